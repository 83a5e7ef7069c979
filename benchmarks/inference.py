"""CPU inference throughput of one checkpoint as eager PyTorch (NCHW, and NHWC: channels_last,
as training runs), TorchScript and onnxruntime, measured in one run, with ratios against eager.
Prints; asserts nothing.

    python -m benchmarks.inference lightning_logs/version_0/checkpoints/last.ckpt [--seconds 3]
    python -m benchmarks.inference pretrained:94 --views [--data-dir ../shared/data/cifar10]

``--views``: the test set scored as a run's final test and ``cifar-evaluate`` score it
(``Classifier.score``), at test-time views level 3 (six views on every image), 2 (the four
shifted ones only where the model is unsure) and 1: accuracy, ECE, images through the network
per test image, seconds, and the ratio against level 3.

Inference computes in float32 in every engine, so the images/s are also given normalised by the
fp32 3x3 conv reference measured in the same run (normalised images/s = raw / (rate / 1000
GFLOP/s): the rate on a machine whose reference runs at 1,000 GFLOP/s).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.harness import DEFAULT_DATA, call_times, machine, rate_label, reference_rate
from cifar_lightning.data import load_splits
from cifar_lightning.export import check_images, export
from cifar_lightning.inference import load_classifier
from cifar_lightning.modelfile import OnnxNetwork
from cifar_lightning.models import with_tta
from cifar_lightning.module import ImageClassifier
from cifar_lightning.recipes import TTA_LEVELS

#: what every engine computes in (load_classifier and the exports are float32)
PRECISION = "32-true"


def throughput(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, seconds: float) -> float:
    """Images per second of fn(x), after a warm-up, over at least ``seconds``."""
    with torch.inference_mode():
        fn(x)
        times = call_times(lambda: fn(x), seconds, min_blocks=3)
    return len(x) / (sum(times) / len(times))


class Counted(torch.nn.Module):
    """A network that counts the images it is run on."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.images = net, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.net(x)


def views(spec: str, data_dir: str) -> None:
    test = load_splits(data_dir, download=False)["test"]
    rate = reference_rate(PRECISION)
    print(f"{machine()}; {spec} on the {len(test.labels):,} test images; reference: {rate_label(PRECISION, rate)}")
    print(f"{'level':<7}{'accuracy':>10}{'ECE':>8}{'views':>7}{'seconds':>9}{'vs 3':>7}")
    full = None
    for level in (3, 2, 1):
        clf = load_classifier(spec, tta=level)
        clf.score(test.images[:500], test.labels[:500])  # warm-up
        clf.network.net = counted = Counted(clf.network.net)
        start = time.perf_counter()
        scored = clf.score(test.images, test.labels)
        seconds = time.perf_counter() - start
        full = full or seconds
        print(f"{level:<7}{scored['accuracy']:>10.2%}{scored['ece']:>8.4f}{counted.images / len(test.labels):>7.2f}"
              f"{seconds:>9.1f}{seconds / full:>6.2f}x", flush=True)  # fmt: skip
    print(f"reference after: {rate_label(PRECISION, reference_rate(PRECISION))}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a .ckpt; with --views any model (pretrained:94, an export...)")
    p.add_argument("--seconds", type=float, default=3.0, help="timing per measurement")
    p.add_argument("--batch-sizes", default="1,256")
    p.add_argument("--tta", type=int, choices=TTA_LEVELS, help="test-time views in every engine (default: the checkpoint's)")
    p.add_argument("--views", action="store_true", help="time the test set at views levels 3, 2 and 1 instead")
    p.add_argument("--data-dir", default=str(DEFAULT_DATA), help="for --views")
    args = p.parse_args()
    if args.views:
        return views(args.checkpoint, args.data_dir)
    ckpt = Path(args.checkpoint)
    module = ImageClassifier.from_checkpoint(ckpt)
    images, _ = check_images(ckpt, None, 256, download=False, random_ok=True)
    tta = module.hparams.tta if args.tta is None else args.tta
    net = with_tta(module.net.eval(), tta, module.temperature)
    rate = reference_rate(PRECISION)
    with tempfile.TemporaryDirectory() as tmp:
        export(module, ckpt, "onnx", Path(tmp) / "m.onnx", images, tta=tta)
        export(module, ckpt, "torchscript", Path(tmp) / "m.ts", images, tta=tta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(Path(tmp) / "m.ts"))
        onnx = OnnxNetwork(Path(tmp) / "m.onnx")
        nhwc = copy.deepcopy(net).to(memory_format=torch.channels_last)
        engines = {"eager PyTorch": net, "eager NHWC": lambda x: nhwc(x.contiguous(memory_format=torch.channels_last)),
                   "TorchScript": scripted, "onnxruntime": onnx}  # fmt: skip
        print(f"{machine()}; model {module.hparams.model}, test-time views level {tta}")
        print(f"reference: {rate_label(PRECISION, rate)} (inference computes in fp32); normalised images/s = raw / (rate / 1000)")
        print(f"{'engine':<15}{'batch':>7}{'images/s':>12}{'normalised':>12}{'vs eager':>10}")
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            x = images[:bs].contiguous()
            eager = None
            for name, fn in engines.items():
                ips = throughput(fn, x, args.seconds)
                eager = eager or ips
                print(f"{name:<15}{bs:>7}{ips:>12,.0f}{ips * 1000 / rate:>12,.0f}{ips / eager:>9.2f}x")


if __name__ == "__main__":
    main()
