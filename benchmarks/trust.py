"""How far to trust a prediction: calibration and corruption robustness of training recipes,
over seeds, through the real command lines (``cifar-train``, then ``cifar-evaluate --corruptions``).

Each variant is a set of cifar-train flags; every (variant, seed) pair is one training run and
one evaluation, several at a time (``--workers``). Prints a table of test accuracy, ECE before
and after calibration, JPEG-75 accuracy and mean corrupted accuracy per variant (mean over
seeds, and the worst seed), and writes summary.json and summary.md into --out, refreshed after
every finished job so a run cut short still reports what it finished.

Training seconds are also given normalised by the 3x3 conv rate in the precision each job
trained in (bf16 only where the hardware runs it natively, else fp32), measured before the first
job and after the last (benchmarks/harness.py; normalised s = raw s x rate / 1000 GFLOP/s). With
several workers the jobs shared the machine, so their times are not those of a run alone.

    python -m benchmarks.trust --data-dir ../shared/data/cifar10 --out /tmp/trust --seeds 0 1 2 3 \\
        --variant "standard=--preset 94 --augment standard --calibrate none" --variant "robust=--preset 94 --augment robust"
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, device_for, normalised, rate_label, reference_rate, training_precision
from cifar_lightning import runs

DEFAULT_VARIANTS = [
    "standard=--preset 94 --augment standard --calibrate none",
    "robust=--preset 94",
]


def run_job(name: str, flags: str, seed: int, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    logs = args.out / name / f"seed{seed}"
    log = logs / "job.log"
    logs.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "cifar_lightning"]
    run = newest_run(logs)
    # A job an earlier invocation finished is read back, and one it left mid-run resumes from its
    # last.ckpt (exactly, as any run does), so a study cut off by a session's end goes on from there.
    done, stopped = (run / runs.RESULTS).is_file(), runs.last_checkpoint(run).is_file()
    recipe = ["--resume", "last"] if stopped and not done else ["--seed", str(seed), *flags.split()]
    train = [*base, "train", "--data-dir", args.data_dir, "--log-dir", str(logs), "--accelerator", args.accelerator,
             "--no-progress-bar", *recipe]  # fmt: skip
    t0 = time.perf_counter()
    with open(log, "a") as f:
        code = 0 if done else subprocess.call(train, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        result: dict[str, Any] = {"variant": name, "seed": seed, "flags": flags, "train_exit": code}
        if stopped and not done:
            result["resumed"] = True
        run = newest_run(logs)
        if code != 0 or not (run / runs.RESULTS).is_file():
            return result
        r = json.loads((run / runs.RESULTS).read_text())
        result |= {k: r.get(k) for k in ("test_acc", "test_ece", "test_ece_uncalibrated", "wall_seconds", "best_val_acc")}
        result["temperature"] = (r.get("calibration") or {}).get("temperature")
        result["train_seconds"] = sum(r.get("train_seconds") or [])
        config = r.get("config") or {}
        result["precision"] = run_precision(config.get("precision", "auto"), config.get("accelerator", args.accelerator))
        if args.corruptions:
            evaluate = [*base, "evaluate", r["best_checkpoint"], "--data-dir", args.data_dir, "--corruptions",
                        "--accelerator", args.accelerator, "--out", str(logs / "report"), "--grid", "16",
                        "--split", args.split]  # fmt: skip
            metrics_file = logs / "report" / "metrics.json"
            code = 0 if done and metrics_file.is_file() else subprocess.call(evaluate, stdout=f, stderr=subprocess.STDOUT,
                                                                             env=env, cwd=REPO)  # fmt: skip
            result["evaluate_exit"] = code
            if code == 0 and metrics_file.is_file():
                m = json.loads(metrics_file.read_text())
                result["clean_accuracy"] = m["accuracy"]  # on --split (the test split unless asked)
                result["eval_ece"] = m["ece"]
                result["corruption_mean_accuracy"] = m["corruption_mean_accuracy"]
                result["corruption_mean_ece"] = m["corruption_mean_ece"]
                result["jpeg75_accuracy"] = next(r["accuracy"] for r in m["corruptions"]["jpeg"] if r["label"] == "q75")
                result["corruptions"] = {k: [round(r["accuracy"], 4) for r in v] for k, v in m["corruptions"].items()}
    result["job_seconds"] = time.perf_counter() - t0
    return result


def newest_run(logs: Path) -> Path:
    """The job's newest LOG_DIR/version_N (version_0 before its first run)."""
    return max((p for p in logs.glob("version_*") if runs.version_of(p) is not None), key=runs.version_of, default=logs / "version_0")


def run_precision(precision: str, accelerator: str) -> str:
    """The precision a job trained in (its config records what it was given: often 'auto')."""
    from cifar_lightning import training

    return training.resolve_precision(precision, accelerator)


