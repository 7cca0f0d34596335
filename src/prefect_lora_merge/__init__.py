"""prefect-lora-merge: merge LoRA adapters into huge sharded safetensors checkpoints, shard by shard.

- `prefect_lora_merge.core`: the engine-free merge (plan, merge_shard, consolidate, validate); no Prefect import.
- `prefect_lora_merge.flows` / `prefect_lora_merge.tasks`: the Prefect flow `lora_merge` and its tasks.
- `lora-merge` (`prefect_lora_merge.cli`): the command line.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
