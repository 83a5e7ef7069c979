"""airbench's 94% recipe (the ``airbench`` package, 0.1.8) on the same GPU and data as ours.

airbench reads ``cifar10/train.pt`` and ``cifar10/test.pt`` (uint8 NHWC images, labels,
classes) from the working directory and downloads them with torchvision when missing; a lent
GPU machine has no internet, so ``--data-dir`` (our image tree) is written in that form first.
Then ``warmup94`` and ``--runs`` timed runs of ``train94``; prints one JSON line per run with
airbench's own time (CUDA events: whitening init, epochs and the TTA test) and the wall
time of the call (which adds its untimed per-epoch evaluations), and the bf16 conv reference rate
of this GPU (the harness's reference convolution, benchmarks/harness.py), before and after.

    python -m research.gpu_airbench --data-dir /tmp/cifar10 --work /tmp/ab --runs 4
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.harness import reference_rate


def gpu_bf16_conv_rate() -> float:
    """GFLOP/s of the reference 3x3 convolution in bf16 on this GPU (Timer synchronises each block)."""
    return reference_rate("bf16-mixed", device="cuda", reps=20)


def write_airbench_data(data_dir: str, work: Path) -> None:
    from cifar_lightning.data import load_splits

    splits = load_splits(data_dir, download=False)
    (work / "cifar10").mkdir(parents=True, exist_ok=True)
    for name in ("train", "test"):
        s = splits[name]
        # Our tree lists the images class by class; torchvision's files are mixed, and airbench sets
        # its whitening layer from the first 5,000 images: a fixed shuffle keeps that a fair sample.
        order = torch.randperm(len(s.labels), generator=torch.Generator().manual_seed(0))
        images = s.images[order].permute(0, 2, 3, 1).contiguous()  # (N, 32, 32, 3) uint8, torchvision's layout
        data = {"images": images, "labels": s.labels[order].long(), "classes": list(s.classes)}
        torch.save(data, work / "cifar10" / f"{name}.pt")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--runs", type=int, default=4)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    write_airbench_data(args.data_dir, args.work)
    os.chdir(args.work)
    import airbench

    print(json.dumps({"gpu": torch.cuda.get_device_name(), "bf16_conv_gflops": gpu_bf16_conv_rate()}), flush=True)
    airbench.warmup94()
    for run in range(args.runs):
        out = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out):
            airbench.train94(run=run)
        wall = time.perf_counter() - t0
        # airbench's table: | run | epoch | train_loss | train_acc | val_acc | tta_val_acc | total_time_seconds |;
        # its last row (epoch "eval") has the TTA test accuracy and the timed total (training + TTA test).
        rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in out.getvalue().splitlines() if r.startswith("|")]
        final = next((r for r in reversed(rows) if len(r) == 7 and r[1] == "eval"), None)
        print(json.dumps({"airbench_run": run, "tta_test_acc": float(final[5]) if final else None,
                          "airbench_seconds": float(final[6]) if final else None, "wall_seconds": wall}), flush=True)  # fmt: skip
    print(json.dumps({"bf16_conv_gflops_after": gpu_bf16_conv_rate()}), flush=True)


if __name__ == "__main__":
    main()
