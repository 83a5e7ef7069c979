"""The slowest part of the fast networks' CPU step is the convolutions' weight gradient at small
spatial sizes. This times oneDNN's (what autograd runs) against two formulations written with
other kernels, at the 94 network's shapes, in bf16, channels-last, batch 1024, and checks that
each gives the same gradient. Prints; asserts nothing (docs/BENCHMARKS.md, "The training step").

    python -m research.wgrad_alternatives            # about a minute on a 2-core CPU (with AMX)
    python -m research.wgrad_alternatives --precision 32-true   # the same in fp32 (a CPU without native bf16)
    python -m research.wgrad_alternatives --network seed        # the seed network's shapes at batch 64

  oneDNN               aten.convolution_backward with only the weight gradient asked for
  batch-as-channels    the gradient as one forward convolution: input and output gradient with
                       batch and channels swapped, the output gradient as the filter
  GEMM per tap         the batch zero-padded once, NHWC, viewed as a (rows, channels) matrix: each
                       of the 9 taps is one GEMM of the output gradient with the input shifted
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.harness import best_seconds, dtype_of, machine, precision_name

#: network -> (batch, [(in, out, side) of each 3x3 convolution])
SHAPES = {"94": (1024, [(24, 64, 31), (64, 64, 15), (64, 256, 15), (256, 256, 7), (256, 256, 3)]),
          "seed": (64, [(3, 32, 32), (32, 32, 32), (32, 64, 16), (64, 64, 16)])}  # fmt: skip


def best_ms(fn: Callable[[], object]) -> float:
    return best_seconds(fn) * 1e3


def onednn(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False])[1]


def batch_as_channels(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.transpose(0, 1), g.transpose(0, 1), padding=1).transpose(0, 1)


def gemm_per_tap(x: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    cin, cout, side = x.shape[1], g.shape[1], x.shape[-1]
    xp = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, cin)
    gp = F.pad(g, (1, 1, 1, 1)).permute(0, 2, 3, 1).reshape(-1, cout)
    row = side + 2
    first, last = row + 1, xp.shape[0] - (row + 1)  # the padded border rows of g are zero
    gt = gp[first:last].t()
    out = torch.empty(cout, 3, 3, cin, dtype=x.dtype)
    for i in range(3):
        for j in range(3):
            d = (i - 1) * row + (j - 1)
            torch.mm(gt, xp[first + d : last + d], out=out[:, i, j])
    return out.permute(0, 3, 1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="bf16-mixed", choices=("bf16-mixed", "32-true"), help="the dtype the step computes in")
    p.add_argument("--network", default="94", choices=sorted(SHAPES))
    args = p.parse_args()
    torch.manual_seed(0)
    batch, shapes = SHAPES[args.network]
    cl, dtype = torch.channels_last, dtype_of(args.precision)
    print(f"weight gradient, {args.network} network, {precision_name(args.precision)}, batch {batch}, {machine()}: ms (relative error)")
    for cin, cout, side in shapes:
        x = torch.randn(batch, cin, side, side, dtype=dtype).contiguous(memory_format=cl)
        w = torch.randn(cout, cin, 3, 3, dtype=dtype).contiguous(memory_format=cl)
        g = torch.randn(batch, cout, side, side, dtype=dtype).contiguous(memory_format=cl)
        ref = onednn(x, w, g).float()
        cells = []
        for name, fn in (("oneDNN", onednn), ("batch-as-channels", batch_as_channels), ("GEMM per tap", gemm_per_tap)):
            err = float((fn(x, w, g).float() - ref).norm() / ref.norm())
            cells.append(f"{name} {best_ms(lambda: fn(x, w, g)):7.1f} ({err:.0e})")  # noqa: B023
        forward = best_ms(lambda: F.conv2d(x, w, padding=1))  # noqa: B023
        print(f"{cin:>4} -> {cout:<4} at {side:>2}x{side:<2}  forward {forward:6.1f}   " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
