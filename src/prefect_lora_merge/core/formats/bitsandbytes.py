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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from ..errors import CheckpointFormatError, LoraMergeError
from ..safetensors_format import FLOAT_DTYPES, torch_dtype
from ..tiling import TileMerge, merge_rounded
from .base import QuantizedWeight, TensorRef, listed, quantization_config
from .survival import DeltaSurvival

QUANT_STATE = ".quant_state.bitsandbytes__"
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


def unpack(packed: torch.Tensor, values: slice) -> torch.Tensor:
    """The 4-bit codes (int64) of flat values `values` (an even start) from all of a weight's packed bytes, high
    nibble first."""
    data = packed.reshape(-1).view(torch.uint8)[values.start // 2 : math.ceil(values.stop / 2)]
    codes = torch.stack([data >> 4, data & 0x0F], dim=-1).reshape(-1)
    return codes[: values.stop - values.start].to(torch.int64)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (any int dtype) into U8 [ceil(n/2), 1], high nibble first (an odd count padded with code 0)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


def blockwise_dequantize(
    codes: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """float32 `table[codes] · absmax[block]` over flat `codes` (int64) that start a block, block `i // blocksize`."""
    values = table[codes]
    count = values.numel()
    full = count - count % blocksize
    values[:full] = (values[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).view(-1)
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


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int, shape: tuple[int, ...], dtype: str
) -> torch.Tensor:
    """The float32 weight bitsandbytes dequantizes: `code · absmax` in float32, rounded to `dtype` (the weight's
    dtype when it was quantized), a chunk at a time."""
    count = math.prod(shape)
    table = code_values(quant_type, packed.device)
    out = torch.empty(count, dtype=torch.float32, device=packed.device)
    rounding = torch_dtype(dtype)
    for chunk in _chunks(count):
        values = blockwise_dequantize(unpack(packed, chunk), absmax[chunk.start // blocksize :], table, blocksize)
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
        codes[chunk] = order[torch.bucketize(scaled.clamp_(-1, 1), midpoints)].to(torch.uint8)
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
        absmax = blockwise_dequantize(nested_codes.to(torch.int64), nested_absmax, nested_map, NESTED_BLOCKSIZE)
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
    """The half of `WeightFormat` a format written only dequantized does not have (planning refuses `keep`)."""

    keeps = False
    row_local = True
    work_copies = 3

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


def _declared(config: dict[str, Any]) -> dict[str, Any] | None:
    found = quantization_config(config)
    if found is None or found[1].get("quant_method") != "bitsandbytes":
        return None
    return found[1]


class Bnb4bit(_NotRequantized):
    """bitsandbytes 4-bit (nf4 / fp4, with or without double quantization) behind `base.WeightFormat`."""

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
        with ThreadPoolExecutor(max_workers=16) as pool:
            blobs = dict(zip(states, pool.map(lambda n: read(refs[n]), states), strict=True))
        weights: dict[str, QuantizedWeight] = {}
        for state in states:
            name, kind = state.split(QUANT_STATE)
            found = _weight_4bit(name, kind, state, blobs[state], refs)
            if isinstance(found, str):
                problems.append(found)
            else:
                weights[name] = found
        if not weights and not problems:
            problems.append(
                f"quantization_config says bitsandbytes 4-bit but no tensor is named <weight>{QUANT_STATE}nf4 or ...fp4"
            )
        if problems:
            raise CheckpointFormatError(
                f"{where}: not a bitsandbytes 4-bit checkpoint this tool can read: {listed(problems)}"
            )
        return weights

    def dequantize(
        self,
        weight: QuantizedWeight,
        parts: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        merge: TileMerge | None = None,
    ) -> torch.Tensor:
        _check_code(weight, parts)
        params = weight.params
        values = dequantize_4bit(
            parts["packed"],
            absmax_values(weight, parts),
            params["quant_type"],
            params["blocksize"],
            weight.shape,
            params["dtype"],
        )
        return merge_rounded(values, dtype, merge)

    def part_rows(self, weight: QuantizedWeight, role: str, rows: slice) -> slice:
        if role != "packed":
            return slice(0, 1)  # a vector is one row: read whole (absmax is n/blocksize values)
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
        blocksize, cols = params["blocksize"], weight.shape[-1] if len(weight.shape) > 1 else 1
        first, _ = _block_span(weight, rows)
        span = self.part_rows(weight, "packed", rows)
        skip = first * blocksize // 2 - span.start * params["storage_itemsize"]
        data = parts["packed"].reshape(-1).view(torch.uint8)[skip:]
        start, stop = rows.start * cols, rows.stop * cols
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
        local = positions - first * blocksize
        values = table[codes[local]] * absmax[positions // blocksize]
        rounded = values.to(torch_dtype(params["dtype"])).to(torch.float64)
        return rounded.view(rows.stop - rows.start, cols)


def _block_span(weight: QuantizedWeight, rows: slice) -> tuple[int, int]:
    """The blocks [first, last) holding logical rows `rows`."""
    cols = weight.shape[-1] if len(weight.shape) > 1 else 1
    blocksize = weight.params["blocksize"]
    return rows.start * cols // blocksize, math.ceil(rows.stop * cols / blocksize)


def _check_code(weight: QuantizedWeight, parts: dict[str, torch.Tensor]) -> None:
    stored = parts["quant_map"].reshape(-1).float()
    expected = code_values(weight.params["quant_type"], stored.device)
    if stored.numel() != 16 or not torch.equal(stored, expected):
        raise CheckpointFormatError(
            f"{weight.parts['quant_map'].entry.name} ({weight.parts['quant_map'].file}) is not bitsandbytes' "
            f"{weight.params['quant_type']} code table, which bitsandbytes itself dequantizes with (it ignores the "
            "stored one): the checkpoint was not written by bitsandbytes or is damaged"
        )


def _weight_4bit(name: str, kind: str, state: str, blob: bytes, refs: dict[str, TensorRef]) -> QuantizedWeight | str:
    """One 4-bit weight from its quant_state JSON and companion tensors, or what is wrong with them."""
    where = refs[state].file
    if kind not in QUANT_TYPES:
        return f"{state} ({where}): quant type {kind!r} is not nf4 or fp4"
    try:
        meta = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return f"{state} ({where}) is not the JSON bitsandbytes writes"
    if not isinstance(meta, dict):
        return f"{state} ({where}) is not the JSON bitsandbytes writes"
    shape, blocksize, dtype = meta.get("shape"), meta.get("blocksize"), meta.get("dtype")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        return f"{state} ({where}): shape {shape!r} is not a list of positive sizes"
    if blocksize not in BLOCKSIZES:
        return f"{state} ({where}): blocksize {blocksize!r} is not one bitsandbytes uses ({list(BLOCKSIZES)})"
    if dtype not in _DTYPES:
        return f"{state} ({where}): dtype {dtype!r} is not bfloat16, float16 or float32"
    if meta.get("quant_type", kind) != kind:
        return f"{state} ({where}) says quant_type {meta.get('quant_type')!r} under a __{kind} name"
    count = math.prod(shape)
    blocks = math.ceil(count / blocksize)
    nested = "nested_blocksize" in meta or "nested_offset" in meta
    need: dict[str, tuple[set[str], int | None]] = {
        "packed": (set(), None),
        "absmax": ({"U8"} if nested else {"F32"}, blocks),
        "quant_map": ({"F32"}, 16),
    }
    params: dict[str, Any] = {"quant_type": kind, "blocksize": blocksize, "dtype": _DTYPES[dtype], "nested": nested}
    if nested:
        nested_blocksize, offset = meta.get("nested_blocksize"), meta.get("nested_offset")
        if not isinstance(nested_blocksize, int) or nested_blocksize <= 0:
            return f"{state} ({where}): nested_blocksize {nested_blocksize!r} is not a positive size"
        if not isinstance(offset, (int, float)) or not math.isfinite(offset):
            return f"{state} ({where}): nested_offset {offset!r} is not a finite number"
        if meta.get("nested_dtype", "float32") != "float32":
            return f"{state} ({where}): nested_dtype {meta.get('nested_dtype')!r} is not float32"
        need["nested_absmax"] = ({"F32"}, math.ceil(blocks / nested_blocksize))
        need["nested_quant_map"] = ({"F32"}, 256)
        params.update(nested_blocksize=nested_blocksize, nested_offset=float(offset))
    parts: dict[str, TensorRef] = {}
    for role, (dtypes, numel) in need.items():
        stored = name if role == "packed" else f"{name}.{role}"
        ref = refs.get(stored)
        if ref is None:
            return f"{state} ({where}) has no {stored} anywhere in the base"
        entry = ref.entry
        if role == "packed":
            if entry.nbytes != math.ceil(count / 2):
                return (
                    f"{stored} ({ref.file}) holds {entry.nbytes} bytes; {kind} codes of a {shape} weight are "
                    f"{math.ceil(count / 2)} (two a byte)"
                )
            params["storage_itemsize"] = max(1, entry.nbytes // max(1, math.prod(entry.shape)))
        elif entry.dtype not in dtypes or math.prod(entry.shape) != numel:
            return f"{stored} ({ref.file}) is {entry.dtype} {list(entry.shape)}; expected {'/'.join(dtypes)} [{numel}]"
        parts[role] = ref
    parts["quant_state"] = refs[state]
    return QuantizedWeight(
        format="bnb-4bit", name=name, shape=tuple(shape), parts=parts, primary="packed", params=params
    )


class BnbInt8(_NotRequantized):
    """bitsandbytes LLM.int8() (8-bit row-wise) behind `base.WeightFormat`."""

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
        for stored in sorted(n for n in refs if n.endswith(".SCB")):
            module = stored[: -len(".SCB")]
            name = f"{module}.weight"
            codes, scb = refs.get(name), refs[stored]
            if codes is None:
                problems.append(f"{stored} ({scb.file}) has no {name} anywhere in the base")
                continue
            if codes.entry.dtype != "I8" or len(codes.entry.shape) != 2:
                if codes.entry.dtype in FLOAT_DTYPES:
                    continue  # an SCB beside a float weight (llm_int8_has_fp16_weight): the float one is the weight
                problems.append(
                    f"{name} ({codes.file}) is {codes.entry.dtype} {list(codes.entry.shape)}; LLM.int8 "
                    "weights are I8 [out, in]"
                )
                continue
            if scb.entry.dtype != "F32" or math.prod(scb.entry.shape) != codes.entry.shape[0]:
                problems.append(
                    f"{stored} ({scb.file}) is {scb.entry.dtype} {list(scb.entry.shape)}; {name} "
                    f"{list(codes.entry.shape)} needs F32 [{codes.entry.shape[0]}] row scales"
                )
                continue
            parts = {"codes": codes, "row_scales": scb}
            if f"{name}_format" in refs:
                parts["weight_format"] = refs[f"{name}_format"]
            weights[name] = QuantizedWeight(
                format=self.key, name=name, shape=tuple(codes.entry.shape), parts=parts, primary="codes"
            )
        if not weights and not problems:
            problems.append("quantization_config says bitsandbytes 8-bit but no tensor is named <module>.SCB")
        if problems:
            raise CheckpointFormatError(
                f"{where}: not a bitsandbytes LLM.int8 checkpoint this tool can read: {listed(problems)}"
            )
        return weights

    def dequantize(
        self,
        weight: QuantizedWeight,
        parts: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        merge: TileMerge | None = None,
    ) -> torch.Tensor:
        codes = parts["codes"].view(weight.shape)
        scales = parts["row_scales"].reshape(-1, 1)
        values = codes * scales * INT8_SCALE  # bitsandbytes' int8_vectorwise_dequant, operation for operation
        return merge_rounded(values, dtype, merge)

    def part_rows(self, weight: QuantizedWeight, role: str, rows: slice) -> slice:
        return rows if role == "codes" else slice(0, 1)

    def decode(self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """Textbook: code times the row's absmax over 127, in float64."""
        scales = parts["row_scales"].reshape(-1).to(torch.float64)[rows]
        return parts["codes"].to(torch.float64) * scales[:, None] / 127.0


class AsQuantized4bit(_NotRequantized):
    """A 16-bit weight as a 4-bit bitsandbytes load of it computes with (`--as-quantized`): its one part is the stored
    weight, and dequantizing it is the quantize → dequantize round trip, in the weight's own dtype.

    Double quantization subtracts the mean of all the weight's absmax values, so a row of the round trip depends on
    the whole weight: validation recomputes such a weight whole (`row_local`)."""

    key = "bnb-4bit-round-trip"
    label = "bitsandbytes 4-bit round trip"
    row_local = False

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
        values, _ = round_trip_4bit(parts["weight"], params["quant_type"], params["blocksize"], params["double_quant"])
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


# What transformers' bitsandbytes load leaves in 16 bits: embeddings (not Linear layers) always, the output head
# unless llm_int8_skip_modules is given (`get_keys_to_not_convert`, its default).
_EMBEDDINGS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings", "shared")
_HEADS = ("lm_head", "embed_out", "output", "output_layer")


def round_trip_weights(
    refs: dict[str, TensorRef], settings: AsQuantized, tied_head: str | None
) -> dict[str, QuantizedWeight]:
    """The weights a 4-bit load of this base would quantize: every 2-D floating `<module>.weight` of a Linear
    layer, that is all but embeddings, and of those all but `settings.skip` where given, else all but the output
    head (transformers' own default; a `llm_int8_skip_modules` list replaces it, as it does in transformers)."""
    weights: dict[str, QuantizedWeight] = {}
    for name, ref in refs.items():
        entry = ref.entry
        if not name.endswith(".weight") or entry.dtype not in FLOAT_DTYPES or len(entry.shape) != 2:
            continue
        module = name[: -len(".weight")]
        leaf = module.rsplit(".", 1)[-1]
        if any(key in leaf for key in _EMBEDDINGS):
            continue  # not a Linear layer
        if not settings.skip and (leaf in _HEADS or name == tied_head):
            continue  # transformers' default modules_to_not_convert: the output head

        if any(module == s or module.endswith(f".{s}") or f".{s}." in f".{module}." for s in settings.skip):
            continue
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
            },
        )
    return weights
