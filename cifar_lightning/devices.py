"""Where things compute: an accelerator name -> a torch device, and the precision a machine
trains in. The one owner, for the package and benchmarks/ alike."""

from __future__ import annotations

import torch

from cifar_lightning.errors import ConfigError


def device_for(accelerator: str) -> str:
    """The torch device for a Lightning-style accelerator name; an unavailable one is an error.
    Training, evaluation, prediction, serving and the benchmarks all ask here."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda"):
        if not cuda:
            raise ConfigError(f"--accelerator {accelerator}: no CUDA GPU is available on this machine")
        return "cuda"
    if accelerator == "mps":
        if not mps:
            raise ConfigError("--accelerator mps: MPS is not available on this machine")
        return "mps"
    if accelerator == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if accelerator != "cpu":
        raise ConfigError(f"--accelerator {str(accelerator)[:40]!r}: choose from cpu, gpu, cuda, mps, auto")
    return "cpu"


def checked_device(device: object) -> str:
    """A device given from Python ('cpu', 'cuda', 'cuda:1', 'mps', a torch.device): one this
    machine has, else ConfigError (never torch's raw RuntimeError at first use)."""
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"device={str(device)[:40]!r}: not a device; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ConfigError(f"device={str(device)!r}: no such CUDA GPU on this machine")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps': MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={str(device)!r}: use 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return str(dev)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX): emulated bf16 is slower than
    fp32. torch has no public query; this one has been stable since torch 1.12."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto': bf16-mixed where the hardware computes in bf16 natively (CPUs with AVX512-BF16 or
    AMX, where it trains the fast network about twice as fast as fp32; Ampere or newer GPUs),
    else 32-true."""
    if precision != "auto":
        return precision
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return "32-true"
    return "bf16-mixed" if native_bf16() else "32-true"
