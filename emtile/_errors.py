"""The one exception type for user mistakes.

Library functions raise :class:`EmtileError` when the input is wrong in a way the user can fix
(a missing path, an invalid tile size, a stack with mixed slice shapes). The message names the
offending value and what would be valid. The CLI turns it into a one-line error and exit code 1;
anything else is a bug and keeps its traceback.

An EmtileError raised in a DataLoader worker process reaches the main process re-built by torch
from a message that holds the worker's whole traceback (``Caught EmtileError in DataLoader worker
process 0. Original Traceback ...``); the error recovers its own one-line message from it, so the
user sees the same line whichever process read the data.
"""

import re


class EmtileError(ValueError):
    """A user-facing error: bad input, with a message that says what would be valid."""

    def __init__(self, *args):
        if len(args) == 1 and isinstance(args[0], str):
            args = (_worker_message(args[0], type(self)),)
        super().__init__(*args)


def _worker_message(text, cls):
    """The original message inside torch's re-raise of a worker's error; ``text`` otherwise."""
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    name = re.escape(f"{cls.__module__}.{cls.__qualname__}")
    found = re.findall(rf"^(?:{name}|{re.escape(cls.__qualname__)}): (.*)$", text, flags=re.M)
    return found[-1] if found else text


def whole_number(name, value, *, least=1):
    """``int(value)``, or one line naming ``name=`` when ``value`` is not a whole number (a bool
    is not one) of at least ``least``: the one wording of every such check."""
    from numbers import Integral

    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
        what = {0: "0 or a positive integer", 1: "a positive integer"}.get(
            least, f"an integer >= {least}")
        raise EmtileError(f"{name}={value!r} must be {what}")
    return int(value)


def one_line(exc, limit=200):
    """``exc`` as ``Type: message`` on one line, cut to ``limit`` characters: the reason that a
    one-line error quotes from a library's exception."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def one_of(name, value, allowed):
    """One line naming ``name=`` when ``value`` is not one of ``allowed``: the one wording of
    every such check."""
    if value not in allowed:
        raise EmtileError(f"{name}={value!r} is not supported: choose one of "
                          f"{', '.join(str(a) for a in allowed)}")
