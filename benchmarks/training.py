"""Training benchmarks for this machine, each measured in one run against its own reference.
Prints figures; asserts nothing. From the repository root:

    python -m benchmarks.training throughput                  # img/s and GFLOP/s per network vs this machine's kernel peaks
    python -m benchmarks.training pipeline                    # an epoch fed by the data module vs steps on in-memory tensors
    python -m benchmarks.training time-to-accuracy --out docs/benchmark   # each preset (and the seed recipe): accuracy vs wall time
    python -m benchmarks.training time-to-accuracy --recipes 94 --seeds 4 5 6 7 --out docs/benchmark --append  # more seeds, one recipe
    python -m benchmarks.training step --recipes 94,96        # one training step: profiler breakdown, convolutions alone
    python -m benchmarks.training all --out docs/benchmark
    python -m benchmarks.training replot --out docs/benchmark # redraw the plot from its CSV

Common flags: --data-dir (default ../shared/data/cifar10), --precision auto|32-true|bf16-mixed (auto: what
cifar-train trains in here, bf16-mixed only where the CPU runs bf16 natively). Every wall time is also
given normalised by the 3x3 conv reference rate in that precision (benchmarks/harness.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.harness import (
    DEFAULT_DATA,
    autocast,
    best_seconds,
    call_times,
    device_for,
    dtype_of,
    machine,
    machine_peaks,
    normalised,
    precision_name,
    rate_label,
    reference_rate,
)
from cifar_lightning import recipes, training
from cifar_lightning.data import CIFAR10DataModule, load_splits
from cifar_lightning.images import normalize
from cifar_lightning.models import MODELS, build


def network_for(recipe: str) -> tuple[torch.nn.Module, int]:
    """The network and batch size a preset trains with."""
    cfg = recipes.build({"preset": recipe})
    return build(cfg.model, **(cfg.model_args() or {})), cfg.batch_size


def train_step_fn(net: torch.nn.Module, batch: int, precision: str):  # noqa: ANN201
    net = net.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9, nesterov=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(precision):
            loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def training_flops(net: torch.nn.Module, batch: int) -> int:
    """FLOPs of one forward + backward pass (convolutions and matmuls, torch's own count)."""
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_throughput(args: argparse.Namespace) -> list[dict]:
    """Training steps per network on in-memory batches, in fp32 and, where the CPU runs bf16
    natively (where cifar-train would use it), in bf16 too; --precision picks one."""
    if args.precision != "auto":
        precisions = [args.precision]
    else:
        precisions = ["32-true", "bf16-mixed"] if training.resolve_precision("auto", "cpu") == "bf16-mixed" else ["32-true"]
    print(f"\n== training-step throughput ({machine()})")
    peaks = {}
    for p in precisions:
        kernels = machine_peaks(p)
        for name, v in kernels.items():
            print(f"peak, {p:<10} {name:<24}: {v:7.1f} GFLOP/s ({precision_name(p)})")
        peaks[p] = max(kernels.values())
    print("(efficiency below: against the highest of these, per precision)")
    rows = []
    recipes = {"seed": "seed", "fast (preset 94/93)": "94", "fast, preset 90 widths": "90"}
    print(f"{'network':<24}{'batch':>6}  {'precision':<11}{'img/s':>8}{'GFLOP/img':>11}{'GFLOP/s':>9}{'of peak':>9}")
    for label, recipe in recipes.items():
        net, batch = network_for(recipe)
        flops = training_flops(net, batch) / batch
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        for p in precisions:
            step = train_step_fn(net, batch, p)
            step(x, y)  # the first step builds the optimiser's state; Timer warms up once more
            seconds = call_times(lambda: step(x, y), args.seconds, min_blocks=3)  # noqa: B023
            ips = batch / (sum(seconds) / len(seconds))
            gflops = ips * flops / 1e9
            rows.append({"network": label, "batch": batch, "precision": p, "images_per_s": ips, "gflop_per_image": flops / 1e9,
                         "gflop_per_s": gflops, "peak_gflop_per_s": peaks[p], "efficiency": gflops / peaks[p]})  # fmt: skip
            print(f"{label:<24}{batch:>6}  {p:<11}{ips:8.0f}{flops / 1e9:11.3f}{gflops:9.1f}{gflops / peaks[p]:9.1%}", flush=True)
    print(f"(registered networks: {', '.join(sorted(MODELS))}; FLOPs counted by torch.utils.flop_counter, forward + backward)")
    return rows


#: torch.profiler op names -> the part of a step they belong to (self time; the rest is "other")
STEP_PARTS = {"convolution_backward": "convolutions, backward", "mkldnn_convolution": "convolutions, forward",
              "max_pool2d": "max-pooling (forward, backward)", "fill_": "max-pooling (forward, backward)",
              "batch_norm": "batch norm (forward, backward)", "gelu": "GELU (forward, backward)",
              "slow_conv2d_forward": "convolutions, forward", "slow_conv2d_backward": "convolutions, backward"}  # fmt: skip


def conv_calls(net: torch.nn.Module, x: torch.Tensor, precision: str) -> list[tuple]:
    """(input shape, conv module, input needs a gradient) for every convolution a forward pass runs."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append((tuple(i[0].shape), m, i[0].requires_grad)))
             for m in net.modules() if isinstance(m, torch.nn.Conv2d)]  # fmt: skip
    with autocast(precision):
        net(x)
    for h in hooks:
        h.remove()
    return calls


def convolutions_alone(net: torch.nn.Module, batch: int, precision: str) -> list[dict]:
    """The step's convolutions by themselves, each shape timed on its own in the dtype the step
    computes them in (bf16 under bf16-mixed, else fp32), channels-last: forward, then backward
    split into its input gradient and its weight gradient (only those the step needs). Their sum
    is what the step would take if pooling, batch norm, GELU and the optimiser cost nothing."""
    rows = []
    cl, dtype = torch.channels_last, dtype_of(precision)
    for shape, conv, needs_input_grad in conv_calls(net, torch.randn(batch, 3, 32, 32).contiguous(memory_format=cl), precision):
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=cl)
        w = conv.weight.detach().to(dtype).contiguous(memory_format=cl)
        y = F.conv2d(x, w, None, conv.stride, conv.padding)
        g = torch.randn_like(y)

        def backward(mask: list[bool]) -> float:
            if not any(mask):
                return 0.0
            return best_seconds(lambda: torch.ops.aten.convolution_backward(g, x, w, None, list(conv.stride), list(conv.padding),  # noqa: B023
                                                                         [1, 1], False, [0, 0], 1, mask), reps=3)  # noqa: B023

        flops = 2 * y.numel() * w[0].numel()
        rows.append({"input": list(shape), "out_channels": w.shape[0], "gflop_forward": flops / 1e9,
                     "forward_s": best_seconds(lambda: F.conv2d(x, w, None, conv.stride, conv.padding), reps=3),  # noqa: B023
                     "input_grad_s": backward([needs_input_grad, False, False]),
                     "weight_grad_s": backward([False, conv.weight.requires_grad, False])})  # fmt: skip
    return rows


def bench_step(args: argparse.Namespace) -> list[dict]:
    """One training step of each preset's network at its batch size, in the precision it trains
    in here (bf16-mixed where the CPU runs bf16 natively, else 32-true; --precision forces one):
    its time against the conv reference in that precision, where the time goes (torch.profiler,
    self time by part), and the same step's convolutions timed alone, the ceiling on what a
    cheaper pooling/BN/GELU could give."""
    from torch.profiler import ProfilerActivity, profile

    precision = training.resolve_precision(args.precision, "cpu")
    name = precision_name(precision)
    print(f"\n== one training step, {name} ({precision}; {machine()})")
    rows = []
    for recipe in args.recipes.split(","):
        net, batch = network_for(recipe)
        flops = training_flops(net, batch)
        step = train_step_fn(net, batch, precision)
        x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
        before = reference_rate(precision)
        seconds = best_seconds(lambda: step(x, y), reps=4)  # noqa: B023
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(2):
                step(x, y)
        parts: dict[str, float] = {}
        for e in prof.key_averages():
            part = next((v for k, v in STEP_PARTS.items() if k in e.key), "other")
            parts[part] = parts.get(part, 0.0) + e.self_cpu_time_total
        total = sum(parts.values())
        shapes = convolutions_alone(net, batch, precision)
        convs = sum(r["forward_s"] + r["input_grad_s"] + r["weight_grad_s"] for r in shapes)
        rate = (before + reference_rate(precision)) / 2
        row = {"recipe": recipe, "batch": batch, "precision": precision, "step_s": seconds, "gflop": flops / 1e9, "conv_gflops": rate,
               "step_efficiency": flops / seconds / 1e9 / rate, "convolutions_alone_s": convs,
               "convolutions_alone_efficiency": flops / convs / 1e9 / rate, "convolutions": shapes,
               "breakdown": {k: v / total for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}}  # fmt: skip
        rows.append(row)
        print(f"preset {recipe}, batch {batch}: {seconds * 1e3:.0f} ms per step ({normalised(seconds, rate) * 1e3:.0f} ms normalised), "
              f"{flops / seconds / 1e9:.0f} GFLOP/s = {row['step_efficiency']:.1%} of the conv rate ({rate_label(precision, rate)}, "
              "mean of before and after)")
        print(f"  its convolutions alone (forward + backward, each shape timed by itself): {convs * 1e3:.0f} ms, "
              f"{row['convolutions_alone_efficiency']:.1%} of the conv rate: the ceiling with free pooling, BN and GELU")
        for k, v in row["breakdown"].items():
            print(f"  {k:<34}{v:7.1%}")
        print("  each convolution alone, GFLOP/s against the conv rate: forward / input gradient / weight gradient")
        for r in shapes:
            n, c, h, _ = r["input"]
            times = (r["forward_s"], r["input_grad_s"], r["weight_grad_s"])
            eff = [f"{r['gflop_forward'] / t / rate:6.1%}" if t else "     -" for t in times]
            print(f"  {c:>4} -> {r['out_channels']:<4} at {h:>2}x{h:<2}  {' / '.join(eff)}   "
                  f"({r['forward_s'] * 1e3:.0f} / {r['input_grad_s'] * 1e3:.0f} / {r['weight_grad_s'] * 1e3:.0f} ms)")
    return rows


def bench_pipeline(args: argparse.Namespace) -> dict:
    """The same training steps, fed by the data module (shuffle, slice, augment, normalise) and
    by one batch already normalised in memory: the difference is what the data path costs."""
    cfg = recipes.build({"preset": "94"})
    precision = training.resolve_precision(args.precision, "cpu")
    dm = CIFAR10DataModule(str(args.data_dir), batch_size=cfg.batch_size, val_size=0, augment=cfg.augment,
                           augment_options=cfg.augment_options())  # fmt: skip
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=True)  # the hook augments only while training
    net, batch = network_for("94")
    step = train_step_fn(net, batch, precision)
    steps = args.pipeline_steps
    x0, y0 = normalize(dm.train_set.images[:batch]), dm.train_set.labels[:batch]
    for _ in range(2):
        step(x0, y0)

    def from_memory() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            step(x0, y0)
        return time.perf_counter() - start

    def from_module() -> float:
        start, done = time.perf_counter(), 0
        while done < steps:
            for b in dm.train_dataloader():
                x, y = dm.on_after_batch_transfer(b, 0)
                step(x, y)
                done += 1
                if done == steps:
                    break
        return time.perf_counter() - start

    # Interleaved and repeated, so a slow moment of the machine hits both sides alike.
    mem, mod = [], []
    for _ in range(args.pipeline_repeats):
        mem.append(from_memory())
        mod.append(from_module())
    m, d = min(mem), min(mod)
    print(f"\n== data pipeline ({steps} steps of batch {batch}, fast network, {precision}, augment {cfg.augment}; best of {len(mem)})")
    print(f"in-memory batch     : {m:6.2f} s")
    print(f"fed by data module  : {d:6.2f} s")
    print(f"data-path overhead  : {(d - m) / m:+.1%}")
    return {"steps": steps, "batch": batch, "memory_s": m, "datamodule_s": d, "overhead": (d - m) / m}


class EpochProbe(L.Callback):
    """After each training epoch: wall seconds since the run began (without this probe's own
    time), validation accuracy if the run has a validation split, and the test accuracy the run
    would report if it stopped here. It reads the test set for the benchmark's curve only; the
    run itself chooses nothing with it."""

    def __init__(self, test_images: torch.Tensor, test_labels: torch.Tensor) -> None:
        self.start = time.perf_counter()
        self.own = 0.0
        self.images, self.labels = test_images, test_labels
        self.rows: list[dict] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        t = time.perf_counter()
        wall = t - self.start - self.own
        was_training = pl_module.training
        pl_module.eval()
        correct = 0
        with torch.inference_mode(), autocast(str(trainer.precision)):
            for i in range(0, len(self.labels), 1000):
                x = normalize(self.images[i : i + 1000]).to(pl_module.device)
                correct += int((pl_module.tta_logits(x).argmax(-1).cpu() == self.labels[i : i + 1000]).sum())
        pl_module.train(was_training)
        val = trainer.callback_metrics.get("val_acc")
        self.rows.append({"epoch": trainer.current_epoch + 1, "wall_s": round(wall, 2),
                          "val_acc": round(float(val), 4) if val is not None else None,
                          "test_acc": round(correct / len(self.labels), 4)})  # fmt: skip
        print(f"  probe: epoch {self.rows[-1]['epoch']}  {wall:.1f} s  test_acc {self.rows[-1]['test_acc']:.4f}", flush=True)
        self.own += time.perf_counter() - t


def bench_time_to_accuracy(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Each recipe and seed through ``training.run_training``, alone on the machine, the conv rate in
    the run's precision measured right before and right after it: (per-epoch rows, one row per
    finished run)."""
    test = load_splits(args.data_dir)["test"]
    rows, runs = [], []
    for recipe in args.recipes.split(","):
        for seed in args.seeds:
            given = {"preset": recipe, "data_dir": str(args.data_dir), "log_dir": str(args.log_dir), "seed": seed,
                     "progress_bar": False, "log_images_every": 0}  # fmt: skip
            if recipe == "seed" and args.seed_epochs:
                given["epochs"] = args.seed_epochs
            if args.precision != "auto":
                given["precision"] = args.precision
            cfg = recipes.build(given)
            argv = " ".join(f"{recipes.flag(k)} {v}" for k, v in given.items())
            print(f"\n== time to accuracy: cifar-train {argv}", flush=True)
            precision = training.resolve_precision(cfg.precision, cfg.accelerator)
            device = device_for(cfg.accelerator)
            before = reference_rate(precision, device)
            probe = EpochProbe(test.images, test.labels)
            result = training.run_training(cfg, callbacks=[probe])
            rate = (before + reference_rate(precision, device)) / 2
            for r in probe.rows:
                rows.append({"recipe": recipe, "seed": seed, **r, "norm_s": round(normalised(r["wall_s"], rate), 1),
                             "precision": precision})  # fmt: skip
            # The run's own wall time, less the probe's test passes (a plain cifar-train run has none).
            wall = result["wall_seconds"] - probe.own
            runs.append({"recipe": recipe, "seed": seed, "epochs": cfg.epochs, "test_acc": result["test_acc"],
                         "test_ece": result["test_ece"], "test_ece_uncalibrated": result["test_ece_uncalibrated"],
                         "wall_s": round(wall, 1), "precision": precision, "conv_gflops": round(rate),
                         "norm_s": round(normalised(wall, rate), 1),
                         "run_dir": result["run_dir"]})  # fmt: skip
            print(f"{recipe} seed {seed}: test accuracy {result['test_acc']:.4f}, wall {wall:.1f} s raw, "
                  f"{normalised(wall, rate):.0f} s normalised ({rate_label(precision, rate)}; probe time "
                  f"{probe.own:.1f} s excluded)", flush=True)  # fmt: skip
    return rows, runs


def plot_time_to_accuracy(rows: list[dict], path: Path) -> None:
    """One curve per recipe (its first seed), against normalised wall time on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for recipe in dict.fromkeys(r["recipe"] for r in rows):
        first = next(r.get("seed") for r in rows if r["recipe"] == recipe)
        pts = [r for r in rows if r["recipe"] == recipe and r.get("seed") == first]
        epochs = max(p["epoch"] for p in pts)
        label = f"seed recipe, Adam ({epochs} epochs)" if recipe == "seed" else f"fast, --preset {recipe} ({epochs} epochs)"
        ax.plot([p["norm_s"] / 60 for p in pts], [100 * p["test_acc"] for p in pts], marker="o", ms=3.5, label=label)
    for target in (90, 93, 94, 95):
        ax.axhline(target, color="grey", lw=0.6, ls=":")
    ax.set_xscale("log")
    # Rows written before the CSV had a precision column were all measured in bf16.
    names = "/".join(dict.fromkeys(precision_name(r.get("precision") or "bf16-mixed") for r in rows))
    ax.set_xlabel("normalised wall time of the cifar-train run, minutes\n"
                  f"(raw time x {names} 3x3 conv GFLOP/s / 1000, in the run's precision, measured in the same run)")
    ax.set_ylabel("test accuracy after the epoch, %")
    ax.set_ylim(30, 97)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    ax.set_title("CIFAR-10 on a 2-core CPU: accuracy against time, every preset")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def read_csv(csv_path: Path) -> list[dict]:
    with open(csv_path) as f:
        return [{**r, "epoch": int(r["epoch"]), "wall_s": float(r["wall_s"]), "test_acc": float(r["test_acc"]),
                 "norm_s": float(r["norm_s"]), "seed": int(r["seed"])} for r in csv.DictReader(f)]  # fmt: skip


def replot(csv_path: Path) -> None:
    """Redraw time_to_accuracy.png from its CSV (same data, current labels)."""
    plot_time_to_accuracy(read_csv(csv_path), csv_path.with_suffix(".png"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("throughput", "pipeline", "time-to-accuracy", "step", "all", "replot"),
                   help="replot: redraw OUT/time_to_accuracy.png from its CSV")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--precision", default="auto", choices=("auto", "32-true", "bf16-mixed"),
                   help="auto: what cifar-train trains in here (bf16-mixed only where the CPU runs bf16 natively, else 32-true)")
    p.add_argument("--seconds", type=float, default=15.0, help="timing per throughput measurement")
    p.add_argument("--pipeline-steps", type=int, default=15)
    p.add_argument("--pipeline-repeats", type=int, default=3)
    p.add_argument("--recipes", default="90,93,94,95,seed", help="presets to run for time-to-accuracy (step: fast ones only)")
    p.add_argument("--seed-epochs", type=int, default=0, help="cut the seed recipe short (0: its 20 epochs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="time-to-accuracy: seeds per recipe (the plot shows the first)")
    p.add_argument("--append", action="store_true", help="time-to-accuracy: keep --out's rows of recipes not run now")
    p.add_argument("--log-dir", type=Path, default=Path("lightning_logs") / "benchmark")
    p.add_argument("--out", type=Path, help="write benchmark.json, time_to_accuracy.csv and .png here")
    args = p.parse_args()
    if args.what == "replot":
        replot((args.out or Path(".")) / "time_to_accuracy.csv")
        return
    torch.manual_seed(0)
    training.quiet_lightning()
    results: dict = {"machine": machine(), "cpu_count": os.cpu_count(), "precision": training.resolve_precision(args.precision, "cpu")}
    if args.what in ("throughput", "all"):
        results["throughput"] = bench_throughput(args)
    if args.what in ("pipeline", "all"):
        results["pipeline"] = bench_pipeline(args)
    if args.what == "step":
        results["step"] = bench_step(args)
    if args.what in ("time-to-accuracy", "all"):
        rows, runs = bench_time_to_accuracy(args)
        ran = {r["recipe"] for r in runs}
        old = args.out / "benchmark_time-to-accuracy.json" if args.out else None
        if args.append and old and old.is_file():
            # Keep the other recipes' rows: recipes can be measured in separate sittings.
            kept = json.loads(old.read_text())
            rows = [r for r in kept.get("time_to_accuracy", []) if r["recipe"] not in ran] + rows
            runs = [r for r in kept.get("runs", []) if r["recipe"] not in ran] + runs
        results["time_to_accuracy"], results["runs"] = rows, runs
        print("\nrecipe  seed  epochs  test_acc  wall_s raw  normalised  conv GFLOP/s")
        for r in runs:
            print(f"{r['recipe']:<7} {r['seed']:>4} {r['epochs']:>7}  {r['test_acc']:.4f}  {r['wall_s']:10.1f}  "
                  f"{r['norm_s']:10.0f}  {r['conv_gflops']:>7} {precision_name(r.get('precision') or 'bf16-mixed')}")
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            with open(args.out / "time_to_accuracy.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["recipe", "seed", "epoch", "wall_s", "norm_s", "val_acc", "test_acc", "precision"])
                w.writeheader()
                w.writerows(rows)
            plot_time_to_accuracy(rows, args.out / "time_to_accuracy.png")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "benchmark.json" if args.what == "all" else f"benchmark_{args.what}.json"
        (args.out / name).write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
