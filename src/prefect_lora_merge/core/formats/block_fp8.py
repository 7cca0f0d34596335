"""Block-FP8 weights (DeepSeek-V3/R1/V3.1, Kimi-K2): dequantize, merge, re-quantize, and how much of a delta survived.

A quantized weight `W [M, N]` is stored as `float8_e4m3fn` codes `q` and a float32 grid `S [ceil(M/bm), ceil(N/bn)]`
(`weight_scale_inv`, which despite its name multiplies): `W[i, j] = q[i, j] * S[i // bm, j // bn]`. Edge blocks are
ragged (`kv_a_proj_with_mqa` is 576 × 7168 with a 5 × 56 grid).

Everything here works on blocked views (`[Mb, bm, Nb, bn]` against `[Mb, 1, Nb, 1]`), never on a scale grid
expanded to the weight's size, and on CPU one tile of whole blocks at a time: a tile's several passes (decode,
scale, merge, encode, compare) then run in cache instead of streaming full-size float32 temporaries through memory.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import CheckpointFormatError
from ..lora_math import all_finite
from ..tiling import TileMerge, tiles
from .base import NonFiniteValues, QuantizedWeight, TensorRef, listed, quantization_config
from .survival import DeltaSurvival, SurvivalSums

E4M3_MAX = 448.0
MIN_AMAX = 1e-4  # DeepSeek's quantizer: an all-zero block still gets a finite, non-zero scale

# e4m3fn bits moved into a float16 (sign to bit 15, exponent and mantissa to bits 7..13) read as 2^-8 times the
# value, subnormals included: float16's exponent bias is 15, e4m3's is 7. Integer shifts and a float16 -> float32
# conversion are vectorised on CPU; PyTorch's own float8 -> float32 conversion is ~7x slower there. The 2^8 goes
# into the block scale, which keeps the product exact: both factors are exact and it is rounded once.
_E4M3_VIA_FP16_FACTOR = 2.0**8


def scale_grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    merge: TileMerge | None = None,
) -> torch.Tensor:
    """The weight of FP8 `codes` [M, N] with block `scales` [ceil(M/bm), ceil(N/bn)], computed in float32, with
    `merge` applied to it when given, then rounded once to `dtype`."""
    scales = scales.to(device=codes.device, dtype=torch.float32)
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    for rows, cols in tiles(codes.shape, codes.device, block):
        values = _decoded(codes[rows, cols], scales[_grid(rows, cols, block)], block)
        out[rows, cols] = values if merge is None else merge(values, rows, cols)
    return out


def quantize(weight: torch.Tensor, block: tuple[int, int], *, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) for a float32 weight, the way DeepSeek's own quantizer does it.

    Per block: `s = max(amax, 1e-4) / 448`, rounded up to a power of two for `scale_fmt: ue8m0`;
    `q = clamp(w / s, ±448)` cast to e4m3. The edges are padded with zeros, which leave each block's amax alone.
    """
    codes = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    scales = torch.empty(scale_grid_shape(weight.shape, block), dtype=torch.float32, device=weight.device)
    for rows, cols in tiles(weight.shape, weight.device, block):
        codes[rows, cols], scales[_grid(rows, cols, block)] = _encoded(weight[rows, cols].float(), block, ue8m0)
    return codes, scales


def requantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    block: tuple[int, int],
    merge: TileMerge,
    *,
    ue8m0: bool,
    tensor: str,
) -> tuple[torch.Tensor, torch.Tensor, DeltaSurvival]:
    """Dequantize, merge, quantize again with fresh scales, and measure how much of the intended ΔW survived:
    `quantize(merge(dequantize(codes, scales)))` tile by tile, without a full-size float32 copy of the weight.

    A merge that produces NaN/Inf leaves non-finite scales: the caller checks them.
    """
    new_codes = torch.empty_like(codes)
    new_scales = torch.empty(scale_grid_shape(codes.shape, block), dtype=torch.float32, device=codes.device)
    scales = scales.to(device=codes.device, dtype=torch.float32)
    sums = SurvivalSums()
    for rows, cols in tiles(codes.shape, codes.device, block):
        base = _decoded(codes[rows, cols], scales[_grid(rows, cols, block)], block)
        merged = merge(base, rows, cols)
        tile_codes, grid = _encoded(merged, block, ue8m0)
        new_codes[rows, cols], new_scales[_grid(rows, cols, block)] = tile_codes, grid
        sums.add(base, merged, _decoded(tile_codes, grid, block, from_base=False))
    return new_codes, new_scales, sums.survival(tensor)


