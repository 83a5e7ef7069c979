"""Start-up time of the commands against importing Lightning, measured in one run, alternating.
Prints figures; asserts nothing.

    python -m benchmarks.startup [--repeats 7]

Each command runs in a fresh interpreter (as a user's shell starts it); the median of the
repeats is reported raw, normalised by the 3x3-convolution rate measured in the same run in the
precision this machine trains in (bf16 only where the CPU runs it natively, else fp32; the
reference every README time is normalised by, benchmarks/harness.py), and as a ratio against
`python -c "import lightning"` timed alongside. Each start is one wall-clock measurement of a
child process, so it is timed as such, not with torch's Timer.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time

from benchmarks.harness import machine, normalised, rate_label, reference_rate, training_precision

COMMANDS = {
    "cifar-train --help": [sys.executable, "-m", "cifar_lightning", "train", "--help"],
    "cifar-predict --help": [sys.executable, "-m", "cifar_lightning", "predict", "--help"],
    "cifar-train --print-config": [sys.executable, "-m", "cifar_lightning", "train", "--print-config"],
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    'python -c "import lightning"': [sys.executable, "-c", "import lightning"],
}
REFERENCE = 'python -c "import lightning"'


def seconds(cmd: list[str]) -> float:
    """Wall seconds of one run of ``cmd``, from spawn to exit."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    for cmd in COMMANDS.values():  # warm the file cache once
        seconds(cmd)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):  # alternating, so a slow moment hits every command alike
        for name, cmd in COMMANDS.items():
            times[name].append(seconds(cmd))
    precision = training_precision()
    rate = reference_rate(precision)
    ref = statistics.median(times[REFERENCE])
    print(f"{machine()}; Python {platform.python_version()}, median of {args.repeats}, {rate_label(precision, rate)}")
    print(f"{'command':<32}{'seconds':>9}{'normalised':>12}{'vs import lightning':>22}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<32}{med:>9.3f}{normalised(med, rate):>12.3f}{med / ref:>21.2f}x")


if __name__ == "__main__":
    main()
