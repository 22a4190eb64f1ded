"""The two error families shared by the compiler and the executor.

`UserError`: a problem with what the user gave us (a bad file, an unsupported op, a budget too small).
The CLIs print it as one line and exit 2, without a traceback.

`InternalError`: a broken invariant inside edge-rt. It says "this is a bug".
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with user input. The message is one line: what, where, what to do."""

    exit_code = 2


class InternalError(RuntimeError):
    """A broken internal invariant: a bug in edge-rt, not in the user's input."""

    def __init__(self, message: str) -> None:
        super().__init__(f"internal error (this is a bug in edge-rt, please report it): {message}")
