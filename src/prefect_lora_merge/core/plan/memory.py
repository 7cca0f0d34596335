"""The memory estimate of a shard's merge, from the plan alone: what drives threads, Dask placement and pod sizes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..adapter import AdapterIndex
from ..formats import weight_format
from ..storage import POOLED_BYTES, READ_AHEAD_BYTES, WRITE_BEHIND_BYTES
from ..update import merges_by_tiles, update_keys

if TYPE_CHECKING:
    from .model import ShardPlan


def shard_peak_bytes(shard: ShardPlan, adapter: AdapterIndex) -> int:
    """Working memory of a shard's merge: what the reader holds (its budget, or one larger tensor alone), what the
    writer holds (likewise), the free buffers kept for reuse, and the largest computed tensor's float32 temporaries
    with its adapter tensors: three full copies for a whole-tensor merge or a dequantization, the format's own count
    for a re-quantization, on top of the largest products B @ A of tiled merges, which the workspace keeps."""
    products = work = largest_read = largest_result = 0
    written = {e.name: e.nbytes for e in shard.output_entries()}
    for t in shard.tensors:
        if not t.computed:
            continue
        updates = t.weight_updates
        adapter_bytes = sum(math.prod(adapter.tensors[k].shape) * 4 for u in updates for k in update_keys(u))
        shape = t.quantized.weight.shape if t.quantized else t.shape
        values = math.prod(shape) * 4
        tiled = merges_by_tiles(updates) and len(shape) == 2
        if tiled:
            products = max(products, len(updates) * values)  # the workspace keeps them for the whole shard
        if t.quantized is not None:
            requantized = t.quantized.write == "requantized"
            copies = weight_format(t.quantized.weight.format).work_copies if requantized else 3
            others = sum(ref.entry.nbytes for ref in t.quantized.others)
            largest_read = max(largest_read, t.base.nbytes + others)
        else:
            copies = 0 if tiled else 3
            largest_read = max(largest_read, t.base.nbytes)
        work = max(work, copies * values + adapter_bytes)
        largest_result = max(largest_result, written.get(t.name, 0))
    buffers = max(READ_AHEAD_BYTES, largest_read) + max(WRITE_BEHIND_BYTES, largest_result) + POOLED_BYTES
    return products + work + buffers
