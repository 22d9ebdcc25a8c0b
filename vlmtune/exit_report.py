"""How each training process tells `vlmtune launch` its exit code (both sides import this module).

torchrun reports any worker failure as exit 1, which would hide a preemption (75: requeue) or a user error (2)
from a scheduler. So the launcher names a folder in `VLMTUNE_EXIT_DIR`, every worker writes its code into
`rank-<RANK>` there, and the launcher exits with the first non-zero code by rank.
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

EXIT_DIR_ENV = "VLMTUNE_EXIT_DIR"
_PREFIX = "rank-"


def report_exit_code(code: int) -> None:
    """Write this rank's exit code where the launcher looks (nothing when not started by `vlmtune launch`)."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder:
        with suppress(OSError):  # the launcher is gone (killed): nobody is left to read it
            Path(folder, f"{_PREFIX}{os.environ.get('RANK', '0')}").write_text(str(code))


def workers_exit_code(exit_dir: Path, launcher_code: int) -> int:
    """The first non-zero code a worker reported (by rank), else the launcher's own."""
    reported = sorted(exit_dir.glob(f"{_PREFIX}*"), key=lambda p: int(p.name.removeprefix(_PREFIX)))
    codes = [int(p.read_text() or 0) for p in reported]
    return next((c for c in codes if c), launcher_code)
