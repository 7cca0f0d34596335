"""Merging one shard: stream the base shard's tensors in order, rewrite the touched ones, copy the rest as bytes.

A shard is a three-stage pipeline: a reader thread runs ahead of the computing thread, and a writer thread, which
also hashes, runs behind it, each within a byte budget. A shard's time is then close to max(read, compute,
write + hash) rather than their sum, and memory stays bounded by the largest tensor plus the budgets. Buffers are
pooled (core.buffers): what was read or written comes back for the next piece instead of a fresh allocation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import torch

from .buffers import BufferPool
from .errors import AdapterError, CheckpointFormatError, LoraMergeError
from .formats import weight_format
from .formats.base import NonFiniteValues, QuantizedWeight
from .formats.bitsandbytes import ROUND_TRIP
from .formats.survival import DeltaSurvival, RoundTripShift
from .lora_math import Fetch, all_finite, merged_tensor, tile_merge
from .meter import ShardMeter
from .plan import MergeJob, PlannedTensor, ShardPlan, TensorRef, Update, update_keys
from .plan.memory import computing_parts
from .resources import DEVICE_PATTERN
from .safetensors_format import encode_header, read_header, torch_dtype
from .state import ShardMeasure, ShardReceipt, committed_record, write_record
from .storage import PIECE_BYTES, POOLED_BYTES, READ_AHEAD_BYTES, WRITE_BEHIND_BYTES
from .tiling import TileMerge, Workspace, merge_rounded, tiles


def resolve_device(device: str) -> torch.device:
    """The torch device `--device` names on this machine. Whatever runs shards here calls it before the output's
    lease is taken (the flow's thread runner, `merge_checkpoint`), so a device this machine lacks writes nothing."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise LoraMergeError(f"--device must be auto, cpu or cuda[:N], not {device!r}")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise LoraMergeError(
            f"--device {device}: this machine has no CUDA device (torch sees none); use --device cpu or auto, or run "
            "on a machine with a GPU"
        )
    count = torch.cuda.device_count()
    if ":" in device and int(device.split(":")[1]) >= count:
        raise LoraMergeError(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return torch.device(device)


@functools.cache
def keep_large_buffers_off_the_heap() -> None:
    """Make glibc serve every allocation of 4 MiB or more with its own mmap, returned to the OS on free, and keep
    up to 64 MiB of freed smaller blocks on the heap for reuse.

    A merge allocates and frees buffers of tens of MiB, from two threads. glibc's adaptive threshold otherwise puts
    them on heap arenas that fragment and never shrink: measured on a 2 GB llama, peak RSS grew with the shard size
    (981 MiB at 500 MB shards) instead of staying near the working set (554 MiB with this setting). Setting the
    threshold also fixes the trim threshold at 128 KiB, which hands the quantized formats' 1 MiB tile temporaries
    back to the OS after every operation: page faults then cost ~30% of a re-quantization on 2 cores.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 4 * 1024 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 64 * 1024 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc (macOS, musl): their allocators behave differently anyway
        pass


@dataclass
class _Segment:
    tensor: PlannedTensor | None  # None: raw bytes of untouched tensors
    data: memoryview  # pooled: given back once computed on or written
    size: int  # bytes held, data and other parts (counted against the read-ahead budget)
    # a quantized weight's other stored parts, by role, read with this one (from any shard)
    others: dict[str, memoryview] | None = None


def merge_or_resume_shard(job: MergeJob, shard: ShardPlan, threads: int | None = None) -> ShardReceipt:
    """The shard's receipt: from its record when an earlier run of this merge committed it, else by merging it."""
    record = committed_record(job, shard)
    if record is not None:
        return ShardReceipt(**record.model_dump(), seconds=0.0, device="none", resumed=True)
    return merge_shard(job, shard, threads)


def merge_shard(job: MergeJob, shard: ShardPlan, threads: int | None = None) -> ShardReceipt:
    """Write the merged version of one base shard to the output, atomically, then its record; return the receipt.

    The record is written only after the shard's object is committed, so a record always describes a whole shard.
    `threads` sets the threads of the elementwise tile passes (see `resources.choose_parallelism`); None leaves
    torch's setting alone.
    """
    started = time.perf_counter()
    keep_large_buffers_off_the_heap()
    if threads is not None:
        torch.set_num_threads(_torch_threads())  # products and norms: torch's own count, whatever another shard set
    device = resolve_device(job.device)
    base = job.base
    header = read_header(base, shard.file)
    if (
        base.version(shard.file) != job.base_versions.get(shard.file)
        or header.file_size != shard.base_size
        or header.header_bytes != shard.base_header_bytes
        or header.tensors != tuple(t.base for t in shard.tensors if t.source is None)
    ):
        raise _changed_since_planned(base.describe(shard.file))
    # The other shards this one reads from (a quantized weight's parts, an untied head's embedding) must be as
    # planned too: their offsets come from the plan.
    for file in sorted(_files_read_from(shard) - {shard.file}):
        if base.version(file) != job.base_versions.get(file):
            raise _changed_since_planned(base.describe(file))
    job.adapters.check_unchanged()
    if shard.copies_base_bytes():
        receipt = _copy_server_side(job, shard, started)
        if receipt is not None:
            return receipt
    if shard.layout_unchanged():
        # Same names, dtypes, shapes and offsets: keep the base's header bytes exactly (metadata included).
        header_blob = base.read_bytes(shard.file, 0, header.data_start)
    else:
        header_blob = encode_header(shard.output_entries(), shard.metadata)

    applied: list[str] = []
    survivals: list[DeltaSurvival] = []
    shifts: list[RoundTripShift] = []
    adapter_cache: dict[str, torch.Tensor] = {}
    kept: dict[str, tuple[torch.Tensor, DeltaSurvival | None]] = {}  # see _quantized_tensor
    workspace = Workspace(device)
    pool = BufferPool(POOLED_BYTES, piece=PIECE_BYTES)
    meter = ShardMeter(device)
    result_bytes = {e.name: e.nbytes for e in shard.output_entries()}

    def fetch(key: str) -> torch.Tensor:
        if key not in adapter_cache:
            adapter_cache[key] = job.adapters.read(key).to(device=device, dtype=torch.float32)
        return adapter_cache[key]

    with job.output.atomic_writer(shard.file) as out, _write_behind(out, shard.file) as writer:
        writer.write(header_blob)
        for segment in _read_ahead(job, shard, pool, meter):
            if segment.tensor is None:
                writer.write(segment.data, give_back=pool)
                continue
            planned = segment.tensor
            written_view = pool.take(result_bytes[planned.name])
            result = _over(written_view, planned.dtype, planned.shape)
            if planned.quantized is not None:
                survival = _quantized_tensor(planned, segment, fetch, workspace, kept, threads, result, shifts)
                if survival is not None:
                    _check_survival(job, shard, survival, weight_format(planned.quantized.weight.format).label)
                    survivals.append(survival)
            else:
                _merge_tensor(planned, segment.data, fetch, workspace, threads, result)
            del result  # nothing looks at the pooled buffers any more: they can go back once used
            pool.give(segment.data)
            for view in (segment.others or {}).values():
                pool.give(view)
            writer.write(written_view, give_back=pool)
            applied += [k for u in planned.updates for k in update_keys(u)]
    written = writer.written
    meter.write_wait = writer.wait
    seconds, peak, gpu_peak = meter.stop()
    expected = len(header_blob) + sum(e.nbytes for e in shard.output_entries())
    if written != expected:  # cannot happen unless a bug slipped in; never publish a wrong-sized shard silently
        job.output.remove(shard.file)
        raise LoraMergeError(f"internal error: wrote {written} bytes for {shard.file}, expected {expected}")
    receipt = ShardReceipt(
        file=shard.file,
        bytes=written,
        sha256=writer.digest.hexdigest(),
        fingerprint=job.fingerprint,
        tensors=len(shard.tensors),
        touched=[t.name for t in shard.touched],
        applied=applied,
        delta_survivals=survivals,
        round_trip_shifts=shifts,
        seconds=time.perf_counter() - started,
        device=str(device),
        measured=ShardMeasure(
            seconds=seconds,
            bytes_read=meter.bytes_read + len(header_blob),
            bytes_written=written,
            read_wait_seconds=meter.read_wait,
            write_wait_seconds=meter.write_wait,
            peak_memory_bytes=peak,
            start_memory_bytes=meter.resident_at_start,
            gpu_peak_bytes=gpu_peak,
            estimated_peak_bytes=shard.peak_bytes(job.adapters),
        ),
    )
    write_record(job.output, receipt.record())
    return receipt


def _files_read_from(shard: ShardPlan) -> set[str]:
    """Every base file a merge of `shard` reads."""
    files = {shard.file}
    for tensor in shard.tensors:
        if tensor.source is not None:
            files.add(tensor.source.file)
        if tensor.quantized is not None:
            files.update(ref.file for ref in tensor.quantized.others)
    return files


def _changed_since_planned(what: str) -> CheckpointFormatError:
    """A base shard is not what was planned (rewritten, re-uploaded): its plan no longer describes its bytes."""
    return CheckpointFormatError(f"{what} changed since the merge was planned; plan the merge again")


def _copy_server_side(job: MergeJob, shard: ShardPlan, started: float) -> ShardReceipt | None:
    """An untouched shard copied by the storage itself (no bytes through this process); None where the base and
    output do not share a filesystem that can do that."""
    base, output = job.base, job.output
    if not output.copy_from(base, shard.file):
        return None
    if base.version(shard.file) != job.base_versions.get(shard.file) or output.size(shard.file) != shard.base_size:
        output.remove(shard.file)  # the base changed while it was being copied: never keep a copy of other bytes
        raise _changed_since_planned(base.describe(shard.file))
    receipt = ShardReceipt(
        file=shard.file,
        bytes=shard.base_size,
        sha256=None,
        fingerprint=job.fingerprint,
        tensors=len(shard.tensors),
        touched=[],
        applied=[],
        copied_server_side=True,
        seconds=time.perf_counter() - started,
        device="storage",
    )
    write_record(job.output, receipt.record())
    return receipt


@functools.cache
def _torch_threads() -> int:
    """torch's own thread count, as the process had it when the first shard merge started: what products and
    norms run with (PEFT's merge on this machine uses the same)."""
    return torch.get_num_threads()


@contextmanager
def _elementwise_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads for the tile passes, set back to torch's own count after. Only elementwise work runs
    under it: its bits do not depend on the thread count, while a product's or a norm's can (MKL, oneDNN).

    `torch.set_num_threads` also changes the default that threads starting their first torch call pick up, so
    every shard merge sets torch's own count again before its products (`merge_shard`)."""
    if threads is None:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(_torch_threads())


def _merge_tensor(
    planned: PlannedTensor,
    data: memoryview,
    fetch: Fetch,
    workspace: Workspace,
    threads: int | None,
    out: torch.Tensor,
) -> None:
    """Merge one tensor's updates into `out` (its bytes in the output shard)."""
    dtype = torch_dtype(planned.dtype)
    base = _from_buffer(data, dtype, planned.base.shape)
    # fp32 arithmetic, as PEFT's merge of an fp32 copy of the model; fp64 tensors keep their precision.
    compute = torch.float64 if dtype == torch.float64 else torch.float32

    def fetch_compute(key: str) -> torch.Tensor:
        return fetch(key).to(compute)

    device = workspace.device
    tiled = base.dim() == 2 and planned.shape == planned.base.shape
    merge = tile_merge(planned.updates, fetch_compute, workspace if tiled and compute == torch.float32 else None)
    if merge is not None and tiled:
        with _elementwise_threads(threads):
            _merge_tiles(planned, base, merge, compute, device, out)
        return
    # A private copy: the merge works on it in place; `base` still reads the shard's bytes, which go back to the
    # pool only after this tensor is merged.
    weight = base.to(device=device, dtype=compute, copy=True)
    merged = merged_tensor(weight, planned.updates, fetch_compute)
    if tuple(merged.shape) != planned.shape:
        raise LoraMergeError(f"internal error: {planned.name} came out {tuple(merged.shape)}, planned {planned.shape}")
    out.copy_(merged)  # rounds to the output dtype (and comes back from the GPU)
    # Checked after rounding: an fp16 tensor can overflow to Inf only there.
    if _broken_values(out, base):
        raise _adapter_broke(planned.name, planned.updates, planned.dtype)


def _merge_tiles(
    planned: PlannedTensor,
    base: torch.Tensor,
    merge: TileMerge,
    compute: torch.dtype,
    device: torch.device,
    out: torch.Tensor,
) -> None:
    """A 2-D weight merged a tile at a time (LoRA on a linear weight): convert, add ΔW's tile, round into `out`,
    with no full-size float32 copy of the weight (ΔW itself is whole, see `tile_merge`). The same bits as the
    whole-tensor path."""
    for rows, cols in tiles(base.shape, device):
        out[rows, cols] = merge(base[rows, cols].to(device=device, dtype=compute), rows, cols)
    if _broken_values(out, base):  # checked after rounding: fp16 can overflow only there
        raise _adapter_broke(planned.name, planned.updates, planned.dtype)


def _broken_values(out: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether the merge wrote NaN/Inf where the base holds a finite value (or where it has no value: the new rows
    of a resized embedding). Value by value: a base with NaN/Inf of its own somewhere keeps them, and must not
    hide an overflow elsewhere in the same tensor."""
    if all_finite(out):
        return False
    bad = ~torch.isfinite(out)
    if out.shape == base.shape:
        return bool((bad & torch.isfinite(base)).any())
    if out.dim() == base.dim() and out.shape[1:] == base.shape[1:]:  # resized: rows added or removed
        shared = min(out.shape[0], base.shape[0])
        return bool((bad[:shared] & torch.isfinite(base[:shared])).any() or bad[shared:].any())
    return True


def _adapter_broke(name: str, updates: tuple[Update, ...], limit: str) -> AdapterError:
    """NaN/Inf where the base is finite: the adapter's fault (NaN/Inf in it, or a result beyond the `limit`
    dtype's range)."""
    return AdapterError(
        f"merging into {name} produced NaN/Inf values from a finite base: the adapter's tensors for "
        f"{', '.join(dict.fromkeys(u.module for u in updates))} are broken (NaN/Inf in them, or a delta beyond "
        f"{limit}'s range); nothing was published"
    )


def _from_buffer(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over a pooled buffer (no copy): read ones are copied (converted, dequantized) before anything is
    modified, since they go back to the pool."""
    flat = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape)


def _over(view: memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of the output dtype over a pooled buffer, for the merge to write into."""
    return _from_buffer(view, torch_dtype(dtype), shape)


def _quantized_tensor(
    planned: PlannedTensor,
    segment: _Segment,
    fetch: Fetch,
    workspace: Workspace,
    kept: dict[str, tuple[torch.Tensor, DeltaSurvival | None]],
    threads: int | None,
    out: torch.Tensor,
    shifts: list[RoundTripShift],
) -> DeltaSurvival | None:
    """A part of a quantized weight into `out`: the weight dequantized to bf16, or one re-quantized part; the
    delta's survival for the weight's primary part when re-quantized.

    The delta applies to the dequantized float32 weight (LoRA on quantized bases is trained on a dequantized
    copy), one tile at a time where the update allows it. A re-quantization makes every part at once: the parts
    stored later in the same shard wait in `kept` (by tensor name) instead of being computed again; in another
    shard, that shard's merge computes them from the same inputs."""
    if planned.name in kept:
        done, survival = kept.pop(planned.name)
        out.copy_(done)
        return survival
    role = planned.quantized
    assert role is not None and segment.others is not None, "a part that computes is read with its weight's others"
    weight = role.weight
    fmt = weight_format(weight.format)
    views = {role.role: segment.data, **segment.others}
    device = workspace.device
    parts = {
        r: _from_buffer(views[r], torch_dtype(ref.entry.dtype), ref.entry.shape).to(device)
        for r, ref in weight.parts.items()
    }
    updates = planned.weight_updates
    merge = tile_merge(updates, fetch, workspace) if updates else None
    whole = None
    if updates and merge is None:  # DoRA, fused experts: the update needs the whole weight at once
        whole = merged_tensor(fmt.dequantize(weight, parts), updates, fetch)
        merge = _tiles_of(whole)
    if role.write == "dequantized":
        dtype = torch_dtype(planned.dtype)
        with _elementwise_threads(threads):
            if whole is not None:  # already merged: rounding it is all that is left (decoding again would not be)
                result = whole.to(dtype)
            elif fmt.key == ROUND_TRIP and merge is not None:
                result = _round_tripped(weight, parts, merge, dtype, shifts)
            else:
                result = fmt.dequantize(weight, parts, dtype=dtype, merge=merge)
        if not all_finite(result):  # bf16 has fp32's range: only NaN/Inf in the base or the adapter end up here
            raise _not_finite(weight, parts, updates)
        out.copy_(result)
        return None
    assert merge is not None, "only touched weights are re-quantized"
    try:
        with _elementwise_threads(threads):
            new_parts, survival = fmt.requantize(weight, parts, merge)
    except NonFiniteValues:
        raise _not_finite(weight, parts, updates) from None
    here = weight.parts[role.role].file
    for other, ref in weight.parts.items():
        if other != role.role and ref.file == here:
            kept[ref.entry.name] = (new_parts[other].cpu(), survival if other == weight.primary else None)
    out.copy_(new_parts[role.role].cpu())
    return survival if role.role == weight.primary else None


def _round_tripped(
    weight: QuantizedWeight,
    parts: dict[str, torch.Tensor],
    merge: TileMerge,
    dtype: torch.dtype,
    shifts: list[RoundTripShift],
) -> torch.Tensor:
    """A touched weight merged `--as-quantized`: Q(W) + ΔW rounded once, and how far Q moved W next to ΔW."""
    rounded = weight_format(weight.format).dequantize(weight, parts)  # Q(W), float32
    original = parts["weight"].reshape(rounded.shape)
    shift_sq = sum(
        float((rounded[rows, cols] - original[rows, cols].float()).square().sum())
        for rows, cols in tiles(tuple(rounded.shape), rounded.device)
    )
    delta_sq = 0.0

    def measured(values: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
        nonlocal delta_sq
        merged = merge(values, rows, cols)
        delta_sq += float((merged - values).square().sum())
        return merged

    result = merge_rounded(rounded, dtype, measured)
    shift, delta = math.sqrt(shift_sq), math.sqrt(delta_sq)
    shifts.append(
        RoundTripShift(tensor=weight.name, shift_norm=shift, delta_norm=delta, ratio=shift / delta if delta else None)
    )
    return result


def _tiles_of(merged: torch.Tensor) -> TileMerge:
    """A merge that hands out the tiles of a weight merged in full (the format decodes its base values for the
    survival sums, not for this)."""
    return lambda _values, rows, cols: merged[rows, cols]


def _not_finite(weight: QuantizedWeight, parts: dict[str, torch.Tensor], updates: tuple[Update, ...]) -> LoraMergeError:
    """The error for NaN/Inf in a dequantized or merged quantized weight: the base's fault or the adapter's."""
    if not all_finite(weight_format(weight.format).dequantize(weight, parts)):
        stored = [ref.entry.name for role, ref in weight.parts.items() if role != weight.primary]
        files = ", ".join(dict.fromkeys(ref.file for ref in weight.parts.values()))
        if weight.format == ROUND_TRIP:  # the stored 16-bit weight itself holds them
            return CheckpointFormatError(
                f"{weight.name} ({files}) holds NaN/Inf, which --as-quantized's 4-bit round trip spreads over whole "
                "blocks (their absmax): the base checkpoint is damaged; without --as-quantized they are kept as stored"
            )
        return CheckpointFormatError(
            f"{weight.name} holds NaN/Inf after dequantizing with {', '.join(stored)} ({files}): the base checkpoint "
            "is damaged"
        )
    return _adapter_broke(weight.name, updates, "float32")


def _check_survival(job: MergeJob, shard: ShardPlan, survival: DeltaSurvival, label: str) -> None:
    threshold = job.min_delta_cosine
    if threshold is not None and survival.cosine < threshold:
        raise LoraMergeError(
            f"{shard.file}: {survival.tensor} re-quantized to {label} keeps too little of the adapter's change (cosine "
            f"{survival.cosine:.3f} of realised vs intended ΔW, below --min-delta-cosine {threshold}; relative error "
            f"{survival.relative_error:.2f}); merge with --output-dtype bf16 to keep the whole delta, or lower the "
            "threshold"
        )


def _segments(shard: ShardPlan) -> Iterator[tuple[PlannedTensor | None, str, int, int]]:
    """(tensor or None for raw bytes, base file, begin, end) in the output's data order: the shard's own tensors
    (raw runs cut to PIECE_BYTES; dropped tensors not read), then the tensors it adds, read where the base stores
    their bytes (copied ones in pieces too)."""
    start = shard.base_data_start
    run_begin: int | None = None
    run_end = 0
    for tensor in shard.tensors:
        if tensor.source is not None:
            continue
        if not tensor.computed and not tensor.dropped:
            if run_begin is None:
                run_begin = tensor.base.begin
            run_end = tensor.base.end
            continue
        if run_begin is not None:
            yield from _chunks(shard.file, start + run_begin, start + run_end)
            run_begin = None
        if not tensor.dropped:
            yield tensor, shard.file, start + tensor.base.begin, start + tensor.base.end
    if run_begin is not None:
        yield from _chunks(shard.file, start + run_begin, start + run_end)
    for tensor in shard.tensors:
        if tensor.source is not None:
            begin, end = tensor.source.span
            if tensor.computed:
                yield tensor, tensor.source.file, begin, end
            else:
                yield from _chunks(tensor.source.file, begin, end)


def _others(tensor: PlannedTensor | None, computing: set[str]) -> list[tuple[str, TensorRef]]:
    """The other stored parts of a quantized weight that computing `tensor` needs, by role: none for a part its
    weight's first part in this shard already computed (`computing_parts`)."""
    if tensor is None or tensor.quantized is None or tensor.name not in computing:
        return []
    role = tensor.quantized
    return [(r, ref) for r, ref in role.weight.parts.items() if r != role.role]


def _computed_ahead(tensor: PlannedTensor | None, computing: set[str]) -> bool:
    """A re-quantized part its weight's first part in this shard computed (it waits in `kept`)."""
    return (
        tensor is not None
        and tensor.quantized is not None
        and tensor.quantized.write == "requantized"
        and tensor.name not in computing
    )


def _chunks(file: str, begin: int, end: int) -> Iterator[tuple[None, str, int, int]]:
    for start in range(begin, end, PIECE_BYTES):
        yield None, file, start, min(end, start + PIECE_BYTES)


def _read_ahead(job: MergeJob, shard: ShardPlan, pool: BufferPool, meter: ShardMeter) -> Iterator[_Segment]:
    """Segments read by a background thread while the consumer computes and writes earlier ones.

    At most READ_AHEAD_BYTES are held ahead of the consumer; a segment larger than that is read only when nothing
    else is in flight, so memory stays bounded by the largest tensor plus the read-ahead budget.
    """
    in_flight = 0
    changed = threading.Condition()
    items: queue.Queue[_Segment | BaseException | None] = queue.Queue()
    stop = threading.Event()

    def may_read(size: int) -> bool:
        return stop.is_set() or in_flight == 0 or in_flight + size <= READ_AHEAD_BYTES

    computing = computing_parts(shard)

    def reader() -> None:
        nonlocal in_flight
        try:
            for tensor, file, begin, end in _segments(shard):
                others = _others(tensor, computing)
                if _computed_ahead(tensor, computing):
                    end = begin  # written from what its weight's first part computed: its own bytes are not needed
                size = end - begin + sum(ref.entry.nbytes for _, ref in others)
                with changed:
                    changed.wait_for(functools.partial(may_read, size))
                    if stop.is_set():
                        return
                    in_flight += size
                data = pool.take(end - begin)
                if end > begin:
                    job.base.read_into(file, begin, data)
                meter.read(size)
                extra = None
                if tensor is not None and tensor.name in computing:  # {} for a weight stored as one tensor
                    extra = {}
                    for role, ref in others:
                        extra[role] = pool.take(ref.entry.nbytes)
                        job.base.read_into(ref.file, ref.span[0], extra[role])
                items.put(_Segment(tensor=tensor, data=data, size=size, others=extra))
            items.put(None)
        except BaseException as exc:  # handed to the consumer, which raises it in the task's own thread
            items.put(exc)

    thread = threading.Thread(target=reader, name=f"read-{shard.file}", daemon=True)
    thread.start()
    try:
        while True:
            waiting = time.perf_counter()
            item = items.get()
            meter.read_wait += time.perf_counter() - waiting
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # the consumer computes and writes this segment before asking for the next
            with changed:
                in_flight -= item.size
                changed.notify_all()
    finally:
        with changed:
            stop.set()
            changed.notify_all()


class _WriteBehind:
    """Writes and hashes a shard's bytes on a thread of its own while the merge computes what comes next.

    At most WRITE_BEHIND_BYTES wait to be written; a piece larger than that waits alone. A write error stops the
    thread and is raised in the merging thread at its next `write` or at the end.
    """

    def __init__(self, out: BinaryIO, name: str) -> None:
        self.digest = hashlib.sha256()
        self.written = 0
        self.wait = 0.0  # seconds `write` and `close` waited for the writer (storage, hashing, the budget)
        self._out = out
        self._waiting: deque[tuple[bytes | memoryview, BufferPool | None]] = deque()
        self._waiting_bytes = 0
        self._closed = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"write-{name}", daemon=True)
        self._thread.start()

    def write(self, data: bytes | memoryview, give_back: BufferPool | None = None) -> None:
        """Queue `data` to be written and hashed; then hand its buffer back to `give_back`, if given."""
        size = len(data)
        waiting = time.perf_counter()
        with self._changed:
            self._changed.wait_for(
                lambda: self._error is not None or not self._waiting or self._waiting_bytes + size <= WRITE_BEHIND_BYTES
            )
            if self._error is not None:
                raise self._error
            self._waiting.append((data, give_back))
            self._waiting_bytes += size
            self._changed.notify_all()
        self.wait += time.perf_counter() - waiting

    def close(self, *, discard: bool = False) -> None:
        """Wait until every piece is written (or, with `discard`, drop those not yet started); raise its error."""
        waiting = time.perf_counter()
        with self._changed:
            self._closed = True
            if discard:
                self._waiting.clear()
            self._changed.notify_all()
        self._thread.join()
        self.wait += time.perf_counter() - waiting
        if self._error is not None and not discard:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._waiting or self._closed)
                if not self._waiting:
                    return
                data, give_back = self._waiting[0]
            size = len(data)
            try:  # file writes and sha256 release the GIL: this overlaps the merge's compute
                self._out.write(data)
                self.digest.update(data)
                with self._changed:
                    if self._waiting:  # not cleared by a discarding close meanwhile
                        self._waiting.popleft()
                        self._waiting_bytes -= size
                    self.written += size
                    self._changed.notify_all()
                if give_back is not None:
                    give_back.give(data)
            except BaseException as exc:  # recorded, so the producer never waits on a dead thread
                with self._changed:
                    self._error = exc
                    self._waiting.clear()
                    self._changed.notify_all()
                return
            del data


@contextmanager
def _write_behind(out: BinaryIO, name: str) -> Iterator[_WriteBehind]:
    """A `_WriteBehind` on `out` that has written everything when the block ends, or stopped if the block raised
    (so the atomic writer around it never commits or removes a file still being written)."""
    writer = _WriteBehind(out, name)
    try:
        yield writer
    except BaseException:
        writer.close(discard=True)
        raise
    writer.close()
