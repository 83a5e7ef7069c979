#!/usr/bin/env bash
# Issue 33 on a CPU: airbench94_muon's recipe shape through this stack, screened on the
# validation split (the test set chooses nothing). Each job's figures land in
# docs/speed/muon_cpu/summary.json as it ends (benchmarks.trust refreshes it after every job),
# so a later session continues the study from there (the run folders beside it are git-ignored).
#
# The selection rule, fixed before the first run (2026-12-03):
#   - the figure is best_val_acc of `--preset 94 --val-size 5000` plus the variant's flags:
#     43,000 training images, 5,000 validation, 2,000 for the temperature, tuning seed 0;
#   - the bar is the old 13-epoch preset's 93.16% (mean of 4 seeds; its worst seed 93.00%) from
#     the GPU sweep (BENCHMARKS.md, "Which levers"), on the same split;
#   - on a CPU one seed is a screen, not a choice: a variant whose seed-0 figure is at least
#     93.00% (the bar's worst seed) goes on to seeds 1-3 (a lent GPU: research/gpu_speed.sh's
#     form); the cheapest in PFLOP whose 4-seed mean reaches 93.16% is then measured once on
#     untuned test seeds 8-11, trained on all 48,000 images;
#   - wall times here share the CPU with other work and are not figures; only accuracy is.
#
#   nice -n 19 bash research/muon_cpu.sh ../shared/data/cifar10 > /tmp/muon_cpu.log 2>&1 &
#
# Round 2 (2026-12-03, a 2-core AMD EPYC with AVX512-BF16, written before its first run), same
# rule, into docs/speed/muon_cpu/round2/: the batch-1,024 job of round 1 is dropped, the GPU sweep
# measured it with 4 seeds (92.85%, BENCHMARKS "Which levers"). Its best 8-epoch Muon variant,
# `--muon-lr 0.15 --warmup-fraction 0.1` with Lookahead, was 0.02 short (93.14%); round 2 adds
# the lever the issue names, the 2,000 temperature images given back to training
# (`--calibrate val`: T fitted on the validation split, so 45,000 images train). A preset would
# then ship T and check it per run (test ECE <= 0.015). Seeds 1-3 follow only if seed 0 passes:
#   ROUND=2 nice -n 19 bash research/muon_cpu.sh ../shared/data/cifar10 [SEEDS...]
# (seed 0 wrote summary_seed0.json; an invocation rewrites summary.json with its own jobs only.)
# Then, fixed before seeds 1-3 ended: if the 4-seed validation mean is at least 93.16%, the
# candidate is `--preset 94 --optimizer muon --epochs 8 --muon-lr 0.15 --warmup-fraction 0.1
# --calibrate fixed --temperature T`, T the mean of the 4 seeds' T (fitted on the validation
# split), trained on all 50,000 images (0.277 PFLOP as printed); on untuned test seeds 8-11 it
# replaces --preset 94 if their mean test accuracy is at least 94.0%, each seed's test ECE at most
# 0.015, and its training time at most 0.8x the old preset's on the same machine, alone.
# Preset 90 with the same levers (2026-12-04, a 2-core AMD EPYC with AVX512-BF16, written before
# its first run), into docs/speed/muon_cpu/p90/: `--preset 90 --val-size 5000` plus Muon at
# --muon-lr 0.15 --warmup-fraction 0.1 and the temperature images given back (--calibrate val), at 5
# and 4 epochs (the shipped preset trains 6), seeds 0-3. The bar is the shipped preset's validation
# mean on the same seeds and split, 89.28% (docs/speed/cpu_90_muon.json, BENCHMARKS "Which levers").
# The fewest epochs whose 4-seed mean reaches it is then run on untuned test seeds 8-11 with
# --calibrate fixed --temperature T (T the mean of its 4 validation seeds), all 50,000 images; it
# replaces --preset 90 if their mean test accuracy is at least 90.0% and each seed's test ECE is at
# most 0.015. Else --preset 90 stays as it is.
#   ROUND=90 bash research/muon_cpu.sh ../shared/data/cifar10 [SEEDS...]
# Preset 90, second try (2026-12-06, a 2-core AMD EPYC with AVX512-BF16, written before its first
# run), into docs/speed/muon_cpu/p90jpeg/. The 5-epoch recipe above failed only on ECE with T
# shipped (0.0155 and 0.0158 on 2 of 4 seeds); preset 90 now fits T on its 2,000 held-out images
# and their JPEG-75 copies (calib_jpeg), which brought the SGD preset's ECE to 0.008-0.009. The
# same 5 Muon epochs with the preset's own calibration (48,000 images train: 0.046 PFLOP against
# the preset's 0.055) on untuned test seeds 8-11 replace --preset 90's recipe if their mean test
# accuracy is at least 90.0% and each seed's test ECE is at most 0.015. Else it stays as it is.
#   ROUND=90jpeg bash research/muon_cpu.sh ../shared/data/cifar10 [SEEDS...]
# Seven epochs, for the stretch target of 0.27 PFLOP (2026-12-06, a 2-core AMD EPYC with AVX512-BF16,
# written before its first run), into docs/speed/muon_cpu/e7/ then e7test/. The GPU sweep gave
# `--muon-lr 0.15` with Lookahead 93.11% at 7 epochs (3 seeds, warm-up 0.2, 43,000 images); the
# shipped 8-epoch recipe adds --warmup-fraction 0.1 and the temperature images (--calibrate val),
# which took 8 epochs from 93.14% to 93.24%. The same at 7 epochs: 0.242 PFLOP on 50,000 images.
# Seed 0 on the validation split is the screen (at least 93.00% goes on to seeds 1-3); if the
# 4-seed validation mean is at least 93.16%, `--preset 94 --epochs 7 --calibrate fixed
# --temperature T` (T the mean of the 4 seeds' T) trains on untuned test seeds 8-11, and replaces
# the preset's 8 epochs if their mean test accuracy is at least 94.0% and each seed's test ECE is
# at most 0.015. Else the preset stays at 8 epochs. The script runs the whole chain by that rule:
#   ROUND=7 nice -n 19 bash research/muon_cpu.sh ../shared/data/cifar10 > /tmp/e7.log 2>&1 &
# If round 7 stops on the validation split (written 2026-12-06 while its seeds 2-3 ran, before any
# run of this one), the other way under 0.27 PFLOP: the shipped 8 epochs with 2,000 images held
# out for the temperature again (--calibrate heldout: T fitted per run), so 48,000 images train:
# 0.265 PFLOP. Its validation figure is already known (the 8 epochs reached the bar on 43,000 and
# 45,000 training images: 93.14% and 93.24%), so it goes straight to untuned test seeds 8-11, into
# docs/speed/muon_cpu/heldout8/, and replaces the preset's shipped temperature if their mean test
# accuracy is at least 94.0% and each seed's test ECE is at most 0.015. Else the preset stays.
#   ROUND=heldout8 nice -n 19 bash research/muon_cpu.sh ../shared/data/cifar10 [SEEDS...]
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: research/muon_cpu.sh DATA_DIR}
if [ "${ROUND:-1}" = 2 ]; then
    shift
    exec .venv/bin/python -m benchmarks.trust --data-dir "$data" --out docs/speed/muon_cpu/round2 --no-corruptions \
        --seeds "${@:-0}" \
        --variant "muon8_la_cal=--preset 94 --val-size 5000 --optimizer muon --epochs 8 --muon-lr 0.15 --warmup-fraction 0.1 --calibrate val"
