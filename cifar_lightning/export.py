"""Checkpoint -> safetensors, ONNX, a torch.export program (.pt2) or TorchScript, each with its
JSON sidecar and checked after writing.

An export carries everything needed to use the network without the training code's state: the
network name and arguments, class names, normalisation, input size, its test-time augmentation,
the test accuracy of exactly what was exported and the source checkpoint's SHA-256 (in the JSON
sidecar written beside every format). ONNX, .pt2 and TorchScript graphs have the checkpoint's
test-time views built in (``--tta 0`` exports the plain network); the safetensors sidecar
records the level and ``load_classifier`` applies it. Each written file is read back through
its own loader (``modelfile.KINDS``) and compared with the PyTorch network. TorchScript, which
torch 2.14 deprecates, stays for C++ users; Python loads the .pt2.

    cifar-export lightning_logs/version_0/checkpoints/last.ckpt --format pt2 --out model.pt2

Only exports bake the temperature into a graph (``Tempered``); everywhere else
``inference.Classifier`` applies it.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from cifar_lightning import bundled, models
from cifar_lightning.calibration import apply_temperature
from cifar_lightning.data import load_splits
from cifar_lightning.errors import CheckpointError, DataError, ExportError, ModelError
from cifar_lightning.fileio import atomic_write_files, new_file, refuse_overlap, sha256_of
from cifar_lightning.images import IMAGE_SIZE, MEAN, STD, normalize
from cifar_lightning.modelfile import KINDS, SUFFIXES, kind_of, open_model
from cifar_lightning.module import ImageClassifier
from cifar_lightning.recipes import EXPORT_FORMATS as FORMATS
from cifar_lightning.runs import SIDECAR_FORMAT, known_test_accuracy, recorded_data_dir, sidecar_path


def export_path(out: Path, fmt: str) -> Path:
    """--out with the format's suffix: added when missing (model -> model.onnx); a suffix of
    another model format is refused, so a file never claims to be what it is not."""
    own = KINDS[fmt].suffixes
    if out.suffix.lower() in own:
        return out
    if out.suffix.lower() in (*SUFFIXES, ".json"):
        raise ExportError(f"--out {out}: a {out.suffix} name for a {fmt} export; use {' or '.join(own)}")
    return out.with_name(out.name + own[0])


class Tempered(torch.nn.Module):
    """A network whose logits are divided by a temperature: the graph an export bakes T into."""

    def __init__(self, net: torch.nn.Module, temperature: float) -> None:
        super().__init__()
        self.net, self.temperature = net, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_temperature(self.net(x), self.temperature)


#: a float16 file is checked against the float32 network within float16's rounding: logits
#: differ by about 1e-3, and an image whose two best classes are that close may swap them
HALF_LIMITS = {"max_abs_logit_diff": 5e-2, "same_top1_fraction": 0.99}


def metadata(module: ImageClassifier, ckpt_path: Path, fmt: str, tta: int, calibrate: bool = True,
             half: bool = False, test_accuracy: float | None = None) -> dict[str, Any]:  # fmt: skip
    hp = module.hparams
    # The run's test accuracy was measured with the checkpoint's own views: it describes this
    # export only when the export keeps them (cifar-evaluate measures any export directly).
    recorded = known_test_accuracy(ckpt_path) if test_accuracy is None else test_accuracy
    accuracy = recorded if tta == hp.tta and not half else None
    return {
        "format": SIDECAR_FORMAT,
        "version": 2,
        "file_format": fmt,
        "model": hp.model,
        "model_args": {"num_classes": int(hp.num_classes), **(hp.model_args or {})},
        "class_names": list(hp.class_names) if hp.class_names else None,
        "mean": list(MEAN),
        "std": list(STD),
        "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
        "weights_dtype": "float16" if half else "float32",
        "input": "float32 NCHW, RGB in [0, 1] normalised with mean/std",
        "output": "logits divided by the temperature (softmax gives calibrated probabilities)"
        if calibrate and module.calibration and fmt != "safetensors" else "logits (softmax gives probabilities)",
        "tta": tta,
        "tta_in_graph": fmt != "safetensors" and tta > 0,
        # The softmax temperature fitted after training (null: never calibrated). A graph
        # divides by it unless exported with --no-calibrate; load_classifier applies it to
        # safetensors weights.
        "temperature": module.temperature if module.calibration else None,
        "temperature_in_graph": bool(fmt != "safetensors" and calibrate and module.calibration),
        "calibration": module.calibration,
        "test_accuracy": accuracy,
        "source_checkpoint": str(ckpt_path),
        "source_sha256": sha256_of(ckpt_path),
    }


def export(module: ImageClassifier, ckpt_path: Path, fmt: str, out: Path, check_images: torch.Tensor,
           tta: int | None = None, calibrate: bool = True, replace: bool = True, half: bool = False,
           test_accuracy: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Write ``out`` and its JSON sidecar, after checking the written file against the PyTorch
    network (with the same test-time views) on ``check_images`` (normalised floats). Returns
    the check's figures. ``tta`` defaults to the checkpoint's own level; ``calibrate=False``
    leaves the temperature out of a graph (it is still recorded in the sidecar); ``replace=False``
    never replaces a file that appeared at ``out`` meanwhile; ``half`` stores safetensors weights
    in float16 (checked within ``HALF_LIMITS``); ``test_accuracy``: the source's recorded one (default: its run's).

    Each format is serialised in memory first and written by Python: on a full disk the C++
    writers of torch and safetensors abort or raise their own errors, and leave a partial file."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")
    if half and fmt != "safetensors":
        raise ExportError(f"--half is for safetensors weights; a {fmt} graph is exported in float32")
    level = module.hparams.tta if tta is None else tta
    net = module.net.eval().to(memory_format=torch.contiguous_format)
    meta = metadata(module, ckpt_path, fmt, level, calibrate, half, test_accuracy)
    in_graph = module.temperature if meta["temperature_in_graph"] else 1.0
    reference = models.with_tta(net, level, module.temperature)
    reference = (Tempered(reference, in_graph) if in_graph != 1.0 else reference).eval()
    example = check_images[:2].contiguous()
    if fmt == "safetensors":
        tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
        limit = torch.finfo(torch.float16).max
        big = next((k for k, v in tensors.items() if half and v.is_floating_point() and v.abs().max() > limit), None)
        if big:
            raise ExportError(f"--half: weight {big} of {ckpt_path} holds values beyond float16's range (+/-65504); export without --half")
        tensors = {k: v.half() if half and v.is_floating_point() else v for k, v in tensors.items()}
        data = safetensors_bytes(tensors, metadata={"format": "pt"})
    elif fmt == "onnx":
        data = _onnx_bytes(reference, example)
    elif fmt == "pt2":
        data = _pt2_bytes(reference, example)
    else:
        data = _torchscript_bytes(reference, example)
    side = sidecar_path(out)

    def check(temps: dict[Path, Path]) -> dict[str, Any]:
        # The written file is read back as a user's load would read it, beside its written sidecar.
        result = verify(temps[out], fmt, meta, reference, check_images)
        meta["check"] = result
        temps[side].write_text(json.dumps(meta, indent=2))
        return result

    side_text = json.dumps(meta, indent=2)
    return atomic_write_files({out: lambda p: p.write_bytes(data), side: lambda p: p.write_text(side_text)}, check, replace=replace)


def _torchscript_bytes(net: torch.nn.Module, example: torch.Tensor) -> bytes:
    """Traced (the networks have no data-dependent control flow). TorchScript is deprecated in
    torch 2.14 in favour of torch.export, but still what C++/mobile deployments load: its
    deprecation and tracer warnings are this project's to say (--help, README), not torch's."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, example), buf)
    return buf.getvalue()


