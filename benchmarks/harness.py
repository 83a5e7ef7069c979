"""What every benchmark shares, so that their figures compare: the machine they ran on, the
precision it trains in, one reference rate, one way of timing, one normalisation, and a
served model for the serving benchmark, the screenshot and the tests.

Why a reference rate: these benchmarks run on shared machines whose speed differs several times
over (between machines, and on one machine from hour to hour). Each run measures the rate of one
large 3x3 convolution right before (and after) it and reports its wall times also normalised by
it: ``normalised s = raw s x rate / 1000 GFLOP/s``, i.e. the time on a machine that runs that
convolution at 1,000 GFLOP/s. The rate is measured in the precision the run computes in: bf16
only where the CPU runs bf16 natively (AVX512-BF16 or AMX), fp32 elsewhere. A CPU without native
bf16 emulates it about 8x slower than it runs fp32, so a bf16 reference there would be off by
that much.
"""

from __future__ import annotations

import datetime as dt
import platform
import socket
import subprocess
import sys
import time
import timeit
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from cifar_lightning import devices
from cifar_lightning.devices import device_for  # noqa: F401 (the benchmarks import it from here)

REPO = Path(__file__).resolve().parents[1]
#: where the shared copy of CIFAR-10 lives on these machines (an image-folder tree)
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar10"

#: the reference convolution: batch 64, 256 -> 256 channels, 16x16, 3x3, padding 1, channels-last
REFERENCE_SHAPE = (64, 256, 16, 16)
REFERENCE_GFLOP = 2 * 64 * 256 * 256 * 9 * 16 * 16 / 1e9


# ----------------------------------------------------------------------------- the machine


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if info:
                break
            continue
        key, _, value = line.partition(":")
        info.setdefault(key.strip(), value.strip())
    return info


def cpu_name() -> str:
    """The CPU's model name, as the kernel reports it."""
    info = _cpuinfo()
    return info.get("model name") or info.get("Model") or platform.processor() or platform.machine() or "cpu"


def bf16_support() -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively, the instruction sets that say so). Read from
    the CPU's flags: without them torch's oneDNN still runs bf16, emulated, far slower than fp32."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    if not flags:
        return False, f"{torch.backends.cpu.get_cpu_capability()}, native bf16 unknown"
    native = [name for flag, name in (("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX")) if flag in flags]
    if native:
        return True, "/".join(native) + ", native bf16"
    if "bf16" in flags:  # Arm: FEAT_BF16
        return True, "Arm BF16, native bf16"
    if "avx512f" in flags:
        return False, "AVX-512 without BF16, no native bf16"
    if "avx2" in flags:
        return False, "AVX2 only, no native bf16"
    return False, "no native bf16"


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: the package's own rule (``devices.native_bf16``)."""
    return devices.native_bf16()


def machine() -> str:
    """One line that says what ran the benchmark: CPU, threads, bf16 support, torch, date."""
    return (f"{cpu_name()}, {torch.get_num_threads()} threads, {bf16_support()[1]}, torch {torch.__version__}, "
            f"{dt.date.today().isoformat()}")  # fmt: skip


# ----------------------------------------------------------------------------- precision


def training_precision(accelerator: str = "cpu") -> str:
    """The precision ``cifar-train --precision auto`` trains in here: bf16-mixed only where the
    hardware computes bf16 natively, else 32-true (the package's own rule, not a copy of it)."""
    return devices.resolve_precision("auto", accelerator)


def dtype_of(precision: str) -> torch.dtype:
    """The dtype the convolutions of a run in ``precision`` compute in."""
    if "bf16" in precision:
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    if precision.startswith("64"):
        return torch.float64
    return torch.float32


