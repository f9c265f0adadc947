"""The two kinds of failure legoc reports (after ExecuTorch's exir/error.py).

* :class:`UserError` - the input is wrong: a bad model file, an untraceable model, an unknown
  target, an infeasible budget, a tampered artifact. The CLI prints one line and exits 2.
* :class:`InternalError` - legoc itself is wrong. The CLI prints one line plus where to report
  it and exits 1.

Messages are single lines: what is wrong, where (file, node, block), what to do.
"""


class LegocError(Exception):
    """Base of every error legoc raises on purpose."""

    exit_code = 1


class UserError(LegocError):
    """Bad input from the user: the fix is on their side and the message says what it is."""

    exit_code = 2


class InternalError(LegocError):
    """A bug in legoc (a pass broke an invariant, a compiled module disagrees with PyTorch)."""

    exit_code = 1


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message ('' if it has none), at most 300
    characters: third-party errors (TVM's run to pages) reach users as one line."""
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            return line if len(line) <= 300 else line[:297] + "..."
    return ""


def describe(exc: BaseException) -> str:
    """``Type: first line`` of an exception (just ``Type`` when the message is empty)."""
    line = first_line(exc)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
