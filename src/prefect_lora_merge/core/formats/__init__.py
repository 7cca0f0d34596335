"""Quantized weight formats: one module per format behind `base.WeightFormat`, found here by key."""

from __future__ import annotations

from .base import WeightFormat
from .block_fp8 import BlockFp8

FORMATS: tuple[WeightFormat, ...] = (BlockFp8(),)


def weight_format(key: str) -> WeightFormat:
    """The format a plan names by its key."""
    for found in FORMATS:
        if found.key == key:
            return found
    raise KeyError(f"no quantized weight format {key!r}")
