"""report.py: metrics against a hand-checked example, and the figures it draws, class names with markup included."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
from PIL import Image

from cifar_lightning import report
from cifar_lightning.errors import printable

# 3 classes, 6 images. Predictions (argmax): 0, 1, 1, 2, 0, 2 ; labels: 0, 0, 1, 2, 2, 1
PROBS = torch.tensor([
    [0.7, 0.2, 0.1],
    [0.3, 0.6, 0.1],  # label 0: wrong, 0 is second best
    [0.1, 0.8, 0.1],
    [0.2, 0.2, 0.6],
    [0.5, 0.1, 0.4],  # label 2: wrong, 2 is second best
    [0.1, 0.3, 0.6],  # label 1: wrong, 1 is second best
])  # fmt: skip
LABELS = torch.tensor([0, 0, 1, 2, 2, 1])


def test_metrics_match_a_hand_checked_example() -> None:
    m = report.compute_metrics(PROBS, LABELS, ["a", "b", "c"])
    assert m["num_images"] == 6
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["top2_accuracy"] == pytest.approx(6 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    # class a: predicted twice (images 0, 4), right once; 2 true images, 1 found
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    # class b: predicted for images 1, 2 -> right once; true images 2, 5 -> found once
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5) and m["per_class"]["b"]["recall"] == pytest.approx(0.5)
    loss = -(math.log(0.7) + math.log(0.3) + math.log(0.8) + math.log(0.6) + math.log(0.4) + math.log(0.3)) / 6
    assert m["mean_loss"] == pytest.approx(loss, rel=1e-5)
    # ECE with 15 bins: every image falls in its own confidence bin except none share; by hand:
    conf = PROBS.max(1).values
    correct = (PROBS.argmax(1) == LABELS).float()
    bins = torch.bucketize(conf, torch.linspace(0, 1, 16)[1:-1], right=True)
    ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).sum() / 6 for b in bins.unique())
    assert m["ece"] == pytest.approx(float(ece), abs=1e-6)


def test_confusion_matrix_sums_to_the_images_and_its_trace_is_the_accuracy() -> None:
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(500, 10, generator=g).softmax(1)
    labels = torch.randint(0, 10, (500,), generator=g)
    m = report.compute_metrics(probs, labels, [str(i) for i in range(10)])
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == 500 and np.trace(cm) / 500 == pytest.approx(m["accuracy"])


def test_most_confident_mistakes_are_wrong_and_ordered_by_confidence() -> None:
    idx = report.most_confident_mistakes(LABELS, PROBS, n=10)
    assert set(idx[:2].tolist()) == {1, 5} and idx[2].item() == 4  # confidences 0.6, 0.6, then 0.5
    assert report.most_confident_mistakes(LABELS, PROBS, n=1).tolist() in ([1], [5])


def test_read_curves_maps_lightning_steps_to_epochs(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path))
    for epoch, step in enumerate((10, 20, 30)):
        w.add_scalar("epoch", epoch, step)
        w.add_scalar("val_acc", 0.5 + epoch / 10, step)
        w.add_scalar("train_loss_epoch", 2.0 - epoch, step)
    w.close()
    curves = report.read_curves(tmp_path)
    assert [e for e, _ in curves["val_acc"]] == [0, 1, 2]
    assert [v for _, v in curves["val_acc"]] == pytest.approx([0.5, 0.6, 0.7])
    assert [e for e, _ in curves["train_loss_epoch"]] == [0, 1, 2]
    assert report.read_curves(tmp_path / "empty") == {t: [] for t in report.CURVE_TAGS}
    assert report.curves_figure(report.read_curves(tmp_path / "empty")) is None


def test_write_report_writes_every_figure_readable_and_not_blank(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 10
    probs = torch.rand(40, 10, generator=g).softmax(1)
    names = [f"class{i}" for i in range(10)]
    m = report.write_report(tmp_path / "r", probs, labels, images, names, {"model": "seed"}, grid=9)
    assert m["model"] == "seed" and m["num_images"] == 40
    md = (tmp_path / "r" / "report.md").read_text()
    for name in ("confusion.png", "confusion_normalized.png", "predictions.png", "misclassified.png", "per_class.png",
                 "calibration.png"):  # fmt: skip
        with Image.open(tmp_path / "r" / name) as im:
            assert im.format == "PNG" and min(im.size) >= 300, name
            assert np.asarray(im.convert("L"), dtype=np.float64).var() > 100, f"{name} looks blank"
        assert f"]({name})" in md
    assert not (tmp_path / "r" / "curves.png").exists()  # no run dir, no curves
    assert "class0" in report.format_table(m)


# ----------------------------------------------------------------------------- names matplotlib reads as math


MARKUP_NAMES = ["$x$", "$$", "a$b$c", "back\\slash", "^_", "$^_$", "$\\frac{$", "a$b", "x" * 255, "last"]


NAME_SETS = {
    "dollars": MARKUP_NAMES,
    "one-dollar-pair": ["$cat$", "dog"],
    "only-dollars": ["$", "$$", "$$$", "$$$$"],
    "not-utf8": [os.fsdecode(b"caf\xe9"), "$\\alpha$"],
}


def _predictions(n_classes: int, n: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.arange(n) % n_classes, torch.rand(n, n_classes, generator=g).softmax(1)


def _draw(fig) -> None:
    """Draw as TensorBoard's add_figure does (outside report.py), then as a PNG file."""
    fig.canvas.draw()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue().startswith(b"\x89PNG")
    report.plt.close(fig)


