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