class References:
    """The conv reference rate per precision, measured before the first job (in the precision
    ``--precision auto`` trains in here) and after the last (in every precision a job used):
    what each job's training seconds are normalised by (the mean of the rates measured)."""

    def __init__(self, accelerator: str) -> None:
        self.device = device_for(accelerator)
        self.rates: dict[str, list[float]] = {}
        self.measure(training_precision(accelerator))

    def measure(self, precision: str) -> None:
        self.rates.setdefault(precision, []).append(reference_rate(precision, self.device))

    def rate(self, precision: str | None) -> float | None:
        got = self.rates.get(precision or "")
        return statistics.fmean(got) if got else None

    def normalise(self, results: list[dict[str, Any]]) -> None:
        """Each finished job's normalised training seconds, with the rates measured so far."""
        for r in results:
            rate = self.rate(r.get("precision"))
            if rate and r.get("train_seconds") is not None:
                r["conv_gflops"] = round(rate)
                r["train_norm_s"] = normalised(r["train_seconds"], rate)

    def note(self) -> str:
        rates = "; ".join(rate_label(p, statistics.fmean(v)) for p, v in self.rates.items())
        return f"normalised train s = train s x rate / 1000 GFLOP/s, in each job's precision: {rates} ({self.device})"


KEYS = ("best_val_acc", "test_acc", "test_ece_uncalibrated", "test_ece", "temperature", "clean_accuracy", "eval_ece", "jpeg75_accuracy",
        "corruption_mean_accuracy", "corruption_mean_ece", "train_seconds", "train_norm_s")  # fmt: skip


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["variant"] for r in results):
        rows = [r for r in results if r["variant"] == name and r.get("test_acc") is not None]
        s: dict[str, Any] = {"seeds": [r["seed"] for r in rows], "flags": next(r["flags"] for r in results if r["variant"] == name)}
        for k in KEYS:
            values = [r[k] for r in rows if r.get(k) is not None]
            if values:
                s[k] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "values": values}
        out[name] = s
    return out


def markdown(summary: dict[str, dict[str, Any]], note: str = "") -> str:
    def cell(s: dict[str, Any], k: str, pct: bool) -> str:
        if k not in s:
            return "-"
        v = s[k]
        return f"{v['mean']:.2%} (min {v['min']:.2%})" if pct else f"{v['mean']:.4f}"

    lines = [
        "| variant | seeds | val acc (mean, worst seed) | test acc (mean, worst seed) | ECE before | ECE after | T | JPEG q75 acc "
        "| mean corrupted acc | train s | normalised train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in summary.items():
        t = f"{s['temperature']['mean']:.3f}" if "temperature" in s else "-"
        secs = f"{s['train_seconds']['mean']:.0f}" if "train_seconds" in s else "-"
        norm = f"{s['train_norm_s']['mean']:.0f}" if "train_norm_s" in s else "-"
        lines.append(
            f"| {name} | {len(s['seeds'])} | {cell(s, 'best_val_acc', True)} | {cell(s, 'test_acc', True)} "
            f"| {cell(s, 'test_ece_uncalibrated', False)} "
            f"| {cell(s, 'test_ece', False)} | {t} | {cell(s, 'jpeg75_accuracy', True)} | {cell(s, 'corruption_mean_accuracy', True)} "
            f"| {secs} | {norm} |"
        )
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant", action="append", help="NAME=cifar-train flags (repeatable)")
    p.add_argument("--once", action="append", default=[], help="NAME=flags, trained with the first seed only")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--workers", type=int, default=1, help="jobs at once (each gets cores / workers threads)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--no-corruptions", dest="corruptions", action="store_false")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the split the clean/JPEG/corrupted evaluation reads (val: to choose a recipe; needs --val-size > 0)")
    p.add_argument("--deadline", type=float, default=0, help="seconds after which no new job starts (0: none)")
    args = p.parse_args()
    variants = [v.split("=", 1) for v in (args.variant or DEFAULT_VARIANTS)]
    jobs = [(n, f, s) for n, f in (o.split("=", 1) for o in args.once) for s in args.seeds[:1]]
    jobs += [(n, f, s) for s in args.seeds for n, f in variants]
    threads = max(1, (os.cpu_count() or 2) // args.workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    refs = References(args.accelerator)
    start, results = time.perf_counter(), []

    def write() -> None:
        refs.normalise(results)
        summary = summarise(results)
        (args.out / "summary.json").write_text(json.dumps({"results": results, "summary": summary, "conv_gflops": refs.rates},
                                                          indent=2))  # fmt: skip
        (args.out / "summary.md").write_text(markdown(summary, refs.note()))

    def job(spec: tuple[str, str, int]) -> dict[str, Any]:
        if args.deadline and time.perf_counter() - start > args.deadline:
            return {"variant": spec[0], "seed": spec[2], "flags": spec[1], "skipped": "deadline"}
        r = run_job(*spec, args, env)
        print(json.dumps({k: v for k, v in r.items() if k != "corruptions"}), flush=True)
        return r

    with ThreadPoolExecutor(args.workers) as pool:
        for future in as_completed([pool.submit(job, spec) for spec in jobs]):
            results.append(future.result())
            write()
    for precision in dict.fromkeys(r["precision"] for r in results if r.get("precision")):
        refs.measure(precision)
    write()
    print(markdown(summarise(results), refs.note()))


if __name__ == "__main__":
    main()
