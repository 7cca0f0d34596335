"""bitsandbytes bases (QLoRA's 4-bit nf4/fp4 and LLM.int8()) as transformers saves them, and the 4-bit round trip
that `--as-quantized` puts a 16-bit base through.

4-bit (`Params4bit`): a weight `<w>` [out, in] is stored as `<w>` (U8 [ceil(n/2), 1], two 4-bit codes a byte, the
first value in the high nibble, over the weight flattened row-major), `<w>.absmax` (one scale per `blocksize`
consecutive values: F32, or U8 with double quantization), `<w>.quant_map` (the 16 code values), with double
quantization `<w>.nested_absmax` (F32, one per `nested_blocksize` absmax values) and `<w>.nested_quant_map` (the
256-value dynamic map), and `<w>.quant_state.bitsandbytes__<nf4|fp4>` (U8 bytes of JSON: shape, dtype, blocksize,
nested_offset...). The JSON is tensor data, not header: planning reads it (a few hundred bytes a weight).

bitsandbytes dequantizes as `code[c] · absmax'` in float32, rounded to the dtype the weight had when it was quantized
(`quant_state.dtype`), where with double quantization `absmax' = nested_map[a] · nested_absmax + offset` in float32.
That rounded tensor is the weight the model computes with (its forward, and the adapter's training, see nothing
else), so it is the dequantized weight here: a touched weight is that plus ΔW in float32, rounded once to the output
dtype. The code values are bitsandbytes' own (`get_4bit_type`, which its CPU and CUDA kernels hard-code); a stored
quant_map that differs from them is refused, since bitsandbytes itself would ignore it.

LLM.int8() (`Int8Params`): `<m>.weight` (I8 [out, in]) and `<m>.SCB` (F32 [out], each row's absmax), maybe
`<m>.weight_format` (a U8 scalar); bitsandbytes dequantizes `codes · SCB · (1/127)` in float32
(`int8_vectorwise_dequant`).

The quantizer (for the round trip only; a bitsandbytes base is written in bf16, not re-quantized) is bitsandbytes'
own CPU path: absmax per block, values times `1/absmax` clamped to [-1, 1], the code whose value is nearest
(`bucketize` on the midpoints of the sorted code values); double quantization subtracts the mean of all the
weight's absmax values and quantizes the rest blockwise (256) to the dynamic map, nearest value again.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import CheckpointFormatError, LoraMergeError
from ..safetensors_format import DTYPES, FLOAT_DTYPES, torch_dtype
from ..tiling import TileMerge, merge_rounded
from .base import QuantizedWeight, TensorRef, listed, quantization_config
from .survival import DeltaSurvival

QUANT_STATE = ".quant_state.bitsandbytes__"
QUANT_STATE_LIMIT = 1 << 16  # bytes: bitsandbytes writes about 200; planning reads no more than this per weight
# Models whose Linear layers are `Conv1D` ([in, out]): transformers quantizes (and saves) their transpose.
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt")
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts
NESTED_BLOCKSIZE = 256  # double quantization's block of absmax values (bitsandbytes' fixed choice)
INT8_SCALE = 7.874015718698502e-3  # bitsandbytes' 1/127, as a float32 multiplier
_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}  # quant_state.dtype -> safetensors dtype

# The 16 code values, exactly as bitsandbytes' `get_4bit_type` makes them (fp4: the table over its largest, 12).
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

Reader = Callable[[TensorRef], bytes]


@functools.cache
def code_values(quant_type: str, device: torch.device | None = None) -> torch.Tensor:
    """The 16 float32 values of `nf4` or `fp4` codes."""
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32, device=device)
    raw = torch.tensor(_FP4_RAW, dtype=torch.float32, device=device)
    return raw / raw.abs().max()


@functools.cache
def dynamic_map(device: torch.device | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): double quantization's code for absmax."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32, device=device)


# -- 4-bit arithmetic ------------------------------------------------------------------------------------------------


# Values per chunk of the 4-bit passes: each pass's temporaries (int64 codes are 2 float32 copies) stay a few MiB
# instead of several copies of the whole weight; a multiple of every block size and of double quantization's
# 256-absmax blocks, so a chunk is whole blocks at both levels.
CHUNK = 1 << 20


def _chunks(count: int) -> list[slice]:
    return [slice(start, min(count, start + CHUNK)) for start in range(0, count, CHUNK)]


def pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (any int dtype) into U8 [ceil(n/2), 1], high nibble first (an odd count padded with code 0)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def blockwise_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """float32 `table[codes] · absmax[block]` over flat integer `codes` that start a block, block `i // blocksize`."""
    values = table.index_select(0, codes.reshape(-1).to(torch.int32))  # int32 indices: 3x faster than int64
    count = values.numel()
    full = count - count % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < count:
        values[full:] *= absmax[full // blocksize]
    return values


def absmax_values(weight: QuantizedWeight, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 absmax of every block, as bitsandbytes computes it from the stored parts."""
    absmax = parts["absmax"].reshape(-1)
    if not weight.params["nested"]:
        return absmax.float()
    nested = blockwise_dequantize(
        absmax.view(torch.uint8).to(torch.int64),
        parts["nested_absmax"].reshape(-1).float(),
        parts["nested_quant_map"].reshape(-1).float(),
        weight.params["nested_blocksize"],
    )
    return nested + torch.tensor(weight.params["nested_offset"], dtype=torch.float32, device=nested.device)


