"""The kinds of failure a command reports, in one place, so the entry points can map each to
an exit status without importing the (heavy) modules that raise them.

A ``UserError`` is something the user can fix (a bad flag, a missing file, a model of another
kind): one line on stderr and exit status 2.
"""

from __future__ import annotations


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
