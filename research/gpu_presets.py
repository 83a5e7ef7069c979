"""Issue 14 on a lent GPU, the presets call: pick the epochs of presets 90, 93 and 95 on the
validation split (tuning seeds 0-3), then measure the picks and --preset 96 on the test set with
4 seeds nothing was tuned with (8-11), all through the real command line (benchmarks.trust).

    python3 -m research.gpu_presets --data-dir .gpu-cifar --out $OUT      (from the repository root)

The rules, fixed before any run:
  90, 93  the fewest epochs with the alternating flip + Lookahead whose validation mean is at least
          the shipped preset's, measured in the same sweep; none: the preset stays as it is.
  95      the fewest epochs whose validation mean is at least 94.25%: 95% less the smallest
          validation-to-test gap measured for the 94 recipe (93.21% -> 93.96%, 0.75 points);
          none: the most epochs tried.
  96      airbench96's published recipe as shipped; nothing is chosen.
Before all that, ``--preset 94`` runs alone once, for its GPU time. Prints JSON lines; writes
choice.json, the sweeps' summary.json files and the logs' tails into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import REPO
from research.sweeps import TEST_SEEDS, TUNE_SEEDS, Deadline, parser
from research.sweeps import trust as trust_command

AFLA = "--alternate-flip --lookahead"
#: preset -> (the shipped preset's flags, {epochs: candidate flags}), candidates fewest epochs first
SWEEP = {
    "90": ({"b6": "--preset 90 --val-size 5000"}, {5: f"--preset 90 --val-size 5000 {AFLA} --epochs 5",
                                                   4: f"--preset 90 --val-size 5000 {AFLA} --epochs 4"}),
    "93": ({"b8": "--preset 93 --val-size 5000"}, {7: f"--preset 93 --val-size 5000 {AFLA} --epochs 7",
                                                   6: f"--preset 93 --val-size 5000 {AFLA} --epochs 6"}),
    "95": ({}, {13: "--preset 95 --val-size 5000 --epochs 13", 12: "--preset 95 --val-size 5000 --epochs 12"}),
}
BAR_95 = 0.9425


def trust(out: Path, args: argparse.Namespace, seeds: list[str], variants: dict[str, str], workers: int, deadline: float) -> list[str]:
    """The sweeps' ``benchmarks.trust`` call, without the corruptions: presets are chosen on clean accuracy."""
    return trust_command(out, args, seeds, variants, workers, deadline, "--no-corruptions")


def val_mean(summary: dict, name: str) -> float | None:
    s = summary.get(name, {})
    return s["best_val_acc"]["mean"] if len(s.get("seeds", [])) == len(TUNE_SEEDS) and "best_val_acc" in s else None


def choose(summary: dict) -> dict[str, dict]:
    picks = {}
    for preset, (base, candidates) in SWEEP.items():
        bar = val_mean(summary, next(iter(base))) if base else BAR_95
        means = {e: val_mean(summary, f"p{preset}e{e}") for e in candidates}
        ok = sorted(e for e, m in means.items() if m is not None and bar is not None and m >= bar)
        if ok:
            picks[preset] = {"epochs": ok[0], "flags": candidates[ok[0]].replace(" --val-size 5000", ""), "bar": bar, "val": means}
        elif preset == "95":
            e = max(candidates)
            picks[preset] = {"epochs": e, "flags": candidates[e].replace(" --val-size 5000", ""), "bar": bar, "val": means,
                             "note": "no candidate met the bar"}  # fmt: skip
        else:
            picks[preset] = {"epochs": None, "flags": f"--preset {preset}", "bar": bar, "val": means, "note": "kept as shipped"}
    return picks


def main() -> None:
    args = parser(__doc__.splitlines()[0], limit=520).parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    left = Deadline(args.limit).left

    # 0. The shipped 94 preset alone on the GPU, with the conv reference before it.
    from research.gpu_airbench import gpu_bf16_conv_rate

    if args.accelerator == "gpu":
        print(json.dumps({"bf16_conv_gflops": gpu_bf16_conv_rate()}), flush=True)
    alone = args.out / "alone94"
    t0 = time.perf_counter()
    with open(args.out / "alone94.log", "w") as log:
        subprocess.call([sys.executable, "-m", "cifar_lightning", "train", "--data-dir", args.data_dir, "--accelerator", args.accelerator,
                         "--no-progress-bar", "--log-dir", str(alone), "--preset", "94", *args.extra.split()], cwd=REPO,
                        stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    r = json.loads((alone / "version_0/results.json").read_text()) if (alone / "version_0/results.json").is_file() else {}
    print(json.dumps({"run": "p94 alone", "command_s": time.perf_counter() - t0, "test_acc": r.get("test_acc"),
                      "wall_seconds": r.get("wall_seconds"), "train_seconds": sum(r.get("train_seconds") or [])}), flush=True)  # fmt: skip

    # 1. --preset 96 on the test seeds, in the background: nothing to choose.
    log96 = open(args.out / "p96.log", "w")
    p96 = subprocess.Popen(trust(args.out / "p96", args, TEST_SEEDS, {"p96": "--preset 96"}, 4, left()), cwd=REPO,
                           stdout=log96, stderr=subprocess.STDOUT)  # fmt: skip
    # 2. The validation sweep, then the choice.
    variants = {}
    for preset, (base, candidates) in SWEEP.items():
        variants |= base
        variants |= {f"p{preset}e{e}": flags for e, flags in candidates.items()}
    with open(args.out / "sweep.log", "w") as log:
        subprocess.call(trust(args.out / "sweep", args, TUNE_SEEDS, variants, 4, left() - 120), cwd=REPO, stdout=log,
                        stderr=subprocess.STDOUT)  # fmt: skip
    summary = json.loads((args.out / "sweep/summary.json").read_text())["summary"]
    picks = choose(summary)
    (args.out / "choice.json").write_text(json.dumps(picks, indent=2))
    print(json.dumps({"choice": picks}), flush=True)
    # 3. The picks on the test seeds.
    tests = {f"t{k}": v["flags"] for k, v in picks.items()}
    with open(args.out / "test.log", "w") as log:
        subprocess.call(trust(args.out / "test", args, TEST_SEEDS, tests, 4, left()), cwd=REPO, stdout=log,
                        stderr=subprocess.STDOUT)  # fmt: skip
    p96.wait()
    log96.close()
    for name in ("sweep", "test", "p96"):
        f = args.out / name / "summary.md"
        print(f"== {name}\n{f.read_text() if f.is_file() else '(none)'}", flush=True)


if __name__ == "__main__":
    main()
