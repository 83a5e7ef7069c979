#!/usr/bin/env bash
# Issue 34 on a lent GPU: what research/photo95_cpu.sh runs on a CPU, with the same flags and rules (its header),
# four jobs at a time: round 2's pick (r95_muon_half) on untuned test seeds 8-11, and round 3's screen (more JPEG,
# validation split, seed 0), whose rule decides from the figures whether it counts. The data comes in two calls:
#   call 1, carry .gpu-data/part1.npz:  bash research/gpu_photo95.sh unpack .gpu-data/part1.npz
#   call 2, carry .gpu-data/part2.npz:  bash research/gpu_photo95.sh run [SEEDS...]
# Each round's summary.json (and each seed's evaluate metrics) lands in $OUT/ as its jobs end; the checkpoints
# stay in /tmp there. Name only the seeds still missing: those run on a CPU are in docs/speed/photo95/muon/test/.
source research/gpu_common.sh
shift
R=/tmp/photo95
save() { mkdir -p "$OUT/$1"; cp "$R/$1/summary.json" "$R/$1/summary.md" "$OUT/$1/" 2>/dev/null
         for m in "$R/$1"/*/seed*/report/metrics.json; do [ -f "$m" ] && cp "$m" "$OUT/$1/$(basename "$(dirname "$(dirname "$m")")")_metrics.json"; done; }
PYTHON=python3 ROOT=$R ACCEL=gpu WORKERS=4 ROUND=muontest timeout 420 bash research/photo95_cpu.sh "$D" "${@:-8 9 10 11}" > "$OUT/muontest.log" 2>&1
save muon/test
PYTHON=python3 ROOT=$R ACCEL=gpu WORKERS=1 ROUND=jpeg timeout 150 bash research/photo95_cpu.sh "$D" > "$OUT/jpeg.log" 2>&1
save jpeg
tail -5 "$OUT/muontest.log" "$OUT/jpeg.log"
