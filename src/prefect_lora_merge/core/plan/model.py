"""The merge plan's data model: which base tensor in which shard gets which update, and what each becomes.

One `MergePlan` is computed once (`planner.make_plan`) from headers and the adapter, serialised, and handed to every
task; nothing downstream derives these facts again.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..adapters import AdapterSet
from ..fingerprint import ALGORITHM_VERSION
from ..formats.base import QuantizedWeight, TensorRef
from ..formats.bitsandbytes import AsQuantized
from ..safetensors_format import TensorEntry, layout
from ..storage import POOLED_BYTES, READ_AHEAD_BYTES, WRITE_BEHIND_BYTES, Location
from ..update import Update
from .memory import shard_peak_bytes

MANIFEST_FILE = "lora-merge-manifest.json"
REPORT_FILE = "lora-merge-report.json"  # the last validation's report, beside the manifest (not listed in it)
OWN_FILES = (MANIFEST_FILE, REPORT_FILE)  # this tool's files at the top of an output: never copied as side files


class QuantizedRole(BaseModel):
    """What a stored part of a quantized weight becomes in the output.

    - `dequantized`: the part that carries the weight (its `primary`) becomes the weight in bf16, under the weight's
      own name (merged when the adapter touches it);
    - `requantized`: every part of a touched weight, in the base's format with fresh scales; each part is computed
      where it is stored (the parts may sit in different shards), from the same inputs, deterministically;
    - `dropped`: the other parts of a weight written in bf16: not in the output.
    Untouched weights of an output kept in the base's format have no role: their parts are copied as bytes.
    """

    model_config = ConfigDict(frozen=True)

    write: Literal["dequantized", "requantized", "dropped"]
    role: str  # which part of `weight` this stored tensor is
    weight: QuantizedWeight
    # For re-quantized parts other than the primary one: the weight's updates, to compute the same merged weight.
    # They are applied and counted on the primary part; here they only shape its other parts.
    weight_updates: tuple[Update, ...] = ()

    @property
    def others(self) -> list[TensorRef]:
        """The weight's other stored parts, which computing this one reads too."""
        return [ref for role, ref in self.weight.parts.items() if role != self.role]


class PlannedTensor(BaseModel):
    model_config = ConfigDict(frozen=True)

    base: TensorEntry
    shape: tuple[int, ...]  # output shape (differs from base only for a resized embedding)
    updates: tuple[Update, ...] = ()
    # Set for a stored part of a quantized weight that is dequantized, re-quantized or dropped (not copied).
    quantized: QuantizedRole | None = None
    # Set for a tensor the base does not store (the lm_head of an untied output): `base` then describes the tensor
    # its value starts from, under the new name, and its bytes are read where the base stores them, through this
    # reference (as a quantized weight's other parts are). Such tensors come after the shard's own, in the output.
    source: TensorRef | None = None

    @property
    def name(self) -> str:
        """The name written to the output: a dequantized weight's own name (`...weight` for `...weight_packed`)."""
        if self.quantized is not None and self.quantized.write == "dequantized":
            return self.quantized.weight.name
        return self.base.name

    @property
    def dtype(self) -> str:
        """The dtype written to the output."""
        if self.quantized is not None and self.quantized.write == "dequantized":
            return self.quantized.weight.dequantized_dtype
        return self.base.dtype

    @property
    def dropped(self) -> bool:
        return self.quantized is not None and self.quantized.write == "dropped"

    @property
    def computed(self) -> bool:
        """Written from arithmetic (a merge, a dtype conversion, a re-quantization) rather than copied as bytes."""
        return bool(self.updates) or (self.quantized is not None and not self.dropped)

    @property
    def weight_updates(self) -> tuple[Update, ...]:
        """The updates of the weight this tensor holds or is a part of (a re-quantized part other than the one
        that carries them computes the same merged weight)."""
        return self.quantized.weight_updates if self.quantized is not None and not self.updates else self.updates


class ShardPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    file: str
    base_size: int
    base_header_bytes: int
    metadata: dict[str, str] | None
    tensors: tuple[PlannedTensor, ...]  # in the base's data order

    @property
    def base_data_start(self) -> int:
        """Offset of the base shard's data section (after the 8-byte length and the JSON header)."""
        return 8 + self.base_header_bytes

    @property
    def touched(self) -> list[PlannedTensor]:
        """Tensors the adapter changes."""
        return [t for t in self.tensors if t.updates]

    @property
    def written(self) -> list[PlannedTensor]:
        """Tensors that go to the output (all but the other parts of quantized weights written in bf16)."""
        return [t for t in self.tensors if not t.dropped]

    def output_entries(self) -> tuple[TensorEntry, ...]:
        return layout([(t.name, t.dtype, t.shape) for t in self.written])

    def base_ref(self, tensor: PlannedTensor) -> TensorRef:
        """Where the base stores the bytes `tensor` starts from: in this shard, or its `source`."""
        return tensor.source or TensorRef(file=self.file, data_start=self.base_data_start, entry=tensor.base)

    def copies_base_bytes(self) -> bool:
        """No tensor changes value, dtype or shape, none is dropped or added: the output shard is the base shard."""
        return all(
            not t.computed and not t.dropped and t.shape == t.base.shape and t.source is None for t in self.tensors
        )

    def layout_unchanged(self) -> bool:
        """Same tensors, dtypes, shapes, hence offsets: the base's header bytes can be kept."""
        return all(
            not t.dropped and t.shape == t.base.shape and t.dtype == t.base.dtype and t.source is None
            for t in self.tensors
        )

    def peak_bytes(self, adapters: AdapterSet) -> int:
        """Working memory of this shard's merge (see `memory.shard_peak_bytes`)."""
        return shard_peak_bytes(self, adapters)


class MergeJob(BaseModel):
    """Everything a shard merge needs besides its own shard plan."""

    model_config = ConfigDict(frozen=True)

    base: Location
    base_versions: dict[str, dict[str, Any]]  # shard -> size and ETag/mtime: part of the fingerprint
    adapters: AdapterSet
    output: Location
    device: str = "cpu"
    # --min-delta-cosine: fail a shard whose re-quantized weight keeps less of its intended delta than this
    min_delta_cosine: float | None = None
    fingerprint: str = ""


class MergePlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    algorithm_version: str = ALGORITHM_VERSION
    job: MergeJob
    shards: tuple[ShardPlan, ...]
    base_has_index: bool
    index_metadata: dict[str, Any]
    extra_files: tuple[str, ...]
    config_updates: dict[str, int | bool]  # dotted keys of config.json set to new values (vocab_size, tie flags)
    config_removals: tuple[str, ...] = ()  # dotted keys dropped from config.json (a bf16 output's quantization_config)
    # keep: every tensor in the base's format (touched quantized weights re-quantized); bf16: quantized weights
    # dequantized to bf16, their other parts and quantization_config dropped
    output_dtype: Literal["keep", "bf16"] = "keep"
    quantized_format: str | None = None  # the base's quantized weight format (its label), if it has one
    as_quantized: AsQuantized | None = None  # --as-quantized: the 4-bit round trip Linear weights go through
    decisions: tuple[str, ...]
    adapter_usage: dict[str, list[str]]  # adapter key -> base tensors it changes

    @property
    def fingerprint(self) -> str:
        return self.job.fingerprint

    @property
    def estimated_peak_bytes(self) -> int:
        return max(
            (s.peak_bytes(self.job.adapters) for s in self.shards),
            default=READ_AHEAD_BYTES + WRITE_BEHIND_BYTES + POOLED_BYTES,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "base": self.job.base.uri,
            "adapter": self.job.adapters.label,
            "adapters": [{"uri": m.index.location.uri, "weight": m.weight} for m in self.job.adapters.members],
            "output": self.job.output.uri,
            "fingerprint": self.fingerprint,
            "output_dtype": self.output_dtype,
            "as_quantized": self.as_quantized.model_dump() if self.as_quantized is not None else None,
            "shards": len(self.shards),
            "shards_touched": sum(1 for s in self.shards if s.touched),
            "tensors": sum(len(s.tensors) for s in self.shards),
            "tensors_touched": sum(len(s.touched) for s in self.shards),
            "adapter_tensors": len(self.adapter_usage),
            "bytes": sum(s.base_size for s in self.shards),
            "estimated_peak_bytes": self.estimated_peak_bytes,
            "decisions": list(self.decisions),
        }
