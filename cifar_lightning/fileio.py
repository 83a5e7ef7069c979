"""The one way this project writes a file or a folder, and the checks on where it writes.

Every file the project writes (checkpoints, exports and their metadata, the decoded-image
cache, reports, run records) goes through ``atomic_write`` or ``atomic_dir``: the bytes go to a
hidden temporary sibling first and only a complete, checked result replaces the target with
``os.replace`` (atomic on POSIX and Windows). A kill, a full disk or a failed check never leaves
a half-written file, nor destroys the one that was there.

Imports nothing heavy: ``--help`` and the config commands load it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from cifar_lightning.errors import ConfigError

T = TypeVar("T")


def temp_sibling(path: Path) -> Path:
    """A hidden name beside ``path`` (same folder, so the final rename never crosses file
    systems); its suffix is kept because some writers choose the format from it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def is_temp_sibling(path: Path) -> bool:
    """A file ``temp_sibling`` made, e.g. left behind by a run killed mid-write."""
    return path.name.startswith(".") and ".tmp-" in path.name


def atomic_write(
    path: str | Path, write: Callable[[Path], None], check: Callable[[Path], T] | None = None, fsync: bool = False,
    replace: bool = True,
) -> T | None:
    """write(tmp); result = check(tmp); then tmp becomes ``path``. Returns check's result.

    ``fsync`` flushes the bytes to disk before the rename (for checkpoints: the file a resumed
    run needs must survive a power cut, not just a kill). ``replace=False`` never replaces a
    file: one that appeared at ``path`` while this one was being written (another process
    given the same --out) is kept, and this write fails instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        result = check(tmp) if check else None
        _move_into_place(tmp, path, replace)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def _move_into_place(tmp: Path, path: Path, replace: bool) -> None:
    # The mode of the file replaced (a user's chmod 600 stays), else as open() would make it:
    # some writers make 0600 temp files.
    try:
        mode = path.stat().st_mode & 0o7777 if path.is_file() else 0o666 & ~_umask()
    except OSError:
        mode = 0o666 & ~_umask()
    os.chmod(tmp, mode)
    if replace:
        os.replace(tmp, path)
    else:
        _rename_no_replace(tmp, path)


def atomic_write_files(writes: dict[Path, Callable[[Path], None]], check: Callable[[dict[Path, Path]], T], replace: bool = True) -> T:
    """Several files that belong together (an export and its sidecar): all written to temp
    siblings and checked (``check`` gets target -> temp) before any takes its place, so they
    appear together; a file this call created is removed again if a later one cannot follow."""
    temps = {path: temp_sibling(path) for path in writes}
    placed: list[Path] = []
    try:
        for path, write in writes.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            write(temps[path])
        result = check(temps)
        for path, tmp in temps.items():
            existed = path.exists()
            _move_into_place(tmp, path, replace)
            if not existed:
                placed.append(path)
        placed.clear()
        return result
    finally:
        for path in placed:
            path.unlink(missing_ok=True)
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def _rename_no_replace(tmp: Path, path: Path) -> None:
    """tmp -> path, failing if path exists, with no window between the check and the move: a
    hard link cannot be made over an existing name. Where the file system has no hard links,
    the check and the rename are separate steps (a window of microseconds, not minutes)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise ConfigError(f"--out {path}: appeared while this was being written (another process?); kept it, wrote nothing") from None
    except OSError:
        if path.exists():
            raise ConfigError(f"--out {path}: appeared while this was being written (another process?); kept it, wrote nothing") from None
        os.rename(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes | memoryview, fsync: bool = False, replace: bool = True) -> None:
    """Bytes already serialised in memory, written atomically. What torch or safetensors would
    write through their C++ writers goes this way: a full disk is then a Python OSError (ENOSPC)
    with the temp file removed, not an abort or a RuntimeError from inside the library."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write, fsync=fsync, replace=replace)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str, replace: bool = True) -> None:
    atomic_write(path, lambda p: p.write_text(text), replace=replace)


def atomic_dir(path: str | Path, write: Callable[[Path], T], replace: bool = False) -> T:
    """write(tmp_dir) fills a hidden temporary folder, which then becomes ``path``. An empty
    ``path`` (e.g. one claimed with ``claim_free_dir``) is taken over; a non-empty one is
    replaced only when ``replace`` is set, and only once the new one is whole."""
    path = Path(path)
    tmp = temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        result = write(tmp)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        elif replace and path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)  # fails (FileExistsError/OSError) if someone else took path meanwhile
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def claim_free_dir(base: Path) -> Path:
    """Create and return base, or base_2, base_3...: the first free one (see ``claim_first``)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    return claim_first(base if n == 1 else base.with_name(f"{base.name}_{n}") for n in itertools.count(1))


def claim_first(candidates: Iterable[Path]) -> Path:
    """Create the first candidate folder that does not exist yet and return it. mkdir is atomic,
    so two processes started at once never pick (and then replace) the same folder."""
    for candidate in candidates:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError("no candidate folder was free")  # the candidates given here never end


def claim_new_dir(parent: Path, name: str, what: str) -> Path:
    """Create parent/<name> with the first free N in ``name.format(N)``; mkdir is atomic, so two
    processes started at once never share (and overwrite) a folder."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(re.escape(name).replace(r"\{\}", r"(\d+)"))
        taken = [int(m.group(1)) for p in parent.iterdir() if (m := pattern.fullmatch(p.name))]
    except OSError as e:
        raise ConfigError(f"{what} {parent}: cannot create or read it ({e.strerror})") from None
    try:
        return claim_first(parent / name.format(n) for n in itertools.count(max(taken, default=-1) + 1))
    except OSError as e:
        raise ConfigError(f"{what} {parent}: cannot create a folder there ({e.strerror})") from None


def _real(path: Path) -> Path:
    """The path with every symlink and '..' resolved, also when its last parts do not exist yet."""
    return Path(os.path.realpath(path))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links too
    except OSError:
        return False


def refuse_overlap(out: Path, inputs: dict[str, Path | None], inside: dict[str, Path | None] | None = None,
                   flag: str = "--out") -> None:  # fmt: skip
    """An output may not be, or contain, any of ``inputs`` (a user's checkpoint, run or data),
    nor lie inside any of ``inside`` (e.g. the data dir, where report PNGs would become training
    images): refused whatever --overwrite says, through any alias (symlinks, '..', hard links)."""
    target = _real(out)
    for what, path in inputs.items():
        if path is not None:
            p = _real(path)
            if target == p or target in p.parents or _same_file(out, path):
                raise ConfigError(f"{flag} {out}: would overwrite the {what} {path}; choose another path")
    for what, path in (inside or {}).items():
        if path is not None and (_real(path) in target.parents or _real(path) == target):
            raise ConfigError(f"{flag} {out}: lies inside the {what} {path}; choose a path outside it")


def new_file(path: str | Path, overwrite: bool, *companions: Path) -> Path:
    """An output file that may be written, with the files written beside it (a sidecar): a
    user's earlier file at any of them is replaced only when asked, and a folder never."""
    out = Path(path)
    for p in (out, *companions):
        if p.is_dir() or (p.is_symlink() and not p.exists()):
            raise ConfigError(f"--out {out}: {p} is a folder or a broken link, where a file would be written; choose another path")
        if p.exists() and not overwrite:
            raise ConfigError(f"--out {out}: {'it' if p == out else p.name} exists; pass --overwrite or choose another path")
    return out


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