def _pt2_bytes(net: torch.nn.Module, example: torch.Tensor) -> bytes:
    """An ExportedProgram with a dynamic batch: the archive ``modelfile.pt2_problem`` accepts."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(net, (example,), dynamic_shapes={"x": {0: batch}})
        buf = io.BytesIO()
        torch.export.save(program, buf)
    return buf.getvalue()


def _onnx_bytes(net: torch.nn.Module, example: torch.Tensor) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        net, (example,), dynamo=True, input_names=["images"], output_names=["logits"],
        dynamic_shapes={"x": {0: batch}}, verbose=False, report=False,
    )  # fmt: skip
    return program.model_proto.SerializeToString()  # the networks are far below protobuf's 2 GB


def verify(path: Path, fmt: str, meta: dict, reference: torch.nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """Max |logit difference| and top-1 agreement between the written file, loaded by its kind's
    own loader (TorchScript's: torch.jit, this project's own file) beside its sidecar, and the network."""
    side = sidecar_path(path)
    side.write_text(json.dumps(meta))
    try:
        with torch.inference_mode():
            expected = reference(images)
        return _compare(expected, _logits_of(path, fmt, meta, images), half=meta.get("weights_dtype") == "float16")
    finally:
        side.unlink(missing_ok=True)


def _logits_of(path: Path, fmt: str, meta: dict, images: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        if fmt == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.jit.load(str(path), map_location="cpu")(images)
        net, _ = KINDS[fmt].loader(path, None)
        net = models.with_tta(net, meta["tta"], meta.get("temperature") or 1.0) if KINDS[fmt].weights else net
        return net(images)  # raw logits for weights; a graph's, with what it bakes in


def _compare(expected: torch.Tensor, got: torch.Tensor, half: bool = False) -> dict[str, Any]:
    diff = float((expected.float() - got.float()).abs().max())
    same = int((expected.argmax(1) == got.argmax(1)).sum())
    result = {"images": len(expected), "max_abs_logit_diff": diff, "same_top1": same}
    limit, agree = (HALF_LIMITS["max_abs_logit_diff"], HALF_LIMITS["same_top1_fraction"]) if half else (1e-4, 1.0)
    if not (diff < limit and same >= agree * len(expected)):
        raise ExportError(
            f"the export does not reproduce the checkpoint: max |logit diff| {diff:.2e}, top-1 agrees on {same}/{len(expected)}"
        )
    return result


def check_images(ckpt_path: Path, data_dir: str | None, n: int, download: bool, random_ok: bool = False) -> tuple[torch.Tensor, str]:
    """Normalised real test images for the export check, and where they came from. Without a
    usable data dir the check never degrades silently: it refuses, unless ``random_ok`` asks
    for seeded random images (which prove the numerics, not the accuracy)."""
    problem = "the model's run records no data dir"
    try:
        data_dir = recorded_data_dir(ckpt_path, data_dir)
        if data_dir:
            test = load_splits(data_dir, download=download)["test"]
            idx = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(0))[:n]
            return normalize(test.images[idx]), f"{len(idx)} test images of {data_dir}"
    except DataError as e:
        problem = str(e)
    if not random_ok:
        raise ExportError(f"no test images to check the export on ({problem}); pass --data-dir, or --random-check for random images")
    g = torch.Generator().manual_seed(0)
    return normalize(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)), f"{n} seeded random images (numerics only)"


def export_command(checkpoint: str | Path, fmt: str, out: str | Path, overwrite: bool = False, tta: int | None = None,
                   data_dir: str | None = None, n_check: int = 256, random_check: bool = False, calibrate: bool = True,
                   download: bool = True, half: bool = False) -> int:  # fmt: skip
    """cifar-export: refuse an --out over the checkpoint, export, check, say what it wrote; the exit status."""
    module, ckpt_path, accuracy = source_module(checkpoint)
    target = export_path(Path(out), fmt)
    try:
        data = recorded_data_dir(ckpt_path, data_dir)
    except DataError:  # gone: check_images says so below, or --random-check does without it
        data = None
    for path in (target, sidecar_path(target)):
        refuse_overlap(path, {"model it exports": ckpt_path, "bundled models": bundled.folder()},
                       inside={"data dir": Path(data) if data else None})  # fmt: skip
    target = new_file(target, overwrite, sidecar_path(target))
    images, where = check_images(ckpt_path, data_dir, n_check, download, random_check)
    check = export(module, ckpt_path, fmt, target, images, tta, calibrate, replace=overwrite, half=half, test_accuracy=accuracy)
    print(f"wrote {target} and {target.name}.json (test-time views: {module.hparams.tta if tta is None else tta})")
    if fmt == "torchscript":
        print("note: TorchScript is deprecated (torch 2.14); it stays for C++ and mobile; from Python, load a --format pt2 export")
    print(
        f"check on {where}: max |logit difference| {check['max_abs_logit_diff']:.2e} "
        f"(limit {HALF_LIMITS['max_abs_logit_diff'] if half else 1e-4:g}), "
        f"same top-1 on {check['same_top1']}/{check['images']}"
    )
    return 0


def source_module(spec: str | Path) -> tuple[ImageClassifier, Path, float | None]:
    """The network an export starts from, its file and its recorded test accuracy: a training
    checkpoint, or the weights of a safetensors export or a bundled model, rebuilt from their
    sidecar (network, test-time views, temperature) so that ``pretrained:94`` goes to ONNX as a
    run's checkpoint does. A graph export is refused: its views and temperature are inside it."""
    if not bundled.is_bundled(spec) and not Path(spec).is_file():
        raise CheckpointError(f"{spec}: no such checkpoint file")
    path = bundled.resolve(spec)  # hash-checked once; an unknown name lists the bundled ones
    try:
        kind = kind_of(path)
    except ModelError:
        kind = KINDS["checkpoint"]  # the checkpoint reader says what is wrong with it
    if kind.name == "checkpoint":
        return ImageClassifier.from_checkpoint(path), path, None  # None: metadata reads its run's accuracy
    if not kind.weights:
        raise ExportError(f"{spec}: a graph export ({kind.name}), its test-time views and temperature inside it; "
                          "export from the .ckpt that cifar-train wrote, a safetensors export or pretrained:NAME")  # fmt: skip
    opened = open_model(path)
    meta, args = opened.meta, dict(opened.meta.get("model_args") or {})
    if any(not torch.allclose(torch.tensor(meta.get(k) or v), torch.tensor(v)) for k, v in (("mean", MEAN), ("std", STD))):
        raise ExportError(f"{spec}: its sidecar normalises with another mean/std than this version's exports record")
    module = ImageClassifier(model=meta["model"], num_classes=int(args.pop("num_classes", len(opened.class_names))),
                             model_args=args, class_names=opened.class_names, tta=int(meta.get("tta", 0)))  # fmt: skip
    module.net.load_state_dict(opened.network.state_dict())  # float32, as the loader rebuilt it
    temperature = meta.get("temperature")
    module.calibration = meta.get("calibration") or ({"temperature": temperature} if temperature else None)
    accuracy = bundled.test_accuracy(spec) if bundled.is_bundled(spec) else meta.get("test_accuracy")
    return module, opened.path, accuracy
