"""What the lent-GPU sweeps (gpu_presets.py, gpu_photo.py) share: their command line, their time
limit, and the ``benchmarks.trust`` call that trains and scores each variant on its seeds."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

TUNE_SEEDS, TEST_SEEDS = ["0", "1", "2", "3"], ["8", "9", "10", "11"]


def parser(description: str, limit: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=float, default=limit, help="seconds after which no new job starts")
    p.add_argument("--accelerator", default="gpu")
    p.add_argument("--extra", default="", help="flags added to every run (a smoke test on the CPU: --epochs 1 ...)")
    return p


class Deadline:
    """Seconds left of ``limit`` from now (at least 1, so a late job still gets a valid --deadline)."""

    def __init__(self, limit: float) -> None:
        self.limit, self.start = limit, time.perf_counter()

    def left(self) -> float:
        return max(1.0, self.limit - (time.perf_counter() - self.start))


def trust(out: Path, args: argparse.Namespace, seeds: list[str], variants: dict[str, str], workers: int, deadline: float,
          *flags: str) -> list[str]:  # fmt: skip
    """The ``benchmarks.trust`` command for ``variants`` (name -> cifar-train flags) on ``seeds``."""
    cmd = [sys.executable, "-m", "benchmarks.trust", "--data-dir", args.data_dir, "--out", str(out), "--accelerator",
           args.accelerator, "--workers", str(workers), "--deadline", str(deadline), *flags, "--seeds", *seeds]  # fmt: skip
    for name, flags_ in variants.items():
        cmd += ["--variant", f"{name}={flags_} {args.extra}".strip()]
    return cmd