def precision_name(precision: str) -> str:
    """'bf16', 'fp16', 'fp32' or 'fp64': what the tables call a precision."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(dtype_of(precision), "fp32")


def autocast(precision: str, device: str = "cpu") -> torch.autocast:
    """The autocast a Lightning run in ``precision`` trains under (off for true precisions)."""
    return torch.autocast(device, dtype=dtype_of(precision), enabled=precision.endswith("-mixed"))


# ----------------------------------------------------------------------------- timing


def call_times(fn: Callable[[], Any], min_run_time: float = 0.0, min_blocks: int = 1, device: str = "cpu") -> list[float]:
    """Seconds per call of ``fn``, one figure per timed block, by torch.utils.benchmark.Timer:
    its warm-up sizes the blocks (one call per block for anything slower than ~10 ms), then
    blocks run until ``min_run_time`` seconds and ``min_blocks`` blocks. All of this process's
    threads are used (Timer's own default is one). ``device="cuda"``: every block is synchronised.
    On the CPU the clock is a plain one: Timer's default asks torch.accelerator at every tick,
    which on a CUDA build without a GPU costs enough to make Timer pick 10-call blocks."""
    clock = {} if device != "cpu" else {"timer": timeit.default_timer}
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), **clock)
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < min_blocks:
        # Timer stops on time, not on a count: ask for the time the missing blocks take (each
        # call adds at least one block; a slow fn gets them all in one call).
        block = sum(m.raw_times) / len(m.raw_times)
        m = timer.blocked_autorange(min_run_time=0.999 * block * (min_blocks - len(times)))
        times += m.times
    return times


def best_seconds(fn: Callable[[], Any], reps: int = 5, device: str = "cpu") -> float:
    """Seconds of one call of ``fn``: the best of ``reps`` timed blocks after a warm-up. The best,
    not the mean: on a shared machine a busy moment only ever adds time."""
    return min(call_times(fn, 0.0, reps, device))


# ----------------------------------------------------------------------------- the reference


def reference_rate(precision: str = "32-true", device: str = "cpu", reps: int = 5) -> float:
    """GFLOP/s of the reference convolution (64 x 256 -> 256 channels at 16x16, 3x3,
    channels-last) in the dtype a run in ``precision`` computes in, measured now, best of
    ``reps``. Every wall time a benchmark prints is also normalised by it (``normalised``)."""
    dtype, cl = dtype_of(precision), torch.channels_last
    n, c, h, w = REFERENCE_SHAPE
    x = torch.randn(n, c, h, w, dtype=dtype, device=device).contiguous(memory_format=cl)
    weight = torch.randn(c, c, 3, 3, dtype=dtype, device=device).contiguous(memory_format=cl)
    return REFERENCE_GFLOP / best_seconds(lambda: F.conv2d(x, weight, padding=1), reps, device)


def rate_label(precision: str, rate: float) -> str:
    """How every table names its reference: 'fp32 3x3 conv 165 GFLOP/s'."""
    return f"{precision_name(precision)} 3x3 conv {rate:,.0f} GFLOP/s"


def normalised(seconds: float, rate: float) -> float:
    """A wall time as it would be on a machine whose reference rate is 1,000 GFLOP/s:
    raw s x rate / 1000 GFLOP/s (any unit of time in, the same unit out)."""
    return seconds * rate / 1000.0


def machine_peaks(precision: str = "32-true") -> dict[str, float]:
    """GFLOP/s of three dense kernels in the dtype of ``precision``, each the best of 5: torch.mm
    (BLAS; on AMD CPUs MKL does not reach the vector units' peak), the same GEMM through oneDNN
    (a 1x1 convolution) and the reference 3x3 convolution. What a training step is compared with."""
    dtype, cl, n = dtype_of(precision), torch.channels_last, 4096
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x = torch.randn(32, 1024, 32, 32, dtype=dtype).contiguous(memory_format=cl)
    w1 = torch.randn(1024, 1024, 1, 1, dtype=dtype).contiguous(memory_format=cl)
    return {
        "torch.mm 4096^2": 2 * n**3 / best_seconds(lambda: a @ b) / 1e9,
        "oneDNN GEMM (1x1 conv)": 2 * 32 * 1024 * 1024 * 1024 / best_seconds(lambda: F.conv2d(x, w1)) / 1e9,
        "oneDNN 3x3 conv 256ch": reference_rate(precision),
    }


# ----------------------------------------------------------------------------- a served model


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_server(model: str | Path, *flags: str, timeout: float = 120.0, **popen: Any) -> tuple[subprocess.Popen, str]:
    """``python -m cifar_lightning serve MODEL --port P FLAGS`` in a child process on a free
    loopback port, returned once /health answers 200: (the process, its base URL). For the
    serving benchmark, the README's screenshot and the tests; stop it with ``stop_server``
    (SIGTERM to its PID, which shuts its workers down too)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cifar_lightning", "serve", str(model), "--port", str(port), *flags], **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cifar-serve exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"cifar-serve was not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Stop a server ``launch_server`` started, by its PID: SIGTERM, then SIGKILL if it has not
    exited within ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
