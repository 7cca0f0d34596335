"""PEFT's merge arithmetic, one base tensor at a time, in fp32.

The order of operations mirrors `peft.tuners.lora` (delta = (B @ A) * s, then W + delta, DoRA's norm from the same
sum), so an fp32 merge matches `merge_and_unload()` to the last bit on the same device, and a bf16 merge equals
PEFT's fp32 result rounded once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .plan import Update

Fetch = Callable[[str], torch.Tensor]  # adapter key -> fp32 tensor on the compute device


def merged_tensor(weight: torch.Tensor, updates: tuple[Update, ...], fetch: Fetch) -> torch.Tensor:
    """Apply the updates to an fp32 base tensor, in plan order; returns the fp32 result."""
    for update in updates:
        if update.kind == "replace":
            weight = fetch(update.adapter_tensors[0]).to(torch.float32).clone()
        elif update.kind == "rows":
            index = torch.tensor(update.indices, dtype=torch.long, device=weight.device)
            weight = weight.index_copy(0, index, fetch(update.adapter_tensors[0]).to(weight))
        else:
            delta = delta_weight(update, fetch)
            if update.magnitude:
                weight = _dora(weight, delta, fetch(update.magnitude), update.form)
            else:
                weight = weight + delta
    return weight


def delta_weight(update: Update, fetch: Fetch) -> torch.Tensor:
    """The update's ΔW in the base tensor's own layout, scaling included."""
    s = update.scale
    if update.form == "bias":
        return fetch(update.adapter_tensors[0]) * s
    A, B = (fetch(k) for k in update.adapter_tensors)
    if update.form == "linear":
        return (B @ A) * s
    if update.form in ("linear_t", "embedding"):
        return (B @ A).T * s
    if update.form == "conv":
        if A.shape[2:] == (1,) * (A.dim() - 2) and A.dim() == 4:
            return (B.squeeze(3).squeeze(2) @ A.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * s
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[A.dim()]
        return conv(A.transpose(0, 1), B).transpose(0, 1) * s
    experts = update.num_experts
    assert experts is not None
    A3 = A.reshape(experts, -1, A.shape[-1])  # (E, r, in): expert e owns a block of A's rows
    B3 = B.reshape(B.shape[0], -1, experts)  # (out, r, E): expert e owns every E-th column of B
    if update.form == "experts":
        pattern = "o r e, e r i -> e o i" if update.experts_layout == "eoi" else "o r e, e r i -> e i o"
        return torch.einsum(pattern, B3, A3) * s
    # One expert's slice of the fused delta, for checkpoints that store experts as separate Linear weights.
    assert update.expert is not None and update.rows is not None
    start, end = update.rows
    return (B3[start:end, :, update.expert] @ A3[update.expert]) * s


def _dora(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, form: str | None) -> torch.Tensor:
    """W' = m / ||W + ΔW|| ⊙ (W + ΔW), the norm taken the way PEFT's DoRA layer for this module type takes it."""
    if form == "linear":
        norm = torch.linalg.norm(weight + delta, dim=1)
        return (magnitude / norm).view(-1, 1) * (weight + delta)
    if form == "linear_t":  # weight stored (in, out): the norm is per output column
        norm = torch.linalg.norm(weight.T + delta.T, dim=1)
        return (magnitude / norm).view(-1, 1).T * (weight + delta)
    if form == "embedding":
        norm = torch.linalg.norm(weight.T + delta.T, dim=1)
        return (magnitude / norm).view(1, -1) * (weight + delta)
    if form == "conv":
        dims = tuple(range(1, weight.dim()))
        norm = (weight + delta).norm(p=2, dim=dims, keepdim=True).transpose(1, 0)
        factor = magnitude.reshape(norm.shape) / norm
        return factor.view(-1, *([1] * (weight.dim() - 1))) * (weight + delta)
    raise ValueError(f"DoRA is not defined for {form} updates")