def grid_span(span: slice, block: int) -> slice:
    """The scale-grid rows (or columns) covering weight rows (or columns) `span`, which starts on a block boundary
    for a tile and anywhere for validation's sampled rows."""
    return slice(span.start // block, math.ceil(span.stop / block))


def _grid(rows: slice, cols: slice, block: tuple[int, int]) -> tuple[slice, slice]:
    """The scale-grid entries of a tile."""
    return grid_span(rows, block[0]), grid_span(cols, block[1])


def _decoded(
    codes: torch.Tensor, grid: torch.Tensor, block: tuple[int, int], *, from_base: bool = True
) -> torch.Tensor:
    """float32 values of a tile of codes with its part of the scale grid (exact products, rounded once). Codes
    this module encoded itself (`from_base=False`) are not looked at for NaN: a NaN there left a NaN scale."""
    if codes.device.type == "cpu":
        bits = codes.view(torch.uint8).to(torch.int16)
        # (b << 7) puts the sign in bit 14; adding 1 << 14 for a set sign carries it into bit 15 (int16 wraps).
        values = (bits << 7).add_((bits >> 7) << 14).view(torch.float16).to(torch.float32)
        if (
            from_base and int((bits & 0x7F).amax()) == 0x7F
        ):  # e4m3fn's NaN codes would read as ±480: make them NaN, as torch does
            values[(bits & 0x7F) == 0x7F] = math.nan
        grid = grid * _E4M3_VIA_FP16_FACTOR
    else:
        values = codes.to(torch.float32)
    blocks = _blocks(values, block)
    blocks.mul_(grid[:, None, :, None])
    return _unblock(blocks, *codes.shape)


def _encoded(values: torch.Tensor, block: tuple[int, int], ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale grid) of a float32 tile; NaN/Inf in the tile end up in its scales."""
    blocks = _blocks(values, block)
    # max(amax, -amin) along the contiguous axis first: ~4x cheaper than abs() and a two-axis reduction.
    amax = torch.maximum(blocks.amax(dim=3), blocks.amin(dim=3).neg_()).amax(dim=1)
    grid = amax.clamp_(min=MIN_AMAX).div_(E4M3_MAX)
    if ue8m0:
        grid = _next_power_of_two(grid)
    scaled = (blocks / grid[:, None, :, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    return _unblock(scaled, *values.shape).to(torch.float8_e4m3fn), grid


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """`x` as [Mb, bm, Nb, bn], zero-padded to whole blocks where its edges are ragged (a view when they are not)."""
    rows, cols = x.shape
    bm, bn = block
    mb, nb = math.ceil(rows / bm), math.ceil(cols / bn)
    if (rows, cols) != (mb * bm, nb * bn):
        padded = x.new_zeros((mb * bm, nb * bn))
        padded[:rows, :cols] = x
        x = padded
    return x.contiguous().view(mb, bm, nb, bn)


def _unblock(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return blocks.reshape(blocks.shape[0] * blocks.shape[1], -1)[:rows, :cols]


def _next_power_of_two(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= x, exactly (log2 in float32 misjudges values next to a power of two)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(x), exponent)


# -- the format ----------------------------------------------------------------------------------------------------


class BlockFp8:
    """Block-FP8 (DeepSeek-V3/R1/V3.1, Kimi-K2-Instruct): parts `codes` (the weight's own name, F8_E4M3) and
    `scales` (`<weight>_scale_inv`, F32 grid); params `block` [rows, cols] and `ue8m0` (power-of-two scales)."""

    key = "block-fp8"
    label = "block-FP8"
    keeps = True

    def row_local(self, weight: QuantizedWeight) -> bool:
        return True

    work_copies = 4  # base tile, merged tile, codes decoded again, their difference: whole tensors on CUDA

    def detect(
        self, config: dict[str, Any], refs: dict[str, TensorRef], where: str, read: object = None
    ) -> dict[str, QuantizedWeight]:
        """Every FP8 block-quantized weight, recognised by its format (e4m3 codes with a float32 `weight_scale_inv`
        companion, wherever the index stores it, and a `weight_block_size`), not by model type."""
        codes = sorted(name for name, ref in refs.items() if ref.entry.dtype.startswith("F8_"))
        if not codes:
            return {}
        found = quantization_config(config)
        quant = found[1] if found else {}
        block = quant.get("weight_block_size")
        config_file = f"{where}/config.json"
        valid_block = isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
        if not valid_block and not any(f"{name}_scale_inv" in refs for name in codes):
            return {}  # FP8 tensors of another scheme (or none): copied as bytes; an adapter update on them is refused
        if not valid_block:
            raise CheckpointFormatError(
                f"{codes[0]} and {len(codes) - 1} other tensor(s) are FP8, but {config_file} has no "
                "quantization_config with a weight_block_size [rows, cols]: only block-quantized FP8 checkpoints "
                "(DeepSeek-V3/R1, Kimi-K2) can be merged; dequantize other FP8 formats first"
            )
        scale_fmt = quant.get("scale_fmt")
        if scale_fmt not in (None, "ue8m0", "float", "fp32"):
            raise CheckpointFormatError(f"{config_file}: quantization_config.scale_fmt {scale_fmt!r} is not supported")
        grid = tuple(block)
        problems: list[str] = []
        weights: dict[str, QuantizedWeight] = {}
        for name in codes:
            ref = refs[name]
            scale = refs.get(f"{name}_scale_inv")
            if ref.entry.dtype != "F8_E4M3":
                problems.append(f"{name} ({ref.file}) is {ref.entry.dtype}; block-quantized weights are F8_E4M3")
            elif not name.endswith(".weight") or scale is None:
                problems.append(
                    f"{name} ({ref.file}) is F8_E4M3 without a {name}_scale_inv companion anywhere in the base"
                )
            elif len(ref.entry.shape) != 2:
                problems.append(f"{name} ({ref.file}) is FP8 with shape {list(ref.entry.shape)}; block scales need 2-D")
            elif scale.entry.dtype != "F32" or scale.entry.shape != scale_grid_shape(ref.entry.shape, grid):
                expected = list(scale_grid_shape(ref.entry.shape, grid))
                problems.append(
                    f"{scale.entry.name} ({scale.file}) is {scale.entry.dtype} {list(scale.entry.shape)}; a "
                    f"{list(ref.entry.shape)} weight with {block} blocks needs F32 {expected}"
                )
            else:
                weights[name] = QuantizedWeight(
                    format=self.key,
                    name=name,
                    shape=ref.entry.shape,
                    parts={"codes": ref, "scales": scale},
                    primary="codes",
                    params={"block": grid, "ue8m0": scale_fmt == "ue8m0"},
                )
        if problems:
            raise CheckpointFormatError(f"{where} is not a block-FP8 checkpoint this tool can read: {listed(problems)}")
        return weights

    def dequantize(
        self,
        weight: QuantizedWeight,
        parts: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        merge: TileMerge | None = None,
    ) -> torch.Tensor:
        return dequantize(parts["codes"], parts["scales"], _block(weight), dtype, merge)

    def quantize(self, weight: QuantizedWeight, values: torch.Tensor) -> dict[str, torch.Tensor]:
        codes, scales = quantize(values, _block(weight), ue8m0=weight.params["ue8m0"])
        return {"codes": codes, "scales": scales}

    def requantize(
        self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], merge: TileMerge
    ) -> tuple[dict[str, torch.Tensor], DeltaSurvival]:
        codes, scales, survival = requantize(
            parts["codes"], parts["scales"], _block(weight), merge, ue8m0=weight.params["ue8m0"], tensor=weight.name
        )
        if not all_finite(scales):  # any NaN/Inf in a block ends up in its scale
            raise NonFiniteValues(weight.name)
        return {"codes": codes, "scales": scales}, survival

    def row_alignment(self, weight: QuantizedWeight) -> int:
        return _block(weight)[0]

    def part_rows(self, weight: QuantizedWeight, role: str, rows: slice) -> slice:
        return rows if role == "codes" else grid_span(rows, _block(weight)[0])

    def decode(self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """Textbook: each code times its block's scale, the grid expanded to the weight's size, in float64."""
        codes = parts["codes"]
        return codes.to(torch.float64) * _expanded(parts["scales"], _block(weight), rows, codes.shape[1])

    def rounding(
        self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice
    ) -> tuple[float, torch.Tensor]:
        """e4m3 keeps 3 mantissa bits: half a step is 2^-4 of a value (2^-3 here, for the block maxima computed
        in float32), a subnormal step 2^-9 of the scale."""
        codes = parts["codes"]
        return 2.0**-3, _expanded(parts["scales"], _block(weight), rows, codes.shape[1]) * 2.0**-9


def _block(weight: QuantizedWeight) -> tuple[int, int]:
    rows, cols = weight.params["block"]
    return rows, cols


def _expanded(grid: torch.Tensor, block: tuple[int, int], rows: slice, cols: int) -> torch.Tensor:
    """Each value's scale, for weight rows `rows` from the grid rows `grid_span(rows)`: textbook, unblocked."""
    offset = rows.start % block[0]
    full = grid.to(torch.float64).repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full[offset : offset + rows.stop - rows.start, :cols]
