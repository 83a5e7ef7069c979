#!/usr/bin/env bash
# Issue 14 on a lent GPU machine, as run for docs/BENCHMARKS.md ("On a GPU"): airbench's 94% recipe and
# ours on the same GPU and data in one call, then a validation-split sweep of the fast recipe's levers.
# The data comes in two calls (python -m research.gpu_data pack; ../shared/docs/GPU.md):
#   call 1, carry .gpu-data/part1.npz:                      bash research/gpu_speed.sh unpack .gpu-data/part1.npz
#   call 2, carry .gpu-data/part2.npz .gpu-data/airbench:   bash research/gpu_speed.sh run
source research/gpu_common.sh
# 1. airbench, alone on the GPU: its warm-up, then 4 timed runs (package source carried in .gpu-data/airbench).
PYTHONPATH=$PWD:$PWD/.gpu-data/airbench timeout ${AIRBENCH_LIMIT:-120} python3 -m research.gpu_airbench --data-dir "$D" --work /tmp/ab --runs 4 2>&1 | tee "$OUT/airbench.log" | grep -v Warning
# 2. ours, alone: the preset as it ships, and the Muon candidate, through the real command line.
for spec in "p94=--preset 94" "p94-muon8=--preset 94 --optimizer muon --alternate-flip --epochs 8"; do
    name=${spec%%=*}; flags=${spec#*=}
    timeout 150 python3 -m cifar_lightning train --data-dir "$D" --accelerator gpu --no-progress-bar --log-dir /tmp/alone/$name $flags > "$OUT/$name.log" 2>&1
    python3 -c "import json,sys; r=json.load(open('/tmp/alone/$name/version_0/results.json')); print(json.dumps({'run': '$name', **{k: r[k] for k in ('test_acc','wall_seconds','epochs_run','test_ece','test_ece_uncalibrated')}, 'train_seconds': sum(r['train_seconds'])}))" | tee -a "$OUT/alone.jsonl"
done
# 3. The sweep: validation split only (4 tuning seeds), five jobs at a time, no new job after the deadline.
V="--preset 94 --val-size 5000"
python3 -m benchmarks.trust --data-dir "$D" --out /tmp/sweep --workers ${WORKERS:-5} --accelerator gpu --no-corruptions \
    --deadline ${DEADLINE:-200} --seeds 0 1 2 3 \
    --variant "b13=$V" \
    --variant "mu8=$V --optimizer muon --alternate-flip --epochs 8" \
    --variant "afla10=$V --alternate-flip --lookahead --epochs 10" \
    --variant "mu7=$V --optimizer muon --alternate-flip --epochs 7" \
    --variant "af11=$V --alternate-flip --epochs 11" \
    --variant "mub2k8=$V --optimizer muon --alternate-flip --batch-size 2000 --weight-decay 0.00267 --epochs 8" \
    --variant "mu9=$V --optimizer muon --alternate-flip --epochs 9" \
    --variant "mula8=$V --optimizer muon --alternate-flip --lookahead --epochs 8" \
    --variant "p95mu12=$V --widths 128,384,384 --lr 1.3 --optimizer muon --alternate-flip --epochs 12" \
    > "$OUT/sweep.log" 2>&1
tail -16 "$OUT/sweep.log"
cp /tmp/sweep/summary.json "$OUT/sweep.json"
