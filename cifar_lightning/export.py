"""Checkpoint -> safetensors (+ JSON sidecar), ONNX or TorchScript, each checked after writing.

An export carries everything needed to use the network without the training code's state: the
network name and arguments, class names, normalisation, input size, the test accuracy known at
export time and the source checkpoint's SHA-256 (in the JSON sidecar written beside every
format). Loading a safetensors or ONNX export never unpickles anything.

    cifar-export lightning_logs/version_0/checkpoints/last.ckpt --format onnx --out seed.onnx
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from cifar_lightning import predict
from cifar_lightning.data import IMAGE_SIZE, MEAN, STD
from cifar_lightning.module import ImageClassifier
from cifar_lightning.predict import SIDECAR_FORMAT, sidecar_path

FORMATS = ("safetensors", "onnx", "torchscript")


class ExportError(ValueError):
    """An export that cannot be written or does not reproduce the checkpoint."""


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def known_test_accuracy(ckpt_path: Path) -> float | None:
    """The run's test accuracy from results.json, when this checkpoint is the one it tested."""
    results = ckpt_path.parent.parent / "results.json"
    try:
        r = json.loads(results.read_text())
        if Path(r["best_checkpoint"]).name == ckpt_path.name:
            return float(r["test_acc"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def metadata(module: ImageClassifier, ckpt_path: Path, fmt: str) -> dict[str, Any]:
    hp = module.hparams
    return {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "file_format": fmt,
        "model": hp.model,
        "model_args": {"num_classes": int(hp.num_classes), **(hp.model_args or {})},
        "class_names": list(hp.class_names) if hp.class_names else None,
        "mean": list(MEAN),
        "std": list(STD),
        "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
        "input": "float32 NCHW, RGB in [0, 1] normalised with mean/std",
        "output": "logits (softmax gives probabilities)",
        "test_accuracy": known_test_accuracy(ckpt_path),
        "source_checkpoint": str(ckpt_path),
        "source_sha256": sha256_of(ckpt_path),
    }


def _write_checked(out: Path, write: Any, check: Any) -> Any:
    """write(tmp); result = check(tmp); rename tmp over out. A failed write or check never leaves
    a partial or wrong file at ``out``, nor replaces one that was there."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}{out.suffix}")
    try:
        write(tmp)
        result = check(tmp)
        os.replace(tmp, out)
        return result
    finally:
        if tmp.exists():
            tmp.unlink()


def export(module: ImageClassifier, ckpt_path: Path, fmt: str, out: Path, check_images: torch.Tensor) -> dict[str, Any]:
    """Write ``out`` and its JSON sidecar, after checking the written file against the PyTorch
    network on ``check_images`` (normalised floats). Returns the check's figures."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    net = module.net.eval().to(memory_format=torch.contiguous_format)
    meta = metadata(module, ckpt_path, fmt)
    example = check_images[:2].contiguous()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        write = lambda p: save_file(tensors, str(p), metadata={"format": "pt"})  # noqa: E731
    elif fmt == "onnx":
        write = lambda p: _write_onnx(net, example, p)  # noqa: E731
    else:
        write = lambda p: _write_torchscript(net, example, p)  # noqa: E731
    check = _write_checked(out, write, lambda p: verify(p, fmt, meta, net, check_images))
    meta["check"] = check
    _write_checked(sidecar_path(out), lambda p: p.write_text(json.dumps(meta, indent=2)), lambda p: None)
    return check


def _write_torchscript(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    """Traced (the networks have no data-dependent control flow). TorchScript is deprecated in
    torch 2.14 in favour of torch.export, but still what C++/mobile deployments load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        torch.jit.save(torch.jit.trace(net, example), str(path))


def _write_onnx(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        net, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
        dynamic_shapes={"x": {0: batch}}, verbose=False, report=False,
    )  # fmt: skip
    program.save(str(path))


def verify(path: Path, fmt: str, meta: dict, net: torch.nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """Max |logit difference| and top-1 agreement between the written file and the network."""
    with torch.inference_mode():
        expected = net(images)
        if fmt == "onnx":
            got = predict.OnnxNetwork(path)(images)
        elif fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
                got = torch.jit.load(str(path), map_location="cpu")(images)
        else:
            got = predict.network_from_safetensors(path, meta)(images)
    return _compare(expected, got)


def _compare(expected: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    diff = float((expected.float() - got.float()).abs().max())
    same = int((expected.argmax(1) == got.argmax(1)).sum())
    result = {"images": len(expected), "max_abs_logit_diff": diff, "same_top1": same}
    if not (diff < 1e-4 and same == len(expected)):
        raise ExportError(
            f"the export does not reproduce the checkpoint: max |logit diff| {diff:.2e}, top-1 agrees on {same}/{len(expected)}"
        )
    return result
