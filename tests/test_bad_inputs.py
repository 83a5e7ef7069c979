"""A corpus of bad inputs across cifar-train, cifar-evaluate, cifar-export, cifar-predict and the
Python API. Each must give one clear line naming the file or flag, the documented exit status
(2: unusable input or flag; predict: 1 when some inputs failed), no traceback, and leave no
partial output behind."""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call, copy_of_seed_run, png_bomb, tiny_train_argv, train_tiny_run, write_malicious_checkpoint
from PIL import Image

from cifar_lightning import load_classifier
from cifar_lightning.cli import evaluate_main, export_main, predict_main, train_main
from cifar_lightning.images import CLASSES


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, seed_run_once: tuple[Path, Path]) -> dict[str, Path]:
    """Good and bad files, made once: a trained seed checkpoint, a fast one, broken trees,
    broken images and checkpoints, a foreign ONNX model."""
    root = tmp_path_factory.mktemp("bad")
    tree, run = copy_of_seed_run(seed_run_once, root / "seed")
    _, fast_run = train_tiny_run(root / "fast", "--preset", "94", "--widths", "8,16,16", "--tta", "0")
    w: dict[str, Path] = {"root": root, "tree": tree, "ckpt": run / "checkpoints" / "last.ckpt",
                          "fast_ckpt": fast_run / "checkpoints" / "last.ckpt"}  # fmt: skip

    def tree_copy(name: str) -> Path:
        return Path(shutil.copytree(tree, root / name))

    w["empty_dir"] = root / "empty"
    w["empty_dir"].mkdir()
    w["folder_ckpt"] = root / "looks_like.ckpt"  # a folder named like a model: the model argument, and refused
    w["folder_ckpt"].mkdir()
    t = tree_copy("missing_class")
    shutil.rmtree(t / "train" / "cat")
    w["missing_class"] = t
    t = tree_copy("empty_class")
    for f in (t / "train" / "dog").iterdir():
        f.unlink()
    w["empty_class"] = t
    t = tree_copy("renamed_class")
    (t / "test" / "frog").rename(t / "test" / "toad")
    w["mismatched_classes"] = t
    t = tree_copy("truncated_image")
    victim = next((t / "train" / "bird").iterdir())
    victim.write_bytes(victim.read_bytes()[:60])
    w["truncated_image_tree"], w["truncated_image"] = t, victim
    t = tree_copy("zero_byte_image")
    victim = next((t / "test" / "ship").iterdir())
    victim.write_bytes(b"")
    w["zero_byte_tree"], w["zero_byte_image"] = t, victim
    t = tree_copy("text_as_png")
    victim = next((t / "train" / "horse").iterdir())
    victim.write_text("this is not an image")
    w["text_png_tree"], w["text_png"] = t, victim

    w["truncated_ckpt"] = root / "truncated.ckpt"
    w["truncated_ckpt"].write_bytes(w["ckpt"].read_bytes()[:3000])
    w["random_ckpt"] = root / "random.ckpt"
    w["random_ckpt"].write_bytes(np.random.default_rng(0).bytes(5000))
    w["marker"] = root / "PWNED"
    w["evil_ckpt"] = write_malicious_checkpoint(root / "evil.ckpt", w["marker"])
    w["plain_pickle"] = root / "plain.ckpt"
    w["plain_pickle"].write_bytes(pickle.dumps({"hello": "world"}))

    foreign = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 5)).eval()
    w["foreign_onnx"] = root / "foreign.onnx"
    torch.onnx.export(foreign, (torch.randn(1, 3, 32, 32),), str(w["foreign_onnx"]), dynamo=False)
    other_input = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 10)).eval()
    w["other_input_onnx"] = root / "other_input.onnx"
    torch.onnx.export(other_input, (torch.randn(1, 3, 64, 64),), str(w["other_input_onnx"]), dynamo=False)
    w["random_onnx"] = root / "random.onnx"
    w["random_onnx"].write_bytes(np.random.default_rng(1).bytes(3000))
    w["a_file"] = root / "a_file"
    w["a_file"].write_text("a file, not a folder")
    w["bad_yaml"] = root / "bad.yaml"
    w["bad_yaml"].write_text("epochs: [1, 2\n")
    w["good_image"] = next((tree / "test" / "cat").iterdir())
    w["bomb"] = png_bomb(root / "bomb.png")
    t = tree_copy("bomb_tree")
    w["bomb_tree"], w["bomb_in_tree"] = t, png_bomb(t / "train" / "deer" / "zz_bomb.png")
    ckpt = torch.load(w["ckpt"], map_location="cpu", weights_only=True)
    ckpt["state_dict"] = {k: v.fill_(float("inf")) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    w["inf_ckpt"] = root / "diverged.ckpt"
    torch.save(ckpt, w["inf_ckpt"])
    w["run_dir"] = w["ckpt"].parent.parent
    return w


@dataclass
class Case:
    name: str
    main: Callable[[list[str]], int]
    argv: Callable[[dict[str, Path], Path], list[str]]
    code: int
    says: Callable[[dict[str, Path]], str]  # text the error line must contain (the file or flag)


def resolve(item: str, w: dict[str, Path], out: Path) -> str:
    """'@key' is a file of the corpus; '%name' a path in the case's own output folder."""
    return str(w[item[1:]]) if item.startswith("@") else str(out / item[1:]) if item.startswith("%") else item


def train(data: str, *extra: str) -> Callable[[dict[str, Path], Path], list[str]]:
    """The tiny cifar-train command line on data, logging into the case's own output folder."""

    def argv(w: dict[str, Path], out: Path) -> list[str]:
        return tiny_train_argv(resolve(data, w, out), out / "logs", *(resolve(e, w, out) for e in extra))

    return argv


def args(*items: str) -> Callable[[dict[str, Path], Path], list[str]]:
    def argv(w: dict[str, Path], out: Path) -> list[str]:
        return [resolve(i, w, out) for i in items]

    return argv


def path_of(key: str) -> Callable[[dict[str, Path]], str]:
    return lambda w: str(w[key])


def text(s: str) -> Callable[[dict[str, Path]], str]:
    return lambda w: s


CASES = [
    # cifar-train: data
    Case("train: data dir missing", train_main, train("/no/such/cifar"), 2, text("/no/such/cifar")),
    Case("train: data dir empty", train_main, train("@empty_dir", "--no-download"), 2, path_of("empty_dir")),
    Case("train: a class missing from train", train_main, train("@missing_class"), 2, path_of("missing_class")),
    Case("train: a class with no images", train_main, train("@empty_class"), 2, text("dog")),
    Case("train: train and test classes differ", train_main, train("@mismatched_classes"), 2, text("toad")),
    Case("train: truncated PNG", train_main, train("@truncated_image_tree"), 2, path_of("truncated_image")),
    Case("train: zero-byte image", train_main, train("@zero_byte_tree"), 2, path_of("zero_byte_image")),
    Case("train: text file named .png", train_main, train("@text_png_tree"), 2, path_of("text_png")),
    # cifar-train: flags and checkpoints
    Case("train: negative epochs", train_main, train("@tree", "--epochs", "-3"), 2, text("--epochs")),
    Case("train: batch size 0", train_main, train("@tree", "--batch-size", "0"), 2, text("--batch-size")),
    Case("train: unknown model", train_main, train("@tree", "--model", "resnet9000"), 2, text("resnet9000")),
    Case("train: unknown augmentation", train_main, train("@tree", "--augment", "mixup"), 2, text("--augment")),
    Case("train: learning rate nan", train_main, train("@tree", "--lr", "nan"), 2, text("--lr")),
    Case("train: malformed --config", train_main, train("@tree", "--config", "@bad_yaml"), 2, path_of("bad_yaml")),
    Case("train: --resume random bytes", train_main, train("@tree", "--resume", "@random_ckpt"), 2, path_of("random_ckpt")),
    Case("train: --init-from truncated", train_main, train("@tree", "--init-from", "@truncated_ckpt"), 2,
         path_of("truncated_ckpt")),  # fmt: skip
    Case("train: --init-from another network", train_main, train("@tree", "--model", "seed", "--init-from", "@fast_ckpt"),
         2, path_of("fast_ckpt")),  # fmt: skip
    Case("train: --init-from the same network at other widths", train_main,
         train("@tree", "--preset", "94", "--widths", "8,32,32", "--init-from", "@fast_ckpt"), 2, text("size mismatch")),  # fmt: skip
    Case("train: --init-from malicious pickle", train_main, train("@tree", "--init-from", "@evil_ckpt"), 2,
         path_of("evil_ckpt")),  # fmt: skip
    Case("train: --resume malicious pickle", train_main, train("@tree", "--resume", "@evil_ckpt"), 2, path_of("evil_ckpt")),
    Case("train: log dir under a file", train_main, lambda w, out: train("@tree", "--log-dir", f"{w['a_file']}/x")(w, out), 2,
         text("--log-dir")),  # fmt: skip
    Case("train: infinite learning rate", train_main, train("@tree", "--lr", "inf"), 2, text("--lr")),
    Case("train: label smoothing 1.5", train_main, train("@tree", "--label-smoothing", "1.5"), 2, text("--label-smoothing")),
    Case("train: unknown strategy", train_main, train("@tree", "--strategy", "nosuch"), 2, text("--strategy")),
    Case("train: two nodes without a launcher", train_main, train("@tree", "--num-nodes", "2"), 2, text("--num-nodes")),
    Case("train: seed out of range", train_main, train("@tree", "--seed", "100000000000000000000"), 2, text("--seed")),
    Case("train: infinite --max-time", train_main, train("@tree", "--max-time", "inf"), 2, text("--max-time")),
    Case("train: float16 weights", train_main, train("@tree", "--precision", "16-true"), 2, text("--precision")),
    Case("train: a decompression bomb in a class folder", train_main, train("@bomb_tree"), 2, path_of("bomb_in_tree")),
    # cifar-evaluate
    Case("evaluate: checkpoint with infinite weights", evaluate_main, args("@inf_ckpt", "--out", "%report"), 2, path_of("inf_ckpt")),
    Case("evaluate: --out is its own run, even with --overwrite", evaluate_main, args("@ckpt", "--out", "@run_dir", "--overwrite"), 2,
         text("would overwrite")),  # fmt: skip
    Case("evaluate: --out inside the data dir", evaluate_main, args("@ckpt", "--data-dir", "@tree", "--out", "@tree"), 2,
         text("data dir")),  # fmt: skip
    Case("evaluate: --split val of a model whose run held none out", evaluate_main,
         args("pretrained:photo", "--data-dir", "@tree", "--split", "val", "--out", "%report"), 2, text("score --split test")),
    Case("evaluate: missing checkpoint", evaluate_main, args("/no/such.ckpt"), 2, text("/no/such.ckpt")),
    Case("evaluate: random-bytes .ckpt", evaluate_main, args("@random_ckpt", "--out", "%report"), 2, path_of("random_ckpt")),
    Case("evaluate: plain pickle, not a checkpoint", evaluate_main, args("@plain_pickle", "--out", "%report"), 2, path_of("plain_pickle")),
    Case("evaluate: malicious pickle", evaluate_main, args("@evil_ckpt", "--out", "%report"), 2, path_of("evil_ckpt")),
    Case("evaluate: data dir missing", evaluate_main, args("@ckpt", "--data-dir", "/no/such/data", "--out", "%report"), 2,
         text("/no/such/data")),  # fmt: skip
    Case("evaluate: --out under a file", evaluate_main, args("@ckpt", "--out", "@a_file"), 2, path_of("a_file")),
    # cifar-export
    Case("export: truncated checkpoint", export_main, args("@truncated_ckpt", "--format", "onnx", "--out", "%m.onnx"), 2,
         path_of("truncated_ckpt")),  # fmt: skip
    Case("export: unknown format", export_main, args("@ckpt", "--format", "tflite", "--out", "%m.tflite"), 2, text("--format")),
    Case("export: malicious pickle", export_main, args("@evil_ckpt", "--format", "safetensors", "--out", "%m.safetensors"), 2,
         path_of("evil_ckpt")),  # fmt: skip
    Case("export: --out is the checkpoint, even with --overwrite", export_main,
         args("@ckpt", "--format", "torchscript", "--out", "@ckpt", "--overwrite"), 2, text("a .ckpt name")),  # fmt: skip
    Case("export: --out with another format's suffix", export_main, args("@ckpt", "--format", "onnx", "--out", "%m.safetensors"), 2,
         text("m.safetensors")),  # fmt: skip
    # cifar-predict
    Case("predict: a folder as the model", predict_main, args("@folder_ckpt", "@good_image"), 2, text("is a folder")),
    Case("predict: an unknown bundled model", predict_main, args("pretrained:nope", "@good_image"), 2, text("no such bundled model")),
    Case("predict: checkpoint with infinite weights", predict_main, args("@inf_ckpt", "@good_image"), 2, path_of("inf_ckpt")),
    Case("predict: a decompression bomb among good images", predict_main, args("@ckpt", "@good_image", "@bomb"), 1, path_of("bomb")),
    Case("predict: ONNX of a 5-class model", predict_main, args("@foreign_onnx", "@good_image"), 2, path_of("foreign_onnx")),
    Case("predict: ONNX of 64x64 inputs", predict_main, args("@other_input_onnx", "@good_image"), 2, path_of("other_input_onnx")),
    Case("predict: random-bytes .onnx", predict_main, args("@random_onnx", "@good_image"), 2, path_of("random_onnx")),
    Case("predict: missing model", predict_main, args("/no/model.ckpt", "@good_image"), 2, text("/no/model.ckpt")),
    Case("predict: malicious pickle", predict_main, args("@evil_ckpt", "@good_image"), 2, path_of("evil_ckpt")),
    Case("predict: --top-k 0", predict_main, args("@ckpt", "@good_image", "--top-k", "0"), 2, text("--top-k")),
    Case("predict: zero-byte image among good ones", predict_main, args("@ckpt", "@good_image", "@zero_byte_image"), 1,
         path_of("zero_byte_image")),  # fmt: skip
    Case("predict: missing image among good ones", predict_main, args("@ckpt", "@good_image", "/no/img.png"), 1, text("/no/img.png")),
]


def snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_clear_line_and_leaves_nothing_behind(
    case: Case, world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(world["root"])
    code = call(case.main, case.argv(world, out))
    captured = capsys.readouterr()
    err_lines = [line for line in captured.err.splitlines() if line.startswith("cifar-")]
    assert code == case.code, captured.err[-2000:]
    assert "Traceback" not in captured.err
    if case.code == 2:
        assert err_lines, captured.err[-2000:]
        assert len(err_lines) == 1, err_lines
        assert case.says(world) in err_lines[0], err_lines[0]
        assert snapshot(out) == set(), snapshot(out)  # no run dir, report or export half-made
    else:  # predict: the failed input is named, on its own line, and the good one is still predicted
        assert any(case.says(world) in line for line in captured.out.splitlines() + captured.err.splitlines())
        assert str(world["good_image"]) in captured.out
    assert not world["marker"].exists()  # the malicious payload never ran
    assert snapshot(world["root"]) == before  # inputs untouched


@pytest.mark.parametrize(
    ("source", "expected"),
    [("missing.ckpt", "missing.ckpt"), ("random_ckpt", "random.ckpt"), ("evil_ckpt", "evil.ckpt"), ("foreign_onnx", "foreign.onnx")],
)
def test_python_api_raises_one_line_errors_naming_the_file(world: dict[str, Path], source: str, expected: str) -> None:
    from cifar_lightning.errors import CheckpointError, ModelError

    path = world.get(source, world["root"] / source)
    with pytest.raises((ModelError, CheckpointError)) as info:
        load_classifier(path)
    message = str(info.value)
    assert expected in message and "\n" not in message
    assert not world["marker"].exists()


def test_python_api_rejects_arrays_of_the_wrong_shape(world: dict[str, Path]) -> None:
    clf = load_classifier(world["ckpt"])
    with pytest.raises(ValueError, match="shape"):
        clf.predict([np.zeros((5, 5, 7), dtype=np.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        clf.predict([np.zeros((5, 5), dtype=np.float64)])


def test_odd_image_modes_and_sizes_are_predicted_not_refused(world: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    files = []
    for name, img in {
        "rgba.png": Image.fromarray(rng.integers(0, 256, (40, 60, 4), dtype=np.uint8), "RGBA"),
        "gray16.png": Image.fromarray(rng.integers(0, 65535, (33, 31), dtype=np.uint16)),
        "palette.gif": Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("P"),
        "tiny.bmp": Image.fromarray(rng.integers(0, 256, (1, 1, 3), dtype=np.uint8)),
        "wide.webp": Image.fromarray(rng.integers(0, 256, (10, 500, 3), dtype=np.uint8)),
        "cmyk.jpg": Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).convert("CMYK"),
    }.items():
        img.save(tmp_path / name)
        files.append(tmp_path / name)
    classes, probs = load_classifier(world["ckpt"]).predict(files)
    assert len(classes) == len(files) and all(c in CLASSES for c in classes)
    assert torch.allclose(probs.sum(1), torch.ones(len(files)), atol=1e-5)


@pytest.mark.unit
def test_a_librarys_warning_never_precedes_the_one_line_refusal(capsys) -> None:
    import warnings

    from cifar_lightning.errors import ConfigError, exit_status

    def refused() -> int:
        warnings.warn("torch says something first", UserWarning, stacklevel=1)
        raise ConfigError("--flag: the one line")

    def works() -> int:
        warnings.warn("torch says something", UserWarning, stacklevel=1)
        return 0

    assert exit_status("cifar-x", refused) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["cifar-x: error: --flag: the one line"]
    assert exit_status("cifar-x", works) == 0
    assert "torch says something" in capsys.readouterr().err  # shown once the command has worked
