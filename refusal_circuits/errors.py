"""Exceptions that carry a one-line, user-facing message.

The command line turns every :class:`InputError` into ``error: <message>`` and exit code 2; anything
else is a bug and keeps its traceback. Library users can catch :class:`RefusalCircuitsError` to handle
all of ours at once.
"""

from __future__ import annotations


class RefusalCircuitsError(Exception):
    """Base class of every error this library raises on purpose."""


class InputError(RefusalCircuitsError, ValueError):
    """Bad input from the user: a file, an argument, a model spec. The message names what was wrong."""


class PromptFileError(InputError):
    """A prompt file that cannot be read; the message names the file and, where there is one, the line."""

    def __init__(self, path: object, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


class MissingExtraError(InputError):
    """An optional dependency is not installed; the message gives the exact pip command."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what} needs the '{extra}' extra: pip install 'refusal-circuits[{extra}]'")
        self.extra = extra


class ModelSpecError(InputError):
    """A model spec that names nothing loadable."""


class NonFiniteJSONError(RefusalCircuitsError, ValueError):
    """A NaN or an infinity reached the JSON writer: a bug in the code that built the record, which should have
    written ``null`` with the reason beside it (:func:`refusal_circuits.io.nullable`). The message names the key
    path that held it; the command line keeps the traceback, as for any bug."""

    def __init__(self, path: str, value: float) -> None:
        super().__init__(f"refusing to write {value!r} at {path}: NaN and infinity are not JSON compliant; a "
                         "statistic that cannot be computed must be written as null with a '_why' reason beside it")
        self.path = path
        self.value = value
