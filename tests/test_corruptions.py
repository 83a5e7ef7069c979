"""The corruption benchmark: each corruption does what its name says on a synthetic image, is
deterministic given a seed, and cifar-evaluate --corruptions reports them; the robust training
augmentation behaves likewise."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call, train_tiny_run
from PIL import Image

from cifar_lightning import augment, corruptions
from cifar_lightning.cli import evaluate_main


def synthetic(n: int = 4) -> torch.Tensor:
    """Smooth colour ramps plus a sharp checkerboard: edges to blur and blocks to compress."""
    y, x = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    checker = ((x // 4 + y // 4) % 2).float() * 80
    img = torch.stack([x * 5.0 + checker, y * 5.0 + 40, 200 - x * 3.0 - checker / 2])
    return img.clamp(0, 255).round().to(torch.uint8).expand(n, -1, -1, -1).contiguous()


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().mean())


@pytest.mark.parametrize(("name", "severity"), corruptions.all_levels())
def test_every_corruption_is_deterministic_keeps_the_shape_and_changes_the_image(name: str, severity: int) -> None:
    x = synthetic()
    a, b = corruptions.corrupt(x, name, severity, seed=3), corruptions.corrupt(x, name, severity, seed=3)
    assert a.dtype == torch.uint8 and a.shape == x.shape and torch.equal(a, b)
    assert err(a, x) > 0.5


def test_severities_grow_in_strength() -> None:
    texture = torch.randint(-40, 41, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    x = (synthetic().int() + texture).clamp(0, 255).to(torch.uint8)  # fine detail for JPEG to quantise
    for name, levels in corruptions.SEVERITIES.items():
        if name == "pixelate":
            continue  # its strength is the resolution left: see test_pixelate_keeps_the_named_resolution
        errors = [err(corruptions.corrupt(x, name, s), x) for s in range(1, len(levels) + 1)]
        assert errors == sorted(errors), name


def test_jpeg_is_pillows_baseline_jpeg_with_420_chroma() -> None:
    x = synthetic(1)
    buf = io.BytesIO()
    Image.fromarray(x[0].permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=75, subsampling="4:2:0")
    expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(corruptions.jpeg(x, 75)[0].numpy(), expected)
    assert Image.open(io.BytesIO(buf.getvalue())).layer[0][1:3] == (2, 2)  # luma sampled 2x2 per chroma sample: 4:2:0


def test_noise_has_the_named_sigma_and_depends_on_the_seed() -> None:
    grey = torch.full((8, 3, 32, 32), 128, dtype=torch.uint8)
    noisy = corruptions.corrupt(grey, "gaussian_noise", 2, seed=0)
    sigma = corruptions.SEVERITIES["gaussian_noise"][1]
    assert float((noisy.float() - 128).std() / 255) == pytest.approx(sigma, rel=0.05)
    assert not torch.equal(noisy, corruptions.corrupt(grey, "gaussian_noise", 2, seed=1))


def test_blur_smooths_edges_and_leaves_flat_images_alone() -> None:
    x = synthetic(1)
    blurred = corruptions.corrupt(x, "gaussian_blur", 3)
    grad = lambda t: float(t.float().diff(dim=-1).abs().mean())  # noqa: E731
    assert grad(blurred) < 0.8 * grad(x)
    flat = torch.full((1, 3, 32, 32), 90, dtype=torch.uint8)
    assert torch.equal(corruptions.corrupt(flat, "gaussian_blur", 3), flat)


def test_brightness_scales_and_contrast_shrinks_spread_around_the_mean() -> None:
    grey = torch.full((1, 3, 32, 32), 100, dtype=torch.uint8)
    assert int(corruptions.corrupt(grey, "brightness", 2).float().mean()) == 150  # x1.5
    x = synthetic(1)
    low = corruptions.corrupt(x, "contrast", 3)  # x0.25
    assert float(low.float().std()) == pytest.approx(0.25 * float(x.float().std()), rel=0.25)


def test_pixelate_keeps_the_named_resolution() -> None:
    x = torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    p = corruptions.corrupt(x, "pixelate", 3)  # 16 px: 2x2 blocks
    blocks = p.unfold(2, 2, 2).unfold(3, 2, 2)
    assert torch.equal(blocks, blocks[..., :1, :1].expand_as(blocks))
    for severity, side in enumerate(corruptions.SEVERITIES["pixelate"], 1):
        q = corruptions.corrupt(x, "pixelate", severity)
        assert len(torch.unique(q[0, 0], dim=1).T) == len(torch.unique(q[0, 0], dim=0)) == side  # side distinct columns, rows


def test_robust_augmentation_is_seeded_uint8_and_uses_real_jpeg() -> None:
    x = synthetic(64)
    aug = augment.BatchAugment("robust")
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    assert a.dtype == torch.uint8 and torch.equal(a, aug(x))
    # JPEG on every image: each comes out as Pillow's JPEG of it at one of the qualities
    torch.manual_seed(0)
    out = augment.random_jpeg(x[:3], 1.0)
    for got, img in zip(out, x[:3], strict=True):
        assert any(torch.equal(got, corruptions.jpeg(img[None], q)[0]) for q in augment.JPEG_QUALITIES)
    assert torch.equal(augment.random_jpeg(x, 0.0), x)
    torch.manual_seed(0)
    assert err(augment.random_noise(x, 1.0), x) > 0.5 and torch.equal(augment.random_noise(x, 0.0), x)
    blurred = augment.random_blur(x, 1.0)
    assert float(blurred.float().diff(dim=-1).abs().mean()) < float(x.float().diff(dim=-1).abs().mean())


@pytest.mark.train
def test_evaluate_corruptions_writes_the_table_the_heatmap_and_metrics(tmp_path: Path, capsys) -> None:
    tree, run = train_tiny_run(tmp_path, "--log-images-every", "0")
    out = tmp_path / "report"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    assert call(evaluate_main, [ckpt, "--out", str(out), "--corruptions", "jpeg,pixelate", "--grid", "4"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["corruptions"]) == ["jpeg", "pixelate"]
    assert [r["label"] for r in metrics["corruptions"]["jpeg"]] == ["q90", "q75", "q50", "q30"]
    cells = [r["accuracy"] for rows in metrics["corruptions"].values() for r in rows]
    assert metrics["corruption_mean_accuracy"] == pytest.approx(sum(cells) / len(cells))
    assert "| jpeg |" in (out / "report.md").read_text() and (out / "corruptions.png").stat().st_size > 0
    capsys.readouterr()
    assert call(evaluate_main, [ckpt, "--out", str(tmp_path / "r2"), "--corruptions", "fog"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and "--corruptions" in err_lines[0] and not (tmp_path / "r2").exists()
