"""CPU inference throughput of one checkpoint as eager PyTorch, TorchScript and onnxruntime,
measured in one run, with ratios against eager. Prints; asserts nothing.

    python scripts/benchmark_inference.py lightning_logs/version_0/checkpoints/last.ckpt [--seconds 3]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from cifar_lightning.checkpoint import classifier_from_checkpoint, load_checkpoint
from cifar_lightning.export import check_images, export
from cifar_lightning.inference import OnnxNetwork
from cifar_lightning.models import with_tta


def throughput(fn, x: torch.Tensor, seconds: float) -> float:
    """Images per second of fn(x), after a warm-up, over at least ``seconds``."""
    for _ in range(3):
        fn(x)
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        fn(x)
        n += 1
    return n * len(x) / elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    p.add_argument("--batch-sizes", default="1,256")
    p.add_argument("--tta", type=int, choices=(0, 1, 2), help="test-time views in every engine (default: the checkpoint's)")
    args = p.parse_args()
    ckpt = Path(args.checkpoint)
    module = classifier_from_checkpoint(load_checkpoint(ckpt), ckpt)
    images, _ = check_images(ckpt, None, 256, download=False, random_ok=True)
    tta = module.hparams.tta if args.tta is None else args.tta
    net = with_tta(module.net.eval(), tta)
    with tempfile.TemporaryDirectory() as tmp:
        export(module, ckpt, "onnx", Path(tmp) / "m.onnx", images, tta=tta)
        export(module, ckpt, "torchscript", Path(tmp) / "m.ts", images, tta=tta)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(Path(tmp) / "m.ts"))
        onnx = OnnxNetwork(Path(tmp) / "m.onnx")
        engines = {"eager PyTorch": net, "TorchScript": scripted, "onnxruntime": onnx}
        print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
              f"model {module.hparams.model}, test-time views level {tta}, torch {torch.__version__}")  # fmt: skip
        print(f"{'engine':<15}{'batch':>7}{'images/s':>12}{'vs eager':>10}")
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            x = images[:bs].contiguous()
            eager = None
            for name, fn in engines.items():
                with torch.inference_mode():
                    ips = throughput(fn, x, args.seconds)
                eager = eager or ips
                print(f"{name:<15}{bs:>7}{ips:>12,.0f}{ips / eager:>9.2f}x")


if __name__ == "__main__":
    main()
