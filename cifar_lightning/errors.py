"""The kinds of failure a command reports, and the one mapping from each to an exit status
(``exit_status``), in one place that imports nothing heavy.

A ``UserError`` is something the user can fix (a bad flag, a missing file, a model of another
kind): one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


class UserError(ValueError):
    """A problem the user can fix: printed as one line, exit status 2."""


class ConfigError(UserError):
    """A bad flag, preset or --config value."""


class DataError(UserError):
    """A data problem: missing dir, unreadable image, failed download."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe or of another model."""


class ModelError(UserError):
    """A model file that cannot be used: missing, corrupt, unsafe, or of another kind."""


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


def _user_errors() -> tuple[type[BaseException], ...]:
    """UserError, and Lightning's own configuration error when Lightning was loaded at all."""
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (UserError, *([lightning_errors.MisconfigurationException] if lightning_errors else []))


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def exit_status(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body; what it raises becomes one line on stderr and an exit status:
    2 for what the user can fix, 1 for a failure, 128 + N for a stop by signal N."""
    try:
        return body()
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
            where = f" {e.filename}" if e.filename else ""
            return _fail(prog, f"cannot write or read{where}: {e.strerror or e} (files written before are intact)", 1)
        if os.environ.get("CIFAR_LIGHTNING_DEBUG"):
            raise
        return _fail(prog, f"{type(e).__name__}: {e} (set CIFAR_LIGHTNING_DEBUG=1 for a traceback)", 1)
