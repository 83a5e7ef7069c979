"""Networks by name. A network knows nothing of training: it maps normalised (N, 3, 32, 32)
floats to (N, num_classes) logits, and is rebuilt from (name, plain keyword arguments) alone.

    python -c "from cifar_lightning.models import build; print(build('seed'))"
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = factory
        return factory

    return add


def build(name: str, **kwargs: object) -> nn.Module:
    """A fresh network; raises ValueError naming the choices for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def keras_init(module: nn.Module) -> None:
    """Keras defaults (Glorot-uniform weights, zero biases), part of reproducing the notebook:
    PyTorch's default Kaiming-uniform(a=sqrt(5)) init trains this network differently."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ByteDropout(nn.Dropout):
    """Dropout whose CPU mask comes from random bytes: for p a multiple of 1/256 (the notebook's
    0.25 and 0.5), keeping an element where its byte is >= 256p keeps it with probability exactly
    1 - p, and 8 bytes per 64-bit draw make the mask about 10x cheaper than ``bernoulli_``, which
    took a fifth of the seed network's CPU step. Same draws from the global generator, so seeded
    runs and exact resume are unchanged in kind; other devices and other p use ``F.dropout``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cut = self.p * 256
        if not self.training or x.device.type != "cpu" or self.p in (0, 1) or cut != int(cut) or self.inplace:
            return super().forward(x)
        n = x.numel()
        # The full int64 range: random_() without bounds leaves the top bit of each word at 0.
        bits = torch.empty((n + 7) // 8, dtype=torch.int64).random_(-(2**63), None).view(torch.uint8)[:n]
        dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
        bits = bits.as_strided(x.shape, x.stride()) if dense else bits.view(x.shape)
        return x * ((bits >= int(cut)).to(x.dtype) * (1 / (1 - self.p)))


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity forward; the backward hands the gradient on in NHWC. The gradient of a flatten
    arrives in NCHW order, and a channels-last bf16 average pool's backward fed an NCHW gradient
    takes 2-3 ms on a CPU where the NHWC one takes 0.3: a tenth of the seed network's step."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return grad.contiguous(memory_format=torch.channels_last)


@register("seed")
class SeedCNN(nn.Module):
    """The Keras notebook's CNN, layer for layer:
    Conv(32)-Conv(32)-MaxPool-Drop(.25)-Conv(64)-Conv(64)-AvgPool-Drop(.25)-Dense(512)-Drop(.5)-Dense(10).

    The second ReLU runs after the max-pool instead of before: max and ReLU commute exactly, and
    on the pooled tensor it touches a quarter of the memory (the CPU step is memory-bound).
    The layers keep their indices, so checkpoints of either order load into both.
    """

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 512, image_size: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(inplace=True), ByteDropout(0.25),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.AvgPool2d(2), ByteDropout(0.25),
        )  # fmt: skip
        flat = 2 * w * (image_size // 4) ** 2
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True), ByteDropout(0.5),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip
        keras_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if self.training and x.requires_grad and x.is_contiguous(memory_format=torch.channels_last):
            x = _ChannelsLastGrad.apply(x)
        return self.head(x)


