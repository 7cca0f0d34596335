"""Prefect flows."""

from .merge import MergeSummary, lora_merge, run_merge

__all__ = ["MergeSummary", "lora_merge", "run_merge"]
