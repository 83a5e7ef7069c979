"""What augmentation costs per epoch, against the training step it feeds, measured in one run.

    python scripts/augment_cost.py [--images 45000] [--batch-size 64] [--model seed] [--bf16]

For each recipe it times the device-side batch hook (augment + normalise) over one epoch of
uint8 batches, and times training steps of the network on the same batch size (``--bf16``: under
bf16 autocast, as the fast presets train), so the cost is printed in seconds per epoch, raw and
normalised by the bf16 3x3 conv rate measured in the same run, and as a share of a training
epoch. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cifar_lightning.augment import BatchAugment
from cifar_lightning.images import normalize
from cifar_lightning.models import build
from cifar_lightning.recipes import AUGMENTS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=45000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model", default="seed")
    p.add_argument("--train-steps", type=int, default=60, help="steps timed to estimate a training epoch")
    p.add_argument("--bf16", action="store_true", help="train under bf16 autocast (the fast presets' precision)")
    args = p.parse_args()
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from benchmark import bf16_conv_rate

    rate = bf16_conv_rate()
    torch.manual_seed(0)
    steps = -(-args.images // args.batch_size)
    batch = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8)

    net = build(args.model).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    y = torch.randint(0, 10, (args.batch_size,))
    x = normalize(batch).contiguous(memory_format=torch.channels_last)
    for i in range(args.train_steps + 5):
        if i == 5:
            t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_epoch = (time.perf_counter() - t) / args.train_steps * steps

    norm = rate / 1000  # normalised s = raw s x rate / 1000 GFLOP/s
    print(f"{args.images} images/epoch, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"bf16 3x3 conv {rate:,.0f} GFLOP/s in this run")  # fmt: skip
    print(f"training epoch of '{args.model}' (network only, {'bf16' if args.bf16 else 'fp32'}): {train_epoch:.1f} s "
          f"({train_epoch * norm:.1f} s normalised)")  # fmt: skip
    print(f"{'augment':<10} {'s/epoch':>8} {'normalised':>11} {'share of training epoch':>24}")
    for mode in AUGMENTS:
        aug = BatchAugment(mode)
        t = time.perf_counter()
        for _ in range(steps):
            normalize(aug(batch) if aug.active else batch)
        s = time.perf_counter() - t
        print(f"{mode:<10} {s:8.2f} {s * norm:11.2f} {100 * s / train_epoch:23.1f}%")


if __name__ == "__main__":
    main()
