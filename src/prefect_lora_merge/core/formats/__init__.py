"""Quantized weight formats: one module per format behind `base.WeightFormat`, found here by key."""

from __future__ import annotations

from .base import WeightFormat
from .block_fp8 import BlockFp8
from .int4_packed import Int4PackQuantized
from .mxfp4 import Mxfp4

FORMATS: tuple[WeightFormat, ...] = (BlockFp8(), Int4PackQuantized(), Mxfp4())


def weight_format(key: str) -> WeightFormat:
    """The format a plan names by its key."""
    for found in FORMATS:
        if found.key == key:
            return found
    raise KeyError(f"no quantized weight format {key!r}")
