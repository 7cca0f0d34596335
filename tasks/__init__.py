"""Prefect tasks: thin wrappers over the engine-free core, returning small, picklable results."""

from .merge import consolidate_output, merge_one_shard, plan_merge, validate_merge

__all__ = ["consolidate_output", "merge_one_shard", "plan_merge", "validate_merge"]
