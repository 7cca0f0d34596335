"""Tiles: a large 2-D weight processed a cache-sized piece at a time.

A merge makes several passes over each value (convert, add the delta, round; for FP8 also decode, encode and
compare). Done on whole tensors, each pass streams a full-size float32 temporary through memory; done a tile at a
time, the passes run in cache. Only elementwise work is tiled: the LoRA product `B @ A` is computed whole, as PEFT
computes it (see `lora_math.tile_merge`), so tiles give the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

# Values per CPU tile: a float32 tile (1 MiB) stays in one core's L2. Measured on DeepSeek shapes, 2 EPYC cores:
# 2-4x the throughput of whole-tensor passes; smaller tiles lose to per-operation overhead.
TILE_VALUES = 1 << 18


class Workspace:
    """Float32 buffers reused from one tensor to the next within a shard merge.

    glibc hands blocks of 4 MiB and more back to the OS on free (see `merge.keep_large_buffers_off_the_heap`), so a
    fresh full-size product page-faults on every tensor: measured 25 ms for a 5632×2048 `B @ A` into a new tensor,
    7 ms into a reused one. A slot is free again once the tensor that took it is written.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[int, torch.Tensor] = {}

    def take(self, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        size = math.prod(shape)
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.numel() < size:
            self._buffers.pop(slot, None)  # free the smaller one first
            buffer = self._buffers[slot] = torch.empty(size, dtype=torch.float32, device=self.device)
        return buffer[:size].view(shape)


TileMerge = Callable[[torch.Tensor, slice, slice], torch.Tensor]
"""(float32 tile of the base weight, its rows, its columns) -> the merged tile, a new tensor."""


def tiles(
    shape: tuple[int, ...], device: torch.device, block: tuple[int, int] = (1, 1)
) -> Iterator[tuple[slice, slice]]:
    """(rows, columns) of the tiles of a 2-D tensor, in whole `block`s of about TILE_VALUES values; one tile on a
    GPU, which has the bandwidth for whole-tensor passes."""
    rows, cols = shape
    if device.type != "cpu":
        yield slice(0, rows), slice(0, cols)
        return
    bm, bn = block
    col_step = bn * max(1, min(math.ceil(cols / bn), TILE_VALUES // (bm * bn)))
    row_step = bm * max(1, TILE_VALUES // (bm * col_step))
    for start in range(0, rows, row_step):
        for col in range(0, cols, col_step):
            yield slice(start, min(rows, start + row_step)), slice(col, min(cols, col + col_step))


def merge_rounded(values: torch.Tensor, dtype: torch.dtype, merge: TileMerge | None) -> torch.Tensor:
    """Float32 `values` with `merge` applied (a tile at a time where 2-D, else once with full slices), rounded once
    to `dtype`."""
    if merge is None:
        return values if values.dtype == dtype else values.to(dtype)
    if values.dim() != 2:
        return merge(values, slice(None), slice(None)).to(dtype)
    out = torch.empty(values.shape, dtype=dtype, device=values.device)
    for rows, cols in tiles(tuple(values.shape), values.device):
        out[rows, cols] = merge(values[rows, cols], rows, cols)
    return out
