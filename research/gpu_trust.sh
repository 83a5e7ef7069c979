#!/usr/bin/env bash
# The trust sweep (python -m benchmarks.trust) on a lent GPU machine, as run for docs/BENCHMARKS.md
# ("Calibration and robustness"). The data comes in two calls (python -m research.gpu_data pack):
#   call 1, carry .gpu-data/part1.npz:  bash research/gpu_trust.sh unpack .gpu-data/part1.npz
#   call 2, carry .gpu-data/part2.npz:  bash research/gpu_trust.sh sweep
source research/gpu_common.sh
T=/tmp/trust
python3 -m benchmarks.trust --data-dir "$D" --out $T --workers ${WORKERS:-5} --accelerator gpu --deadline ${DEADLINE:-330} \
    --seeds 0 1 2 3 \
    --once "seed=--preset seed" \
    --once "p90=--preset 90 --augment robust --noise 0.2 --blur 0.2" \
    --once "p93=--preset 93 --augment robust --noise 0.2 --blur 0.2" \
    --once "c5000=--preset 94 --augment standard --calib-size 5000" \
    --variant "std-nocal=--preset 94 --augment standard --calibrate none" \
    --variant "std-cal=--preset 94 --augment standard" \
    --variant "rob-j50=--preset 94 --augment robust --jpeg 0.5" \
    --variant "rob-all=--preset 94 --augment robust --jpeg 0.5 --noise 0.2 --blur 0.2" 2>&1 | tee "$OUT/sweep.log"
cp $T/summary.json $T/summary.md "$OUT/"
python3 -m research.calibration_size $T/c5000/seed0/version_0/checkpoints/last.ckpt > "$OUT/calib_size.md" 2>&1
for v in rob-all std-cal; do for f in calibration corruptions; do cp $T/$v/seed0/report/$f.png "$OUT/$v-$f.png" 2>/dev/null; done; done
