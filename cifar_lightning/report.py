"""Evaluation metrics (torchmetrics) and the figures of a report (seaborn/matplotlib).

Pure functions of probabilities, labels and uint8 images: nothing here knows about Lightning
or command lines, so the same figures serve cifar-evaluate, TensorBoard during training and
cifar-show-data.

    cifar-evaluate lightning_logs/version_0/checkpoints/last.ckpt --data-dir ../shared/data/cifar10
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib

if "ipykernel" not in sys.modules:  # in a notebook, its inline backend shows the figures
    matplotlib.use("Agg")  # headless: figures are files and TensorBoard images, never windows

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from torchmetrics.classification import (  # noqa: E402
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from cifar_lightning.calibration import N_BINS, accuracy, ece  # noqa: E402
from cifar_lightning.errors import printable  # noqa: E402
from cifar_lightning.fileio import atomic_write  # noqa: E402

GOOD, BAD = "#1a7f37", "#cf222e"  # green for right, red for wrong
#: longer user texts (class names are folder names, up to 255 bytes) are shortened in figures
MAX_LABEL = 60


# ----------------------------------------------------------------------------- metrics


def compute_metrics(probs: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Accuracy, top-k, loss, ECE, per-class precision/recall/F1/support and the confusion
    matrix (rows true, columns predicted), as plain JSON-ready numbers."""
    probs, labels = probs.float().cpu(), labels.long().cpu()
    c = len(class_names)

    def acc(k: int) -> float:
        return float(MulticlassAccuracy(c, top_k=min(k, c), average="micro")(probs, labels))

    per = {name: metric(c, average=None)(probs, labels) for name, metric in
           (("precision", MulticlassPrecision), ("recall", MulticlassRecall), ("f1", MulticlassF1Score))}  # fmt: skip
    support = torch.bincount(labels, minlength=c)
    confusion = MulticlassConfusionMatrix(c)(probs, labels)
    return {
        "num_images": len(labels),
        "accuracy": accuracy(probs, labels),  # the one accuracy (calibration.accuracy), as a run's own test gives it
        "top2_accuracy": acc(2),
        "top5_accuracy": acc(5),
        "mean_loss": float(F.nll_loss(probs.clamp_min(1e-12).log(), labels)),
        "ece": ece(probs, labels),
        "per_class": {
            name: {k: float(per[k][i]) for k in per} | {"support": int(support[i])} for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }


def most_confident_mistakes(labels: torch.Tensor, probs: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n wrong predictions made with the highest probability, most confident first."""
    conf, pred = probs.max(dim=1)
    wrong = torch.nonzero(pred != labels).flatten()
    order = conf[wrong].argsort(descending=True)
    return wrong[order[:n]]


# ----------------------------------------------------------------------------- figures


def literal(text: object, max_chars: int = MAX_LABEL) -> str:
    """User text (a class name, a title naming a path) as a figure must be given it to draw it
    as it is: matplotlib reads a text with two or more ``$`` as math markup, so ``$x$`` would
    be drawn as math and ``$$`` or ``a$b$c`` would fail to parse and stop the whole figure.
    Every ``$`` is escaped (``\\$``, which matplotlib draws as ``$`` and which makes no text
    math), so backslashes, ``^`` and ``_`` are drawn as typed too. Escaping the text itself,
    rather than switching math off in an rc context, holds also where a figure is drawn after
    this module returned it (TensorBoard's ``add_figure``). A very long text is shortened in
    the middle; a name that is not UTF-8 shows its bytes as \\xNN."""
    s = printable(str(text))
    if len(s) > max_chars:
        s = f"{s[: max_chars // 2 - 1]}…{s[-(max_chars - max_chars // 2):]}"
    return s.replace("$", r"\$")


def _to_hwc(image: torch.Tensor) -> np.ndarray:
    x = image.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


def confusion_figure(confusion: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], normalize: bool = False) -> Figure:
    """Seaborn heatmap with class names on both axes; counts, or row-normalised shares."""
    cm = np.asarray(confusion, dtype=np.float64)
    total = cm.sum()
    accuracy = np.trace(cm) / total if total else float("nan")
    data = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1) if normalize else cm
    fig, ax = plt.subplots(figsize=(9, 7.5))
    names = [literal(name) for name in class_names]
    sns.heatmap(
        data, annot=True, fmt=".2f" if normalize else ".0f", cmap="Blues", square=True, cbar=True,
        xticklabels=names, yticklabels=names, ax=ax, annot_kws={"size": 9},
        vmin=0, vmax=1 if normalize else None, linewidths=0.5, linecolor="white",
    )  # fmt: skip
    ax.set_xlabel("predicted class", fontsize=12)
    ax.set_ylabel("true class", fontsize=12)
    ax.set_xticklabels(ax.get_xticklabels(), rotation=40, ha="right")
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    kind = "row-normalised (recall on the diagonal)" if normalize else "counts"
    ax.set_title(f"Confusion matrix, {kind}\naccuracy {accuracy:.2%} on {int(total):,} images", fontsize=13)
    fig.tight_layout()
    return fig


def prediction_grid(
    images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, class_names: Sequence[str], title: str = ""
) -> Figure:
    """Images titled with true and predicted class and its probability: green right, red wrong."""
    n = len(images)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 2.15 * rows + (0.4 if title else 0)), squeeze=False)
    conf, pred = probs.max(dim=1)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(_to_hwc(images[i]), interpolation="nearest")
        right = int(pred[i]) == int(labels[i])
        ax.set_title(
            f"true: {literal(class_names[int(labels[i])], 24)}\npred: {literal(class_names[int(pred[i])], 19)} {float(conf[i]):.2f}",
            color=GOOD if right else BAD, fontsize=9,
        )  # fmt: skip
    if title:
        fig.suptitle(literal(title, 200), fontsize=13)
    fig.tight_layout()
    return fig


def per_class_figure(metrics: dict) -> Figure:
    """Per-class recall (= accuracy on that class), sorted, against the overall accuracy."""
    items = sorted(((v["recall"], k) for k, v in metrics["per_class"].items()))
    values, names = [v for v, _ in items], [literal(k) for _, k in items]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.5))
    overall = metrics["accuracy"]
    colors = [GOOD if v >= overall else "#bf8700" for v in values]
    # Bars at positions, names as tick labels: shortened names that happen to be equal stay two bars.
    ax.barh(range(len(names)), values, color=colors)
    ax.set_yticks(range(len(names)), names)
    for y, v in enumerate(values):
        ax.text(v + 0.005, y, f"{v:.1%}", va="center", fontsize=10)
    ax.axvline(overall, color="black", linestyle="--", linewidth=1, label=f"overall {overall:.1%}")
    ax.set_xlim(0, min(1.0, max(values) + 0.12) if values else 1)
    ax.set_xlabel("recall (share of the class's images classified correctly)")
    ax.set_title("Accuracy per class")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _reliability(ax: plt.Axes, hist: plt.Axes, probs: torch.Tensor, labels: torch.Tensor, title: str) -> None:
    n_bins = N_BINS
    conf, pred = probs.float().max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    idx = torch.bucketize(conf, edges[1:-1], right=True)
    counts = torch.bincount(idx, minlength=n_bins).float()
    acc = torch.bincount(idx, weights=correct, minlength=n_bins) / counts.clamp_min(1)
    mean_conf = torch.bincount(idx, weights=conf, minlength=n_bins) / counts.clamp_min(1)
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    width = 1 / n_bins
    filled = counts > 0
    ax.bar(centers[filled], acc[filled].numpy(), width=width * 0.95, color="#0969da", label="accuracy")
    ax.bar(
        centers[filled], mean_conf[filled].numpy(), width=width * 0.95, fill=False, edgecolor=BAD, hatch="//",
        linewidth=1, label="mean confidence",
    )  # fmt: skip
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(f"{title}, ECE {ece(probs, labels):.3f}")
    hist.bar(centers, counts.numpy(), width=width * 0.95, color="gray")
    hist.set_xlabel("confidence (top-1 probability)")
    hist.set_ylabel("images")
    hist.set_xlim(0, 1)


def calibration_figure(probs: torch.Tensor, labels: torch.Tensor, raw_probs: torch.Tensor | None = None,
                       temperature: float = 1.0) -> Figure:  # fmt: skip
    """Reliability diagram: accuracy against confidence per bin, with the confidence histogram;
    given ``raw_probs`` (before the temperature), both side by side."""
    panels = [(raw_probs, "Before calibration (T = 1)"), (probs, f"After calibration (T = {temperature:.3f})")]
    panels = panels if raw_probs is not None else [(probs, "Reliability diagram")]
    fig, axes = plt.subplots(2, len(panels), figsize=(6.5 * len(panels), 7.5), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)  # fmt: skip
    for col, (p, title) in enumerate(panels):
        _reliability(axes[0, col], axes[1, col], p, labels, title)
    fig.tight_layout()
    return fig


def corruption_figure(results: dict) -> Figure:
    """Heatmap of accuracy per corruption (rows) and severity (columns), labelled with what
    each severity is."""
    names = list(results)
    width = max(len(v) for v in results.values())
    acc = np.full((len(names), width), np.nan)
    labels = np.full((len(names), width), "", dtype=object)
    for i, name in enumerate(names):
        for j, r in enumerate(results[name]):
            acc[i, j] = r["accuracy"]
            labels[i, j] = f"{r['accuracy']:.1%}\n{literal(r['label'])}"
    fig, ax = plt.subplots(figsize=(2.2 * width + 2.5, 0.75 * len(names) + 1.5))
    sns.heatmap(acc, annot=labels, fmt="", cmap="RdYlGn", vmin=0.5, vmax=1.0, mask=np.isnan(acc), ax=ax,
                xticklabels=[f"severity {j + 1}" for j in range(width)], yticklabels=[literal(n) for n in names],
                cbar_kws={"label": "accuracy"})  # fmt: skip
    ax.set_title("Accuracy on corrupted copies of the split")
    ax.tick_params(axis="y", rotation=0)
    fig.tight_layout()
    return fig


CURVE_TAGS = ("train_loss_epoch", "train_acc", "val_loss", "val_acc")


def read_curves(run_dir: Path | None) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch (epoch, value) series of a Lightning run's TensorBoard scalars; empty if absent."""
    curves: dict[str, list[tuple[int, float]]] = {tag: [] for tag in CURVE_TAGS}
    if run_dir is None or not Path(run_dir).is_dir() or not list(Path(run_dir).glob("events.out.tfevents.*")):
        return curves

    by_epoch: dict[str, dict[int, float]] = {tag: {} for tag in CURVE_TAGS}
    for events_file in sorted(Path(run_dir).glob("events.out.tfevents.*")):  # several after a resume
        try:
            acc = EventAccumulator(str(events_file), size_guidance={"scalars": 0})
            acc.Reload()
            tags = set(acc.Tags().get("scalars", []))
        except Exception:
            continue
        if "epoch" not in tags:
            continue
        epoch_at = {e.step: int(round(e.value)) for e in acc.Scalars("epoch")}
        for tag in CURVE_TAGS:
            if tag in tags:
                for e in acc.Scalars(tag):
                    if e.step in epoch_at:
                        by_epoch[tag][epoch_at[e.step]] = float(e.value)
    return {tag: sorted(values.items()) for tag, values in by_epoch.items()}


def curves_figure(curves: dict[str, list[tuple[int, float]]]) -> Figure | None:
    """Loss and accuracy against epoch, training and validation; None with nothing to draw."""
    if not any(curves.values()):
        return None
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for split, tag, style in (("train", "train_loss_epoch" if kind == "loss" else "train_acc", "-o"),
                                  ("validation", "val_loss" if kind == "loss" else "val_acc", "-s")):  # fmt: skip
            series = curves.get(tag) or []
            if series:
                ax.plot([e + 1 for e, _ in series], [v for _, v in series], style, markersize=4, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(kind)
        ax.set_title(f"{kind} by epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def data_grid_figure(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    per_class: int = 8,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    n_augmented: int = 4,
) -> Figure:
    """Training images, one row per class; with ``augment``, each row is one original followed
    by ``n_augmented`` random augmentations of it."""
    c = len(class_names)
    firsts = [torch.nonzero(labels == k).flatten()[: (1 if augment else per_class)] for k in range(c)]
    cols = 1 + n_augmented if augment else per_class
    fig, axes = plt.subplots(c, cols, figsize=(1.25 * cols + 1.2, 1.3 * c), squeeze=False)
    for k, idx in enumerate(firsts):
        row = images[idx]
        if augment is not None and len(row):
            augmented = augment(row.repeat(n_augmented, 1, 1, 1))
            if augmented.is_floating_point():  # [0, 1] floats: bring the originals to the same scale
                row = row.float() / 255 if not row.is_floating_point() else row
            row = torch.cat([row, augmented.to(row.dtype)])
        for j in range(cols):
            ax = axes[k, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(row):
                ax.imshow(_to_hwc(row[j]), interpolation="nearest")
            if j == 0:
                ax.set_ylabel(literal(class_names[k]), rotation=0, ha="right", va="center", fontsize=11)
            if augment is not None and k == 0:
                ax.set_title("original" if j == 0 else f"augmented {j}", fontsize=10)
    fig.suptitle("CIFAR-10 training images" + (" and random augmentations" if augment else ""), fontsize=13)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = 100, replace: bool = True) -> None:
    """PNG written atomically: an interrupted save never leaves half an image at ``path``;
    ``replace=False`` keeps a file that appeared there meanwhile."""
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"), replace=replace)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- report


def worst_confusions(metrics: dict, n: int = 5) -> list[tuple[str, str, int]]:
    cm, names = np.asarray(metrics["confusion_matrix"]), metrics["class_names"]
    off = [(int(cm[i, j]), names[i], names[j]) for i in range(len(names)) for j in range(len(names)) if i != j and cm[i, j]]
    return [(t, p, c) for c, t, p in sorted(off, reverse=True)[:n]]


def format_table(metrics: dict, worst: int = 5) -> str:
    """A compact terminal summary: overall figures, per-class table, worst confusions."""
    lines = [
        f"images {metrics['num_images']:,}   accuracy {metrics['accuracy']:.4f}   top-2 {metrics['top2_accuracy']:.4f}"
        f"   top-5 {metrics['top5_accuracy']:.4f}   loss {metrics['mean_loss']:.4f}   ECE {metrics['ece']:.4f}",
    ]
    if "ece_uncalibrated" in metrics:
        lines.append(f"calibration: temperature {metrics['temperature']:.3f}, ECE {metrics['ece_uncalibrated']:.4f} before, "
                     f"{metrics['ece']:.4f} after")  # fmt: skip
    if metrics.get("corruptions"):
        n = sum(len(v) for v in metrics["corruptions"].values())
        lines.append(f"corruptions: mean accuracy {metrics['corruption_mean_accuracy']:.4f} over {n} corrupted copies, "
                     f"mean ECE {metrics['corruption_mean_ece']:.4f}")  # fmt: skip
        for name, rows in metrics["corruptions"].items():
            lines.append(f"  {name:<15}" + "  ".join(f"{r['label']:>12} {r['accuracy']:.4f}" for r in rows))
    lines += [
        "",
        f"{'class':<12}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}",
    ]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name:<12}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>10,}")
    pairs = worst_confusions(metrics, worst)
    if pairs:
        lines += ["", "worst confusions (true -> predicted: images)"]
        lines += [f"  {t} -> {p}: {c}" for t, p, c in pairs]
    return "\n".join(lines)


def _calibration_lines(metrics: dict) -> list[str]:
    if "ece_uncalibrated" not in metrics:
        return []
    return [
        "",
        "| | ECE (15 bins) | mean loss |",
        "| --- | --- | --- |",
        f"| before calibration (T = 1) | {metrics['ece_uncalibrated']:.4f} | {metrics['mean_loss_uncalibrated']:.4f} |",
        f"| after calibration (T = {metrics['temperature']:.3f}) | {metrics['ece']:.4f} | {metrics['mean_loss']:.4f} |",
    ]


def corruption_table(metrics: dict) -> list[str]:
    """Markdown: accuracy (ECE) per corruption and severity, and the means."""
    results = metrics.get("corruptions")
    if not results:
        return []
    width = max(len(v) for v in results.values())
    out = [
        "",
        f"Clean accuracy {metrics['accuracy']:.2%}; mean over all {sum(len(v) for v in results.values())} corrupted "
        f"copies {metrics['corruption_mean_accuracy']:.2%} (mean ECE {metrics['corruption_mean_ece']:.4f}).",
        "",
        "| corruption | " + " | ".join(f"severity {j + 1}" for j in range(width)) + " |",
        "| --- |" + " --- |" * width,
    ]
    for name, rows in results.items():
        cells = [f"{r['accuracy']:.2%} ({r['label']}, ECE {r['ece']:.3f})" for r in rows] + [""] * (width - len(rows))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return out


def _markdown(metrics: dict, figures: list[str]) -> str:
    title = f"# Evaluation of `{metrics.get('model', 'model')}` on the {metrics.get('split', 'test')} split"
    out = [
        title,
        "",
        f"Checkpoint `{metrics.get('checkpoint', '?')}` (SHA-256 `{str(metrics.get('checkpoint_sha256', '?'))[:16]}…`), "
        f"{metrics['num_images']:,} images.",
        "",
        "| accuracy | top-2 | top-5 | mean loss | ECE |",
        "| --- | --- | --- | --- | --- |",
        f"| {metrics['accuracy']:.2%} | {metrics['top2_accuracy']:.2%} | {metrics['top5_accuracy']:.2%} "
        f"| {metrics['mean_loss']:.4f} | {metrics['ece']:.4f} |",
        *_calibration_lines(metrics),
        *corruption_table(metrics),
        "",
        "| class | precision | recall | F1 | support |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, m in metrics["per_class"].items():
        out.append(f"| {name} | {m['precision']:.2%} | {m['recall']:.2%} | {m['f1']:.2%} | {m['support']:,} |")
    captions = {
        "confusion.png": "Confusion matrix (counts)",
        "confusion_normalized.png": "Confusion matrix, row-normalised",
        "per_class.png": "Accuracy per class",
        "predictions.png": "Predictions on a random sample of the split",
        "misclassified.png": "The most confident mistakes",
        "calibration.png": "Calibration",
        "corruptions.png": "Accuracy under corruptions",
        "curves.png": "Training curves",
    }
    for name in figures:
        out += ["", f"## {captions.get(name, name)}", "", f"![{captions.get(name, name)}]({name})"]
    return "\n".join(out) + "\n"


def _no_mistakes() -> Figure:
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, "no mistakes on this split", ha="center", va="center", fontsize=14)
    return fig


def write_report(out_dir: Path, probs: torch.Tensor, labels: torch.Tensor, images: torch.Tensor, class_names: Sequence[str],
                 meta: dict, run_dir: Path | None = None, grid: int = 25, raw_probs: torch.Tensor | None = None,
                 corruptions: dict | None = None) -> dict:  # fmt: skip
    """Write metrics.json, every figure and report.md into out_dir; return the metrics.
    ``raw_probs``: the same predictions before the temperature (ECE before and after);
    ``corruptions``: {name: [{severity, label, accuracy, ece}, ...]} from cifar-evaluate."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {**meta, **compute_metrics(probs, labels, class_names)}
    if raw_probs is not None:
        metrics["ece_uncalibrated"] = ece(raw_probs, labels)
        metrics["mean_loss_uncalibrated"] = float(F.nll_loss(raw_probs.float().clamp_min(1e-12).log(), labels))
    if corruptions:
        cells = [r for rows in corruptions.values() for r in rows]
        metrics["corruptions"] = corruptions
        metrics["corruption_mean_accuracy"] = sum(r["accuracy"] for r in cells) / len(cells)
        metrics["corruption_mean_ece"] = sum(r["ece"] for r in cells) / len(cells)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    figures: dict[str, Figure] = {
        "confusion.png": confusion_figure(metrics["confusion_matrix"], class_names),
        "confusion_normalized.png": confusion_figure(metrics["confusion_matrix"], class_names, normalize=True),
        "per_class.png": per_class_figure(metrics),
    }
    # A seeded sample, not the first images: splits are often sorted by class.
    shown = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:grid].sort().values
    figures["predictions.png"] = prediction_grid(
        images[shown], labels[shown], probs[shown], class_names, title=f"{len(shown)} random images: green right, red wrong"
    )
    mistakes = most_confident_mistakes(labels, probs, grid)
    figures["misclassified.png"] = prediction_grid(images[mistakes], labels[mistakes], probs[mistakes], class_names,
                                                   title="Most confident mistakes") if len(mistakes) else _no_mistakes()  # fmt: skip
    figures["calibration.png"] = calibration_figure(probs, labels, raw_probs, float(meta.get("temperature") or 1.0))
    if corruptions:
        figures["corruptions.png"] = corruption_figure(corruptions)
    curves = curves_figure(read_curves(run_dir))
    if curves is not None:
        figures["curves.png"] = curves
    for name, fig in figures.items():
        save_figure(fig, out_dir / name)
    (out_dir / "report.md").write_text(_markdown(metrics, list(figures)))
    return metrics
