"""MXFP4 weights (GPT-OSS-20B/120B fused experts): dequantize, merge, re-quantize, and how much of a delta survived.

A GPT-OSS checkpoint stores each fused expert weight `<p>` as `<p>_blocks` (U8 [E, R, G, 16], two FP4 e2m1 codes a
byte, the low nibble first) and `<p>_scales` (U8 [E, R, G], E8M0: the scale is 2^(s - 127)), one scale for each 32
consecutive values. `R` is the weight's output features and `G · 32` its input features: transformers'
`convert_moe_packed_tensors` decodes `[E, R, G · 32]` and transposes it to the `[E, in, out]` its `GptOssExperts`
holds (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]), which is also what a bf16 GPT-OSS checkpoint stores. That
transposed tensor is the logical weight here, so in it the 32 values of a block run down a column:
`W[e, g·32 + 2k + j, r] = FP4[nibble j of blocks[e, r, g, k]] · 2^(scales[e, r, g] - 127)`.

Everything works on views of blocks as `[G, 16, 2, R]` against scales `[G, 1, 1, R]`: only the bytes are
transposed, never float32 values. On CPU a tile is a few block groups of one expert (about `tiling.TILE_VALUES`
values, so that its passes run in cache), on CUDA a run of whole experts.

The quantizer is the reference quantizer transformers and vLLM use for GPT-OSS (triton_kernels'
`downcast_to_mxfp_torch` with its default `DequantScaleRoundingMode.ROUND_UP`, which transformers' `Mxfp4Quantize`
calls): per block, the scale is the smallest power of two `>= amax / 6` (amax / 6 computed in float32, at least
2^-126; an all-zero block gets byte 0), so nothing clamps, and each value is rounded to the nearest e2m1 value, ties
to the even code, the sign kept (a negative value rounding to zero is code 8, -0). Values are taken in float32 as
they come (transformers' own on-the-fly path rounds them to bf16 first: a second rounding this one avoids).

That rule is not idempotent: a block whose largest value rounds to 3 (`amax / scale` in (3, 3.5)) decodes to the same
values as the block with half the scale and doubled codes (largest code 6, none ±0.5 or ±1.5), and ROUND_UP picks
the latter for those values. No rule that sees only values can reproduce both. Ours stores one of each such pair,
the one with the larger scale: a block whose largest code is 6 and none of whose codes is ±0.5 or ±1.5 is stored
with its scale doubled and its codes halved. So the decoded values are exactly ROUND_UP's; the bytes are ROUND_UP's
except in those blocks (all 32 values must avoid the ±0.5 and ±1.5 bands: measured, 1 in 184k blocks of Gaussian
values, 1.6% of blocks of Cauchy ones, whose outliers leave the rest at 0); and `quantize(dequantize(b, s)) ==
(b, s)` for every block our quantize writes, and for every block ROUND_UP or the OCP floor rule writes except those
same rare ones and all-zero blocks with a non-zero scale byte.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import torch

from .. import tiling
from ..errors import CheckpointFormatError
from ..tiling import TileMerge
from .base import NonFiniteValues, QuantizedWeight, TensorRef, listed, quantization_config
from .survival import DeltaSurvival, SurvivalSums

BLOCK = 32  # values per scale
BYTES = BLOCK // 2  # packed bytes per block
SCALE_BIAS = 127  # E8M0: 2^(s - 127); 255 is NaN in the OCP spec, transformers reads it as 2^128 (ldexp)
E2M1_MAX = 6.0
# The e2m1 values of codes 0..15 (bit 3 the sign), as the OCP MX spec and transformers' FP4_VALUES list them.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Rounding |v| / scale to a magnitude code counts the midpoints it passes: past a midpoint whose tie goes up (to the
# even code above), `>=`; past one whose tie goes down, `>`.
_MIDPOINTS = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
# A magnitude code halved (the same value at twice the scale), for the codes that have a half: 1.0 -> 0.5, 6 -> 3.
_HALVED = (0, 0, 1, 0, 2, 3, 4, 5)

# e2m1 bits moved into a float16 (sign to bit 15, exponent and mantissa to bits 9..11) read as 2^-14 times the value,
# the subnormal 0.5 included: float16's exponent bias is 15, e2m1's is 1. Shifts and a float16 -> float32 conversion
# run ~6x faster on CPU than indexing a table of the 16 values. The 2^14 goes into the block scale, which keeps the
# product exact: both factors are exact and so is code · 2^(s-127) in float32 (rounded once where it overflows).
_E2M1_VIA_FP16_EXPONENT = 14


def logical_shape(blocks_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """[E, in, out] of blocks [E, out, G, 16]."""
    experts, rows, groups, _ = blocks_shape
    return experts, groups * BLOCK, rows


def dequantize(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32, merge: TileMerge | None = None
) -> torch.Tensor:
    """The logical weight [E, in, out] of `blocks` [E, out, G, 16] and `scales` [E, out, G], computed in float32, with
    `merge` applied to the whole of it when given (once, full slices), then rounded once to `dtype`.

    Without a merge each tile goes straight to the output; with one, the whole float32 weight is made first."""
    shape = logical_shape(tuple(blocks.shape))
    whole = torch.float32 if merge is not None else dtype
    out = torch.empty(shape, dtype=whole, device=blocks.device)
    for experts, groups in _tiles(shape, blocks.device):
        target = out[experts, _rows(groups)]
        if whole == torch.float32:
            _decode_into(target, blocks[experts, :, groups], scales[experts, :, groups])
        else:
            target.copy_(_decoded(blocks[experts, :, groups], scales[experts, :, groups]))
    if merge is None:
        return out
    merged = merge(out, slice(None), slice(None))
    return merged if merged.dtype == dtype else merged.to(dtype)


def quantize(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [E, out, G, 16], scales [E, out, G]) for float32 `values` [E, in, out] (see the module docstring for
    the rule). Raises NonFiniteValues for NaN/Inf (they would end up in a block's scale)."""
    values = values.float()
    experts, inputs, rows = values.shape
    if inputs % BLOCK:
        raise ValueError(f"MXFP4 needs input features in multiples of {BLOCK}, not {inputs}")
    blocks = torch.empty((experts, rows, inputs // BLOCK, BYTES), dtype=torch.uint8, device=values.device)
    scales = torch.empty((experts, rows, inputs // BLOCK), dtype=torch.uint8, device=values.device)
    for experts_, groups in _tiles(tuple(values.shape), values.device):
        blocks[experts_, :, groups], scales[experts_, :, groups] = _encoded(values[experts_, _rows(groups)])
    return blocks, scales


def requantize(
    blocks: torch.Tensor, scales: torch.Tensor, merge: TileMerge, *, tensor: str
) -> tuple[torch.Tensor, torch.Tensor, DeltaSurvival]:
    """`quantize(merge(dequantize(blocks, scales)))`, and how much of the intended ΔW survived. The merge sees the
    whole float32 weight (it is 3-D); the encoding and the survival sums go a tile at a time. Raises
    NonFiniteValues for NaN/Inf in the merged values."""
    base = dequantize(blocks, scales)
    merged = merge(base, slice(None), slice(None))
    new_blocks = torch.empty_like(blocks)
    new_scales = torch.empty_like(scales)
    sums = SurvivalSums()
    for experts, groups in _tiles(tuple(base.shape), base.device):
        tile = merged[experts, _rows(groups)]
        tile_blocks, tile_scales = _encoded(tile)
        new_blocks[experts, :, groups], new_scales[experts, :, groups] = tile_blocks, tile_scales
        realised = torch.empty_like(tile)
        _decode_into(realised, tile_blocks, tile_scales)
        sums.add(base[experts, _rows(groups)], tile, realised)
    return new_blocks, new_scales, sums.survival(tensor)


def _tiles(shape: tuple[int, ...], device: torch.device) -> Iterator[tuple[slice, slice]]:
    """(experts, block groups) of the tiles of a logical weight [E, G·32, R]: on CPU one expert's groups, about
    TILE_VALUES values a tile, so that a tile's passes run in cache (a GPT-OSS-120B gate_up_proj expert is 16.6M
    values: ~2x the throughput of whole-expert passes); on a GPU runs of whole experts of about 64 tiles' worth."""
    experts, inputs, rows = shape
    groups = inputs // BLOCK
    if device.type != "cpu":
        step = max(1, (64 * tiling.TILE_VALUES) // max(1, inputs * rows))
        for start in range(0, experts, step):
            yield slice(start, min(experts, start + step)), slice(0, groups)
        return
    step = max(1, tiling.TILE_VALUES // max(1, BLOCK * rows))
    for expert in range(experts):
        for start in range(0, groups, step):
            yield slice(expert, expert + 1), slice(start, min(groups, start + step))


def _rows(groups: slice) -> slice:
    """The logical rows (input features) of block groups `groups`."""
    return slice(groups.start * BLOCK, groups.stop * BLOCK)


@functools.cache
def _power_table(offset: int, halves: int, device: torch.device) -> torch.Tensor:
    """2^(s - 127 + offset) as float32 for every scale byte s, exactly; with `halves` = 1 or 2, the first or second
    of two factors whose product that is, each a float32 where the whole would overflow (or underflow) one."""
    exponents = [s - SCALE_BIAS + offset for s in range(256)]
    if halves:
        exponents = [k // 2 if halves == 1 else k - k // 2 for k in exponents]
    return torch.tensor([math.ldexp(1.0, k) for k in exponents], dtype=torch.float32, device=device)


def _factors(scales: torch.Tensor, offset: int, halves: int = 0) -> torch.Tensor:
    return _power_table(offset, halves, scales.device)[scales.to(torch.int64)]


@functools.cache
def _inverse_table(device: torch.device) -> torch.Tensor:
    """2^(127 - s) as float32, the exact reciprocal of scale byte s; 0 for byte 0, an all-zero block's, so that its
    values stay signed zeros, as the reference quantizer leaves them."""
    inverses = [0.0] + [math.ldexp(1.0, SCALE_BIAS - s) for s in range(1, 255)] + [0.0]
    return torch.tensor(inverses, dtype=torch.float32, device=device)


def _decode_into(out: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    """Decode a run of experts' `blocks` [n, R, G, 16] / `scales` [n, R, G] into float32 `out` [n, G·32, R]."""
    n, rows, groups, _ = blocks.shape
    pairs = out.view(n, groups, BYTES, 2, rows)
    codes = blocks.permute(0, 2, 3, 1).contiguous().to(torch.int16)  # [n, G, 16, R]: only bytes are transposed
    for nibble, code in enumerate((codes & 0x0F, codes >> 4)):
        bits = ((code & 0x07) << 9).bitwise_or_((code & 0x08) << 12)
        pairs[:, :, :, nibble] = bits.view(torch.float16)
    grid = scales.permute(0, 2, 1)[:, :, None, None, :]  # [n, G, 1, 1, R]
    if int(scales.amax()) - SCALE_BIAS + _E2M1_VIA_FP16_EXPONENT < 128:
        pairs.mul_(_factors(grid, _E2M1_VIA_FP16_EXPONENT))
    else:  # 2^(s - 113) overflows float32 for s >= 241: two exact factors, the product rounded once, as ldexp does
        pairs.mul_(_factors(grid, _E2M1_VIA_FP16_EXPONENT, 1)).mul_(_factors(grid, _E2M1_VIA_FP16_EXPONENT, 2))


def _decoded(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    n, rows, groups, _ = blocks.shape
    out = torch.empty((n, groups * BLOCK, rows), dtype=torch.float32, device=blocks.device)
    _decode_into(out, blocks, scales)
    return out


def _encoded(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [n, R, G, 16], scales [n, R, G]) of float32 `values` [n, G·32, R]."""
    n, inputs, rows = values.shape
    groups = inputs // BLOCK
    grouped = values.reshape(n, groups, BLOCK, rows)
    # max(amax, -amin) down the block: cheaper than abs() and a reduction; NaN propagates into it.
    amax = torch.maximum(grouped.amax(dim=2), grouped.amin(dim=2).neg_())  # [n, G, R]
    if not bool(torch.isfinite(amax).all()):
        raise NonFiniteValues("NaN/Inf in the values to quantize")
    exponent = _round_up_exponent(amax / E2M1_MAX)  # the scale byte: 0 for an all-zero block
    inverse = _inverse_table(values.device)[exponent.to(torch.int64)]
    magnitude = grouped.abs().mul_(inverse[:, :, None, :])  # exact: a power of two, at most 6
    codes = _passed(magnitude, *_MIDPOINTS[0]).to(torch.uint8)
    for midpoint in _MIDPOINTS[1:]:
        codes += _passed(magnitude, *midpoint)
    del magnitude
    exponent = _canonical(codes, exponent)
    codes |= torch.signbit(grouped).to(torch.uint8) << 3
    pairs = codes.view(n, groups, BYTES, 2, rows)
    packed = pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)  # [n, G, 16, R]
    return packed.permute(0, 3, 1, 2).contiguous(), exponent.permute(0, 2, 1).contiguous()


def _passed(magnitude: torch.Tensor, midpoint: float, tie_up: bool) -> torch.Tensor:
    return magnitude >= midpoint if tie_up else magnitude > midpoint


def _round_up_exponent(ratio: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes of the smallest power of two >= `ratio` (float32), within [1, 254]; 0 where `ratio` is 0."""
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa · 2^exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype) + SCALE_BIAS
    return torch.where(ratio == 0, 0, exponent.clamp_(1, 254)).to(torch.uint8)


def _canonical(codes: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """Magnitude `codes` [n, G, 32, R] and scale bytes [n, G, R] in canonical form, in place for the codes: a block
    whose largest code is 6 and whose codes all have halves (none is 0.5 or 1.5) takes twice the scale and halved
    codes, the same values (see the module docstring)."""
    largest = codes.amax(dim=2)
    has_half_step = ((codes & 0x05) == 0x01).any(dim=2)  # magnitude codes 1 (0.5) and 3 (1.5)
    # No overflow: a finite float32 block has amax / 6 < 2^126, a byte of at most 253.
    halve = (largest == 7) & ~has_half_step
    if not bool(halve.any()):
        return exponent
    by_block = codes.permute(0, 1, 3, 2)  # [n, G, R, 32]: a view, so the assignment writes `codes`
    by_block[halve] = torch.tensor(_HALVED, dtype=torch.uint8, device=codes.device)[by_block[halve].to(torch.int64)]
    return exponent + halve.to(exponent.dtype)


class Mxfp4:
    """The MXFP4 format behind `base.WeightFormat`."""

    key = "mxfp4"
    label = "MXFP4"
    keeps = True

    def row_local(self, weight: QuantizedWeight) -> bool:
        return True

    # the whole float32 base, the merged weight, ΔW while it is added, the base decoded again to measure survival
    work_copies = 4

    def detect(
        self, config: dict[str, Any], refs: dict[str, TensorRef], where: str, read: object = None
    ) -> dict[str, QuantizedWeight]:
        found = quantization_config(config)
        if found is None or found[1].get("quant_method") != "mxfp4":
            return {}
        problems: list[str] = []
        weights: dict[str, QuantizedWeight] = {}
        for name in sorted(n for n in refs if n.endswith("_scales") and f"{n[: -len('_scales')]}_blocks" not in refs):
            problems.append(f"{name} ({refs[name].file}) has no {name[: -len('_scales')]}_blocks anywhere in the base")
        for name in sorted(n for n in refs if n.endswith("_blocks")):
            weight = name[: -len("_blocks")]
            blocks, scales = refs[name], refs.get(f"{weight}_scales")
            problem = _problem(name, blocks, scales)
            if problem is None and weight in refs:
                problem = (
                    f"{name} ({blocks.file}) is stored beside an unquantized {weight} ({refs[weight].file}): a "
                    "weight is one or the other; remove the stale one"
                )
            if problem:
                problems.append(problem)
                continue
            assert scales is not None
            weights[weight] = QuantizedWeight(
                format=self.key,
                name=weight,
                shape=logical_shape(blocks.entry.shape),
                parts={"blocks": blocks, "scales": scales},
                primary="blocks",
                params={"block_size": BLOCK},
            )
        if not weights and not problems:
            problems.append("quantization_config.quant_method is mxfp4 but no tensor is named <weight>_blocks")
        if problems:
            raise CheckpointFormatError(f"{where}: not an MXFP4 checkpoint this tool can read: {listed(problems)}")
        return weights

    def dequantize(
        self,
        weight: QuantizedWeight,
        parts: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        merge: TileMerge | None = None,
    ) -> torch.Tensor:
        return dequantize(parts["blocks"], parts["scales"], dtype, merge)

    def quantize(self, weight: QuantizedWeight, values: torch.Tensor) -> dict[str, torch.Tensor]:
        _, inputs, rows = weight.shape
        blocks, scales = quantize(values.reshape(-1, inputs, rows))
        return {"blocks": blocks, "scales": scales}

    def requantize(
        self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], merge: TileMerge
    ) -> tuple[dict[str, torch.Tensor], DeltaSurvival]:
        blocks, scales, survival = requantize(parts["blocks"], parts["scales"], merge, tensor=weight.name)
        return {"blocks": blocks, "scales": scales}, survival

    def row_alignment(self, weight: QuantizedWeight) -> int:
        return weight.shape[1]  # one expert: the only run of logical rows whose bytes are contiguous parts' rows

    def part_rows(self, weight: QuantizedWeight, role: str, rows: slice) -> slice:
        _, inputs, out = weight.shape
        first, last = rows.start // inputs, math.ceil(rows.stop / inputs)
        per_expert = out * (inputs // BLOCK) if role == "blocks" else out  # blocks [E·R·G, 16], scales [E·R, G]
        return slice(first * per_expert, last * per_expert)

    def decode(self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """Textbook: the table of the 16 values, low nibble first, times 2^(s - 127), in float64."""
        _, inputs, out = weight.shape
        blocks, scales = parts["blocks"], parts["scales"]
        table = torch.tensor(FP4_VALUES, dtype=torch.float64, device=blocks.device)
        codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).to(torch.int64)  # [E·R·G, 16, 2]
        values = table[codes].reshape(-1, out, inputs // BLOCK, BLOCK)
        factor = torch.pow(2.0, scales.to(torch.float64) - SCALE_BIAS).reshape(-1, out, inputs // BLOCK, 1)
        logical = (values * factor).reshape(-1, out, inputs).transpose(1, 2).reshape(-1, out)
        start = rows.start % inputs
        return logical[start : start + (rows.stop - rows.start)]

    def rounding(
        self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice
    ) -> tuple[float, torch.Tensor]:
        """The worst case of rounding to e2m1 at a scale no value exceeds 6 times (ROUND_UP's, so nothing clamps):
        a quarter of the scale where the step is half of it (values below 2 scales), and a fifth of the value above,
        reached at the ties 2.5 (step 1) and 5 (step 2) scales; the sum bounds both. (A floor-rule scale, which
        clamps up to 8 scales to 6, would need a quarter of the value: not this quantizer's.)"""
        _, inputs, out = weight.shape
        scales = parts["scales"].to(torch.float64).reshape(-1, out, inputs // BLOCK, 1)
        quarter = torch.pow(2.0, scales - SCALE_BIAS - 2).expand(-1, -1, -1, BLOCK)
        absolute = quarter.reshape(-1, out, inputs).transpose(1, 2).reshape(-1, out)
        start = rows.start % inputs
        return 0.2, absolute[start : start + (rows.stop - rows.start)]


def _problem(name: str, blocks: TensorRef, scales: TensorRef | None) -> str | None:
    """What is wrong with `name` and its scales as MXFP4 blocks, if anything."""
    entry = blocks.entry
    if scales is None:
        return f"{name} ({blocks.file}) has no {name[: -len('_blocks')]}_scales anywhere in the base"
    if entry.dtype != "U8":
        return f"{name} ({blocks.file}) is {entry.dtype}; MXFP4 blocks are U8 (two e2m1 codes a byte)"
    if len(entry.shape) != 4 or entry.shape[-1] != BYTES:
        return (
            f"{name} ({blocks.file}) has shape {list(entry.shape)}; MXFP4 expert blocks are "
            f"[experts, rows, groups, {BYTES}] (transformers dequantizes no other layout)"
        )
    if scales.entry.dtype != "U8" or scales.entry.shape != entry.shape[:-1]:
        return (
            f"{scales.entry.name} ({scales.file}) is {scales.entry.dtype} {list(scales.entry.shape)}; blocks "
            f"{list(entry.shape)} need U8 E8M0 scales {list(entry.shape[:-1])}"
        )
    return None
