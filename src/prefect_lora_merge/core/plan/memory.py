"""The memory estimate of a shard's merge, from the plan alone: what drives threads, Dask placement and pod sizes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..adapters import AdapterSet
from ..formats import weight_format
from ..storage import POOLED_BYTES, READ_AHEAD_BYTES, WRITE_BEHIND_BYTES
from ..update import merges_by_tiles, update_keys

if TYPE_CHECKING:
    from .model import ShardPlan


def shard_peak_bytes(shard: ShardPlan, adapters: AdapterSet) -> int:
    """Working memory of a shard's merge: what the reader holds (its budget, or one larger tensor alone), what the
    writer holds (likewise), the free buffers kept for reuse, and the largest computed tensor's float32 temporaries
    with its adapter tensors: three full copies for a whole-tensor merge or a dequantization, the format's own count
    for a re-quantization, on top of the largest products B @ A of tiled merges, which the workspace keeps."""
    products = work = largest_read = largest_result = 0
    written = {e.name: e.nbytes for e in shard.output_entries()}
    computing = computing_parts(shard)
    kept = most_kept = 0  # re-quantized parts computed ahead of their place in the shard, waiting to be written
    for t in shard.tensors:
        if t.quantized is not None and t.quantized.write == "requantized":
            if t.name in computing:
                kept += sum(ref.entry.nbytes for ref in t.quantized.others if ref.file == shard.file)
                most_kept = max(most_kept, kept)
            else:
                kept -= t.base.nbytes
                continue  # written from what its weight's first part computed
        if not t.computed:
            continue
        updates = t.weight_updates
        adapter_bytes = sum(math.prod(adapters.tensors[k].shape) * 4 for u in updates for k in update_keys(u))
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
    return products + work + buffers + most_kept


def computing_parts(shard: ShardPlan) -> set[str]:
    """The tensors of `shard` whose merge computes a quantized weight: every dequantized one, and the first stored
    part (in data order) of each re-quantized weight, which computes all the weight's parts at once; the weight's
    later parts in the shard are written from that (`merge._quantized_tensor`), and read without its other parts."""
    computing: set[str] = set()
    seen: set[str] = set()
    for t in shard.tensors:
        if t.quantized is None or t.dropped:
            continue
        weight = t.quantized.weight.name
        if t.quantized.write == "dequantized" or weight not in seen:
            computing.add(t.name)
        seen.add(weight)
    return computing
