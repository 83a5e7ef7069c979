"""cifar-export, cifar-predict and load_classifier: round trips, image modes, bad inputs,
malicious and GPU-saved checkpoints."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MaliciousPayload, call, copy_of_seed_run, write_malicious_checkpoint
from PIL import Image

from cifar_lightning import load_classifier
from cifar_lightning.cli import evaluate_main, export_main, predict_main
from cifar_lightning.errors import ModelError
from cifar_lightning.images import normalize
from cifar_lightning.inference import as_uint8_batch


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, seed_run_once: tuple[Path, Path]) -> dict[str, Path]:
    """The session's 1-epoch tiny run (a copy), exported to every format."""
    root = tmp_path_factory.mktemp("export")
    tree, run_dir = copy_of_seed_run(seed_run_once, root)
    (ckpt,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    paths = {"tree": tree, "ckpt": ckpt, "root": root, "run": run_dir}
    for fmt in ("safetensors", "onnx", "pt2", "torchscript"):
        paths[fmt] = root / f"model.{fmt}"
        assert call(export_main, [str(ckpt), "--format", fmt, "--out", str(paths[fmt])]) == 0
    return paths


def sample_images(tree: Path) -> list[Path]:
    return sorted((tree / "test").rglob("*.png"))[::4]


def test_every_export_predicts_what_the_checkpoint_predicts(trained) -> None:
    files = sample_images(trained["tree"])
    ref_classes, ref = load_classifier(trained["ckpt"]).predict(files)
    for fmt in ("safetensors", "onnx", "pt2"):
        classes, probs = load_classifier(trained[fmt]).predict(files)
        assert classes == ref_classes and torch.allclose(probs, ref, atol=1e-5), fmt
    scripted = torch.jit.load(str(trained["torchscript"]))
    x = normalize(as_uint8_batch(files))
    assert torch.allclose(scripted(x).softmax(1), ref, atol=1e-5)


def test_sidecar_carries_what_is_needed_to_use_the_model(trained) -> None:
    meta = json.loads((trained["root"] / "model.safetensors.json").read_text())
    assert meta["model"] == "seed" and meta["model_args"]["num_classes"] == 10
    assert meta["class_names"][0] == "airplane" and meta["input_size"] == [3, 32, 32]
    assert meta["mean"] == [0.4914, 0.4822, 0.4465] and meta["std"] == [0.2470, 0.2435, 0.2616]
    assert meta["source_sha256"] == hashlib.sha256(trained["ckpt"].read_bytes()).hexdigest()
    # the exported checkpoint is the one the run tested: the sidecar carries that run's test accuracy
    results = json.loads((trained["run"] / "results.json").read_text())
    assert Path(results["best_checkpoint"]) == trained["ckpt"]
    assert meta["test_accuracy"] == pytest.approx(results["test_acc"])
    onnx_meta = json.loads((trained["root"] / "model.onnx.json").read_text())
    assert onnx_meta["check"]["max_abs_logit_diff"] < 1e-4 and onnx_meta["check"]["same_top1"] == onnx_meta["check"]["images"]


def test_onnx_export_takes_any_batch_size(trained) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(trained["onnx"]), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        out = session.run(None, {session.get_inputs()[0].name: np.zeros((n, 3, 32, 32), np.float32)})[0]
        assert out.shape == (n, 10)


def write_modes(d: Path) -> dict[str, Path]:
    d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)
    files = {}

    def save(name: str, im: Image.Image, **kw) -> None:
        files[name] = d / name
        im.save(files[name], **kw)

    save("rgb8.png", Image.fromarray(rgb))
    save("gray16.png", Image.fromarray(rng.integers(0, 65536, (40, 40), dtype=np.uint16)))
    save("palette.png", Image.fromarray(rgb).convert("P"))
    save("gray.png", Image.fromarray(rgb).convert("L"))
    save("rgba.png", Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])))
    save("photo.jpg", Image.fromarray(rgb), quality=90)
    save("photo.webp", Image.fromarray(rgb))
    save("photo.bmp", Image.fromarray(rgb))
    save("tall.png", Image.fromarray(rng.integers(0, 256, (300, 7, 3), dtype=np.uint8)))
    save("huge.png", Image.fromarray(rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)))
    return files


