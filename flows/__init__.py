"""Prefect flows. The flow module (Prefect, torch) is imported on first use, so `prefect_lora_merge.flows.api` can
start the ephemeral server before it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["MergeSummary", "lora_merge", "run_merge"]

if TYPE_CHECKING:
    from .merge import MergeSummary, lora_merge, run_merge


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import merge

        return getattr(merge, name)
    raise AttributeError(f"module 'prefect_lora_merge.flows' has no attribute {name!r}")
