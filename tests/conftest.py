"""Shared test helpers: tiny synthetic CIFAR-10 lookalikes in both source formats, a local fake
download, the one tiny cifar-train command line, the tiny seed run trained once per session (a
copy of it per module as ``run``, and exported to every format as ``trained``), a malicious
checkpoint, and what the tests of refusals share: the one error line, a folder's state, a small
full disk, SIGTERM at a chosen point, and a command under a memory limit.

Tiers (markers, pyproject.toml): ``unit`` (no Trainer, no subprocess: ``-m unit`` is the quick
loop), ``train`` (trains tiny runs in-process), ``subprocess`` (runs the commands as a user
does), ``faults`` (kills, signals, full disks), ``browser`` (headless Chromium) and
``real_data`` (../shared's CIFAR-10). A test marked with none of them is a ``unit`` test.
"""

from __future__ import annotations

import os

# Under pytest-xdist, each worker gets its share of the cores (set before torch loads, and
# inherited by the commands tests start): N workers each running torch on every core would
# oversubscribe them, and OpenMP threads spin-waiting on a busy core make tiny steps slower.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import contextlib
import functools
import hashlib
import http.server
import io
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_lightning import fileio
from cifar_lightning.images import CLASSES

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "cifar10"


def class_colour_image(label: int, rng: np.random.Generator) -> np.ndarray:
    """32x32 RGB noise around a colour that depends on the class, so tiny runs can learn."""
    base = np.array([(label * 25) % 256, (255 - label * 25) % 256, (label * 70) % 256], dtype=np.float64)
    img = base + rng.normal(0, 30, (32, 32, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_imagefolder(root: Path, n_train: int = 12, n_test: int = 4, classes=CLASSES, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for label, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(class_colour_image(label, rng)).save(d / f"{cls}_{i:04d}.png")
    return root


def call(main, argv: list[str]) -> int:
    """A CLI entry point's exit status, also when argparse exits from inside it."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def tiny_train_argv(tree: Path | str, logs: Path | str, *extra: str, epochs: int = 1) -> list[str]:
    """The one tiny cifar-train command line: the seed network on the CPU, 20 validation images,
    batches of 32, no progress bar. extra comes last, so a flag given there wins over these."""
    return [
        "--data-dir", str(tree), "--log-dir", str(logs), "--val-size", "20", "--epochs", str(epochs),
        "--batch-size", "32", "--accelerator", "cpu", "--no-progress-bar", "--preset", "seed", *extra,
    ]  # fmt: skip


def train_tiny_run(root: Path, *extra: str, epochs: int = 1) -> tuple[Path, Path]:
    """cifar-train on a fresh tiny tree under root, with its own cache: (tree, run dir)."""
    from cifar_lightning.cli import train_main

    tree = write_imagefolder(root / "tree")
    old = os.environ.get("CIFAR_LIGHTNING_CACHE")
    os.environ["CIFAR_LIGHTNING_CACHE"] = str(root / "cache")
    try:
        code = train_main(tiny_train_argv(tree, root / "logs", *extra, epochs=epochs))
    finally:
        if old is None:
            os.environ.pop("CIFAR_LIGHTNING_CACHE", None)
        else:
            os.environ["CIFAR_LIGHTNING_CACHE"] = old
    assert code == 0
    return tree, root / "logs" / "version_0"


TIERS = ("train", "subprocess", "faults", "browser", "real_data")
#: module fixtures that train a tiny run: a test that uses one is in the ``train`` tier
TRAINING_FIXTURES = {"seed_run_once", "world", "trained", "run", "calibrated", "fast_run", "export_dir", "model", "client",
                     "trained_run", "unbroken", "eval_run"}  # fmt: skip


#: the longest modules first: on several workers (CI), a long test left for the end keeps one
#: worker busy while the others idle; modules stay whole, so their fixtures are built once
FIRST = ("test_real_data.py", "test_faults.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))  # stable
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS) and TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.train)
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def seed_run_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny seed run (1 epoch, 20 validation images, no TensorBoard images), trained ONCE per
    session: (tree, run dir). Read it, never change it: a test that changes files takes
    ``copy_of_seed_run``."""
    return train_tiny_run(tmp_path_factory.mktemp("seed_run"), "--log-images-every", "0")


def copy_of_seed_run(seed_run: tuple[Path, Path], dest: Path) -> tuple[Path, Path]:
    """A private copy of the session's seed run under dest, as if trained there: (tree, run
    dir); the paths its config.yaml and results.json record name the copy."""
    tree, run = seed_run
    root = run.parent.parent
    shutil.copytree(root, dest, dirs_exist_ok=True)
    moved = dest / run.relative_to(root)
    for record in ("config.yaml", "results.json"):
        path = moved / record
        path.write_text(path.read_text().replace(str(root), str(dest)))
    return dest / tree.relative_to(root), moved


class MaliciousPayload:
    """Unpickling this runs a shell command that creates the marker file: what a malicious
    checkpoint carries. A test that finds the marker afterwards caught code being run."""

    def __init__(self, marker: Path | str) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {shlex.quote(self.marker)}",))


def write_malicious_checkpoint(path: Path, marker: Path, *, raw_pickle: bool = False) -> Path:
    """A file shaped like a seed checkpoint (state_dict, hyper_parameters {"model": "seed"}) whose
    payload, once unpickled, creates marker: written by torch.save, or with raw_pickle as a bare
    pickle stream."""
    ckpt = {"state_dict": {}, "hyper_parameters": {"model": "seed"}, "payload": MaliciousPayload(marker)}
    if raw_pickle:
        path.write_bytes(pickle.dumps(ckpt))
    else:
        import torch

        torch.save(ckpt, path)
    return path


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    """train: 10 classes x 12 PNGs, test: 10 x 4."""
    return write_imagefolder(tmp_path / "cifar_tree")


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own decoded-image cache, never the user's."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CIFAR_LIGHTNING_CACHE", str(cache))
    return cache


def fake_cifar10_archive(n_train: int = 50, n_test: int = 20, seed: int = 0) -> tuple[bytes, dict[str, str]]:
    """A small tar.gz in CIFAR-10's python format; returns (bytes, md5 of each member)."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    per_batch = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for i, n in enumerate(per_batch, 1):
        members[f"data_batch_{i}"] = pickle.dumps(
            {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
        )
    members["test_batch"] = pickle.dumps(
        {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n_test).tolist()}
    )
    members["batches.meta"] = pickle.dumps({"label_names": list(CLASSES)})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), {k: hashlib.md5(v).hexdigest() for k, v in members.items()}


@pytest.fixture
def fake_cifar10_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Serve a fake cifar-10-python.tar.gz over HTTP on localhost and point torchvision's
    CIFAR10 at it (URL and every checksum), so the real download code path runs offline."""
    from torchvision.datasets import CIFAR10

    archive, md5s = fake_cifar10_archive()
    served = tmp_path / "served"
    served.mkdir()
    (served / "cifar-10-python.tar.gz").write_bytes(archive)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # a client that hangs up early (BrokenPipeError) is the test's business, not a traceback in CI's log

    server = Server(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-python.tar.gz"
    monkeypatch.setattr(CIFAR10, "url", url)
    monkeypatch.setattr(CIFAR10, "tgz_md5", hashlib.md5(archive).hexdigest())
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", md5s[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5s["test_batch"]]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5s["batches.meta"]})
    yield url
    server.shutdown()
    server.server_close()


def png_bomb(path: Path, side: int = 30000) -> Path:
    """A ~100 KB PNG declaring side x side pixels: a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    body = zlib.compress((b"\x00" + b"\x00" * (side * 3)) * 4, 9)
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, seed_run_once: tuple[Path, Path]) -> dict[str, Path]:
    """A copy of the session's seed run for this module's tests, which may add files to it:
    its root, data tree, run dir, log dir and last checkpoint, and a cat and a dog test image."""
    root = tmp_path_factory.mktemp("run")
    tree, run_dir = copy_of_seed_run(seed_run_once, root)
    return {"root": root, "tree": tree, "run": run_dir, "logs": run_dir.parent, "ckpt": run_dir / "checkpoints" / "last.ckpt",
            "good": next((tree / "test" / "cat").iterdir()), "good2": next((tree / "test" / "dog").iterdir())}  # fmt: skip


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, seed_run_once: tuple[Path, Path]) -> dict[str, Path]:
    """The session's 1-epoch tiny run (a copy), exported to every format, ONCE per session (the
    export and predict tests read it): read it, never change it."""
    from cifar_lightning.cli import export_main

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


# ----------------------------------------------------------------------------- what the tests of refusals share


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def tree_state(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes: what a refused command must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if fileio.is_temp_sibling(p)]


CLASSES_2 = ("apple", "pear")


def tree_of(root: Path, classes: tuple[str, ...] = CLASSES_2, n_train: int = 3, n_test: int = 1) -> Path:
    return write_imagefolder(root, n_train=n_train, n_test=n_test, classes=classes)


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