@pytest.mark.parametrize("names", NAME_SETS.values(), ids=NAME_SETS.keys())
def test_figures_draw_class_names_with_markup_characters_literally(names: list[str], tmp_path: Path) -> None:
    images, labels, probs = _predictions(len(names))
    metrics = report.compute_metrics(probs, labels, names)
    _draw(report.confusion_figure(metrics["confusion_matrix"], names))
    _draw(report.confusion_figure(metrics["confusion_matrix"], names, normalize=True))
    _draw(report.per_class_figure(metrics))
    _draw(report.prediction_grid(images, labels, probs, names, title="$HOME/runs/$x$: a$b$c"))
    _draw(report.data_grid_figure(images, labels, names, per_class=2))
    _draw(report.corruption_figure({"$noise$": [{"accuracy": 0.5, "label": "σ $0.1$"}]}))
    if printable("".join(names)) == "".join(names):
        # (a class name that is not UTF-8 never reaches a report: data.py refuses its folder)
        m = report.write_report(tmp_path / "r", probs, labels, images, names, {"model": "seed"}, grid=9)
        assert list(m["per_class"]) == names  # the records keep the names as they are
        assert all((tmp_path / "r" / f).is_file() for f in ("confusion.png", "per_class.png", "predictions.png"))


@pytest.mark.parametrize("name", [*MARKUP_NAMES, "plain", "\\$", "a\\$b$"])
def test_literal_text_is_never_math_and_draws_back_to_the_name(name: str) -> None:
    text = report.literal(name, max_chars=1000)
    assert not matplotlib.cbook.is_math_text(text)
    assert text.replace("\\$", "$") == name  # what matplotlib draws for a text that is not math
    assert len(report.literal("y" * 255)) <= report.MAX_LABEL


def test_the_drawn_tick_labels_are_the_class_names_as_typed() -> None:
    names = ["$x$", "a$b$c", "^_"]
    fig = report.confusion_figure(np.eye(3), names)
    fig.canvas.draw()
    ax = fig.axes[0]
    drawn = [t._preprocess_math(t.get_text()) for t in ax.get_xticklabels()]  # what the renderer gets
    assert drawn == [(n, False) for n in names]
    report.plt.close(fig)