fi
if [ "${ROUND:-1}" = 7 ]; then
    e7="--preset 94 --val-size 5000 --optimizer muon --epochs 7 --muon-lr 0.15 --warmup-fraction 0.1 --calibrate val"
    trust() { .venv/bin/python -m benchmarks.trust --data-dir "$data" --no-corruptions "$@"; }
    field() {  # field KEY: the summary's mean of KEY over the seeds that ran (nothing printed if absent: the gate then stops)
        .venv/bin/python -c "import json; s=json.load(open('docs/speed/muon_cpu/e7/summary.json'))['summary']['muon7_la_cal']; print(s['$1']['mean'])"
    }
    trust --out docs/speed/muon_cpu/e7 --seeds 0 --variant "muon7_la_cal=$e7"
    awk -v v="$(field best_val_acc)" 'BEGIN { exit !(v >= 0.93) }' || { echo "e7: seed 0 below 93.00%: stop"; exit 0; }
    trust --out docs/speed/muon_cpu/e7 --seeds 0 1 2 3 --variant "muon7_la_cal=$e7"
    awk -v v="$(field best_val_acc)" 'BEGIN { exit !(v >= 0.9316) }' || { echo "e7: 4-seed mean below 93.16%: stop"; exit 0; }
    t=$(printf '%.3f' "$(field temperature)")
    echo "e7: passes on validation; test seeds with T=$t"
    exec .venv/bin/python -m benchmarks.trust --data-dir "$data" --no-corruptions --out docs/speed/muon_cpu/e7test \
        --seeds 8 9 10 11 --variant "muon7_fixedT=--preset 94 --epochs 7 --calibrate fixed --temperature $t"
