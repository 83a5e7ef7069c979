"""The kinds of failure a command reports, and the one mapping from each to an exit status
(``exit_status``), in one place that imports nothing heavy.

A ``UserError`` is something the user can fix (a bad flag, a missing file, a model of another
kind): one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import os
import reprlib
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator


class UserError(ValueError):
    """A problem the user can fix: printed as one line, exit status 2."""


class ConfigError(UserError):
    """A bad flag, preset or --config value."""


class DataError(UserError):
    """A data problem: missing dir, unreadable image, failed download."""


class ModelError(UserError):
    """A model file that cannot be used: missing, corrupt, unsafe, or of another kind."""


class CheckpointError(ModelError):
    """A checkpoint (one kind of model file) that cannot be used: missing, unreadable, unsafe or of another model."""


class ImageError(UserError):
    """One input that is not a usable image."""


class NotAnImageError(ImageError):
    """Bytes that no image decoder recognises."""


class ImageTooLargeError(ImageError):
    """An image declaring more pixels than the decoder will allocate (e.g. a decompression bomb)."""


class ExportError(UserError):
    """An export that cannot be written or does not reproduce the checkpoint."""


class TrainingFailedError(Exception):
    """Training could not go on (e.g. a non-finite loss): one line, exit status 1."""


class RunInterruptedError(Exception):
    """Stopped by a signal after saving what there was to save: one line, exit 128 + signal."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def printable(path: object) -> str:
    """A path (or a message holding one) as stderr, JSON or YAML can carry it: a name that is
    not UTF-8 (on POSIX, str holds its bytes as lone surrogates, which .encode(), json and yaml
    refuse) shows each such byte as \\xNN; any other text is returned as it is."""
    text = str(path)
    try:
        raw = os.fsencode(text)
    except UnicodeError:  # lone surrogates that are no file system's bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def shown(value: object, limit: int = 80) -> str:
    """A value as an error message quotes it: bounded however large or deeply nested it is (a
    file may hold megabytes, or aliases that expand to billions of items); strings as they are."""
    text = value if isinstance(value, str) else _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown_names(names: object, limit: int = 5) -> str:
    """A list of class names as an error quotes it: the first few, each cut short."""
    items = [str(n) for n in list(names)[: limit + 1]] if isinstance(names, (list, tuple)) else []  # type: ignore[arg-type]
    if not items:
        return "none"
    text = ", ".join(shown(n, 30) for n in items[:limit])
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")  # type: ignore[arg-type]


def _user_errors() -> tuple[type[BaseException], ...]:
    """UserError, and Lightning's own configuration error when Lightning was loaded at all."""
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (UserError, *([lightning_errors.MisconfigurationException] if lightning_errors else []))


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {printable(' '.join(message.split()))}", file=sys.stderr)
    return code


def _stop_on_sigterm(signum: int, frame: object) -> None:
    # An exception, not the default instant death: the ``finally`` clauses of the atomic
    # writers then remove their temp files and unfilled claimed folders on the way out.
    raise RunInterruptedError("stopped by SIGTERM; nothing half-written was left behind", 128 + signum)


def disk_message(e: OSError) -> str:
    """One line for a failed write or read: which file, and a full disk said as such."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the disk writing{where} ({e.strerror}; files written before are intact, nothing half-written was kept)"
    return f"cannot write or read{where}: {e.strerror or e} (files written before are intact)"


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """SIGTERM as an exception while the block runs (where nothing else handles it), so the
    ``finally`` clauses of the atomic writers clean up on the way out instead of the process
    dying mid-write."""
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def exit_status(prog: str, body: Callable[[], int], sigterm: bool = True, hold_warnings: bool | None = None) -> int:
    """Run a command's body; what it raises becomes one line on stderr and an exit status:
    2 for what the user can fix, 1 for a failure, 128 + N for a stop by signal N.

    ``sigterm`` turns SIGTERM into an exception for the body's duration (``sigterm_raises``).
    Training passes False: Lightning's own handler stops fit at a step boundary and saves a
    checkpoint, and it calls any handler installed before it (which would raise mid-step);
    training raises on SIGTERM itself once fit is over. ``hold_warnings`` (default: as
    ``sigterm``, so not for the long-running train and serve) keeps library warnings until the
    command has worked: torch's warnings never precede the project's one-line error."""
    hold = sigterm if hold_warnings is None else hold_warnings
    held: list[warnings.WarningMessage] = []
    try:
        with sigterm_raises() if sigterm else contextlib.nullcontext(), warnings.catch_warnings(record=hold) as caught:
            code = body()
            held = list(caught or [])
        for w in held:  # a command that worked shows what the libraries warned of; a refusal is its one line alone
            sys.stderr.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
        return code
    except RunInterruptedError as e:
        return _fail(prog, str(e), e.code)
    except TrainingFailedError as e:
        return _fail(prog, str(e), 1)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except Exception as e:
        if isinstance(e, _user_errors()):
            return _fail(prog, str(e), 2)
        if isinstance(e, OSError):
            # A full disk, an unwritable folder: say which file; files are written atomically,
            # so the ones already there are intact.
            return _fail(prog, disk_message(e), 1)
        if os.environ.get("CIFAR_LIGHTNING_DEBUG"):
            raise
        return _fail(prog, f"{type(e).__name__}: {e} (set CIFAR_LIGHTNING_DEBUG=1 for a traceback)", 1)
