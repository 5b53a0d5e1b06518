"""Exceptions for user-facing errors.

Every error a user can cause (bad path, unreadable file, not a CT, wrong model file) is raised as a
subclass of ``NoduleDetectionError``, which is a ``ValueError`` whose message is one line that says what
is wrong and what to do. The command line prints that line and exits non-zero, without a traceback.
"""


class NoduleDetectionError(ValueError):
    """A user error with a one-line, human-readable message."""


class InputError(NoduleDetectionError):
    """The input image cannot be used (missing, unreadable, not a chest CT, absurd geometry)."""


class ModelError(NoduleDetectionError):
    """A model file is missing, corrupt, tampered with, or of another format version."""


class OutputError(NoduleDetectionError):
    """An output cannot be written (exists and ``overwrite`` is off, folder not writable)."""
