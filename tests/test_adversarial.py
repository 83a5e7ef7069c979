"""Round two of the adversarial pass: each class of defect, kept fixed in its owner.

Path aliases (fileio.refuse_overlap), files that appear meanwhile (fileio.atomic_write
replace=False), untrusted sizes (recipes.RecipeLoader, checkpoint.weights_problem), checks made
before a run changes (training.build_data, training.check_resume_agrees), models of the wrong kind, and
faults: a full disk (a small tmpfs, where the tests run as root) and SIGTERM.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, call, copy_of_seed_run, tiny_train_argv, write_imagefolder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cifar_lightning import fileio
from cifar_lightning.checkpoint import load_checkpoint, weights_problem
from cifar_lightning.cli import evaluate_main, export_main, show_data_main, train_main
from cifar_lightning.errors import ConfigError, ModelError, exit_status, shown
from cifar_lightning.recipes import read_yaml


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def tree_state(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if fileio.is_temp_sibling(p)]


# ----------------------------------------------------------------------------- path aliases


def alias_of(kind: str, target: Path, scratch: Path) -> Path:
    """Another name for ``target`` (a file or folder): a symlinked parent, a '..' detour, a
    symlink to the thing itself, or a hard link (files only)."""
    scratch.mkdir(parents=True, exist_ok=True)
    if kind == "parent-link":
        link = scratch / "link"
        if not link.exists():
            link.symlink_to(target.parent, target_is_directory=True)
        return link / target.name
    if kind == "dotdot":
        return target.parent / "sub_that_is_not_there" / ".." / target.name
    if kind == "self-link":
        link = scratch / f"self_{target.name}"
        if not link.exists():
            link.symlink_to(target, target_is_directory=target.is_dir())
        return link
    if kind == "hard-link":
        link = scratch / f"hard_{target.name}"
        if not link.exists():
            os.link(target, link)
        return link
    raise AssertionError(kind)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["parent-link", "dotdot", "self-link", "hard-link"]), what=st.sampled_from(["checkpoint", "run", "logs"]))
def test_generated_aliases_of_an_input_are_always_refused(tmp_path: Path, kind: str, what: str) -> None:
    """An --out that names the checkpoint, its run, or a folder holding the run, by another name."""
    run = tmp_path / "logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"weights")
    target = {"checkpoint": ckpt, "run": run, "logs": run.parent}[what if kind != "hard-link" else "checkpoint"]
    out = alias_of(kind, target, Path(tempfile.mkdtemp(dir=tmp_path)))
    with pytest.raises(ConfigError, match="would overwrite"):
        fileio.refuse_overlap(out, {"checkpoint": ckpt, "training run": run})
    assert ckpt.read_bytes() == b"weights"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["parent-link", "dotdot", "self-link"]), name=st.sampled_from(["x.png", "cat/x.png", "dog/zz.png"]))
def test_generated_aliases_into_the_data_dir_are_always_refused(tmp_path: Path, kind: str, name: str) -> None:
    data = tmp_path / "data"
    (data / "train" / "cat").mkdir(parents=True, exist_ok=True)
    (data / "train" / "dog").mkdir(parents=True, exist_ok=True)
    out = alias_of(kind, data / "train", Path(tempfile.mkdtemp(dir=tmp_path))) / name
    with pytest.raises(ConfigError):
        fileio.refuse_overlap(out, {"data dir": data}, inside={"data dir": data})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, seed_run_once: tuple[Path, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adversary")
    tree, run_dir = copy_of_seed_run(seed_run_once, root)
    return {"root": root, "tree": tree, "run": run_dir, "logs": run_dir.parent, "ckpt": run_dir / "checkpoints" / "last.ckpt"}


def test_evaluate_through_a_symlinked_log_dir_never_deletes_the_run(run, tmp_path: Path, capsys) -> None:
    link = tmp_path / "LINK"
    link.symlink_to(run["logs"], target_is_directory=True)
    before = tree_state(run["run"])
    assert call(evaluate_main, [str(run["ckpt"]), "--out", str(link / run["run"].name), "--overwrite"]) == 2
    assert "would overwrite" in one_error_line(capsys)
    assert tree_state(run["run"]) == before


def test_export_through_a_symlinked_folder_never_replaces_its_checkpoint(run, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "DIR"
    folder.mkdir()
    ckpt = folder / "m.pt"
    shutil.copy(run["ckpt"], ckpt)
    before = ckpt.read_bytes()
    link = tmp_path / "LINK"
    link.symlink_to(folder, target_is_directory=True)
    for out in (link / "m.pt", folder / "x" / ".." / "m.pt"):
        assert call(export_main, [str(ckpt), "--format", "torchscript", "--out", str(out), "--overwrite", "--random-check"]) == 2
        assert "would overwrite" in one_error_line(capsys)
    assert ckpt.read_bytes() == before


def test_show_data_never_writes_into_its_data_through_an_alias(run, tmp_path: Path, capsys) -> None:
    tree = Path(shutil.copytree(run["tree"], tmp_path / "tree"))
    link = tmp_path / "T"
    link.symlink_to(tree, target_is_directory=True)
    before = tree_state(tree)
    victim = next((tree / "train" / "cat").iterdir())
    for out in (link / "train" / "cat" / victim.name, link / "train" / "dog" / "zz.png", tree / "nothere" / ".." / "train" / "x.png"):
        assert call(show_data_main, ["--data-dir", str(tree), "--out", str(out), "--overwrite"]) == 2
        assert "--out" in one_error_line(capsys)
    assert tree_state(tree) == before


def test_evaluate_never_writes_its_report_into_the_data_through_an_alias(run, tmp_path: Path, capsys) -> None:
    tree = Path(shutil.copytree(run["tree"], tmp_path / "tree"))
    link = tmp_path / "T"
    link.symlink_to(tree, target_is_directory=True)
    before = tree_state(tree)
    for out in (link / "train" / "cat" / "report", tree / "x" / ".." / "train" / "dog"):
        assert call(evaluate_main, [str(run["ckpt"]), "--data-dir", str(tree), "--out", str(out), "--overwrite"]) == 2
        assert "--out" in one_error_line(capsys)
    assert tree_state(tree) == before


# ----------------------------------------------------------------------------- a file that appears meanwhile


def test_a_file_that_appears_while_an_export_is_written_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"mine")
        out.write_bytes(b"theirs")  # another process, given the same --out, finished first

    with pytest.raises(ConfigError, match="appeared while"):
        fileio.atomic_write(out, write, replace=False)
    assert out.read_bytes() == b"theirs"
    assert not leftovers(tmp_path)


def test_two_exports_to_one_name_at_once_never_replace_each_other(run, tmp_path: Path) -> None:
    """Two real cifar-export processes, same --out, no --overwrite: one writes, the other is refused."""
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-m", "cifar_lightning", "export", str(run["ckpt"]), "--format", "safetensors", "--out", str(out),
           "--random-check"]  # fmt: skip
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    assert codes[0] == 0 and codes[1] == 2, [p.stderr.read() for p in procs]
    assert not leftovers(tmp_path)


# ----------------------------------------------------------------------------- untrusted sizes


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg", strict=True)
) + "epochs: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n"


def test_a_yaml_with_aliases_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases") as e:
        read_yaml(path)
    assert time.perf_counter() - t0 < 2 and len(str(e.value)) < 300


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(1, 6), fan=st.integers(1, 9), key=st.sampled_from(["epochs", "lr", "widths", "data_dir", "preset"]))
def test_generated_yaml_with_aliases_is_refused_and_the_error_is_short(tmp_path_factory, depth: int, fan: int, key: str) -> None:
    lines = ["l0: &l0 [lol]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]" for i in range(1, depth + 1)]
    path = tmp_path_factory.mktemp("yaml") / "r.yaml"
    path.write_text("\n".join([*lines, f"{key}: *l{depth}"]) + "\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(path)
    assert len(str(e.value)) < 300


def test_a_huge_value_is_quoted_bounded() -> None:
    nested: list = ["lol"] * 9
    for _ in range(8):
        nested = [nested] * 9  # 9**9 items if walked: shown() must not walk them
    assert len(shown(nested)) <= 80 and len(shown("x" * 10_000_000)) <= 80


def test_a_recipe_over_a_megabyte_is_refused_unparsed(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("epochs: 3\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="MB"):
        read_yaml(path)


MEMORY_PROBE = r"""
import resource, sys
from cifar_lightning import inference, checkpoint  # torch and its libraries mapped first
def vm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))
limit = vm() + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
from cifar_lightning.cli import {main}
sys.exit({main}(sys.argv[1:]))
"""


def probe_memory(main: str, args: list[str]) -> subprocess.CompletedProcess:
    """A command run with at most 1 GiB of address space beyond what importing torch took."""
    return subprocess.run([sys.executable, "-c", MEMORY_PROBE.format(main=main), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip


@pytest.mark.subprocess
def test_a_yaml_bomb_is_one_line_within_a_gigabyte(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    proc = probe_memory("train_main", ["--config", str(path), "--print-config"])
    assert proc.returncode == 2 and "aliases" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


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


# ----------------------------------------------------------------------------- checks before a run changes


def test_a_model_scored_on_other_class_names_is_refused(run, tmp_path: Path, capsys) -> None:
    other = write_imagefolder(tmp_path / "other", n_train=1, n_test=2, classes=[f"thing{i}" for i in range(10)])
    assert call(evaluate_main, [str(run["ckpt"]), "--data-dir", str(other), "--out", str(tmp_path / "r")]) == 2
    assert "not the model's" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_a_log_dir_inside_the_data_is_refused_before_anything_is_written(run, tmp_path: Path, capsys) -> None:
    tree = Path(shutil.copytree(run["tree"], tmp_path / "tree"))
    link = tmp_path / "T"
    link.symlink_to(tree, target_is_directory=True)
    before = tree_state(tree)
    for logs in (tree / "train", link / "train" / "cat", tree / "x" / ".." / "test"):
        assert call(train_main, tiny_train_argv(tree, logs)) == 2
        line = one_error_line(capsys)
        assert "--log-dir" in line and "inside the data dir" in line
    assert tree_state(tree) == before and sorted(p.name for p in (tree / "train").iterdir()) == sorted(os.listdir(run["tree"] / "train"))


def test_a_calibration_split_left_empty_is_refused_before_a_run_folder_exists(run, tmp_path: Path, capsys) -> None:
    logs = tmp_path / "logs"
    # 120 training images: 111 for validation leaves 9, and a tenth of 9 is none to calibrate on
    argv = tiny_train_argv(run["tree"], logs, "--calibrate", "heldout", "--val-size", "111")
    assert call(train_main, argv) == 2
    assert "--calibrate heldout" in one_error_line(capsys)
    assert not list(logs.glob("version_*"))


@pytest.mark.parametrize(("extra", "says"), [(["--data-dir", "ELEVEN"], "11 ("), (["--lr", "0.5"], "--lr")],
                         ids=["eleven-classes", "other-lr"])  # fmt: skip
def test_a_resume_that_cannot_go_ahead_leaves_the_run_as_it_was(run, tmp_path: Path, capsys, extra: list[str], says: str) -> None:
    _, moved = copy_of_seed_run((run["tree"], run["run"]), tmp_path / "copy")
    eleven = write_imagefolder(tmp_path / "eleven", n_train=3, n_test=1, classes=[*sorted(os.listdir(run["tree"] / "train")), "zebra"])
    extra = [str(eleven) if a == "ELEVEN" else a for a in extra]
    before = tree_state(moved)
    assert call(train_main, ["--resume", str(moved / "checkpoints" / "last.ckpt"), "--epochs", "2", "--no-progress-bar", *extra]) == 2
    assert says in one_error_line(capsys)
    assert tree_state(moved) == before


# ----------------------------------------------------------------------------- faults: a full disk, SIGTERM


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest):
    """A small tmpfs, 256 KiB unless the test is marked ``disk_kib(N)`` (root only: the tests are
    skipped elsewhere)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    marker = request.node.get_closest_marker("disk_kib")
    where = tmp_path / "disk"
    where.mkdir()
    size = f"size={marker.args[0] if marker else 256}k"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", size, "tmpfs", str(where)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> None:
    """Fill the disk up to ``leave`` free bytes."""
    with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            st = os.statvfs(disk)
            free = st.f_bavail * st.f_frsize - leave
            if free <= 0:
                break
            f.write(b"\0" * min(free, 1 << 16))
            f.flush()


