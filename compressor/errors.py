"""Errors the library raises for problems the user can fix.

Every message is one line that says what went wrong and what to do. The CLI prints it as
``error: <message>`` and exits with code 2; Python callers can catch ``AtcError``.
"""


class AtcError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in atc."""


class CheckpointError(AtcError):
    """A checkpoint is missing, unreadable, unsafe or does not fit the model."""


class DataError(AtcError):
    """A dataset folder is missing, empty, corrupt or in an unsupported layout."""


class ConfigError(AtcError):
    """A preset, preset key or option value is invalid."""


class ModelError(AtcError):
    """An architecture is unknown, cannot be traced or does not fit the input."""


class OutputError(AtcError):
    """An output location cannot be written (not empty, no space, not writable)."""


class TrainingError(AtcError):
    """Training stopped: a loss went non-finite or the device ran out of memory."""


class ExportError(AtcError):
    """ONNX export or its parity check failed."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after its state was saved; ``--resume`` continues it.

    Not an ``AtcError``: nothing was wrong with the input. The CLI exits with 128 + ``signum``.
    """

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def shown(text: object) -> str:
    """User text (a path, a value) as a message shows it: as typed when every character prints, else
    quoted with escapes (``repr``), so that a message stays one line whatever the user typed."""
    s = str(text)
    return s if s.isprintable() else repr(s)
