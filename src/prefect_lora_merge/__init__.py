"""prefect-lora-merge: merge LoRA adapters into huge sharded safetensors checkpoints, shard by shard.

- `lora_merge(MergeParameters(...))`: the Prefect flow; called inside another flow it runs as a subflow and returns
  a `MergeSummary` (the manifest's location and the validation result).
- `announce_adapter(...)`: emit the event that starts a deployed merge (deployments/prefect.yaml).
- `prefect_lora_merge.core`: the engine-free merge (plan, merge_shard, consolidate, validate); no Prefect import.
- `prefect_lora_merge.flows` / `prefect_lora_merge.tasks`: the Prefect flow and its tasks.
- `lora-merge` (`prefect_lora_merge.cli`): the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["MergeParameters", "MergeSummary", "__version__", "announce_adapter", "lora_merge"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from prefect_lora_merge.core.options import MergeParameters
    from prefect_lora_merge.flows import MergeSummary, lora_merge
    from prefect_lora_merge.flows.events import announce_adapter

# Imported on first use, so `import prefect_lora_merge` (and the CLI's start) stays free of Prefect and torch.
_LAZY = {
    "MergeParameters": "prefect_lora_merge.core.options",
    "MergeSummary": "prefect_lora_merge.flows",
    "lora_merge": "prefect_lora_merge.flows",
    "announce_adapter": "prefect_lora_merge.flows.events",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'prefect_lora_merge' has no attribute {name!r}")
