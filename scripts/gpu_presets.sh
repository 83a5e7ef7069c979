#!/usr/bin/env bash
# Issue 14 on a lent GPU machine, the presets call (scripts/gpu_presets.py says what it runs and how it chooses).
# The data comes in two calls (scripts/gpu_data.py pack; ../shared/docs/GPU.md):
#   call 1, carry .gpu-data/part1.npz:   bash scripts/gpu_presets.sh unpack .gpu-data/part1.npz
#   call 2, carry .gpu-data/part2.npz:   LIMIT=480 bash scripts/gpu_presets.sh run
source scripts/gpu_common.sh
LIMIT=${LIMIT:-480}
mkdir -p /tmp/gp
timeout "$LIMIT" python3 scripts/gpu_presets.py --data-dir "$D" --out /tmp/gp --limit $((LIMIT - 90)) 2>&1 | tee "$OUT/presets.log" | grep -v Warning
pkill -f benchmark_trust.py; pkill -f "cifar_lightning train"; sleep 1
# What comes back: summaries, the choice, every job's log (not the checkpoints).
(cd /tmp/gp && find . \( -name 'summary.*' -o -name choice.json -o -name '*.log' -o -name results.json \) -print0 | tar -cf - --null -T - | tar -C "$OUT" -xf -)
