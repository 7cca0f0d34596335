"""How much of an intended weight change ΔW a re-quantized weight still carries, for every quantized format.

A format's re-quantization adds each tile's sums to one `SurvivalSums`: the intended ΔW `i = merged − base` and the
quantization error `e = realised − merged`. The realised ΔW is `i + e`, so its cosine and norms follow from three
dot products, without the cancellation of subtracting two near-equal sums.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel

# A re-quantized weight whose realised delta points less than this way along the intended one is reported.
WARN_COSINE = 0.9


class DeltaSurvival(BaseModel):
    """How much of an intended weight change ΔW a re-quantized weight still carries.

    `cosine` of realised vs intended ΔW (1 = same direction); `relative_norm` ‖realised‖/‖intended‖ (1 = same size);
    `relative_error` ‖realised − intended‖/‖intended‖ (0 = all of it survived)."""

    tensor: str
    cosine: float
    relative_norm: float
    relative_error: float


class SurvivalSums:
    """Sums of products of the intended ΔW and the quantization error, a tile at a time: float32 dot products of
    one tile (accumulated blockwise by BLAS), added up in float64."""

    def __init__(self) -> None:
        self.ii = self.ie = self.ee = 0.0

    def add(self, base: torch.Tensor, merged: torch.Tensor, realised: torch.Tensor) -> None:
        """One tile: its base values, the merged values meant to be stored, and what the new codes decode to
        (`realised` may be overwritten)."""
        error = realised.sub_(merged).reshape(-1)
        intended = merged.sub(base).reshape(-1)
        self.ii += float(torch.dot(intended, intended))
        self.ie += float(torch.dot(intended, error))
        self.ee += float(torch.dot(error, error))

    def survival(self, tensor: str) -> DeltaSurvival:
        ii, ie, ee = self.ii, self.ie, self.ee
        if ii <= 0.0:  # nothing was meant to change
            return DeltaSurvival(tensor=tensor, cosine=1.0 if ee == 0 else 0.0, relative_norm=0.0, relative_error=0.0)
        rr = max(ii + 2 * ie + ee, 0.0)  # ‖i + e‖²
        cosine = (ii + ie) / math.sqrt(ii * rr) if rr > 0 else 0.0
        return DeltaSurvival(
            tensor=tensor,
            cosine=max(-1.0, min(1.0, cosine)),
            relative_norm=math.sqrt(rr / ii),
            relative_error=math.sqrt(ee / ii),
        )


class RoundTripShift(BaseModel):
    """For a weight merged `--as-quantized`: how far the 4-bit round trip moved it, next to the delta.

    `ratio` = ‖Q(W) − W‖ / ‖ΔW‖: how much the choice between merging into the round-tripped weights and into the
    16-bit ones matters for this tensor (above 1, the two merges differ by more than the adapter changes)."""

    tensor: str
    shift_norm: float  # ‖Q(W) − W‖
    delta_norm: float  # ‖ΔW‖
    ratio: float | None  # None where ΔW is zero


def round_trip_summary(shifts: list[RoundTripShift]) -> str:
    """One line on the round trip's shifts (largest ratio first), for the CLI and the summary artifact."""
    ratios = sorted(s.ratio for s in shifts if s.ratio is not None)
    if not ratios:
        return f"{len(shifts)} round-tripped weight(s) touched, all with ΔW = 0"
    largest = next(s for s in shifts if s.ratio is not None)
    above = sum(1 for r in ratios if r > 1)
    return (
        f"‖Q(W) − W‖ / ‖ΔW‖ over {len(ratios)} touched weight(s): median {ratios[len(ratios) // 2]:.3g}, largest "
        f"{largest.ratio:.3g} on {largest.tensor}; {above} above 1 (there the round trip moves the weight more than "
        "the adapter does, so merging into the 16-bit weights instead would give a different model)"
    )
