"""What augmentation costs per epoch, against the training step it feeds, measured in one run.

    python -m benchmarks.augment_cost [--images 45000] [--batch-size 64] [--model seed] [--bf16]

For each recipe it times the device-side batch hook (augment + normalise) over one epoch of
uint8 batches, and times training steps of the network on the same batch size (``--bf16``: under
bf16 autocast, as the fast presets train where the CPU runs bf16 natively; else fp32), so the
cost is printed in seconds per epoch, raw and normalised by the 3x3 conv rate in the training
steps' precision measured in the same run, and as a share of a training epoch. Prints; asserts
nothing.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.harness import autocast, call_times, machine, normalised, rate_label, reference_rate
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
    precision = "bf16-mixed" if args.bf16 else "32-true"
    rate = reference_rate(precision)
    torch.manual_seed(0)
    steps = -(-args.images // args.batch_size)
    batch = torch.randint(0, 256, (args.batch_size, 3, 32, 32), dtype=torch.uint8)

    net = build(args.model).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    y = torch.randint(0, 10, (args.batch_size,))
    x = normalize(batch).contiguous(memory_format=torch.channels_last)

    def train_step() -> None:
        with autocast(precision):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(4):  # the optimiser's state, the allocator's pools (Timer warms up once more)
        train_step()
    step_times = call_times(train_step, min_blocks=args.train_steps)
    train_epoch = sum(step_times) / len(step_times) * steps

    print(f"{args.images} images/epoch, batch {args.batch_size}; {machine()}; {rate_label(precision, rate)} in this run")
    print(f"training epoch of '{args.model}' (network only, {'bf16' if args.bf16 else 'fp32'}): {train_epoch:.1f} s "
          f"({normalised(train_epoch, rate):.1f} s normalised)")  # fmt: skip
    print(f"{'augment':<10} {'s/epoch':>8} {'normalised':>11} {'share of training epoch':>24}")
    for mode in AUGMENTS:
        aug = BatchAugment(mode)

        def one_batch(aug: BatchAugment = aug) -> None:
            normalize(aug(batch) if aug.active else batch)

        per_batch = call_times(one_batch, min_run_time=1.0)
        s = sum(per_batch) / len(per_batch) * steps
        print(f"{mode:<10} {s:8.2f} {normalised(s, rate):11.2f} {100 * s / train_epoch:23.1f}%")


if __name__ == "__main__":
    main()
