"""Helpers for tests and demos: tiny local models that build offline in about a second."""

from __future__ import annotations

from typing import Any

__all__ = ["build_tiny_llm", "build_tiny_tokenizer"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `python -m vlmtune.testing.tiny` does not import its module twice.
    if name in __all__:
        from vlmtune.testing import tiny

        return getattr(tiny, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
