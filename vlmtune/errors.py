"""Errors that are the user's to fix: printed as a message (no traceback), exit code 2."""

from __future__ import annotations

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": stopped on request after a complete checkpoint; requeue it
EXIT_DIVERGED = 3  # non-finite loss or gradients under train.nonfinite=abort, or too many in a row
EXIT_INTERRUPTED = 130  # the shell's convention for Ctrl-C


class UserError(Exception):
    """A problem in the user's recipe, data or environment. The message says what and where."""


class RecipeError(UserError):
    """The recipe (or an override) is invalid. Holds every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        head = f"invalid recipe {source}" if source else "invalid recipe"
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{head}: {len(problems)} problem(s)\n{lines}")


class DataError(UserError):
    """A data file or row cannot be used. The message names the file and row."""


class Preempted(Exception):
    """The run stopped early on request (signal or STOP file) after saving a complete checkpoint."""

    def __init__(self, step: int, reason: str) -> None:
        self.step = step
        super().__init__(f"stopped at step {step} ({reason}) after saving a checkpoint; run again to resume")


class TrainingDiverged(Exception):
    """Training produced non-finite losses or gradients beyond what train.nonfinite allows."""


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (library errors run long), for one-line user errors."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