@functools.cache
def _byte_values(quant_type: str, device: torch.device | None = None) -> torch.Tensor:
    """[256, 2] float32: the two code values each packed byte holds (high nibble first), so that decoding indexes
    once per byte instead of once per value."""
    table = code_values(quant_type, device)
    byte = torch.arange(256, device=table.device)
    return torch.stack([table[byte >> 4], table[byte & 0x0F]], dim=1)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: str,
    blocksize: int,
    shape: tuple[int, ...],
    dtype: str,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight bitsandbytes dequantizes: `code · absmax` in float32, rounded to `dtype` (the weight's dtype when
    it was quantized), a chunk at a time, in `out_dtype` (float32, or `dtype` itself to skip the widening)."""
    count = math.prod(shape)
    pairs = _byte_values(quant_type, packed.device)
    data = packed.reshape(-1).view(torch.uint8)
    out = torch.empty(count, dtype=out_dtype, device=packed.device)
    rounding = torch_dtype(dtype)
    for chunk in _chunks(count):
        index = data[chunk.start // 2 : math.ceil(chunk.stop / 2)].to(torch.int32)  # int32: 3x faster than int64
        values = pairs.index_select(0, index).view(-1)
        values = values[: chunk.stop - chunk.start]
        full = values.numel() - values.numel() % blocksize
        first = chunk.start // blocksize
        values[:full].view(-1, blocksize).mul_(absmax[first : first + full // blocksize, None])
        if full < values.numel():
            values[full:] *= absmax[first + full // blocksize]
        out[chunk] = values if rounding == torch.float32 else values.to(rounding)
    return out.view(shape)


def quantize_blockwise(values: torch.Tensor, table: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, absmax float32) of flat float32 `values`: per block its absmax, each value times `1/absmax`
    clamped to [-1, 1], the index of the nearest table value (ties to the lower one): bitsandbytes' reference
    quantizer (its torch kernels; its CPU C kernel looks codes up in a 65536-bin table instead, which picks a
    neighbour of the nearest code for a few values in a thousand of the 256-value map, never of the 16 4-bit
    codes)."""
    count = values.numel()
    blocks = math.ceil(count / blocksize)
    absmax = torch.empty(blocks, dtype=torch.float32, device=values.device)
    codes = torch.empty(count, dtype=torch.uint8, device=values.device)
    order = torch.argsort(table)
    ordered = table[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    sorted_table = bool((order == torch.arange(order.numel(), device=order.device)).all())
    for chunk in _chunks(count):
        part = values[chunk]
        full = part.numel() - part.numel() % blocksize
        first = chunk.start // blocksize
        amax = part[:full].view(-1, blocksize).abs().amax(dim=1)
        if full < part.numel():  # the last, short block
            amax = torch.cat([amax, part[full:].abs().amax().reshape(1)])
        absmax[first : first + amax.numel()] = amax
        inverse = 1.0 / amax.clamp(min=1e-38)
        scaled = torch.empty_like(part)
        scaled[:full] = (part[:full].view(-1, blocksize) * inverse[: full // blocksize, None]).view(-1)
        if full < part.numel():
            scaled[full:] = part[full:] * inverse[-1]
        scaled.clamp_(-1, 1)
        # the index of the nearest sorted value: how many midpoints lie below (bucketize's rule, ~2x faster on CPU
        # for the 15 midpoints of a 4-bit code; the 255 of the 8-bit map, for absmax only, go to bucketize)
        if midpoints.numel() < 32:
            nearest = torch.zeros(scaled.shape, dtype=torch.uint8, device=scaled.device)
            for midpoint in midpoints.tolist():
                nearest += scaled > midpoint
        else:
            nearest = torch.bucketize(scaled, midpoints, out_int32=True)
        codes[chunk] = order.to(torch.uint8).index_select(0, nearest.to(torch.int32)) if not sorted_table else nearest
    return codes, absmax


def round_trip_4bit(
    weight: torch.Tensor, quant_type: str, blocksize: int, double_quant: bool
) -> tuple[torch.Tensor, float | None]:
    """dequantize(quantize(W)) as bitsandbytes' 4-bit load of W computes it, as float32 values of W's dtype, and
    the double quantization's offset (None without). `weight` in its stored dtype: the quantizer reads it as
    float32, a chunk at a time."""
    flat = weight.reshape(-1)
    table = code_values(quant_type, flat.device)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    absmax_parts = []
    for chunk in _chunks(flat.numel()):
        codes[chunk], amax = quantize_blockwise(flat[chunk].to(torch.float32), table, blocksize)
        absmax_parts.append(amax)
    absmax = torch.cat(absmax_parts)
    offset = None
    if double_quant:
        offset_t = absmax.mean()
        nested_map = dynamic_map(flat.device)
        nested_codes, nested_absmax = quantize_blockwise(absmax - offset_t, nested_map, NESTED_BLOCKSIZE)
        absmax = blockwise_dequantize(nested_codes, nested_absmax, nested_map, NESTED_BLOCKSIZE)
        absmax = absmax + offset_t
        offset = float(offset_t)
    out = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    for chunk in _chunks(flat.numel()):
        values = blockwise_dequantize(
            codes[chunk].to(torch.int64), absmax[chunk.start // blocksize :], table, blocksize
        )
        out[chunk] = values.to(weight.dtype)
    return out.view(weight.shape), offset


class _NotRequantized:
    """What the bitsandbytes formats share: no re-quantization (they are written in bf16; planning refuses `keep`),
    and rows that are local unless the weight is stored transposed (GPT-2's Conv1D)."""

    keeps = False
    work_copies = 3

    def row_local(self, weight: QuantizedWeight) -> bool:
        return not weight.params.get("transposed")  # a Conv1D weight's rows are the stored weight's columns

    def quantize(self, weight: QuantizedWeight, values: torch.Tensor) -> dict[str, torch.Tensor]:
        raise LoraMergeError(f"internal error: {self.label} weights are not re-quantized")  # type: ignore[attr-defined]

    def requantize(
        self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], merge: TileMerge
    ) -> tuple[dict[str, torch.Tensor], DeltaSurvival]:
        raise LoraMergeError(f"internal error: {self.label} weights are not re-quantized")  # type: ignore[attr-defined]

    def row_alignment(self, weight: QuantizedWeight) -> int:
        return 1

    def rounding(
        self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice
    ) -> tuple[float, torch.Tensor]:
        raise LoraMergeError(f"internal error: {self.label} weights are not re-quantized")  # type: ignore[attr-defined]


def _found(
    where: str, kind: str, weights: dict[str, QuantizedWeight], problems: list[str], named: str
) -> dict[str, QuantizedWeight]:
    """A detection's weights, or the error listing its problems (none found counts as one)."""
    if not weights and not problems:
        problems.append(f"quantization_config says bitsandbytes {kind} but no tensor is named {named}")
    if problems:
        raise CheckpointFormatError(
            f"{where}: not a bitsandbytes {kind} checkpoint this tool can read: {listed(problems)}"
        )
    return weights


def _declared(config: dict[str, Any]) -> dict[str, Any] | None:
    found = quantization_config(config)
    if found is None or found[1].get("quant_method") != "bitsandbytes":
        return None
    return found[1]


class Bnb4bit(_NotRequantized):
    """bitsandbytes 4-bit (nf4 / fp4, with or without double quantization) behind `base.WeightFormat`.

    GPT-2-style models keep their Linear layers as `Conv1D` ([in, out]); transformers quantizes the transpose and
    saves that, so such a weight is transposed back when dequantized (and validated whole: its rows are the stored
    weight's columns)."""

    key = "bnb-4bit"
    label = "bitsandbytes 4-bit"

    def detect(
        self, config: dict[str, Any], refs: dict[str, TensorRef], where: str, read: Reader | None = None
    ) -> dict[str, QuantizedWeight]:
        quant = _declared(config)
        states = sorted(n for n in refs if QUANT_STATE in n)
        if quant is None or not (quant.get("load_in_4bit") or quant.get("_load_in_4bit") or states):
            return {}
        if read is None:
            raise LoraMergeError("internal error: bitsandbytes detection needs to read quant_state tensors")
        problems: list[str] = []
        small: list[str] = []  # the tensors planning reads: each weight's quant_state JSON and code table
        for state in states:
            problem = _small_tensor_problem(state, refs[state], {"U8"}, QUANT_STATE_LIMIT)
            if problem:
                problems.append(problem)
                continue
            small.append(state)
            table = f"{state.split(QUANT_STATE)[0]}.quant_map"
            if table in refs and not _small_tensor_problem(table, refs[table], {"F32"}, 16 * 4):
                small.append(table)
        with ThreadPoolExecutor(max_workers=16) as pool:
            blobs = dict(zip(small, pool.map(lambda n: read(refs[n]), small), strict=True))
        transposed = str(config.get("model_type")) in CONV1D_MODEL_TYPES
        weights: dict[str, QuantizedWeight] = {}
        for state in states:
            if state not in blobs:
                continue
            found = _weight_4bit(state, blobs, refs, transposed)
            if isinstance(found, str):
                problems.append(found)
            else:
                weights[found.name] = found
        return _found(where, "4-bit", weights, problems, f"<weight>{QUANT_STATE}nf4 or ...fp4")

    def dequantize(
        self,
        weight: QuantizedWeight,
        parts: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        merge: TileMerge | None = None,
    ) -> torch.Tensor:
        params = weight.params
        stored = tuple(params["stored_shape"])
        rounding = torch_dtype(params["dtype"])
        # untouched and written in the dtype bitsandbytes rounds to (bf16 mostly): no float32 copy at all
        direct = merge is None and dtype == rounding
        values = dequantize_4bit(
            parts["packed"], absmax_values(weight, parts), params["quant_type"], params["blocksize"], stored,
            params["dtype"], rounding if direct else torch.float32,
        )  # fmt: skip
        if params.get("transposed"):
            values = values.t().contiguous()
        return merge_rounded(values, dtype, merge)

    def part_rows(self, weight: QuantizedWeight, role: str, rows: slice) -> slice:
        if role != "packed":
            return slice(0, 1)  # a vector is one row: read whole (absmax is n/blocksize values)
        if weight.params.get("transposed"):
            return slice(0, weight.parts["packed"].entry.shape[0])
        first, last = _block_span(weight, rows)
        blocksize = weight.params["blocksize"]
        itemsize = weight.params["storage_itemsize"]
        begin = first * blocksize // 2
        end = min(math.ceil(math.prod(weight.shape) / 2), last * blocksize // 2)
        return slice(begin // itemsize, math.ceil(end / itemsize))

    def decode(self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """Textbook, in float64: code value times the block's absmax (decoded from the nested map with the offset
        under double quantization), rounded to the weight's quantization dtype as bitsandbytes hands it over."""
        params = weight.params
        stored_rows, cols = params["stored_shape"]
        wanted = slice(0, stored_rows) if params.get("transposed") else rows
        blocksize = params["blocksize"]
        first, _ = _block_span(weight, wanted)
        span = self.part_rows(weight, "packed", wanted)
        skip = first * blocksize // 2 - span.start * params["storage_itemsize"]
        data = parts["packed"].reshape(-1).view(torch.uint8)[skip:]
        start, stop = wanted.start * cols, wanted.stop * cols
        codes = torch.stack([data >> 4, data & 0x0F], dim=-1).reshape(-1).to(torch.int64)
        table = torch.tensor(
            _NF4 if params["quant_type"] == "nf4" else [v / 12.0 for v in _FP4_RAW], dtype=torch.float64
        )
        absmax = parts["absmax"].reshape(-1)
        if params["nested"]:
            index = torch.arange(absmax.numel()) // params["nested_blocksize"]
            nested_map = parts["nested_quant_map"].reshape(-1).to(torch.float64)
            scale = parts["nested_absmax"].reshape(-1).to(torch.float64)[index]
            absmax = nested_map[absmax.view(torch.uint8).to(torch.int64)] * scale + params["nested_offset"]
        absmax = absmax.to(torch.float64)
        positions = torch.arange(start, stop)
        values = table[codes[positions - first * blocksize]] * absmax[positions // blocksize]
        rounded = values.to(torch_dtype(params["dtype"])).to(torch.float64).view(-1, cols)
        return rounded.t()[rows] if params.get("transposed") else rounded


def _block_span(weight: QuantizedWeight, rows: slice) -> tuple[int, int]:
    """The blocks [first, last) holding rows `rows` of the weight as stored."""
    cols = weight.params["stored_shape"][1]
    blocksize = weight.params["blocksize"]
    return rows.start * cols // blocksize, math.ceil(rows.stop * cols / blocksize)


def _small_tensor_problem(name: str, ref: TensorRef, dtypes: set[str], limit: int) -> str | None:
    """What keeps planning from reading a small settings tensor (quant_state JSON, code table), if anything."""
    entry = ref.entry
    if entry.dtype not in dtypes or len(entry.shape) != 1 or entry.nbytes > limit:
        return (
            f"{name} ({ref.file}) is {entry.dtype} {list(entry.shape)}; bitsandbytes stores it as "
            f"{'/'.join(sorted(dtypes))}, one dimension, at most {limit} bytes"
        )
    return None


def _exact_int(value: Any) -> bool:
    return type(value) is int  # not a bool, not a float that happens to be whole


def _weight_4bit(
    state: str, blobs: dict[str, bytes], refs: dict[str, TensorRef], transposed: bool
) -> QuantizedWeight | str:
    """One 4-bit weight from its quant_state JSON and companion tensors, or what is wrong with them."""
    where = refs[state].file
    name, _, kind = state.rpartition(QUANT_STATE)
    if not name or QUANT_STATE in name:
        return f"{state} ({where}) is not named <weight>{QUANT_STATE}<type>"
    if kind not in QUANT_TYPES:
        return f"{state} ({where}): quant type {kind!r} is not nf4 or fp4"
    try:
        meta = json.loads(blobs[state].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        return f"{state} ({where}) is not the JSON bitsandbytes writes"
    shape, blocksize, dtype = meta.get("shape"), meta.get("blocksize"), meta.get("dtype")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_exact_int(d) and d > 0 for d in shape)):
        return f"{state} ({where}): shape {shape!r} is not two positive sizes (bitsandbytes quantizes Linear weights)"
    if not _exact_int(blocksize) or blocksize not in BLOCKSIZES:
        return f"{state} ({where}): blocksize {blocksize!r} is not one bitsandbytes uses ({list(BLOCKSIZES)})"
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        return f"{state} ({where}): dtype {dtype!r} is not bfloat16, float16 or float32"
    if meta.get("quant_type", kind) != kind:
        return f"{state} ({where}) says quant_type {meta.get('quant_type')!r} under a __{kind} name"
    count = math.prod(shape)
    blocks = math.ceil(count / blocksize)
    nested = "nested_blocksize" in meta or "nested_offset" in meta
    need: dict[str, tuple[set[str], int]] = {
        "absmax": ({"U8"} if nested else {"F32"}, blocks),
        "quant_map": ({"F32"}, 16),
    }
    params: dict[str, Any] = {
        "quant_type": kind, "blocksize": blocksize, "dtype": _DTYPES[dtype], "nested": nested,
        "stored_shape": list(shape), "transposed": transposed and _is_conv1d(name),
    }  # fmt: skip
    if nested:
        nested_blocksize, offset = meta.get("nested_blocksize"), meta.get("nested_offset")
        if not _exact_int(nested_blocksize) or nested_blocksize not in BLOCKSIZES:
            return f"{state} ({where}): nested_blocksize {nested_blocksize!r} is not one bitsandbytes uses"
        if type(offset) not in (int, float) or not math.isfinite(offset):
            return f"{state} ({where}): nested_offset {offset!r} is not a finite number"
        if meta.get("nested_dtype", "float32") != "float32":
            return f"{state} ({where}): nested_dtype {meta.get('nested_dtype')!r} is not float32"
        need["nested_absmax"] = ({"F32"}, math.ceil(blocks / nested_blocksize))
        need["nested_quant_map"] = ({"F32"}, 256)
        params.update(nested_blocksize=nested_blocksize, nested_offset=float(offset))
    packed = refs.get(name)
    if packed is None:
        return f"{state} ({where}) has no {name} anywhere in the base"
    entry = packed.entry
    itemsize = DTYPES[entry.dtype][1] if entry.dtype in DTYPES else 0
    if not itemsize or len(entry.shape) != 2 or entry.shape[1] != 1 or entry.nbytes != math.ceil(count / 2):
        return (
            f"{name} ({packed.file}) is {entry.dtype} {list(entry.shape)}; the {kind} codes of a {shape} weight are "
            f"{math.ceil(count / 2)} bytes (two a byte) stored as [n, 1]"
        )
    params["storage_itemsize"] = itemsize
    parts: dict[str, TensorRef] = {"packed": packed}
    for role, (dtypes, numel) in need.items():
        stored = f"{name}.{role}"
        ref = refs.get(stored)
        if ref is None:
            return f"{state} ({where}) has no {stored} anywhere in the base"
        if ref.entry.dtype not in dtypes or ref.entry.shape != (numel,):
            return (
                f"{stored} ({ref.file}) is {ref.entry.dtype} {list(ref.entry.shape)}; a {shape} weight in blocks of "
                f"{blocksize} needs {'/'.join(dtypes)} [{numel}]"
            )
        parts[role] = ref
    table = blobs.get(f"{name}.quant_map")
    expected = code_values(kind)
    if table is None or not torch.equal(torch.frombuffer(bytearray(table), dtype=torch.float32), expected):
        return (
            f"{name}.quant_map ({parts['quant_map'].file}) is not bitsandbytes' {kind} code table, which bitsandbytes "
            "itself dequantizes with (it ignores the stored one): the checkpoint was not written by bitsandbytes or "
            "is damaged"
        )
    parts["quant_state"] = refs[state]
    logical = (shape[1], shape[0]) if params["transposed"] else tuple(shape)
    return QuantizedWeight(format="bnb-4bit", name=name, shape=logical, parts=parts, primary="packed", params=params)


def _is_conv1d(weight: str) -> bool:
    """A GPT-2-style `Conv1D` weight (`c_attn`, `c_proj`, `c_fc`, `q_attn`): stored [in, out]."""
    leaf = weight.removesuffix(".weight").rpartition(".")[2]
    return leaf in ("c_attn", "c_proj", "c_fc", "q_attn")


class BnbInt8(_NotRequantized):
    """bitsandbytes LLM.int8() (8-bit row-wise) behind `base.WeightFormat`. Only the row-major layout transformers
    saves (`weight_format` 0, "row") is read, as bitsandbytes itself reads no other; a GPT-2-style `Conv1D` weight is
    stored transposed, as for 4-bit."""

    key = "bnb-int8"
    label = "bitsandbytes LLM.int8"

    def detect(
        self, config: dict[str, Any], refs: dict[str, TensorRef], where: str, read: Reader | None = None
    ) -> dict[str, QuantizedWeight]:
        quant = _declared(config)
        if quant is None or not (quant.get("load_in_8bit") or quant.get("_load_in_8bit")):
            return {}
        problems: list[str] = []
        weights: dict[str, QuantizedWeight] = {}
        transposed = str(config.get("model_type")) in CONV1D_MODEL_TYPES
        layouts: list[str] = []
        for stored in sorted(n for n in refs if n.endswith(".SCB")):
            module = stored[: -len(".SCB")]
            name = f"{module}.weight"
            codes, scb = refs.get(name), refs[stored]
            if codes is None:
                problems.append(f"{stored} ({scb.file}) has no {name} anywhere in the base")
                continue
            if codes.entry.dtype in FLOAT_DTYPES:
                continue  # an SCB beside a float weight (llm_int8_has_fp16_weight): the float one is the weight
            if codes.entry.dtype != "I8" or len(codes.entry.shape) != 2:
                problems.append(
                    f"{name} ({codes.file}) is {codes.entry.dtype} {list(codes.entry.shape)}; LLM.int8 weights are "
                    "I8 [out, in]"
                )
                continue
            if scb.entry.dtype != "F32" or scb.entry.shape != (codes.entry.shape[0],):
                problems.append(
                    f"{stored} ({scb.file}) is {scb.entry.dtype} {list(scb.entry.shape)}; {name} "
                    f"{list(codes.entry.shape)} needs F32 [{codes.entry.shape[0]}] row scales"
                )
                continue
            parts = {"codes": codes, "row_scales": scb}
            layout = refs.get(f"{name}_format")
            if layout is not None:
                problem = _small_tensor_problem(layout.entry.name, layout, {"U8"}, 1)
                if problem and not (layout.entry.dtype == "U8" and layout.entry.shape == ()):
                    problems.append(problem)
                    continue
                parts["weight_format"] = layout
                layouts.append(layout.entry.name)
            flipped = transposed and _is_conv1d(name)
            rows, cols = codes.entry.shape
            weights[name] = QuantizedWeight(
                format=self.key,
                name=name,
                shape=(cols, rows) if flipped else (rows, cols),
                parts=parts,
                primary="codes",
                params={"transposed": flipped},
            )
        if layouts:
            if read is None:
                raise LoraMergeError("internal error: LLM.int8 detection needs to read weight_format tensors")
            with ThreadPoolExecutor(max_workers=16) as pool:
                values = dict(zip(layouts, pool.map(lambda n: read(refs[n]), layouts), strict=True))
            for layout, value in values.items():
                if value != b"\x00":
                    problems.append(
                        f"{layout} ({refs[layout].file}) is {_INT8_LAYOUTS.get(value[:1], repr(value))}, not row: "
                        "bitsandbytes reads only the row-major layout transformers saves; save the model again with "
                        "a current transformers"
                    )
        return _found(where, "LLM.int8", weights, problems, "<module>.SCB")

    def dequantize(
        self,
        weight: QuantizedWeight,
        parts: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        merge: TileMerge | None = None,
    ) -> torch.Tensor:
        codes = parts["codes"]  # [out, in], as stored
        scales = parts["row_scales"].reshape(-1, 1)
        values = codes * scales * INT8_SCALE  # bitsandbytes' int8_vectorwise_dequant, operation for operation
        if weight.params.get("transposed"):
            values = values.t().contiguous()
        return merge_rounded(values, dtype, merge)

    def part_rows(self, weight: QuantizedWeight, role: str, rows: slice) -> slice:
        if role != "codes":
            return slice(0, 1)
        return slice(0, weight.shape[1]) if weight.params.get("transposed") else rows

    def decode(self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """Textbook: code times the row's absmax over 127, in float64."""
        scales = parts["row_scales"].reshape(-1).to(torch.float64)
        if weight.params.get("transposed"):
            return (parts["codes"].to(torch.float64) * scales[:, None] / 127.0).t()[rows]
        return parts["codes"].to(torch.float64) * scales[rows][:, None] / 127.0


_INT8_LAYOUTS = {b"\x01": "col32", b"\x02": "col_turing", b"\x03": "col_ampere"}  # bitsandbytes' FORMAT_TO_INT


class AsQuantized4bit(_NotRequantized):
    """A 16-bit weight as a 4-bit bitsandbytes load of it computes with (`--as-quantized`): its one part is the stored
    weight, and dequantizing it is the quantize → dequantize round trip, in the weight's own dtype.

    Double quantization subtracts the mean of all the weight's absmax values, so a row of the round trip depends on
    the whole weight: validation recomputes such a weight whole (`row_local`)."""

    key = "bnb-4bit-round-trip"
    label = "bitsandbytes 4-bit round trip"

    def row_local(self, weight: QuantizedWeight) -> bool:
        return False

    def detect(
        self, config: dict[str, Any], refs: dict[str, TensorRef], where: str, read: Reader | None = None
    ) -> dict[str, QuantizedWeight]:
        return {}  # never found in a base: planning makes these weights for --as-quantized (`round_trip_weights`)

    def dequantize(
        self,
        weight: QuantizedWeight,
        parts: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        merge: TileMerge | None = None,
    ) -> torch.Tensor:
        params = weight.params
        stored = parts["weight"].reshape(weight.shape)
        if params.get("transposed"):  # a Conv1D weight: transformers quantizes its transpose
            values, _ = round_trip_4bit(stored.t().contiguous(), params["quant_type"], params["blocksize"],
                                        params["double_quant"])  # fmt: skip
            values = values.t().contiguous()
        else:
            values, _ = round_trip_4bit(stored, params["quant_type"], params["blocksize"], params["double_quant"])
        return merge_rounded(values, dtype, merge)

    def part_rows(self, weight: QuantizedWeight, role: str, rows: slice) -> slice:
        return slice(0, math.prod(weight.shape[:-1]) if len(weight.shape) > 1 else 1)

    def decode(self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """The round trip of the whole weight (the choice of codes is bitsandbytes' float32 arithmetic, which a
        float64 recomputation could not reproduce at the boundaries between codes), its rows in float64."""
        stored = parts["weight"].reshape(weight.shape)
        values = self.dequantize(weight, {"weight": stored}).to(torch.float64)
        return values.reshape(-1, weight.shape[-1])[rows]


ROUND_TRIP = AsQuantized4bit.key


class AsQuantized(BaseModel):
    """`--as-quantized`: the 4-bit settings of the QLoRA load the adapter was trained through."""

    model_config = ConfigDict(frozen=True)

    quant_type: Literal["nf4", "fp4"]
    blocksize: int = 64
    double_quant: bool = True
    # llm_int8_skip_modules: the modules (name or suffix) kept in 16 bits; given, it replaces transformers' default
    # (the output head), as in transformers
    skip: tuple[str, ...] = ()

    def describe(self) -> str:
        return (
            f"{self.quant_type}, blocksize {self.blocksize}, double quantization {'on' if self.double_quant else 'off'}"
        )


# What transformers' (5.x) bitsandbytes load leaves in 16 bits, by the names checkpoints store: embeddings (not Linear
# layers), MoE experts (fused into 3-D parameters on load, not Linear layers) and routers (`gate`/`router` beside
# `experts`: parameters of a router module); by default the output head too (`get_keys_to_not_convert`), unless
# llm_int8_skip_modules is given, which replaces that default.
_EMBEDDING_LEAVES = ("wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings", "shared")
_HEADS = ("lm_head", "embed_out", "output", "output_layer")
_ROUTERS = ("gate", "router")
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def skipped(module: str, patterns: tuple[str, ...]) -> bool:
    """transformers' `should_convert_module`, negated: a pattern matches a module from the start up to a module
    boundary (as a regex: `layers.1` matches `layers.1.mlp`, not `layers.11`), or as a suffix."""
    for pattern in patterns:
        try:
            if re.match(rf"(?:{pattern}){_BOUNDARY}", module):
                return True
        except re.error:
            pass  # not a regex: transformers would raise; the suffix test still applies
        if module.endswith(pattern):
            return True
    return False


def round_trip_weights(
    refs: dict[str, TensorRef], settings: AsQuantized, tied_head: str | None, conv1d: bool = False
) -> dict[str, QuantizedWeight]:
    """The weights a 4-bit load of this base would quantize: every 2-D floating `<module>.weight` of a Linear layer
    (see above for what is not one), less `settings.skip` where given, else less the output head. `conv1d`: a
    GPT-2-style model, whose `Conv1D` weights ([in, out]) transformers quantizes transposed."""
    with_experts = {name.split(".experts.")[0] for name in refs if ".experts." in name}  # MoE blocks
    weights: dict[str, QuantizedWeight] = {}
    for name, ref in refs.items():
        entry = ref.entry
        if not name.endswith(".weight") or entry.dtype not in FLOAT_DTYPES or len(entry.shape) != 2:
            continue
        module = name[: -len(".weight")]
        parent, _, leaf = module.rpartition(".")
        if leaf.startswith("embed") and leaf != "embed_out" or leaf in _EMBEDDING_LEAVES:
            continue
        if ".experts." in f".{module}." or (leaf in _ROUTERS and parent in with_experts):
            continue
        if settings.skip:
            if skipped(module, settings.skip):
                continue
        elif leaf in _HEADS or name == tied_head:
            continue
        transposed = conv1d and _is_conv1d(name)
        weights[name] = QuantizedWeight(
            format=ROUND_TRIP,
            name=name,
            shape=tuple(entry.shape),
            parts={"weight": ref},
            primary="weight",
            dequantized_dtype=entry.dtype,
            params={
                "quant_type": settings.quant_type,
                "blocksize": settings.blocksize,
                "double_quant": settings.double_quant,
                "dtype": entry.dtype,
                "transposed": transposed,
            },
        )
    return weights
