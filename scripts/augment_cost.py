"""What augmentation costs per epoch, against the training step it feeds, measured in one run.

    python scripts/augment_cost.py [--images 45000] [--batch-size 64] [--model seed]

For each recipe it times the device-side batch hook (augment + normalise) over one epoch of
uint8 batches, and times training steps of the network on the same batch size, so the cost is
printed both in seconds per epoch and as a share of a training epoch. Prints; asserts nothing.
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
    args = p.parse_args()
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
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_epoch = (time.perf_counter() - t) / args.train_steps * steps

    print(f"{args.images} images/epoch, batch {args.batch_size}, {torch.get_num_threads()} threads")
    print(f"training epoch of '{args.model}' (network only): {train_epoch:.1f} s")
    print(f"{'augment':<10} {'s/epoch':>8} {'share of training epoch':>24}")
    for mode in AUGMENTS:
        aug = BatchAugment(mode)
        t = time.perf_counter()
        for _ in range(steps):
            normalize(aug(batch) if aug.active else batch)
        s = time.perf_counter() - t
        print(f"{mode:<10} {s:8.2f} {100 * s / train_epoch:23.1f}%")


if __name__ == "__main__":
    main()
