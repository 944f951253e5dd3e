"""The one exception type for user mistakes.

Library functions raise :class:`EmtileError` when the input is wrong in a way the user can fix
(a missing path, an invalid tile size, a stack with mixed slice shapes). The message names the
offending value and what would be valid. The CLI turns it into a one-line error and exit code 1;
anything else is a bug and keeps its traceback.
"""


class EmtileError(ValueError):
    """A user-facing error: bad input, with a message that says what would be valid."""
