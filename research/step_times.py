"""Issue 33: where a training step's time goes, per step, through the real stack.

Each variant trains (cifar-train's own run, a few epochs) with a probe callback that records,
for every step, the time from the batch's start to the optimiser step (forward + backward) and
from there to the batch's end (the optimiser, Lookahead), and RunEstimate's printed estimate.
Answers: is Muon's step slower than SGD's on a CPU, does batch 2,000 run fewer images a second,
and are the first steps (which the estimate times) the steady state?

    python -m research.step_times --data-dir ../shared/data/cifar10 --out docs/speed/step_times.json \
        --variant "sgd1024=preset=94" --variant "muon2000=preset=94,optimizer=muon,batch_size=2000,lookahead=false"

A variant is NAME=key=value,... (TrainConfig fields; values as YAML reads them). Run alone:
these are wall times.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from benchmarks.harness import DEFAULT_DATA, machine, reference_rate
from cifar_lightning import runs, training
from cifar_lightning.callbacks import RunEstimate


class StepProbe(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self._t0 = self._t1 = self._t_end = 0.0
        self.estimate: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self._t0 = time.perf_counter()
        self._t1 = 0.0
        # the loop between two steps: fetching, moving and preparing the batch, the loop's hooks
        self._between = self._t0 - self._t_end if batch_idx and self._t_end else 0.0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # noqa: ANN001
        self._t1 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        t2 = time.perf_counter()
        self.steps.append({"epoch": trainer.current_epoch, "fwd_bwd": (self._t1 or t2) - self._t0,
                           "opt": t2 - (self._t1 or t2), "step": t2 - self._t0, "between": self._between})  # fmt: skip
        self._t_end = t2


    def on_train_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        self.estimate = next((c.estimate_seconds for c in trainer.callbacks if isinstance(c, RunEstimate)), None)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, spec = text.partition("=")
    pairs = dict(p.split("=", 1) for p in spec.split(",") if p)
    return name, {k: v if k == "preset" else yaml.safe_load(v) for k, v in pairs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(DEFAULT_DATA))
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", action="append", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    record: dict[str, Any] = {"machine": machine(), "runs": {}}
    if out.is_file():
        record["runs"] = json.loads(out.read_text()).get("runs", {})
    for text in args.variant:
        name, fields = parse_variant(text)
        rate = reference_rate("bf16-mixed" if fields.get("precision") != "32-true" else "32-true")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = runs.resolve_recipe({"data_dir": args.data_dir, "log_dir": tmp, **fields})
            probe = StepProbe()
            t0 = time.perf_counter()
            results = training.run_training(cfg, callbacks=[probe])
            wall = time.perf_counter() - t0
            est = probe.estimate
        epochs: dict[int, list[dict[str, float]]] = {}
        for s in probe.steps:
            epochs.setdefault(int(s["epoch"]), []).append(s)
        per_epoch = [{"epoch": e, "steps": len(v), "median_step": statistics.median(x["step"] for x in v),
                      "median_fwd_bwd": statistics.median(x["fwd_bwd"] for x in v),
                      "median_opt": statistics.median(x["opt"] for x in v), "sum_step": sum(x["step"] for x in v),
                      "median_between": statistics.median(x["between"] for x in v[1:] or v),
                      "sum_between": sum(x["between"] for x in v)}
                     for e, v in sorted(epochs.items())]  # fmt: skip
        record["runs"][name] = {
            "fields": fields, "batch_size": cfg.batch_size, "wall_s": wall, "train_s": results.get("train_seconds"),
            "epoch_seconds": results.get("epoch_seconds"),
            "test_acc": results.get("test_acc"), "estimate_s": est, "first_steps": [s["step"] for s in probe.steps[:8]],
            "steps_sum_s": sum(s["step"] for s in probe.steps), "per_epoch": per_epoch, "conv_rate_gflops": rate,
        }  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
        r = record["runs"][name]
        medians = (f"{p['median_step']:.4f} (opt {p['median_opt']:.4f}, between {p['median_between']:.4f})" for p in per_epoch)
        print(f"{name}: {r['steps_sum_s']:.1f} s of steps; per epoch median step " + ", ".join(medians), flush=True)


if __name__ == "__main__":
    main()
