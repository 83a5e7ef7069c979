"""cifar-predict and load_classifier on model files: images of any mode, bad images, and unusable, malicious or oversized models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MaliciousPayload, call, one_error_line, png_bomb, probe_memory, sample_images, write_malicious_checkpoint
from PIL import Image

from cifar_lightning import load_classifier
from cifar_lightning.checkpoint import load_checkpoint, weights_problem
from cifar_lightning.cli import evaluate_main, export_main, predict_main
from cifar_lightning.errors import ModelError
from cifar_lightning.inference import as_uint8_batch


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


def test_top_k_above_the_class_count_gives_every_class_once(trained, tmp_path: Path, capsys) -> None:
    """--top-k is "at most": 11 on a 10-class model lists the 10, best first, summing to 1."""
    img = tmp_path / "one.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    assert call(predict_main, [str(trained["onnx"]), str(img), "--json", "--top-k", "11"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    probs = [t["probability"] for t in r["top_k"]]
    assert len({t["class"] for t in r["top_k"]}) == 10 and probs == sorted(probs, reverse=True)
    assert sum(probs) == pytest.approx(1, abs=1e-5)


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


def test_an_onnx_model_with_a_fixed_batch_of_one_classifies_many_images(run, tmp_path: Path) -> None:
    net = load_classifier(run["ckpt"]).network.eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(tmp_path / "b1.onnx"), dynamo=False)
    files = sorted((run["tree"] / "test").rglob("*.png"))[:5]
    classes, probs = load_classifier(tmp_path / "b1.onnx").predict(files)
    assert classes == load_classifier(run["ckpt"]).predict(files)[0] and probs.shape == (5, 10)


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


# ----------------------------------------------------------------------------- bad images: each one reported, the others still predicted


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


def test_a_decompression_bomb_is_one_bad_input_and_the_others_are_still_predicted(run, tmp_path: Path, capsys) -> None:
    bomb = png_bomb(tmp_path / "bomb.png")
    code = call(predict_main, [str(run["ckpt"]), str(run["good"]), str(bomb), str(run["good2"]), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [("top_k" in r, "error" in r) for r in out] == [(True, False), (False, True), (True, False)]
    assert "bomb.png" in out[1]["error"]


# ----------------------------------------------------------------------------- unusable models: one line, exit 2


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


def test_an_empty_model_argument_is_refused_not_the_current_folder(trained, capsys, monkeypatch) -> None:
    monkeypatch.chdir(trained["tree"])
    image = sample_images(trained["tree"])[0]
    assert call(predict_main, ["", str(image), "--json"]) == 2
    assert "empty" in capsys.readouterr().err


def test_a_torchscript_export_is_named_and_refused_without_loading_it(trained, capsys) -> None:
    image = sample_images(trained["tree"])[0]
    assert call(predict_main, [str(trained["torchscript"]), str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TorchScript" in err and "Warning" not in err


def test_predict_json_never_contains_nan(run, tmp_path: Path, capsys) -> None:
    assert call(export_main, [str(run["ckpt"]), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "m.safetensors.json").read_text())
    for bad in ({"std": [0, 0, 0]}, {"mean": [1e308 * 10, 0, 0]}, {"class_names": "cat"}, {"model": ["seed"]}, {"mean": [0.5, 0.5]}):
        (tmp_path / "m.safetensors.json").write_text(json.dumps({**meta, **bad}))
        assert call(predict_main, [str(tmp_path / "m.safetensors"), str(run["good"]), "--json"]) == 2, bad
        assert "unusable export metadata" in one_error_line(capsys), bad
    nested = "[" * 100_000 + "0" + "]" * 100_000  # a deeply nested sidecar
    (tmp_path / "m.safetensors.json").write_text(json.dumps(meta)[:-1] + f', "class_names": {nested}}}')
    assert call(predict_main, [str(tmp_path / "m.safetensors"), str(run["good"])]) == 2
    one_error_line(capsys)


def test_loading_a_checkpoint_or_export_with_non_finite_weights_is_refused(run, tmp_path: Path, capsys) -> None:
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    poisoned = tmp_path / "poisoned.ckpt"
    torch.save(ckpt, poisoned)
    with pytest.raises(ModelError, match="NaN or infinite"):
        load_classifier(poisoned)
    assert call(evaluate_main, [str(poisoned), "--data-dir", str(run["tree"]), "--out", str(tmp_path / "r")]) == 2
    assert name in one_error_line(capsys)
    assert call(export_main, [str(poisoned), "--format", "onnx", "--out", str(tmp_path / "p.onnx")]) == 2
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_a_safetensors_file_with_integer_or_bool_weights_is_refused(run, tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    from cifar_lightning.inference import load_classifier

    out = tmp_path / "m.safetensors"
    assert call(export_main, [str(run["ckpt"]), "--format", "safetensors", "--out", str(out), "--random-check"]) == 0
    weights = load_file(str(out))
    weights = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in weights.items()}
    save_file(weights, str(out))
    with pytest.raises(ModelError, match="integer or bool"):
        load_classifier(out)


def test_an_onnx_graph_whose_scores_ignore_the_batch_is_a_model_of_another_kind(tmp_path: Path) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cifar_lightning.inference import load_classifier

    # (N, 3, 32, 32) -> mean over the batch and the pixels -> (1, 3) @ (3, 10): one row whatever N is
    nodes = [helper.make_node("ReduceMean", ["images", "axes"], ["m"], keepdims=0), helper.make_node("Unsqueeze", ["m", "zero"], ["m1"]),
             helper.make_node("MatMul", ["m1", "w"], ["logits"])]  # fmt: skip
    inits = [numpy_helper.from_array(np.array([0, 2, 3], dtype=np.int64), "axes"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
             numpy_helper.from_array(np.ones((3, 10), dtype=np.float32), "w")]  # fmt: skip
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 10])], inits)  # fmt: skip
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)
    with pytest.raises(ModelError, match="another kind"):
        load_classifier(path)


# ----------------------------------------------------------------------------- malicious models: refused, their payload never run


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


# ----------------------------------------------------------------------------- models asking for a network too big to build


def test_weights_are_checked_against_a_network_that_allocates_nothing() -> None:
    import tracemalloc

    from cifar_lightning.models import build

    small = {k: (tuple(v.shape), v.is_floating_point()) for k, v in build("fast", num_classes=10, widths=[8, 16, 16]).state_dict().items()}
    tracemalloc.start()
    # 3000-wide groups would take gigabytes; on the meta device they take nothing.
    problem = weights_problem("fast", {"num_classes": 10, "widths": [3000, 3000, 3000]}, small)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert problem and problem.startswith("size mismatch") and peak < 50 << 20
    assert weights_problem("fast", {"num_classes": 10, "widths": [8, 16, 16]}, small) is None
    assert weights_problem("seed", {"num_classes": 10}, {}).startswith("missing")


@pytest.mark.subprocess
def test_a_sidecar_asking_for_a_huge_network_is_refused_within_a_gigabyte(run, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    assert call(export_main, [str(run["ckpt"]), "--format", "safetensors", "--out", str(out), "--random-check"]) == 0
    side = out.with_name(out.name + ".json")
    meta = json.loads(side.read_text())
    meta["model"], meta["model_args"] = "fast", {"num_classes": 10, "widths": [3000, 3000, 3000]}
    side.write_text(json.dumps(meta))
    proc = probe_memory("predict_main", [str(out), str(next((run["tree"] / "test" / "cat").iterdir()))])
    assert proc.returncode == 2 and "do not fit" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.subprocess
def test_a_checkpoint_asking_for_a_huge_network_is_refused_within_a_gigabyte(run, tmp_path: Path) -> None:
    ckpt = load_checkpoint(run["ckpt"])
    ckpt["hyper_parameters"]["model"] = "fast"
    ckpt["hyper_parameters"]["model_args"] = {"widths": [3000, 3000, 3000]}
    bad = tmp_path / "huge.ckpt"
    torch.save(ckpt, bad)
    for main, args in (("predict_main", [str(bad), str(next((run["tree"] / "test" / "cat").iterdir()))]),
                       ("export_main", [str(bad), "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--random-check"])):
        proc = probe_memory(main, args)
        assert proc.returncode == 2 and "do not fit" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
