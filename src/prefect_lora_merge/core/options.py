"""The merge's parameters: one validated model shared by the CLI, the Prefect flow and deployments."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from .adapter_spec import AdapterSpec
from .errors import LoraMergeError
from .formats.bitsandbytes import BLOCKSIZES, AsQuantized
from .resources import DEVICE_PATTERN, parse_size

# A Prefect block document's reference: its type's slug and its name, or the name alone.
BLOCK_REFERENCE = r"([a-z0-9][a-z0-9-]*/)?[a-z0-9][a-z0-9-]*"


def block_reference(value: str | None) -> str | None:
    """A storage block's reference as given (empty: none), or the error that says what one looks like."""
    value = (value or "").strip() or None
    if value is not None and not re.fullmatch(BLOCK_REFERENCE, value):
        raise LoraMergeError(
            f"storage block {value!r} is not a block's name: give NAME or TYPE/NAME (lowercase letters, digits and "
            "dashes), like aws-credentials/prod"
        )
    return value


class MergeParameters(BaseModel):
    """What to merge into what, and how. Storage credentials belong in the environment or a Prefect block
    (storage_block), not here: these parameters are stored by Prefect and shown in its UI."""

    base: str = Field(description="Base checkpoint directory or URI (safetensors shards + index + config.json).")
    adapter: str | list[str | AdapterSpec] = Field(
        description="PEFT LoRA adapter directory or URI (adapter_config.json + weights), as PATH or PATH:WEIGHT; or "
        "a list of them, merged in one pass as W + Σ wᵢ·ΔWᵢ (a weight defaults to 1 and may be negative)."
    )
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
    wait_for_output: bool = Field(
        False,
        description="When another run of this tool is writing the same output, wait for it to finish instead of "
        "failing: for a turn in a Prefect global concurrency limit of one run per output (with a Prefect server), "
        "then for the output's lease. The deployment's trigger and schedule set it.",
    )
    break_lock: bool = Field(False, description="Take the output's lease even if another run seems to hold it.")
    output_dtype: Literal["auto", "bf16", "keep", "fp8"] = Field(
        "auto",
        description="For a quantized base (block-FP8, compressed-tensors INT4, MXFP4): bf16 (what auto means there) "
        "dequantizes every quantized weight and drops the quantization config; keep leaves untouched quantized "
        "weights byte for byte and re-quantizes touched ones in the base's format with fresh scales (fp8 is its "
        "older name, for block-FP8). Other bases keep every dtype.",
    )
    min_delta_cosine: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        allow_inf_nan=False,
        description="With output_dtype keep: fail a shard whose re-quantized weight keeps less of its intended "
        "change than this cosine (realised vs intended ΔW).",
    )
    as_quantized: Literal["nf4", "fp4"] | None = Field(
        None,
        description="For a 16-bit base and a QLoRA adapter: put every Linear weight through bitsandbytes' 4-bit "
        "round trip (quantize, dequantize) before adding the delta, so the merge is the model the adapter was "
        "trained with (nf4 is QLoRA's type).",
    )
    as_quantized_blocksize: int = Field(64, description="With as_quantized: the 4-bit block size (QLoRA's: 64).")
    as_quantized_double_quant: bool = Field(
        True, description="With as_quantized: double quantization of the block scales (QLoRA's default: on)."
    )
    as_quantized_skip: list[str] = Field(
        default_factory=list,
        description="With as_quantized: modules the 4-bit load kept in 16 bits (BitsAndBytesConfig's "
        "llm_int8_skip_modules), by name or suffix. Embeddings always are; as in transformers, a list given here "
        "replaces the default (the output head): name lm_head in it too to keep it.",
    )
    runner: Literal["threads", "dask"] = Field(
        "threads",
        description="Where shard tasks run: threads of the flow's own process, or a Dask cluster (prefect-dask): "
        "the one at dask_address, else a local cluster of dask_workers processes.",
    )
    dask_address: str | None = Field(
        None,
        description="With runner dask: the scheduler of a running Dask cluster, like tcp://10.0.0.5:8786. Its "
        "workers need this package installed and PREFECT_API_URL pointing at the same Prefect server.",
    )
    dask_workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="With runner dask and no dask_address: worker processes of the local cluster (default: as many "
        "as the CPUs, the shards and max_memory allow); each gets an equal share of max_memory.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (e.g. endpoint_url) for base, adapter and output."
    )
    storage_block: str | None = Field(
        None,
        description="A Prefect block with the S3 credentials for the s3:// locations: prefect-aws's AwsCredentials, "
        "MinIOCredentials or S3Bucket, by name (or type/name, like aws-credentials/prod). Only the name is a "
        "parameter: each process that opens the storage reads the block from the Prefect server.",
    )

    @field_validator("adapter")
    @classmethod
    def _adapter(cls, value: str | list[str | AdapterSpec]) -> str | list[str | AdapterSpec]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one adapter")
        try:
            adapter_specs(value)
        except LoraMergeError as exc:
            raise ValueError(str(exc)) from None
        return value

    def adapter_specs(self) -> tuple[AdapterSpec, ...]:
        """The adapters to merge, in order, each with its weight."""
        return adapter_specs(self.adapter)

    @field_validator("storage_block")
    @classmethod
    def _storage_block(cls, value: str | None) -> str | None:
        try:
            return block_reference(value)
        except LoraMergeError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("max_memory")
    @classmethod
    def _max_memory(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                parse_size(value, "max_memory")
            except LoraMergeError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="before")
    @classmethod
    def _older_names(cls, values: Any) -> Any:
        """`fp8_min_cosine`: what `min_delta_cosine` was called while block-FP8 was the only quantized format (saved
        deployments and events may still send it)."""
        if isinstance(values, dict) and "fp8_min_cosine" in values:
            values = dict(values)
            older = values.pop("fp8_min_cosine")
            if values.get("min_delta_cosine") is None:
                values["min_delta_cosine"] = older
        return values

    @model_validator(mode="after")
    def _as_quantized(self) -> MergeParameters:
        if self.as_quantized is None and (
            self.as_quantized_blocksize != 64 or not self.as_quantized_double_quant or self.as_quantized_skip
        ):
            raise ValueError("as_quantized_blocksize, _double_quant and _skip set the round trip of as_quantized")
        if self.as_quantized_blocksize not in BLOCKSIZES:
            raise ValueError(f"as_quantized_blocksize must be one of {list(BLOCKSIZES)}")
        return self

    def round_trip(self) -> AsQuantized | None:
        """The --as-quantized settings, or None."""
        return as_quantized_settings(
            self.as_quantized, self.as_quantized_blocksize, self.as_quantized_double_quant, self.as_quantized_skip
        )

    @model_validator(mode="after")
    def _runner(self) -> MergeParameters:
        if self.runner != "dask" and (self.dask_address or self.dask_workers):
            raise ValueError("dask_address and dask_workers need runner dask (--runner dask)")
        if self.dask_address and self.dask_workers:
            raise ValueError(
                "dask_workers sizes a local cluster; a cluster at dask_address has its own workers: give one of them"
            )
        if self.runner == "dask" and self.workers is not None:
            raise ValueError(
                "workers counts shards at once on this machine; with runner dask the cluster's workers decide it "
                "(use dask_workers for a local cluster)"
            )
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(DEVICE_PATTERN, value):
            raise ValueError(f"must be auto, cpu or cuda[:N], not {value!r}")
        return value


def as_quantized_settings(
    quant_type: str | None, blocksize: int = 64, double_quant: bool = True, skip: list[str] | tuple[str, ...] = ()
) -> AsQuantized | None:
    """`--as-quantized` and its settings as the plan takes them (None: no round trip)."""
    if quant_type is None:
        return None
    return AsQuantized(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant, skip=tuple(skip))


def adapter_specs(adapter: str | AdapterSpec | list[str | AdapterSpec]) -> tuple[AdapterSpec, ...]:
    """Each adapter named, parsed: `PATH`, `PATH:WEIGHT`, or an AdapterSpec; one or a list."""
    given = adapter if isinstance(adapter, list) else [adapter]
    return tuple(one if isinstance(one, AdapterSpec) else AdapterSpec.parse(one) for one in given)
