"""Rank-aware console output: only the main process speaks unless asked otherwise."""

from __future__ import annotations

import logging
import os
import sys

_LOGGER_NAME = "vlmtune"


def rank() -> int:
    """Global rank from the launcher's environment (0 when not distributed)."""
    return int(os.environ.get("RANK", os.environ.get("PROCESS_INDEX", "0")))


def is_main_process() -> bool:
    return rank() == 0


class _MainProcessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or is_main_process()


def get_logger(name: str | None = None) -> logging.Logger:
    """The vlmtune logger (or a child of it); INFO to stderr on rank 0 only."""
    root = logging.getLogger(_LOGGER_NAME)
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[vlmtune] %(message)s"))
        handler.addFilter(_MainProcessFilter())
        root.addHandler(handler)
        root.setLevel(os.environ.get("VLMTUNE_LOG_LEVEL", "INFO"))
        root.propagate = False
    if not name or name == _LOGGER_NAME:
        return root
    return logging.getLogger(name if name.startswith(_LOGGER_NAME + ".") else f"{_LOGGER_NAME}.{name}")
