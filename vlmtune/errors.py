"""Errors that are the user's to fix: printed as a message (no traceback), exit code 2."""

from __future__ import annotations

EXIT_USER_ERROR = 2


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
