"""What each change to the seed recipe's CPU training step is worth, measured in one run: the
notebook network's forward + backward + Adam step at batch 64, for the preset as it was (float32,
torch dropout, ReLU before the max-pool, foreach Adam, glibc's default allocator settings) and
with each lever added or taken away.

    python -m research.seed_step                 # about 2 minutes on a 2-core CPU
    python -m research.seed_step --steps 100 --rounds 3
    python -m research.seed_step --network fast --steps 8   # the same levers on the fast presets'
                                                            # network (bf16, batch 1024, Nesterov SGD)

Every variant runs in its own process (the allocator setting is process-wide), in rounds that
interleave the variants, so a machine that slows down part-way slows all of them alike; the
median of the rounds is printed, with the 3x3 conv rate of the same run in the precision this
machine trains in (bf16 only where the CPU runs it natively, else fp32; normalised ms = raw ms x
rate / 1,000 GFLOP/s). Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the children import torch; the parent only starts them
    import torch

#: name -> (precision, byte dropout, ReLU after pool, fused Adam, keep freed memory, NHWC gradient
#: at the flatten, compile, dense layer by hand)
VARIANTS: dict[str, tuple[str, bool, bool, bool, bool, bool, bool, bool]] = {
    "the preset before (fp32, torch dropout, ReLU->pool, foreach Adam)": ("fp32", False, False, False, False, False, False, False),
    "+ bf16 autocast": ("bf16", False, False, False, False, False, False, False),
    "+ bf16, fused Adam": ("bf16", False, False, True, False, False, False, False),
    "+ bf16, fused Adam, byte dropout": ("bf16", True, False, True, False, False, False, False),
    "+ bf16, fused Adam, byte dropout, pool->ReLU": ("bf16", True, True, True, False, False, False, False),
    "+ glibc keeps freed memory (the preset until 2026-12-06)": ("bf16", True, True, True, True, False, False, False),
    "the preset now (+ NHWC gradient at the flatten)": ("bf16", True, True, True, True, True, False, False),
    "the preset now in fp32": ("fp32", True, True, True, True, True, False, False),
    "the preset now + torch.compile": ("bf16", True, True, True, True, True, True, False),
    "the preset now + the dense layer's gradient cast contiguously": ("bf16", True, True, True, True, True, False, True),
}


def dense_by_hand(linear: torch.nn.Linear) -> None:
    """Autocast's dense layer casts its weight gradient back to float32 from a transposed bf16
    tensor (1.6-2 ms of the step in torch.profiler); this computes the same values (bit for bit,
    checked on the seed network's 4096 -> 512 layer) with that gradient contiguous."""
    import torch

    class Dense(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, b):  # noqa: ANN001, ANN205
            wb = w.to(torch.bfloat16)
            ctx.save_for_backward(x, wb)
            return torch.addmm(b.to(torch.bfloat16), x, wb.t())

        @staticmethod
        def backward(ctx, g):  # noqa: ANN001, ANN205
            x, wb = ctx.saved_tensors
            return g @ wb, (g.t() @ x).float(), g.sum(0).float()

    linear.forward = lambda x: Dense.apply(x.to(torch.bfloat16), linear.weight, linear.bias)

#: the fast network (presets 93/94) in bf16 at batch 1024: name -> (fused SGD, keep freed memory, compile)
FAST_VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "fast, bf16, batch 1024, foreach SGD (the presets)": (False, True, False),
    "+ fused SGD": (True, True, False),
    "- glibc keeps freed memory": (False, False, False),
    "+ torch.compile": (False, True, True),
}


