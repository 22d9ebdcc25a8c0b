"""Preemption: SIGTERM, SIGUSR1 or a STOP file ask the run to checkpoint at the next step boundary and exit.

Signals reach ranks unevenly (a launcher may forward them to some workers only), so every step the ranks agree:
the loop adds each rank's `requested()` flag into the step's loss reduction (no collective of its own), and if
any rank was asked, all stop after the same step.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

STOP_FILE = "STOP"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Set by `vlmtune launch` to when it started: a STOP file older than the launch was meant for an earlier run.
LAUNCH_TIME_ENV = "VLMTUNE_LAUNCH_TIME"


class StopWatcher:
    """Collects stop requests (signals, a STOP file in the output folder) on this rank."""

    def __init__(self, output_dir: Path) -> None:
        self.stop_file = output_dir / STOP_FILE
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopWatcher:
        self._drop_stale_stop_file()
        # Handlers can only be installed from the main thread (a notebook cell running in another thread cannot).
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _drop_stale_stop_file(self) -> None:
        """A STOP file from before this launch (left when a run ended right after it appeared) is not for us."""
        started = float(os.environ.get(LAUNCH_TIME_ENV, time.time()))
        try:
            if self.stop_file.stat().st_mtime < started:
                self.stop_file.unlink()
        except FileNotFoundError:
            pass

    def _on_signal(self, signum: int, frame) -> None:
        self.reason = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether this rank was asked to stop (a signal, or the STOP file); the ranks' answers are summed."""
        if self.reason is None and self.stop_file.exists():
            self.reason = f"{self.stop_file} exists"
        return self.reason is not None

    def clear(self, accelerator) -> None:
        """Forget a honoured STOP file, so the resumed run does not stop again at once."""
        if accelerator.is_main_process and self.stop_file.exists():
            self.stop_file.unlink()
