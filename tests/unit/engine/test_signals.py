import os
import signal
import time
from types import SimpleNamespace

import torch

from vlmtune.engine.signals import LAUNCH_TIME_ENV, StopWatcher

ONE_PROCESS = SimpleNamespace(device=torch.device("cpu"), reduce=lambda t, op: t, is_main_process=True)


def test_a_stop_file_from_before_the_launch_is_dropped_a_new_one_is_honoured(tmp_path, monkeypatch):
    stale = tmp_path / "STOP"
    stale.touch()
    os.utime(stale, (time.time() - 60, time.time() - 60))
    monkeypatch.setenv(LAUNCH_TIME_ENV, str(time.time() - 1))
    with StopWatcher(tmp_path) as stop:
        assert not stale.exists() and not stop.requested()
        (tmp_path / "STOP").touch()  # e.g. written by `vlmtune launch` on a scheduler's signal
        assert stop.requested() and "STOP exists" in stop.reason
        stop.clear(ONE_PROCESS)
        assert not (tmp_path / "STOP").exists()


def test_a_signal_asks_to_stop_and_handlers_are_restored(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    with StopWatcher(tmp_path) as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested() and stop.reason == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before
