#!/usr/bin/env bash
# Issue 14 on a lent GPU machine, the presets call (research/gpu_presets.py says what it runs and how it chooses).
# The data comes in two calls (python -m research.gpu_data pack; ../shared/docs/GPU.md):
#   call 1, carry .gpu-data/part1.npz:   bash research/gpu_presets.sh unpack .gpu-data/part1.npz
#   call 2, carry .gpu-data/part2.npz:   LIMIT=480 bash research/gpu_presets.sh run
source research/gpu_common.sh
LIMIT=${LIMIT:-480}
mkdir -p /tmp/gp
# Job control: the run below gets a process group of its own (its id is $run), so what it started and left
# running (benchmarks.trust, its cifar-train jobs) is stopped with it, by that group, finished or timed out.
set -m
timeout "$LIMIT" python3 -m research.gpu_presets --data-dir "$D" --out /tmp/gp --limit $((LIMIT - 90)) > "$OUT/presets.log" 2>&1 &
run=$!
wait "$run"
kill -- -"$run" 2>/dev/null; sleep 1
grep -v Warning "$OUT/presets.log"
# What comes back: summaries, the choice, every job's log (not the checkpoints).
(cd /tmp/gp && find . \( -name 'summary.*' -o -name choice.json -o -name '*.log' -o -name results.json \) -print0 | tar -cf - --null -T - | tar -C "$OUT" -xf -)
