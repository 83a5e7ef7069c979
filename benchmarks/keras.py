"""Side by side with the notebook's own Keras system, in one run: seconds per epoch, images/s and
test accuracy after each epoch, for the notebook's network in Keras and for ``--preset seed``,
trained on the same 50,000 images, in alternating epochs on the same machine.

    pip install -e '.[keras]'          # tensorflow-cpu and keras: an optional extra, never a runtime need
    python -m benchmarks.keras --data-dir ../shared/data/cifar10 --epochs 2

Each system trains in its own child process (TensorFlow and torch must not share one), and the
two take turns: Keras' epoch 1, ours, Keras' epoch 2, ours..., each child waiting idle while the
other trains, so a machine that slows down mid-run slows both alike (on these shared machines
the same Keras epoch has taken 48 s in one run and 84 s in another). Epoch time is the training
pass alone; the test pass after each epoch is not counted. The 3x3 conv rate in the precision
our side trains in (bf16 only where the CPU runs it natively, else fp32) is measured before and
after, and every time is also printed normalised by their mean (normalised s = raw s x rate /
1,000 GFLOP/s). Prints; asserts nothing.

Neither this module's top level nor the Keras child imports torch (the harness is imported by
the parent only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALL_HINT = "Keras and TensorFlow are not installed; install the optional extra: pip install -e '.[keras]'"


def write_numpy(data_dir: str, path: Path) -> None:
    """Train and test images (uint8 NHWC) and labels from our data module, for the Keras child:
    it must not import torch (TensorFlow and torch in one process can crash on import)."""
    import numpy as np

    from cifar_lightning.data import load_splits

    splits = load_splits(data_dir)
    arrays = {f"{s}_{k}": (splits[s].images.permute(0, 2, 3, 1) if k == "x" else splits[s].labels).numpy()
              for s in ("train", "test") for k in ("x", "y")}  # fmt: skip
    np.savez(path, **arrays)


def keras_model():  # noqa: ANN201 (keras is optional)
    """The notebook's network, layer for layer (our ``seed`` model mirrors it)."""
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(32, 3, padding="same", activation="relu"), layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2), layers.Dropout(0.25),
        layers.Conv2D(64, 3, padding="same", activation="relu"), layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.AveragePooling2D(2), layers.Dropout(0.25),
        layers.Flatten(), layers.Dense(512, activation="relu"), layers.Dropout(0.5), layers.Dense(10, activation="softmax"),
    ])  # fmt: skip


def wait_turn() -> None:
    """Block until the parent says this child may train its next epoch."""
    if sys.stdin.readline().strip() != "go":
        sys.exit(0)  # the parent is gone or has stopped the run


def run_keras(args: argparse.Namespace) -> None:
    import keras
    import numpy as np

    data = np.load(args.arrays)
    # float32 in [0, 1], as the notebook fed them
    x, y, xt, yt = data["train_x"] / np.float32(255), data["train_y"], data["test_x"] / np.float32(255), data["test_y"]
    keras.utils.set_random_seed(args.seed)
    model = keras_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy", metrics=["accuracy"])
    y1, yt1 = keras.utils.to_categorical(y, 10), keras.utils.to_categorical(yt, 10)
    for epoch in range(1, args.epochs + 1):
        wait_turn()
        t = time.perf_counter()
        model.fit(x, y1, batch_size=args.batch_size, epochs=1, shuffle=True, verbose=0)
        seconds = time.perf_counter() - t
        _, acc = model.evaluate(xt, yt1, batch_size=500, verbose=0)
        print(json.dumps({"system": "keras", "epoch": epoch, "seconds": seconds, "images": len(x), "test_acc": float(acc)}), flush=True)


def run_ours(args: argparse.Namespace) -> None:
    import lightning as L
    import torch

    from cifar_lightning import training
    from cifar_lightning.images import normalize

    class PerEpoch(L.Callback):
        """Times each training pass, then scores the test set (not counted)."""

        def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            wait_turn()
            self.t = time.perf_counter()

        def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
            seconds = time.perf_counter() - self.t
            test = trainer.datamodule.load()["test"]
            module.eval()
            with torch.inference_mode():
                right = sum(int((module(normalize(test.images[i : i + 500])).argmax(1) == test.labels[i : i + 500]).sum())
                            for i in range(0, len(test.labels), 500))  # fmt: skip
            module.train()
            n = len(trainer.datamodule.train_set)
            print(json.dumps({"system": "ours", "epoch": trainer.current_epoch + 1, "seconds": seconds, "images": n,
                              "test_acc": right / len(test.labels)}), flush=True)  # fmt: skip

    training.run_training(our_recipe(args), callbacks=[PerEpoch()])