@pytest.mark.faults
@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "safetensors"])
def test_an_export_to_a_full_disk_is_exit_1_one_line_and_leaves_nothing(run, small_disk: Path, fmt: str) -> None:
    fill(small_disk, leave=16 << 10)
    out = small_disk / "m"
    proc = subprocess.run([sys.executable, "-m", "cifar_lightning", "export", str(run["ckpt"]), "--format", fmt, "--out", str(out),
                           "--random-check"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "no space left" in lines[0], proc.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.faults
@pytest.mark.disk_kib(65536)  # room for the 26 MB seed checkpoint, then filled
def test_writing_the_temperature_to_a_full_disk_says_so_and_keeps_the_checkpoint(run, small_disk: Path, capsys) -> None:
    from cifar_lightning.training import calibrate_checkpoint

    ckpt = small_disk / "last.ckpt"
    try:
        shutil.copy(run["ckpt"], ckpt)
    except OSError:
        pytest.skip("the seed checkpoint does not fit the small disk")
    before = ckpt.read_bytes()
    fill(small_disk)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 10

    def body() -> int:
        calibrate_checkpoint(ckpt, images, labels, "heldout", "cpu")
        return 0

    assert exit_status("cifar-train", body, sigterm=False) == 1
    assert "no space left" in one_error_line(capsys)
    assert ckpt.read_bytes() == before and not leftovers(small_disk)


@pytest.mark.faults
def test_show_data_to_a_full_disk_is_exit_1_and_leaves_nothing(run, small_disk: Path) -> None:
    fill(small_disk, leave=4 << 10)
    argv = ["show-data", "--data-dir", str(run["tree"]), "--out", str(small_disk / "g.png")]
    proc = subprocess.run([sys.executable, "-m", "cifar_lightning", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "no space left" in lines[0], proc.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.faults
def test_a_report_to_a_full_disk_is_exit_1_and_leaves_nothing(run, small_disk: Path) -> None:
    fill(small_disk, leave=8 << 10)
    proc = subprocess.run([sys.executable, "-m", "cifar_lightning", "evaluate", str(run["ckpt"]), "--out", str(small_disk / "r")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "no space left" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# The command in a subprocess; HOLD names a function that announces itself in MARKER and waits
# there, so the test can send SIGTERM at exactly that point.
HOLDING = r"""
import importlib, os, sys, time
from pathlib import Path
module_name, _, name = os.environ["HOLD"].rpartition(".")
module = importlib.import_module(module_name)
real = getattr(module, name)
def held(*a, **k):
    result = real(*a, **k)
    Path(os.environ["MARKER"]).write_text("here")
    time.sleep(120)
    return result
setattr(module, name, held)
from cifar_lightning.__main__ import main
sys.exit(main())
"""


def sigterm_at(hold: str, argv: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    marker = tmp_path / "marker"
    env = {**os.environ, "HOLD": hold, "MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDING, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.faults
def test_sigterm_during_an_export_leaves_no_temp_file(run, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["export", str(run["ckpt"]), "--format", "onnx", "--out", str(out_dir / "m.onnx"), "--random-check"]
    proc = sigterm_at("cifar_lightning.export.verify", argv, tmp_path)  # the temp file is written and being checked
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert list(out_dir.iterdir()) == []


@pytest.mark.faults
def test_sigterm_during_an_evaluation_leaves_no_claimed_folder(run, tmp_path: Path) -> None:
    _, moved = copy_of_seed_run((run["tree"], run["run"]), tmp_path / "copy")
    before = sorted(p.name for p in moved.iterdir())
    proc = sigterm_at("cifar_lightning.report.write_report", ["evaluate", str(moved / "checkpoints" / "last.ckpt")], tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in moved.iterdir()) == before  # no report/, no hidden temp folder
    assert call(evaluate_main, [str(moved / "checkpoints" / "last.ckpt")]) == 0
    assert (moved / "report" / "report.md").is_file()  # the next evaluation gets report/, not report_2/


def test_a_full_disk_error_says_so_in_one_line(capsys) -> None:
    def body() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/m.onnx")

    assert exit_status("cifar-export", body) == 1
    line = one_error_line(capsys)
    assert "no space left" in line and "/somewhere/m.onnx" in line


def test_a_data_or_log_dir_whose_name_is_not_utf8_is_refused_before_training(tmp_path: Path, capsys) -> None:
    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))  # a name a run record (YAML, JSON) cannot hold
    for flag in ("--data-dir", "--log-dir"):
        argv = tiny_train_argv(tmp_path / "tree", tmp_path / "logs", flag, odd)
        assert call(train_main, argv) == 2
        line = one_error_line(capsys)
        assert flag in line and "UTF-8" in line
        line.encode("utf-8")  # the message itself is printable
    assert not (tmp_path / "logs").exists()
