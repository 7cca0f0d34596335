"""PEFT's merge arithmetic, one base tensor at a time, in fp32.

The order of operations mirrors `peft.tuners.lora` (delta = (B @ A) * s, then W + delta, DoRA's norm from the same
sum), so an fp32 merge matches `merge_and_unload()` to the last bit on the same device, and a bf16 merge equals
PEFT's fp32 result rounded once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .safetensors_format import torch_dtype
from .tiling import TileMerge, Workspace
from .update import TILED_FORMS, Update, merges_by_tiles

Fetch = Callable[[str], torch.Tensor]  # adapter key -> fp32 tensor on the compute device

WHOLE = (slice(None), slice(None))


def merged_tensor(weight: torch.Tensor, updates: tuple[Update, ...], fetch: Fetch) -> torch.Tensor:
    """Apply the updates to an fp32 base tensor, in plan order; returns the fp32 result.

    `weight` is modified in place (the caller hands over a private copy): with the delta that is two tensors of
    the base's size in fp32, the least this arithmetic can hold. In-place `add_`/`mul_` give the same bits as
    PEFT's out-of-place `W + ΔW` and `(B @ A) * s`.
    """
    for update in updates:
        if update.kind == "replace":
            weight = fetch(update.adapter_tensors[0]).to(weight.dtype, copy=True)
        elif update.kind == "rows":
            index = torch.tensor(update.indices, dtype=torch.long, device=weight.device)
            weight.index_copy_(0, index, fetch(update.adapter_tensors[0]).to(weight))
        else:
            delta = rounded(delta_weight(update, fetch), update)
            weight.add_(delta)
            if update.rounded_to:
                weight = rounded(weight, update)
            if update.magnitude:
                dora_rescale(weight, fetch(update.magnitude), update.form)
            del delta
    return weight


def tile_merge(updates: tuple[Update, ...], fetch: Fetch, workspace: Workspace | None = None) -> TileMerge | None:
    """`merged_tensor` one tile of the weight at a time, for plain LoRA deltas (on a linear weight or on one expert's
    slice); None for the others (DoRA's norms span the whole weight).

    Each product B @ A is computed whole, by the same call as PEFT's: a tile's `B[rows] @ A[:, cols]` is not always
    the same bits (MKL picks other kernels for a few rows or columns, measured). The scaling, the addition and the
    rounding then run per tile, in cache: no full-size float32 copy of the weight, and one pass over the product
    instead of three (scale in place, add, read). With a `workspace`, the products go into its reused buffers."""
    if not merges_by_tiles(updates):
        return None
    products = [(lora_product(u, fetch, workspace=workspace, slot=i), u) for i, u in enumerate(updates)]

    def merge(values: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        merged: torch.Tensor | None = None
        for product, update in products:
            delta = product[rows, cols] * update.scale  # ΔW's tile, rounded as PEFT rounds (B @ A) * s
            if update.rounded_to:
                merged = rounded(rounded(delta, update) + (values if merged is None else merged), update)
            else:
                merged = values + delta if merged is None else merged.add_(delta)
        assert merged is not None
        return merged

    return merge


def lora_product(
    update: Update,
    fetch: Fetch,
    tile: tuple[slice, slice] = WHOLE,
    *,
    workspace: Workspace | None = None,
    slot: int = 0,
) -> torch.Tensor:
    """B @ A of a linear or per-expert update, before scaling (the scaling is applied per tile, in cache, as a
    second rounding step exactly like PEFT's `(B @ A) * s`); into the workspace's buffer `slot` when given."""
    rows, cols = tile
    if update.form == "linear":
        A, B = lora_factors(update, fetch)
        return _matmul(B[rows], A[:, cols], workspace, slot)
    assert update.form == "expert" and update.expert is not None and update.rows is not None, update.form
    A3, B3 = expert_factors(update, fetch)
    start, end = update.rows
    return _matmul(B3[start:end, :, update.expert][rows], A3[update.expert][:, cols], workspace, slot)


def lora_factors(update: Update, fetch: Fetch) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear update's A (r, in) and B (out, r); a BD-LoRA factor expanded from its diagonal blocks as PEFT's
    `BlockDiagonalLinear.weight_as_blockdiagonal_matrix` expands it, zeros off the diagonal."""
    A, B = (fetch(k) for k in update.adapter_tensors)
    if update.block_diagonal == "A":
        A = torch.block_diag(*torch.chunk(A, update.nblocks or 1, dim=0))
    elif update.block_diagonal == "B":
        B = torch.block_diag(*torch.chunk(B, update.nblocks or 1, dim=0))
    return A, B


def rounded(values: torch.Tensor, update: Update) -> torch.Tensor:
    """Values rounded to the update's `rounded_to` dtype and back, in place (unchanged without one): the roundings
    of PEFT's nn.MultiheadAttention merge, which adds ΔW in the weight's own dtype."""
    if update.rounded_to is None:
        return values
    return values.copy_(values.to(torch_dtype(update.rounded_to)))


def expert_factors(update: Update, fetch: Fetch) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused-experts update's A and B with the expert as an axis: A3 (E, r, in), B3 (out, r, E)."""
    A, B = (fetch(k) for k in update.adapter_tensors)
    experts = update.num_experts
    assert experts is not None
    A3 = A.reshape(experts, -1, A.shape[-1])  # expert e owns a block of A's rows
    B3 = B.reshape(B.shape[0], -1, experts)  # expert e owns every E-th column of B
    return A3, B3


def _matmul(left: torch.Tensor, right: torch.Tensor, workspace: Workspace | None, slot: int) -> torch.Tensor:
    if workspace is None:
        return left @ right
    return torch.mm(left, right, out=workspace.take(slot, (left.shape[0], right.shape[1])))


def delta_weight(update: Update, fetch: Fetch, tile: tuple[slice, slice] = WHOLE) -> torch.Tensor:
    """The update's ΔW in the base tensor's own layout, scaling included (a new tensor the caller may modify);
    `tile` (rows, columns) asks for part of it, for the forms in TILED_FORMS: validation recomputes sampled rows
    that way (in float64; a part is not always the same float32 bits as the slice of the whole)."""
    assert tile == WHOLE or update.form in TILED_FORMS, update.form
    s = update.scale
    if update.form == "bias":
        return fetch(update.adapter_tensors[0]) * s
    if update.form in TILED_FORMS:
        return lora_product(update, fetch, tile).mul_(s)
    A, B = lora_factors(update, fetch)
    if update.form in ("linear_t", "embedding"):
        return (B @ A).T.mul_(s)
    if update.form == "conv":
        if A.shape[2:] == (1,) * (A.dim() - 2) and A.dim() == 4:
            return (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3).mul_(s)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[A.dim()]
        return conv(A.transpose(0, 1), B).transpose(0, 1).mul_(s)
    assert update.form == "experts", update.form
    A3, B3 = expert_factors(update, fetch)
    pattern = "o r e, e r i -> e o i" if update.experts_layout == "eoi" else "o r e, e r i -> e i o"
    return torch.einsum(pattern, B3, A3).mul_(s)


def dora_rescale(combined: torch.Tensor, magnitude: torch.Tensor, form: str | None) -> None:
    """W' = m / ||W + ΔW|| ⊙ (W + ΔW), in place on `combined` = W + ΔW, the norm taken the way PEFT's DoRA layer
    for this module type takes it."""
    if form == "linear":
        combined.mul_((magnitude / torch.linalg.norm(combined, dim=1)).view(-1, 1))
    elif form == "linear_t":  # stored (in, out): one norm per output column
        combined.mul_((magnitude / torch.linalg.norm(combined.T, dim=1)).view(-1, 1).T)
    elif form == "embedding":
        combined.mul_((magnitude / torch.linalg.norm(combined.T, dim=1)).view(1, -1))
    elif form == "conv":
        norm = combined.norm(p=2, dim=tuple(range(1, combined.dim())), keepdim=True).transpose(1, 0)
        factor = magnitude.reshape(norm.shape) / norm
        combined.mul_(factor.view(-1, *([1] * (combined.dim() - 1))))
    else:
        raise ValueError(f"DoRA is not defined for {form} updates")


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf. One min/max reduction (NaN propagates into both): ~17× faster than isfinite().all() on CPU."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