def test_every_common_image_mode_and_size_is_predicted(trained, tmp_path: Path, capsys) -> None:
    files = write_modes(tmp_path / "imgs")
    assert call(predict_main, [str(trained["onnx"]), str(tmp_path / "imgs"), "--json", "--top-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(Path(r["path"]).name for r in out) == sorted(files)
    for r in out:
        assert len(r["top_k"]) == 3 and r["top_k"][0]["probability"] >= r["top_k"][1]["probability"]
        assert sum(t["probability"] for t in r["top_k"]) <= 1 + 1e-6


def test_alpha_is_composited_over_white_and_16_bit_is_scaled() -> None:
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert (as_uint8_batch([clear]) == 255).all()
    sixteen = Image.fromarray(np.full((32, 32), 65535, np.uint16))
    assert (as_uint8_batch([sixteen]) == 255).all()
    chw = np.zeros((3, 32, 32), np.uint8)
    assert as_uint8_batch([chw]).shape == (1, 3, 32, 32)


def test_python_api_takes_paths_pil_images_and_uint8_arrays(trained) -> None:
    clf = load_classifier(trained["safetensors"])
    path = sample_images(trained["tree"])[0]
    pil = Image.open(path)
    arr = np.asarray(pil)
    classes, probs = clf.predict([path, pil, arr])
    assert classes[0] == classes[1] == classes[2] and classes[0] in clf.class_names
    assert probs.shape == (3, 10) and torch.allclose(probs[0], probs[2])


def test_bad_inputs_are_reported_one_by_one_and_good_ones_still_predicted(trained, tmp_path: Path, capsys) -> None:
    good = sample_images(trained["tree"])[0]
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:60])
    paths = [good, tmp_path / "text.png", tmp_path / "empty.jpg", tmp_path / "trunc.png", tmp_path / "missing.png"]
    assert call(predict_main, [str(trained["ckpt"]), *map(str, paths), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert "top_k" in out[0] and all("error" in r for r in out[1:])
    assert all(Path(r["path"]).name in r["error"] for r in out[1:])
    assert call(predict_main, [str(trained["ckpt"]), *map(str, paths)]) == 1
    captured = capsys.readouterr()
    assert str(good) in captured.out and len(captured.err.strip().splitlines()) == 4 and "Traceback" not in captured.err


def _other_onnx(path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10)).eval()
    torch.onnx.export(net, (torch.zeros(1, 1, 28, 28),), dynamo=True).save(str(path))


@pytest.mark.parametrize("kind", ["missing", "txt", "corrupt-safetensors", "no-sidecar", "corrupt-onnx", "other-onnx"])
def test_unusable_models_give_one_line_and_exit_2(trained, tmp_path: Path, capsys, kind: str) -> None:
    import shutil

    if kind == "missing":
        model = tmp_path / "nope.ckpt"
    elif kind == "txt":
        model = tmp_path / "model.txt"
        model.write_text("hi")
    elif kind == "corrupt-safetensors":
        model = tmp_path / "m.safetensors"
        model.write_bytes(trained["safetensors"].read_bytes()[:1000])
        shutil.copy(trained["root"] / "model.safetensors.json", tmp_path / "m.safetensors.json")
    elif kind == "no-sidecar":
        model = tmp_path / "m.safetensors"
        shutil.copy(trained["safetensors"], model)
    elif kind == "corrupt-onnx":
        model = tmp_path / "m.onnx"
        model.write_bytes(trained["onnx"].read_bytes()[:500])
    else:
        model = tmp_path / "mnist.onnx"
        _other_onnx(model)
    code = call(predict_main, [str(model), str(sample_images(trained["tree"])[0])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and model.name in err[0] and "Traceback" not in err[0], err
    with pytest.raises(ModelError):
        load_classifier(model)


@pytest.mark.parametrize("cli", ["predict", "evaluate", "export"])
def test_a_malicious_checkpoint_is_refused_by_every_cli_and_never_runs(trained, tmp_path: Path, capsys, cli: str) -> None:
    marker = tmp_path / "pwned"
    evil = write_malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    argv = {
        "predict": (predict_main, [str(evil), str(sample_images(trained["tree"])[0])]),
        "evaluate": (evaluate_main, [str(evil), "--data-dir", str(trained["tree"]), "--out", str(tmp_path / "r")]),
        "export": (export_main, [str(evil), "--format", "onnx", "--out", str(tmp_path / "e.onnx")]),
    }[cli]
    assert call(*argv) == 2
    err = capsys.readouterr().err
    assert "refused to load" in err and "Traceback" not in err
    assert not marker.exists() and not (tmp_path / "r").exists() and not (tmp_path / "e.onnx").exists()


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_cpu_only_machine(trained, tmp_path: Path) -> None:
    """Simulated without a GPU: a serialization tagger records every storage as cuda:0, exactly
    what torch.save writes for GPU tensors."""
    if torch.cuda.is_available():
        pytest.skip("a real GPU is present")
    ckpt = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    gpu_file = tmp_path / "gpu.ckpt"

    def cuda_tag(storage):
        return "cuda:0" if storage.device.type == "cpu" else None

    torch.serialization.register_package(-100, cuda_tag, lambda obj, location: None)
    try:
        torch.save(ckpt, gpu_file)
    finally:
        torch.serialization._package_registry[:] = [e for e in torch.serialization._package_registry if e[1] is not cuda_tag]
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(gpu_file, weights_only=True)  # what a loader without map_location hits
    classes, _ = load_classifier(gpu_file).predict(sample_images(trained["tree"])[:2])
    assert classes == load_classifier(trained["ckpt"]).predict(sample_images(trained["tree"])[:2])[0]


def test_export_never_replaces_an_existing_file_without_overwrite(trained, capsys) -> None:
    before = trained["onnx"].read_bytes()
    assert call(export_main, [str(trained["ckpt"]), "--format", "onnx", "--out", str(trained["onnx"])]) == 2
    assert "--overwrite" in capsys.readouterr().err and trained["onnx"].read_bytes() == before


def _rewritten_pt2(src: Path, dest: Path, change) -> Path:  # noqa: ANN001
    """A copy of a .pt2 archive with one entry changed by ``change(name, data) -> data``, beside its sidecar."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, change(item.filename, zin.read(item.filename)))
    (dest.parent / (dest.name + ".json")).write_text((src.parent / (src.name + ".json")).read_text())
    return dest


@pytest.mark.parametrize("entry", ["sample_inputs", "pickled_weight", "operator", "expression"])
def test_a_crafted_pt2_runs_no_code_and_is_refused_in_one_line(trained, tmp_path: Path, capsys, entry: str) -> None:
    import io
    import pickle

    marker = tmp_path / "ran"
    payload = io.BytesIO()
    torch.save({"x": MaliciousPayload(marker)}, payload)

    def change(name: str, data: bytes) -> bytes:
        if entry == "sample_inputs" and name.endswith("sample_inputs/model.pt"):
            return payload.getvalue()
        if entry == "pickled_weight" and name.endswith("model_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()
        if entry == "operator" and name.endswith("models/model.json"):
            return data.replace(b"torch.ops.aten.relu_.default", b"builtins.exec", 1)
        if entry == "expression" and name.endswith("models/model.json"):
            program = json.loads(data)
            program["range_constraints"] = {"__import__('os').system('touch " + str(marker) + "')": {"min_val": 1, "max_val": 2}}
            return json.dumps(program).encode()
        return data

    crafted = _rewritten_pt2(trained["pt2"], tmp_path / "crafted.pt2", change)
    assert pickle.dumps is not None  # (pickle made the payload above)
    with pytest.raises(ModelError, match="refused: not a .pt2 written by cifar-export"):
        load_classifier(crafted)
    image = sample_images(trained["tree"])[0]
    assert call(predict_main, [str(crafted), str(image)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0]
    assert not marker.exists()


def test_a_torchscript_export_is_named_and_refused_without_loading_it(trained, capsys) -> None:
    image = sample_images(trained["tree"])[0]
    assert call(predict_main, [str(trained["torchscript"]), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TorchScript" in err and "Warning" not in err


def test_export_never_replaces_a_users_file_at_the_sidecar_path(trained, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.safetensors"
    side = tmp_path / "m.safetensors.json"
    side.write_text("my own notes")
    assert call(export_main, [str(trained["ckpt"]), "--format", "safetensors", "--out", str(out)]) == 2
    assert side.read_text() == "my own notes" and not out.exists()
    assert "m.safetensors.json exists" in capsys.readouterr().err
    side.unlink()
    side.mkdir()  # a folder where the sidecar would go: refused before anything is written
    assert call(export_main, [str(trained["ckpt"]), "--format", "safetensors", "--out", str(out)]) == 2
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_re_export_keeps_the_mode_of_the_file_it_replaces(trained, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert call(export_main, [str(trained["ckpt"]), "--format", "onnx", "--out", str(out)]) == 0
    out.chmod(0o600)
    assert call(export_main, [str(trained["ckpt"]), "--format", "onnx", "--out", str(out), "--overwrite"]) == 0
    assert out.stat().st_mode & 0o777 == 0o600


def test_export_of_a_bundled_model_or_an_export_says_what_is_possible(trained, capsys) -> None:
    assert call(export_main, ["pretrained:94", "--format", "onnx", "--out", str(trained["root"] / "b.onnx")]) == 2
    assert "already an export" in capsys.readouterr().err
    assert call(export_main, [str(trained["onnx"]), "--format", "pt2", "--out", str(trained["root"] / "b.pt2")]) == 2
    assert "not a training checkpoint" in capsys.readouterr().err


def test_an_empty_model_argument_is_refused_not_the_current_folder(trained, capsys, monkeypatch) -> None:
    monkeypatch.chdir(trained["tree"])
    image = sample_images(trained["tree"])[0]
    assert call(predict_main, ["", str(image), "--json"]) == 2
    assert "empty" in capsys.readouterr().err
