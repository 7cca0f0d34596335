"""The merge's parameters: one validated model shared by the CLI, the Prefect flow and deployments."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from .errors import LoraMergeError
from .resources import parse_size


class MergeParameters(BaseModel):
    """What to merge into what, and how. Storage credentials belong in the environment, not here: these
    parameters are stored by Prefect and shown in its UI."""

    base: str = Field(description="Base checkpoint directory or URI (safetensors shards + index + config.json).")
    adapter: str = Field(description="PEFT LoRA adapter directory or URI (adapter_config.json + weights).")
    output: str = Field(description="Where the merged checkpoint goes; never inside the base or adapter.")
    device: str = Field("auto", description="auto, cpu or cuda[:N]: where touched tensors are computed.")
    workers: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Shards merged at the same time; empty: as many as the CPUs, the shards and max_memory allow.",
    )
    max_memory: str | None = Field(
        None,
        description="Memory the shard merges may use together, like 16GiB (default: 80% of what is available when "
        "the merge starts); sets how many shards run at once from the plan's per-shard estimate.",
    )
    overwrite: bool = Field(False, description="Replace an output that holds a merge of other inputs.")
    break_lock: bool = Field(False, description="Take the output's lease even if another run seems to hold it.")
    output_dtype: Literal["auto", "bf16", "fp8"] = Field(
        "auto",
        description="For an FP8 block-quantized base: bf16 (what auto means there) dequantizes every FP8 weight; "
        "fp8 keeps untouched ones as they are and re-quantizes touched ones. Other bases keep every dtype.",
    )
    fp8_min_cosine: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="With output_dtype fp8: fail a shard whose re-quantized weight keeps less of its intended "
        "change than this cosine (realised vs intended ΔW).",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (e.g. endpoint_url) for base, adapter and output."
    )

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_size(value, "max_memory")
            except LoraMergeError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value not in ("auto", "cpu") and not value.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], not {value!r}")
        return value