fi
if [ "${ROUND:-1}" = heldout8 ]; then
    shift
    exec .venv/bin/python -m benchmarks.trust --data-dir "$data" --out docs/speed/muon_cpu/heldout8 --no-corruptions \
        --seeds ${@:-8 9 10 11} --variant "muon8_heldout=--preset 94 --calibrate heldout"
fi
if [ "${ROUND:-1}" = test ]; then  # the step after round 2: untuned test seeds, all 50,000 images, T shipped
    shift
    exec .venv/bin/python -m benchmarks.trust --data-dir "$data" --out docs/speed/muon_cpu/test --no-corruptions \
        --seeds ${@:-8 9 10 11} \
        --variant "muon8_fixedT=--preset 94 --optimizer muon --epochs 8 --muon-lr 0.15 --warmup-fraction 0.1 --calibrate fixed --temperature 0.463"
fi
if [ "${ROUND:-1}" = 90test ]; then  # p90's choice (5 epochs: 89.73% on validation, 4 gave 89.12%), T = mean of its 4 seeds' T
    shift
    exec .venv/bin/python -m benchmarks.trust --data-dir "$data" --out docs/speed/muon_cpu/p90test --no-corruptions \
        --seeds ${@:-8 9 10 11} \
        --variant "muon5_fixedT=--preset 90 --optimizer muon --muon-lr 0.15 --warmup-fraction 0.1 --epochs 5 --calibrate fixed --temperature 0.465"
fi
if [ "${ROUND:-1}" = 90jpeg ]; then
    shift
    exec .venv/bin/python -m benchmarks.trust --data-dir "$data" --out docs/speed/muon_cpu/p90jpeg --no-corruptions \
        --seeds ${@:-8 9 10 11} \
        --variant "muon5_heldout_jpeg=--preset 90 --optimizer muon --muon-lr 0.15 --warmup-fraction 0.1 --epochs 5"
fi
if [ "${ROUND:-1}" = 90old ]; then  # the SGD preset 90 until 2026-12-06, for the time ratio on one machine (flags spelled out)
    shift
    exec .venv/bin/python -m benchmarks.trust --data-dir "$data" --out docs/speed/muon_cpu/p90old --no-corruptions \
        --seeds ${@:-9} \
        --variant "sgd6=--preset 90 --optimizer sgd --lr 1.5 --epochs 6 --warmup-fraction 0.2"
fi
if [ "${ROUND:-1}" = old ]; then  # the old 94 recipe, for the time ratio back to back on one machine (flags spelled out: they outlive the preset)
    shift
    exec .venv/bin/python -m benchmarks.trust --data-dir "$data" --out docs/speed/muon_cpu/test_old --no-corruptions \
        --seeds ${@:-8} \
        --variant "sgd11=--preset 94 --optimizer sgd --epochs 11 --warmup-fraction 0.2 --calibrate heldout"
fi
if [ "${ROUND:-1}" = 90 ]; then
    shift
    p90="--preset 90 --val-size 5000 --optimizer muon --muon-lr 0.15 --warmup-fraction 0.1 --calibrate val"
    exec .venv/bin/python -m benchmarks.trust --data-dir "$data" --out docs/speed/muon_cpu/p90 --no-corruptions \
        --seeds ${@:-0 1 2 3} --variant "muon5=$p90 --epochs 5" --variant "muon4=$p90 --epochs 4"
fi
base="--preset 94 --val-size 5000 --optimizer muon --no-lookahead --warmup-fraction 0"
exec .venv/bin/python -m benchmarks.trust --data-dir "$data" --out docs/speed/muon_cpu --no-corruptions --seeds 0 \
    --variant "muon8_b2000=$base --epochs 8 --batch-size 2000 --weight-decay 0.00267" \
    --variant "muon8_b1024=$base --epochs 8"