class FrozenScaleBatchNorm(nn.BatchNorm2d):
    """BatchNorm with its scale fixed at 1 and only the shift learned: the following GELU and
    the scale-free conv weights make a learned scale redundant, and fixing it trains faster
    (airbench's choice). Momentum 0.4 (PyTorch's convention) follows fast-moving statistics
    over a short run; a tiny eps because the inputs are never near-constant."""

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class ConvGroup(nn.Module):
    """conv -> maxpool 2 -> BN -> GELU -> conv -> BN -> GELU, the fast network's unit. With
    ``depth`` 3 a third conv -> BN -> GELU follows, and the two after the pool become a residual
    branch added to the pooled activation (airbench96's group)."""

    def __init__(self, cin: int, cout: int, bn_momentum: float, depth: int = 2) -> None:
        super().__init__()
        if depth not in (2, 3):
            raise ValueError(f"a conv group has 2 or 3 convolutions, not {depth}")
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = FrozenScaleBatchNorm(cout, bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = FrozenScaleBatchNorm(cout, bn_momentum)
        convs = [self.conv1, self.conv2]
        if depth == 3:
            self.conv3 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.norm3 = FrozenScaleBatchNorm(cout, bn_momentum)
            convs.append(self.conv3)
        self.depth = depth
        self.act = nn.GELU()
        for conv in convs:
            # Identity-like start: the first `cin` filters pass their input channel through,
            # so a deep stack starts near the identity and trains from the first step.
            w = conv.weight.data
            nn.init.dirac_(w[: w.size(1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        y = self.act(self.norm2(self.conv2(x)))
        if self.depth == 2:
            return y
        return x + self.act(self.norm3(self.conv3(y)))


@register("fast")
class FastNet(nn.Module):
    """The notebook's family made fast: convolutions, max pooling and a dense head, plus a
    fixed patch-whitening first layer, batch norm and GELU (after Keller Jordan's airbench).

    The 2x2 whitening conv is set once from the training images' patch covariance
    (``init_whitening``) and never trained, so the first trainable conv sees decorrelated
    inputs; its bias trains for the first epochs only (the module decides when).
    ``depth`` 3 gives every group a third conv and a residual (airbench96's network).
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: tuple[int, int, int] | list[int] = (64, 256, 256),
        bn_momentum: float = 0.4,
        scaling_factor: float = 1 / 9,
        whiten_eps: float = 5e-4,
        depth: int = 2,
    ) -> None:
        super().__init__()
        w1, w2, w3 = (int(w) for w in widths)
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)  # 2x2x3 = 12 patch dims, +/- each eigenvector
        self.whiten.weight.requires_grad_(False)
        self.whiten_eps = whiten_eps
        # 0 until init_whitening ran; saved with the weights, so a checkpoint is never re-whitened.
        self.register_buffer("whitening_ready", torch.zeros((), dtype=torch.bool))
        self.layers = nn.Sequential(
            nn.GELU(),
            ConvGroup(24, w1, bn_momentum, depth),
            ConvGroup(w1, w2, bn_momentum, depth),
            ConvGroup(w2, w3, bn_momentum, depth),
            nn.MaxPool2d(3),
            nn.Flatten(),
        )
        self.head = nn.Linear(w3, num_classes, bias=False)
        self.scaling_factor = scaling_factor  # keeps the initial logits small (a softmax near uniform)

    @torch.no_grad()
    def init_whitening(self, images: torch.Tensor) -> None:
        """Set the whitening filters from normalised training images (N, 3, 32, 32)."""
        c, (h, w) = images.shape[1], self.whiten.weight.shape[2:]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        cov = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
        filters = (eigenvectors / torch.sqrt(eigenvalues + self.whiten_eps).view(-1, 1)).reshape(-1, c, h, w)
        self.whiten.weight.copy_(torch.cat([filters, -filters]).to(self.whiten.weight))
        self.whitening_ready.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.whiten(x))) * self.scaling_factor


#: level 2 runs its four shifted views only on images whose calibrated two-view confidence is
#: below this (chosen on held-out images, docs/BENCHMARKS.md "Test-time views where unsure")
UNSURE_BELOW = 0.95


def tta_logits(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, level: int,
               temperature: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Logits averaged over test-time views: level 0 the image alone; 1 the image and its
    mirror; 3 also both shifted one pixel up-left and down-right (6 views, airbench's weights);
    2 the same six where the model is unsure (the top softmax probability of the two mirror
    views, at ``temperature``, below UNSURE_BELOW) and the two mirror views elsewhere: about
    half the cost of 3 at its accuracy. Decided image by image, so an image's scores never
    depend on the rest of its batch. The one definition every path uses: training's test,
    evaluation, prediction, exports (a traced graph computes all six views and picks)."""
    if level == 0:
        return forward(x)

    def mirror(v: torch.Tensor) -> torch.Tensor:
        return 0.5 * forward(v) + 0.5 * forward(v.flip(-1))

    def six(v: torch.Tensor, two: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(v, (1, 1, 1, 1), mode="reflect")
        h, w = v.shape[-2:]
        return 0.5 * two + 0.5 * (0.5 * mirror(padded[..., :h, :w]) + 0.5 * mirror(padded[..., 2:, 2:]))

    logits = mirror(x)
    if level == 1:
        return logits
    if level == 3:
        return six(x, logits)
    unsure = (logits.float() / temperature).softmax(-1).amax(-1) < UNSURE_BELOW
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return torch.where(unsure[:, None], six(x, logits), logits)  # a graph: no data-dependent shapes
    idx = unsure.nonzero().flatten()
    if len(idx) == 0:
        return logits
    return logits.index_copy(0, idx, six(x[idx], logits[idx]).to(logits.dtype))


class WithTTA(nn.Module):
    """A network whose forward averages its test-time views: what every inference path runs and
    exports carry, so an exported model classifies exactly as the checkpoint did in training's
    test and in cifar-evaluate."""

    def __init__(self, net: nn.Module, level: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.net, self.level, self.temperature = net, int(level), float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.net, x, self.level, self.temperature)


def with_tta(net: nn.Module, level: int, temperature: float = 1.0) -> nn.Module:
    """``net`` with its test-time views (``net`` itself at level 0); ``temperature``: the model's
    own, with which level 2 judges where it is unsure."""
    return WithTTA(net, level, temperature) if level else net
