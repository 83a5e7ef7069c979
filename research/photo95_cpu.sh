#!/usr/bin/env bash
# Issue 34 on a CPU: the 95 widths (128-384-384) as a photo model, screened on the validation split.
# Each job's figures land in docs/speed/photo95/summary.json as it ends (benchmarks.trust), so a
# later session continues from there (the run folders beside it are git-ignored).
#
# The selection rule, fixed before the first run (2026-12-05, a 2-core AMD EPYC with AVX512-BF16):
#   - each candidate is `--preset 95` (13 epochs, 1.13 PFLOP: the issue's budget, nothing to start
#     from) with `--augment robust --jpeg-quality-min 50` switched on late (`--robust-from F`), so
#     that the wider network first learns clean images, as pretrained:94 did before `--preset photo`;
#   - the figures are clean, JPEG-75 and the mean of the 19 corrupted copies on the validation split
#     `--val-size 2000` (split_seed 0: the same 2,000 images the photo tuning run was scored on,
#     93.40% / 90.40% / 84.00%, BENCHMARKS "A preset for photos"), tuning seed 0; on a CPU one seed
#     is a screen: 45 minutes a candidate here;
#   - a candidate goes on to untuned test seeds 8-11 (all 48,000 training images, `--val-size 0`)
#     if its seed-0 figures reach clean >= 94.0%, JPEG-75 >= 92.0% and corrupted >= 85%; if none
#     does, the one with the best mean of clean and JPEG-75 is the study's best, and no test seed
#     runs for it unless that mean beats the photo tuning run's (91.90%).
#   - wall times here share the CPU with other work and are not figures; only accuracy is.
#
#   nice -n 19 bash research/photo95_cpu.sh ../shared/data/cifar10 > /tmp/photo95.log 2>&1 &
#
# Round 1 (seed 0, docs/speed/photo95/summary.json): r95_half reached 94.10% clean, 92.00% JPEG-75
# and 86.31% corrupted on the validation split: all three bars, so by the rule it goes on to the
# untuned test seeds 8-11 with all 48,000 training images (2,000 held out for T, as the preset does):
#   ROUND=test nice -n 19 bash research/photo95_cpu.sh ../shared/data/cifar10 [SEEDS...]
# Its figures land in docs/speed/photo95/test/summary.json as each seed ends.
# Test seed 8 (2026-12-06): 93.39% clean, 91.25% JPEG-75: the validation split (94.10%) overstated
# it, and seeds 9-11 were not run (BENCHMARKS, "The 95 widths as a photo model").
#
# Round 2 (rule fixed 2026-12-06 before its run, a 2-core AMD EPYC with AVX512-BF16): Muon, which
# gave the 94 widths the SGD recipe's accuracy in 0.74x the FLOPs, on the same 13 epochs of the 95
# widths (`--optimizer muon --muon-lr 0.15 --warmup-fraction 0.1`, preset 94's Muon settings), robust
# for the second half. Same split and seed as round 1, for an A/B against r95_half on the same 2,000
# images (that split overstated r95_half by 0.7-0.8 points against the test set, so its absolute
# bars do not decide): it goes on to test seed 8 if it beats r95_half's 94.10% clean and 92.00%
# JPEG-75 both, with corrupted >= 85%; else the study records it and stops there.
#   ROUND=muon nice -n 19 bash research/photo95_cpu.sh ../shared/data/cifar10
# Result (2026-12-06, docs/speed/photo95/muon/summary.json): 94.15% clean, 92.35% JPEG-75, 85.71%
# corrupted on the 2,000 images, against r95_half's 94.10 / 92.00 / 86.31: it beats both bars, so
# by the rule it goes on to the untuned test seeds (all 48,000 training images, T fitted on the
# 2,000 held out and their JPEG-75 copies, as --preset photo fits it):
#   ROUND=muontest nice -n 19 bash research/photo95_cpu.sh ../shared/data/cifar10 [SEEDS...]
# about 80 minutes a seed on this machine, scored on all 10,000 test images with all 19 copies.
# Test seed 8 (2026-12-06): 94.19% clean (ECE 0.0083), 92.12% JPEG-75, 85.47% corrupted: every target on its own;
# its model became pretrained:photo, and --preset photo this recipe. Seeds 9-11 go on (a stopped seed resumes).
# Test seed 9 (2026-12-06): 94.13% clean (ECE 0.0098), 92.36% JPEG-75, 85.56% corrupted; seed 10: 94.11% (ECE
# 0.0079), 92.00%, 85.32%; seed 11: 94.13% (ECE 0.0103), 92.13%, 85.53%. Mean of 8-11: 94.14% clean, 92.15%
# JPEG-75, 85.47% corrupted: every target of issue 34 (round 3 does not run: JPEG-75 is over 92%).
#
# Round 3 (rule fixed 2026-12-06 before test seed 8 of round 2 ended, a 2-core AMD EPYC with AVX512-BF16):
# the screen model of round 2 scored 94.06% clean but 91.82% JPEG-75 on the test set, so the lever left
# is more JPEG in the robust half: the same run with `--jpeg 0.75` (robust's share of re-encoded images,
# 0.5 by default). It runs only if round 2's test seeds leave JPEG-75 under 92.0% (their mean so far)
# while clean is at or above 94.0%. Same split and seed as rounds 1-2 (A/B against r95_muon_half on the
# same 2,000 images); it goes on to test seeds if its JPEG-75 beats r95_muon_half's 92.35% by at least
# 0.25 points (5 images) with clean at most 0.25 points under its 94.15% and corrupted >= 85%.
#   ROUND=jpeg nice -n 19 bash research/photo95_cpu.sh ../shared/data/cifar10
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: research/photo95_cpu.sh DATA_DIR [SEEDS...]}
shift
base="--preset 95 --val-size 2000 --augment robust --jpeg-quality-min 50"
test="--preset 95 --val-size 0 --augment robust --jpeg-quality-min 50"  # the test seeds train on all 48,000
muon="--optimizer muon --muon-lr 0.15 --warmup-fraction 0.1"             # preset 94's Muon settings
# On a lent GPU (research/gpu_photo95.sh): ACCEL=gpu, WORKERS jobs at once, the folders under ROOT.
root=${ROOT:-docs/speed/photo95}
# sweep OUT SPLIT DEFAULT_SEEDS --variant ...: one benchmarks.trust call; the seeds given on the command line win.
sweep() {
    out=$1 split=$2 seeds=$3
    shift 3
    exec ${PYTHON:-.venv/bin/python} -m benchmarks.trust --data-dir "$data" --out "$root$out" \
        --accelerator "${ACCEL:-auto}" --workers "${WORKERS:-1}" --split "$split" --seeds ${given:-$seeds} "$@"
}
given="$*"
case "${ROUND:-screen}" in
    test) sweep /test test "8 9 10 11" --variant "r95_half=$test --robust-from 0.5" ;;
    muontest) sweep /muon/test test "8 9 10 11" --variant "r95_muon_half=$test --robust-from 0.5 $muon --calib-jpeg" ;;
    jpeg) sweep /jpeg val 0 --variant "r95_muon_half_jpeg75=$base --robust-from 0.5 $muon --jpeg 0.75" ;;
    muon) sweep /muon val 0 --variant "r95_muon_half=$base --robust-from 0.5 $muon" ;;
    *) sweep "" val 0 --variant "r95_last3=$base --robust-from 0.77" --variant "r95_half=$base --robust-from 0.5" ;;
esac
