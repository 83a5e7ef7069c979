"""One inference path, one image policy, one recipe: a checkpoint and its exports score the same,
training and prediction decode images alike, the recipe round-trips through YAML, and the
commands start without loading what they do not need."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, call, train_tiny_run
from PIL import Image

from cifar_lightning import cli, data, load_classifier
from cifar_lightning.images import load_image


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny run of the fast recipe (test-time views level 2), exported with and without them."""
    root = tmp_path_factory.mktemp("tta")
    # Without Lookahead: on 2 tiny epochs its slow copy stays near chance, T grows huge and every view
    # gives uniform probabilities, where this test needs views that change them.
    tree, run_dir = train_tiny_run(root, "--preset", "94", "--widths", "8,16,16", "--epochs", "2", "--val-size", "20", "--no-lookahead")
    (ckpt,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    out = {"tree": tree, "run": run_dir, "ckpt": ckpt, "root": root}
    for fmt, tta in (("onnx", None), ("safetensors", None), ("pt2", None), ("torchscript", None), ("onnx", "0")):
        name = f"model{'_plain' if tta else ''}.{fmt}"
        out[name] = root / name
        argv = [str(ckpt), "--format", fmt, "--out", str(out[name]), *(["--tta", tta] if tta else [])]
        assert call(cli.export_main, argv) == 0
    return out


def _evaluate(model: Path, tree: Path, out: Path) -> dict:
    assert call(cli.evaluate_main, [str(model), "--data-dir", str(tree), "--out", str(out), "--accelerator", "cpu"]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.train
def test_a_checkpoint_and_its_exports_score_the_same_with_their_test_time_views(fast_run, tmp_path: Path) -> None:
    results = json.loads((fast_run["run"] / "results.json").read_text())
    ckpt = _evaluate(fast_run["ckpt"], fast_run["tree"], tmp_path / "ckpt")
    assert ckpt["tta"] == 2
    # what training's own test measured, through the same scoring path: equal to the image
    assert ckpt["accuracy"] == results["test_acc"] and ckpt["ece"] == pytest.approx(results["test_ece"], abs=1e-7)
    for name in ("model.onnx", "model.safetensors", "model.pt2"):
        exported = _evaluate(fast_run[name], fast_run["tree"], tmp_path / name)
        assert exported["accuracy"] == ckpt["accuracy"], name
        assert np.allclose(exported["confusion_matrix"], ckpt["confusion_matrix"]), name
        meta = json.loads((fast_run["root"] / f"{name}.json").read_text())
        assert meta["tta"] == 2 and meta["test_accuracy"] == pytest.approx(results["test_acc"])
    # Without the views the export is another model: its sidecar claims no accuracy it did not earn.
    plain = json.loads((fast_run["root"] / "model_plain.onnx.json").read_text())
    assert plain["tta"] == 0 and plain["test_accuracy"] is None


@pytest.mark.train
def test_predict_load_classifier_and_every_export_give_the_same_probabilities(fast_run) -> None:
    files = sorted((fast_run["tree"] / "test").rglob("*.png"))
    ref_classes, ref = load_classifier(fast_run["ckpt"]).predict(files)
    for name in ("model.onnx", "model.safetensors"):
        classes, probs = load_classifier(fast_run[name]).predict(files)
        assert classes == ref_classes and torch.allclose(probs, ref, atol=1e-5), name
    scripted = torch.jit.load(str(fast_run["model.torchscript"]))
    from cifar_lightning.images import normalize
    from cifar_lightning.inference import as_uint8_batch

    assert torch.allclose(scripted(normalize(as_uint8_batch(files))).softmax(1), ref, atol=1e-5)
    plain_classes, plain = load_classifier(fast_run["model_plain.onnx"]).predict(files)
    assert not torch.allclose(plain, ref, atol=1e-4)  # the views do change the probabilities
    assert torch.allclose(load_classifier(fast_run["ckpt"], tta=0).predict(files)[1], plain, atol=1e-5)


def test_a_loaded_checkpoint_runs_channels_last_as_training_does_and_scores_as_in_nchw(fast_run) -> None:
    clf = load_classifier(fast_run["ckpt"])
    convs = [m for m in clf.network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    from cifar_lightning.images import normalize

    nchw = clf.network.to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        ref = nchw(normalize(images).contiguous())
    again = load_classifier(fast_run["ckpt"]).logits(images)
    assert torch.allclose(again, ref, atol=1e-4)


def test_training_folders_and_prediction_decode_an_image_the_same_way(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for size, mode in (((48, 64), "RGB"), ((40, 40), "L"), ((32, 32), "RGB"), ((300, 7), "RGBA")):
        arr = rng.integers(0, 256, (*size, len(mode)) if len(mode) > 1 else size, dtype=np.uint8)
        path = tmp_path / f"{size[0]}x{size[1]}{mode}.png"
        Image.fromarray(arr, mode).save(path)
        assert np.array_equal(data.decode_image(path), load_image(path).transpose(2, 0, 1)), path.name
    square = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(square).save(tmp_path / "exact.png")
    assert np.array_equal(load_image(tmp_path / "exact.png"), square)  # a CIFAR-sized file passes through unchanged


def test_print_config_is_a_recipe_that_config_takes_back_unchanged(tmp_path: Path, capsys) -> None:
    assert call(cli.train_main, ["--preset", "90", "--epochs", "3", "--lr", "0.5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    recipe = yaml.safe_load(printed)
    assert (recipe["preset"], recipe["epochs"], recipe["lr"], recipe["widths"]) == ("90", 3, 0.5, [32, 128, 128])
    (tmp_path / "r.yaml").write_text(printed)
    assert call(cli.train_main, ["--config", str(tmp_path / "r.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    assert not (tmp_path / "lightning_logs").exists()


def test_every_preset_is_a_yaml_file_in_the_package() -> None:
    from cifar_lightning import recipes

    for name in recipes.preset_names():
        path = Path(recipes.preset_file(name))
        assert path.is_file() and path.parent.name == "presets"
        assert recipes.read_yaml(path) == recipes.preset(name)


@pytest.mark.subprocess
def test_help_loads_neither_torch_nor_lightning_and_python_m_runs_each_command() -> None:
    probe = (
        "import sys\n"
        "from cifar_lightning import cli\n"
        "for p in (cli.train_parser, cli.evaluate_parser, cli.export_parser, cli.predict_parser, cli.show_data_parser, cli.serve_parser):\n"
        "    p().format_help()\n"
        "cli.resolve_train_config(['--preset', 'seed'])\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'numpy', 'PIL'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]"
    for command in ("train", "evaluate", "export", "predict", "show-data", "serve"):
        proc = subprocess.run([sys.executable, "-m", "cifar_lightning", command, "--help"], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0 and "usage:" in proc.stdout, command
    proc = subprocess.run([sys.executable, "-m", "cifar_lightning", "fly"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "usage" in proc.stderr


@pytest.mark.subprocess
def test_predicting_with_an_onnx_export_never_loads_lightning(fast_run) -> None:
    image = sorted((fast_run["tree"] / "test").rglob("*.png"))[0]
    probe = (
        "import sys\n"
        "from cifar_lightning.cli import predict_main\n"
        f"code = predict_main([{str(fast_run['model.onnx'])!r}, {str(image)!r}, '--json'])\n"
        "print('LOADED' if any(m.split('.')[0] == 'lightning' for m in sys.modules) else 'CLEAN', code)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip().splitlines()[-1] == "CLEAN 0"


@pytest.mark.train
def test_a_default_run_logs_test_images_the_lr_per_step_and_its_versions(fast_run, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: dict[str, list] = {"images": [], "scalars": []}
    for events in fast_run["run"].glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
        acc.Reload()
        tags["images"] += acc.Tags()["images"]
        tags["scalars"] += [(t, len(acc.Scalars(t))) for t in acc.Tags()["scalars"]]
    assert {"test/confusion", "test/predictions"} <= set(tags["images"])
    lr = [n for t, n in tags["scalars"] if t.startswith("lr-")]
    results = json.loads((fast_run["run"] / "results.json").read_text())
    # 120 training images less 20 for validation and those held out for calibration, batch 32
    train_images = 120 - 20 - results["calibration"]["images"]
    steps = results["epochs_run"] * -(-train_images // 32)
    assert lr and max(lr) >= steps  # one point per step, not per epoch
    assert set(results["versions"]) >= {"cifar_lightning", "torch", "lightning"}
    assert results["versions"]["torch"] == torch.__version__
