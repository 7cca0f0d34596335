"""Quantized weight formats: one module per format behind `base.WeightFormat`, found here by key."""

from __future__ import annotations

from .base import WeightFormat
from .bitsandbytes import AsQuantized4bit, Bnb4bit, BnbInt8
from .block_fp8 import BlockFp8
from .int4_packed import Int4PackQuantized
from .mxfp4 import Mxfp4

# The formats a base is stored in, each detected from config.json and the headers.
FORMATS: tuple[WeightFormat, ...] = (BlockFp8(), Int4PackQuantized(), Mxfp4(), Bnb4bit(), BnbInt8())
# ... and the one planning makes for `--as-quantized` (a 16-bit weight through a 4-bit round trip).
_ALL: tuple[WeightFormat, ...] = (*FORMATS, AsQuantized4bit())


def weight_format(key: str) -> WeightFormat:
    """The format a plan names by its key."""
    for found in _ALL:
        if found.key == key:
            return found
    raise KeyError(f"no quantized weight format {key!r}")
