"""What a quantized weight format is to the rest of the tool: one interface, one module per format.

A quantized weight is one logical weight (the tensor a module sees, which an adapter targets, e.g.
`...experts.7.down_proj.weight` [7168, 2048]) stored as several tensors, each with a role: block-FP8 keeps `codes`
and `scales`; compressed-tensors INT4 `packed`, `scale` and `shape`; MXFP4 `blocks` and `scales`. Planning asks each
format to find its weights (`detect`); the merge asks it to dequantize (merging on the way) or re-quantize a weight
from its stored parts; validation asks it for a float64 reference of sampled rows and the rounding bound of its
codes. Nothing outside a format's module knows how its bytes are laid out.

Conventions every format follows:
- `parts` are tensors over the stored bytes, keyed by role, each with its stored dtype and shape (never modified).
- The logical weight is computed in float32. Where it is 2-D, a format works a tile of whole quantization blocks
  at a time (`tiling.tiles`) and calls `merge(values, rows, cols)` per tile with the tile's rows and columns of the
  logical weight; on CUDA, or for a weight that is not 2-D, it calls `merge` once with the whole weight and full
  slices (`slice(None)`).
- Validation reads rows of the logical weight seen as [rows, last dim] (leading dims flattened), in runs of whole
  `row_alignment` rows; `part_rows` says which rows of each stored part (also seen as [rows, last dim]) hold them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict

from ..safetensors_format import TensorEntry
from ..tiling import TileMerge
from .survival import DeltaSurvival


class TensorRef(BaseModel):
    """Where a tensor's bytes are in the base, whichever shard holds it."""

    model_config = ConfigDict(frozen=True)

    file: str
    data_start: int  # offset of the shard's data section
    entry: TensorEntry

    @property
    def span(self) -> tuple[int, int]:
        return self.data_start + self.entry.begin, self.data_start + self.entry.end


class QuantizedWeight(BaseModel):
    """One logical weight of a quantized base and the stored tensors it is made of."""

    model_config = ConfigDict(frozen=True)

    format: str  # the WeightFormat's `key`
    name: str  # the weight as modules see it: what an adapter targets, and its name in a bf16 output
    shape: tuple[int, ...]  # its dequantized shape, as a bf16 checkpoint of the same model stores it
    parts: dict[str, TensorRef]  # role -> stored tensor, in the format's role order
    primary: str  # the role whose place in its shard the dequantized weight takes in a bf16 output
    params: dict[str, Any] = {}  # the format's own settings (block size, group size, power-of-two scales, ...)
    # the dtype the weight is written in when dequantized: bf16, or the stored dtype of a weight put through a
    # quantization round trip (`--as-quantized`)
    dequantized_dtype: str = "BF16"

    @property
    def stored_names(self) -> tuple[str, ...]:
        return tuple(ref.entry.name for ref in self.parts.values())


class NonFiniteValues(Exception):
    """A re-quantization met NaN/Inf in the merged values: the caller decides whose fault it is."""


class WeightFormat(Protocol):
    key: str  # the name in plans and records: "block-fp8", "int4-pack-quantized", "mxfp4"
    label: str  # the name in messages: "block-FP8", "compressed-tensors INT4 pack-quantized", "MXFP4"
    work_copies: int  # full-size float32 copies of a weight a re-quantization holds at once (memory estimate)
    keeps: bool  # whether an output can keep the format (touched weights re-quantized); else it is written in bf16

    def detect(
        self,
        config: dict[str, Any],
        refs: dict[str, TensorRef],
        where: str,
        read: Callable[[TensorRef], bytes] | None = None,
    ) -> dict[str, QuantizedWeight]:
        """Every weight of this format in the base, by logical name; {} when the base is not in this format.
        `refs`: every stored tensor by name (headers only), `where`: the base, for messages, `read`: a stored
        tensor's bytes, for a format that keeps its settings in tensors (bitsandbytes' quant_state). Raises
        errors.CheckpointFormatError naming the tensors when the config declares this format but the tensors do not
        fit it (a missing scale, a wrong dtype or shape)."""
        ...

    def row_local(self, weight: QuantizedWeight) -> bool:
        """Whether `decode` of some rows needs only their `part_rows`; else validation dequantizes the weight whole
        once and samples rows of that (a round trip's double quantization, a transposed GPT-2 `Conv1D` weight)."""
        ...

    def dequantize(
        self,
        weight: QuantizedWeight,
        parts: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        merge: TileMerge | None = None,
    ) -> torch.Tensor:
        """The logical weight computed in float32, `merge` applied when given, rounded once to `dtype`."""
        ...

    def quantize(self, weight: QuantizedWeight, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parts (every role, stored dtypes) for float32 `values`: the whole logical weight, or a run of whole
        `row_alignment` rows of it (then each part holds the `part_rows` of those rows). Fresh scales, computed
        the way the format's reference quantizer computes them."""
        ...

    def requantize(
        self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], merge: TileMerge
    ) -> tuple[dict[str, torch.Tensor], DeltaSurvival]:
        """`quantize(merge(dequantize(parts)))` without a full-size float32 copy where tiles allow, and how much of
        the intended ΔW survived (`survival.SurvivalSums`). Raises NonFiniteValues for NaN/Inf in the merged values."""
        ...

    def row_alignment(self, weight: QuantizedWeight) -> int:
        """Rows of the logical weight (as [rows, last dim]) that share scales, read together by validation."""
        ...

    def part_rows(self, weight: QuantizedWeight, role: str, rows: slice) -> slice:
        """The rows of stored part `role` (as [rows, last dim]) that hold logical rows `rows` (whole alignments)."""
        ...

    def decode(self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """float64 logical rows `rows` from their `part_rows` (each part as read: [rows, last dim], stored dtype),
        written independently of `dequantize` (textbook arithmetic): validation's reference."""
        ...

    def rounding(
        self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice
    ) -> tuple[float, torch.Tensor]:
        """(relative, absolute): one rounding to this format with these parts' scales moves a value `v` by at most
        `relative · |v| + absolute` (absolute per value, float64, shaped like `decode`'s result)."""
        ...


def quantization_configs(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(dotted key, value) of each quantization_config in config.json: at the top, then in `text_config`
    (multimodal checkpoints keep it there)."""
    scopes = (("", config), ("text_config.", config.get("text_config")))
    return [
        (f"{path}quantization_config", scope["quantization_config"])
        for path, scope in scopes
        if isinstance(scope, dict) and isinstance(scope.get("quantization_config"), dict)
    ]


def quantization_config(config: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The quantization_config that describes the weights (the top level's, else text_config's), or None."""
    found = quantization_configs(config)
    return found[0] if found else None


def listed(problems: list[str], limit: int = 5) -> str:
    """Problems for one message: the first `limit`, and how many more."""
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more
