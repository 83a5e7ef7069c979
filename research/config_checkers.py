"""Which library checks TrainConfig: pydantic v2 or jsonargparse, measured side by side.

    pip install jsonargparse && python -m research.config_checkers [--repeats 7]

For each: the import time in a fresh interpreter (``--help`` pays it on every call; median of
the repeats, alternating), the time to check the 94 preset's whole recipe, and which of a set of
bad values it refuses with the field's declared type and bounds alone (strict types, bounds,
choices). Result and the choice: docs/BENCHMARKS.md, "Checking the recipe".
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time
from typing import Any

from cifar_lightning import recipes

BAD = {"epochs": 0, "batch_size": True, "lr": float("inf"), "optimizer": "adagrad", "seed": -1, "tta": "2", "label_smoothing": 1.0}


def import_seconds(module: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jsonargparse_checker() -> Any:
    """TrainConfig's fields as a dataclass (types and defaults, as jsonargparse reads them)."""
    import jsonargparse

    fields = [(name, f.annotation, dataclasses.field(default=f.default)) for name, f in recipes.FIELDS.items()]
    Plain = dataclasses.make_dataclass("Plain", fields)  # noqa: N806
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(Plain, "cfg")
    return parser


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args()
    try:
        import jsonargparse  # noqa: F401  (only this comparison needs it)
    except ImportError:
        sys.exit("research.config_checkers: needs jsonargparse beside pydantic: pip install jsonargparse")
    base = import_seconds("sys", args.repeats)
    print(f"python -c pass: {base * 1e3:.0f} ms")
    for module in ("pydantic", "jsonargparse", "cifar_lightning.recipes"):
        print(f"import {module}: {(import_seconds(module, args.repeats) - base) * 1e3:.0f} ms over a bare interpreter")
    values = recipes.preset("94")
    t0 = time.perf_counter()
    for _ in range(100):
        recipes.TrainConfig(**values)
    print(f"pydantic: check the 94 recipe: {(time.perf_counter() - t0) * 10:.2f} ms")
    refused = []
    for name, value in BAD.items():
        try:
            recipes.check_values({name: value})
        except recipes.ConfigError as e:
            refused.append(f"{name}={value!r}: {e}")
    print(f"pydantic refuses {len(refused)} of {len(BAD)} bad values from the declared types and bounds:")
    for line in refused:
        print("  " + line)
    parser = jsonargparse_checker()
    t0 = time.perf_counter()
    for _ in range(100):
        parser.parse_object({"cfg": values})
    print(f"jsonargparse: check the 94 recipe: {(time.perf_counter() - t0) * 10:.2f} ms")
    refused = []
    for name, value in BAD.items():
        try:
            parser.parse_object({"cfg": {name: value}})
        except Exception as e:  # jsonargparse raises its own ArgumentError
            refused.append(f"{name}={value!r}: {str(e).splitlines()[0][:120]}")
    print(f"jsonargparse refuses {len(refused)} of {len(BAD)} (bounds need custom types: PositiveInt, ClosedUnitInterval...):")
    for line in refused:
        print("  " + line)


if __name__ == "__main__":
    main()
