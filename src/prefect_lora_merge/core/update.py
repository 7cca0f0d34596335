"""What one change to one base tensor is: the kinds and forms of updates, and which of them merge a tile at a time."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class Update(BaseModel):
    """One change to one base tensor, derived from adapter tensors (keys into the adapter index)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["replace", "delta", "rows"]
    # delta forms: linear (B@A), linear_t (fan_in_fan_out), embedding ((B@A)^T), conv, experts (fused 3-D),
    # expert (one expert's slice of a fused delta, for per-expert tensors on disk), bias (lora_B.bias).
    form: Literal["linear", "linear_t", "embedding", "conv", "experts", "expert", "bias"] | None = None
    module: str
    adapter_tensors: tuple[str, ...]
    rank: int | None = None
    alpha: float | None = None
    scale: float = 1.0
    magnitude: str | None = None  # DoRA magnitude vector
    num_experts: int | None = None
    expert: int | None = None
    rows: tuple[int, int] | None = None
    experts_layout: Literal["eoi", "eio"] | None = None
    indices: tuple[int, ...] | None = None
    # BD-LoRA (`use_bdlora`): the factor stored block-diagonal, as its `nblocks` row blocks side by side; expanded to
    # the full factor before the product, as PEFT's merge does.
    block_diagonal: Literal["A", "B"] | None = None
    nblocks: int | None = None
    # The dtype ΔW is rounded to before it is added, and the sum after: PEFT's nn.MultiheadAttention merge adds
    # `ΔW.to(weight.dtype)` in the weight's own dtype (one rounding more than a Linear's merge, in bf16/fp16).
    rounded_to: Literal["F16", "BF16"] | None = None


TILED_FORMS = ("linear", "expert")  # delta forms whose ΔW can be computed a tile at a time


def merges_by_tiles(updates: tuple[Update, ...]) -> bool:
    """Plain LoRA deltas on a linear weight or one expert's slice: merged a tile at a time (`lora_math.tile_merge`);
    DoRA's norms and the other forms span the whole tensor."""
    return bool(updates) and all(u.kind == "delta" and u.form in TILED_FORMS and not u.magnitude for u in updates)


def update_keys(update: Update) -> tuple[str, ...]:
    return update.adapter_tensors + ((update.magnitude,) if update.magnitude else ())


PARAMETER_FORMS = ("experts", "expert")  # updates of target_parameters, matched by that list when planned