def our_recipe(args: argparse.Namespace):  # noqa: ANN201 (a TrainConfig; recipes is imported here, not at the top)
    """Our side's recipe: --preset seed on all 50,000 training images, with --ours' values."""
    import yaml

    from cifar_lightning import recipes

    return recipes.build({
        "preset": "seed", "data_dir": args.data_dir, "val_size": 0, "epochs": args.epochs, "seed": args.seed,
        "batch_size": args.batch_size, "log_dir": args.log_dir, "calibrate": "none", "progress_bar": False,
        "log_images_every": 0, **{k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.ours)},
    })  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="lightning_logs/benchmark_keras")
    p.add_argument("--ours", nargs="*", default=[], metavar="KEY=VALUE", help="recipe values for our side (strings)")
    p.add_argument("--json", help="also write every epoch's figures here")
    p.add_argument("--system", choices=("keras", "ours"), help=argparse.SUPPRESS)  # the child processes
    p.add_argument("--arrays", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.system == "keras":
        return run_keras(args)
    if args.system == "ours":
        return run_ours(args)
    # Looked up, not imported: this process imports torch, which must not meet TensorFlow.
    if any(importlib.util.find_spec(m) is None for m in ("keras", "tensorflow")):
        print(INSTALL_HINT, file=sys.stderr)
        sys.exit(2)
    from benchmarks.harness import device_for, rate_label, reference_rate
    from cifar_lightning import training

    cfg = our_recipe(args)
    precision, device = training.resolve_precision(cfg.precision, cfg.accelerator), device_for(cfg.accelerator)
    rate = reference_rate(precision, device)
    rows = []
    # The children run this module with -m from the caller's folder (relative paths stay valid): put the repository on their path.
    path = os.pathsep.join(part for part in (str(REPO), os.environ.get("PYTHONPATH", "")) if part)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
    tmp = tempfile.TemporaryDirectory()
    arrays = Path(tmp.name) / "cifar10.npz"
    write_numpy(args.data_dir, arrays)
    children, errs = {}, {}
    for system in ("keras", "ours"):
        argv = [sys.executable, "-m", "benchmarks.keras", *sys.argv[1:], "--system", system, "--arrays", str(arrays)]
        errs[system] = open(Path(tmp.name) / f"{system}.err", "w")  # noqa: SIM115 (closed in the finally below)
        children[system] = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs[system],
                                            text=True, env=env)  # fmt: skip
    print(f"{'system':<7}{'epoch':>6}{'s/epoch':>10}{'images/s':>10}{'test acc':>10}", flush=True)
    try:
        for _ in range(args.epochs):
            for system, child in children.items():
                child.stdin.write("go\n")
                child.stdin.flush()
                line = ""
                while not line.startswith("{"):
                    line = child.stdout.readline()
                    if not line:
                        err = (Path(tmp.name) / f"{system}.err").read_text()
                        sys.exit(f"{system} failed:\n{err[-3000:]}")
                r = json.loads(line)
                rows.append(r)
                print(f"{r['system']:<7}{r['epoch']:>6}{r['seconds']:>10.1f}{r['images'] / r['seconds']:>10.0f}"
                      f"{r['test_acc']:>10.4f}", flush=True)  # fmt: skip
    finally:
        for child in children.values():
            child.stdin.close()
        for child in children.values():
            child.wait()
        for f in errs.values():
            f.close()
    rate = (rate + reference_rate(precision, device)) / 2
    norm = rate / 1000
    print(f"\n{rate_label(precision, rate)} in this run (mean of before and after; our side trains in {precision}); "
          f"normalised s = raw s x {norm:.3f}")
    print(f"{'system':<7}{'epoch':>6}{'s/epoch':>10}{'normalised':>12}{'images/s':>10}{'test acc':>10}")
    for r in rows:
        print(f"{r['system']:<7}{r['epoch']:>6}{r['seconds']:>10.1f}{r['seconds'] * norm:>12.1f}"
              f"{r['images'] / r['seconds']:>10.0f}{r['test_acc']:>10.4f}")  # fmt: skip
    mean = {s: sum(r["seconds"] for r in rows if r["system"] == s) / max(1, sum(r["system"] == s for r in rows)) for s in ("keras", "ours")}
    print(f"mean epoch: keras {mean['keras']:.1f} s, ours {mean['ours']:.1f} s; ours / keras = {mean['ours'] / mean['keras']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"conv_rate_gflops": rate, "epochs": rows, "mean_seconds": mean}, indent=2))


if __name__ == "__main__":
    main()