def time_steps(name: str, net: torch.nn.Module, opt: torch.optim.Optimizer, xs: list, ys: list, bf16: bool, compile_: bool,
               warmup: int, steps: int, **loss_args: float) -> None:  # fmt: skip
    """Time ``steps`` training steps (forward, backward, optimiser) after ``warmup`` untimed ones,
    cycling through the batches; prints the variant's JSON line for the parent."""
    import torch
    import torch.nn.functional as F

    run = torch.compile(net) if compile_ else net

    def step(i: int) -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(run(xs[i % len(xs)]), ys[i % len(ys)], **loss_args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    t = time.perf_counter()
    for i in range(steps):
        step(i)
    print(json.dumps({"name": name, "ms": (time.perf_counter() - t) / steps * 1e3}))


def fast_child(name: str, steps: int) -> None:
    import torch

    from cifar_lightning import models
    from cifar_lightning.training import keep_freed_memory

    fused, keep, compile_ = FAST_VARIANTS[name]
    if keep:
        keep_freed_memory()
    torch.manual_seed(0)
    net = models.build("fast").train().to(memory_format=torch.channels_last)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, **({"fused": True} if fused else {"foreach": True}))
    xs = [torch.randn(1024, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    ys = [torch.randint(0, 10, (1024,)) for _ in range(2)]
    time_steps(name, net, opt, xs, ys, bf16=True, compile_=compile_, warmup=3, steps=steps, label_smoothing=0.2)


def child(name: str, steps: int) -> None:
    import torch
    from torch import nn

    from cifar_lightning import models
    from cifar_lightning.training import keep_freed_memory

    precision, byte_dropout, pool_first, fused, keep, nhwc_grad, compile_, by_hand = VARIANTS[name]
    if keep:
        keep_freed_memory()
    if not nhwc_grad:  # the gradient reaches the average pool in the flatten's NCHW order
        models._ChannelsLastGrad.apply = staticmethod(lambda x: x)
    torch.manual_seed(0)
    net = models.build("seed")
    if not byte_dropout:
        for seq in (net.features, net.head):
            for i, m in enumerate(seq):
                if isinstance(m, nn.Dropout):
                    seq[i] = nn.Dropout(m.p)
    if not pool_first:  # the notebook's order: ReLU, then max-pool
        net.features[3], net.features[4] = net.features[4], net.features[3]
    if by_hand:
        dense_by_hand(net.head[1])
    net = net.train().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), 1e-3, **({"fused": True} if fused else {"foreach": True}))
    # distinct batches, as training sees: a single reused batch would stay in the caches
    xs = [torch.randn(64, 3, 32, 32).contiguous(memory_format=torch.channels_last) for _ in range(16)]
    ys = [torch.randint(0, 10, (64,)) for _ in range(16)]
    time_steps(name, net, opt, xs, ys, bf16=precision == "bf16", compile_=compile_, warmup=10, steps=steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--network", choices=("seed", "fast"), default="seed")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    variants, batch = (VARIANTS, 64) if args.network == "seed" else (FAST_VARIANTS, 1024)
    if args.variant:
        return (child if args.network == "seed" else fast_child)(args.variant, args.steps)
    from benchmarks.harness import REPO, normalised, rate_label, reference_rate, training_precision

    precision = training_precision()
    rate = reference_rate(precision)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            out = subprocess.run([sys.executable, "-m", "research.seed_step", "--network", args.network, "--variant", name,
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True, cwd=REPO)  # fmt: skip
            times[name].append(json.loads(out.stdout.strip().splitlines()[-1])["ms"])
    rate = (rate + reference_rate(precision)) / 2
    base = statistics.median(times[next(iter(variants))])
    print(f"{rate_label(precision, rate)} (mean of before and after); normalised ms = raw ms x {rate / 1000:.3f}")
    print(f"{args.network + f' network, batch {batch}, CPU':<66}{'ms/step':>9}{'normalised':>12}{'epoch (50k)':>13}{'vs first':>11}")
    for name, ts in times.items():
        ms = statistics.median(ts)
        print(f"{name:<66}{ms:>9.1f}{normalised(ms, rate):>12.1f}{ms * 50_000 / batch / 1000:>12.1f}s{base / ms:>10.2f}x")


if __name__ == "__main__":
    main()
