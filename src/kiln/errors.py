"""User-facing errors.

A `KilnError` is a mistake the user can fix (a bad flag, a missing folder, a prompt over a limit). The
CLI prints its message on one line and exits non-zero, without a traceback. Anything else escaping is a
bug in kiln and keeps its traceback.
"""


class KilnError(Exception):
    """An error caused by user input or the user's environment; the message says how to fix it."""


class LimitError(KilnError, ValueError):
    """A request exceeds one of the engine's build limits."""
