"""compressed-tensors INT4 `pack-quantized` weights (Kimi-K2-Thinking, K2.5, K2.6): detect, dequantize, merge,
re-quantize, and how much of a delta survived.

The layout, as compressed-tensors 0.20.1 writes it (`pack_to_int32`, `unpack_from_int32`,
`PackedQuantizationCompressor`). A quantized Linear `<m>` is stored as
- `<m>.weight_packed` int32 [out, in/8]: value `j` of a row is the nibble at bits 4(j%8)..4(j%8)+3 of word `j // 8`
  (the first value in the lowest nibble), offset binary: nibble = q + 8 for a code q in [-8, 7];
- `<m>.weight_scale` [out, in/group] ([out, 1] for strategy "channel"), in the dtype of the weights the library
  quantized (bf16 in Kimi): `W[i, j] = q[i, j] * scale[i, j // group]`. Symmetric schemes store no zero point;
- `<m>.weight_shape` [2], the unpacked shape (int64 as 0.20.1 writes it; int32 accepted). Nothing here reads it to
  decode: `dequantize` only checks it against the shape the headers give.

The arithmetic is the library's own (its eager PyTorch path, which it runs on CPU):
- dequantize: `q.to(scale.dtype) * scale`, so the weight is the product *rounded to the scale's dtype* (bf16 for
  Kimi: a code times a bf16 scale needs up to 11 bits). The product is exact in float32, so a float32 product rounded
  once to the scale dtype is the library's bits.
- quantize, on a weight held in the scale's dtype: per group `amax = max(-min(w, 0), max(w, 0))`,
  `scale = amax / 7.5` (the float32 quotient rounded to the scale dtype; 0 becomes the dtype's eps) and
  `q = round_half_even(clamp(w / scale, -8, 7))`, where `w / scale` is itself rounded to the scale dtype. (The
  library's Triton kernel, used on GPUs that have Triton, skips that last rounding: ~1% of its codes differ from
  its own CPU path. This module follows the CPU path on every device.)

The library's quantizer does not reproduce its own output: `amax / 7.5` puts a group's largest value at ±7.5 codes,
which rounds to 7 or -8, so quantizing a dequantized group gives a scale 7/7.5 or 8/7.5 of the original. Here a group
that is already exactly codes times a scale keeps that scale (`_keep_grids`): an untouched weight pushed through
`dequantize` -> `quantize` reproduces its bytes, and every other group gets the library's scale and codes.

On CPU the work goes one tile of whole groups (and whole int32 words) at a time, on CUDA the whole tensor at once.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import CheckpointFormatError
from ..lora_math import all_finite
from ..safetensors_format import torch_dtype
from ..tiling import TileMerge, tiles
from .base import NonFiniteValues, QuantizedWeight, TensorRef, listed, quantization_config
from .survival import DeltaSurvival, SurvivalSums

KEY = "int4-pack-quantized"
LABEL = "compressed-tensors INT4 pack-quantized"
NUM_BITS = 4
Q_MIN, Q_MAX = -8, 7
VALUES_PER_WORD = 32 // NUM_BITS
# The library's symmetric scale divides by half the code range: (Q_MAX - Q_MIN) / 2.
HALF_RANGE = (Q_MAX - Q_MIN) / 2
SCALE_DTYPES = ("BF16", "F16", "F32")
SHAPE_DTYPES = ("I64", "I32")
STRATEGIES = ("group", "channel")


# -- kernels -------------------------------------------------------------------------------------------------------


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles (q + 8) [rows, 8 * words] of int32 words [rows, words]: shifts and masks on the words' bytes."""
    rows, words = packed.shape
    data = packed.contiguous().view(torch.uint8)
    if sys.byteorder == "big" and packed.device.type == "cpu":  # a word's lowest nibble is in its last byte there
        data = data.view(rows, words, 4).flip(-1).reshape(rows, 4 * words)
    return torch.stack((data & 0xF, data >> 4), dim=-1).view(rows, VALUES_PER_WORD * words)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int32 words [rows, cols/8] of integer codes in [-8, 7] (any dtype that holds them) [rows, cols]."""
    rows, cols = codes.shape
    nibbles = (codes.to(torch.int16) + 8).to(torch.uint8)
    data = (nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)).contiguous()
    if sys.byteorder == "big" and codes.device.type == "cpu":
        data = data.view(rows, -1, 4).flip(-1).reshape(rows, -1).contiguous()
    return data.view(torch.int32)


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    group: int,
    dtype: torch.dtype = torch.float32,
    merge: TileMerge | None = None,
) -> torch.Tensor:
    """The weight of int32 `packed` [out, in/8] with group `scale`s [out, in/group], the library's values (products
    rounded to the scale's dtype) in float32, with `merge` applied when given, then rounded once to `dtype`."""
    shape = (packed.shape[0], packed.shape[1] * VALUES_PER_WORD)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    for rows, cols in tiles(shape, packed.device, (1, _block(group))):
        values = _decoded(packed[rows, _words(cols)], scale[rows, _groups(cols, group)], group)
        out[rows, cols] = values if merge is None else merge(values, rows, cols)
    return out


def quantize(
    values: torch.Tensor, group: int, scale_dtype: torch.dtype, *, tensor: str = "the weight"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int32 [rows, cols/8], scales [rows, cols/group] in `scale_dtype`) of a float32 weight: the library's
    quantizer applied to the weight held in `scale_dtype`, except that a group already on a 4-bit grid keeps it."""
    rows, cols = values.shape
    packed = torch.empty((rows, cols // VALUES_PER_WORD), dtype=torch.int32, device=values.device)
    scales = torch.empty((rows, cols // group), dtype=scale_dtype, device=values.device)
    for tile_rows, tile_cols in tiles(values.shape, values.device, (1, _block(group))):
        tile = values[tile_rows, tile_cols].to(torch.float32)
        if not all_finite(tile):
            raise NonFiniteValues(f"{tensor}: NaN/Inf at rows {tile_rows.start}–{tile_rows.stop - 1}")
        codes, grid, _ = _encoded(tile, group, scale_dtype)
        packed[tile_rows, _words(tile_cols)] = pack(codes)
        scales[tile_rows, _groups(tile_cols, group)] = grid
    return packed, scales


def requantize(
    packed: torch.Tensor, scale: torch.Tensor, group: int, merge: TileMerge, *, tensor: str
) -> tuple[torch.Tensor, torch.Tensor, DeltaSurvival]:
    """`quantize(merge(dequantize(packed, scale)))` tile by tile, without a full-size float32 copy of the weight on
    CPU, and how much of the intended ΔW survived. Raises NonFiniteValues for NaN/Inf in the merged values."""
    shape = (packed.shape[0], packed.shape[1] * VALUES_PER_WORD)
    new_packed = torch.empty_like(packed)
    new_scale = torch.empty_like(scale)
    sums = SurvivalSums()
    for rows, cols in tiles(shape, packed.device, (1, _block(group))):
        words, groups = _words(cols), _groups(cols, group)
        base = _decoded(packed[rows, words], scale[rows, groups], group)
        merged = merge(base, rows, cols)
        if not all_finite(merged):
            raise NonFiniteValues(f"{tensor}: the merged values hold NaN/Inf at rows {rows.start}–{rows.stop - 1}")
        codes, grid, realised = _encoded(merged, group, scale.dtype)
        new_packed[rows, words] = pack(codes)
        new_scale[rows, groups] = grid
        del codes, grid
        sums.add(base, merged, realised)
    return new_packed, new_scale, sums.survival(tensor)


def _block(group: int) -> int:
    """Columns a tile holds a multiple of: whole groups and whole int32 words."""
    return math.lcm(group, VALUES_PER_WORD)


def _words(cols: slice) -> slice:
    return slice(cols.start // VALUES_PER_WORD, math.ceil(cols.stop / VALUES_PER_WORD))


def _groups(cols: slice, group: int) -> slice:
    return slice(cols.start // group, math.ceil(cols.stop / group))


def _decoded(packed: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """float32 values of a tile of words with its scales: codes times scales, rounded to the scales' dtype."""
    codes = unpack(packed).to(torch.float32).sub_(8)
    rows, cols = codes.shape
    values = codes.view(rows, cols // group, group).mul_(scale.to(torch.float32)[:, :, None]).view(rows, cols)
    if scale.dtype != torch.float32:  # exact products, rounded once as the library rounds them
        values = values.to(scale.dtype).to(torch.float32)
    return values


def _encoded(
    values: torch.Tensor, group: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes, scales, what they decode to in float32) of a finite float32 tile, computed as the library computes
    them on the tile held in `scale_dtype`. Codes are integers in [-8, 7] in `scale_dtype`."""
    rows, cols = values.shape
    held = values.to(scale_dtype).reshape(rows, cols // group, group)
    amax = torch.maximum(held.amax(dim=2), held.amin(dim=2).neg()).clamp_(min=0)
    grid = (amax.to(torch.float32) / HALF_RANGE).to(scale_dtype)
    grid.masked_fill_(grid == 0, torch.finfo(scale_dtype).eps)  # the library's guard against a zero scale
    codes, realised = _codes(held, grid)
    _keep_grids(values.reshape(rows, cols // group, group), held, amax, codes, grid, realised)
    return codes.reshape(rows, cols), grid, realised.reshape(rows, cols)


def _codes(held: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, decoded float32 values) of groups [..., group] held in the scale dtype with their scales [...]."""
    scale = grid.to(torch.float32)[..., None]
    # The library divides in the weight's dtype: a float32 quotient rounded to it.
    quotient = held.to(torch.float32, copy=True).div_(scale).to(held.dtype)
    codes = quotient.clamp_(Q_MIN, Q_MAX).round_()  # round half to even, as torch.round
    realised = codes.to(torch.float32, copy=True).mul_(scale)
    if held.dtype != torch.float32:  # rounded in place: one float32 copy of the tile, not two
        realised.copy_(realised.to(held.dtype))
    return codes, realised


def _keep_grids(
    values: torch.Tensor,
    held: torch.Tensor,
    amax: torch.Tensor,
    codes: torch.Tensor,
    grid: torch.Tensor,
    realised: torch.Tensor,
) -> None:
    """Groups whose values are exactly 4-bit codes times a scale keep that scale and those codes (in place).

    Such a group is what dequantizing a stored group gives. Its largest value is `8 s` (a code -8) or `7 s` rounded
    to the scale dtype (a code ±7: the library's `amax / 7.5` never leaves a smaller extreme code), so the scale is
    `amax / 8`, or `amax / 7` give or take one last bit. A candidate is kept only where it decodes to every value of
    the group; the library's own result is kept where it already does (an all-zero group)."""
    candidates = (values == held.to(torch.float32)).all(dim=2)  # one pass: merged float32 values rarely are
    if not bool(candidates.any()):
        return
    candidates &= (realised != held.to(torch.float32)).any(dim=2)
    if not bool(candidates.any()):
        return
    rows, groups = candidates.nonzero(as_tuple=True)
    group_values, extreme = held[rows, groups], amax[rows, groups].to(torch.float32)
    for candidate in _GRID_CANDIDATES:
        scale = candidate(extreme, grid.dtype)
        tried_codes, tried = _codes(group_values, scale)
        fits = (tried == group_values.to(torch.float32)).all(dim=1) & (scale > 0) & torch.isfinite(scale)
        if bool(fits.any()):
            hit = (rows[fits], groups[fits])
            codes[hit], grid[hit], realised[hit] = tried_codes[fits], scale[fits], tried[fits]
            rest = ~fits
            rows, groups, group_values, extreme = rows[rest], groups[rest], group_values[rest], extreme[rest]
            if rows.numel() == 0:
                return


def _next(positive: torch.Tensor, step: int) -> torch.Tensor:
    """The neighbouring value of the same floating dtype, `step` last bits up (positive values only)."""
    bits = {2: torch.int16, 4: torch.int32}[positive.element_size()]
    return (positive.view(bits) + step).view(positive.dtype)


# The scales a group on a 4-bit grid can have, from its largest magnitude: a code -8, or ±7 (its product rounded).
_GRID_CANDIDATES = (
    lambda extreme, dtype: (extreme / 8).to(dtype),
    lambda extreme, dtype: (extreme / 7).to(dtype),
    lambda extreme, dtype: _next((extreme / 7).to(dtype), -1),
    lambda extreme, dtype: _next((extreme / 7).to(dtype), 1),
)


# -- the format ----------------------------------------------------------------------------------------------------


class Int4PackQuantized:
    """compressed-tensors INT4 pack-quantized weights behind `base.WeightFormat`. Roles: `packed`
    (`weight_packed`), `scale` (`weight_scale`) and, where the checkpoint stores it, `shape` (`weight_shape`)."""

    key = KEY
    label = LABEL
    keeps = True

    def row_local(self, weight: QuantizedWeight) -> bool:
        return True

    # A whole-tensor re-quantization (CUDA) holds, in float32 sizes: the base values and the merged values (2), the
    # merged values in the scale dtype and their codes (1 for bf16), the decoded new codes (1), and then either a
    # quotient or a rounding temporary (<= 1) or the intended ΔW of `SurvivalSums.add` (1). On CPU all but the
    # packed words and scales are tile-sized.
    work_copies = 5

    def detect(
        self, config: dict[str, Any], refs: dict[str, TensorRef], where: str, read: object = None
    ) -> dict[str, QuantizedWeight]:
        schemes = _declared_schemes(config)
        if not schemes:
            return {}
        weights: dict[str, QuantizedWeight] = {}
        problems: list[str] = []
        for name in sorted(n for n in refs if n.endswith(".weight_packed")):
            module = name.removesuffix(".weight_packed")
            scheme = _scheme_for(module, schemes, problems)
            if scheme is not None:
                weight = _weight(module, refs, scheme, problems)
                if weight is not None:
                    weights[weight.name] = weight
        if problems:
            raise CheckpointFormatError(f"{where} is not a {LABEL} checkpoint this tool can read: {listed(problems)}")
        return weights

    def dequantize(
        self,
        weight: QuantizedWeight,
        parts: dict[str, torch.Tensor],
        *,
        dtype: torch.dtype = torch.float32,
        merge: TileMerge | None = None,
    ) -> torch.Tensor:
        _check_shape(weight, parts)
        return dequantize(parts["packed"], parts["scale"], weight.params["group_size"], dtype, merge)

    def quantize(self, weight: QuantizedWeight, values: torch.Tensor) -> dict[str, torch.Tensor]:
        scale_dtype = torch_dtype(weight.params["scale_dtype"])
        packed, scale = quantize(values, weight.params["group_size"], scale_dtype, tensor=weight.name)
        return self._parts(weight, packed, scale)

    def requantize(
        self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], merge: TileMerge
    ) -> tuple[dict[str, torch.Tensor], DeltaSurvival]:
        _check_shape(weight, parts)
        packed, scale, survival = requantize(
            parts["packed"], parts["scale"], weight.params["group_size"], merge, tensor=weight.name
        )
        return self._parts(weight, packed, scale), survival

    def row_alignment(self, weight: QuantizedWeight) -> int:
        return 1  # scales are per row and group: any run of rows has its own

    def part_rows(self, weight: QuantizedWeight, role: str, rows: slice) -> slice:
        """`packed` and `scale` have a row per weight row; `shape` ([2], seen as [1, 2]) is one row, which `decode`
        and `rounding` never need: its rows are the whole of it, whichever weight rows are asked for."""
        return slice(0, 1) if role == "shape" else rows

    def decode(self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice) -> torch.Tensor:
        """Textbook: each nibble by its own shift of the words read as unsigned 32-bit numbers, times its group's
        scale in float64, rounded to the scale's dtype as the library's dequantization rounds it."""
        words = parts["packed"].to(torch.int64) & 0xFFFFFFFF
        nibbles = torch.stack([(words >> (NUM_BITS * k)) & 0xF for k in range(VALUES_PER_WORD)], dim=2)
        codes = (nibbles - 8).reshape(words.shape[0], -1).to(torch.float64)
        scale = parts["scale"].to(torch.float64).repeat_interleave(weight.params["group_size"], dim=1)
        return (codes * scale).to(parts["scale"].dtype).to(torch.float64)

    def rounding(
        self, weight: QuantizedWeight, parts: dict[str, torch.Tensor], rows: slice
    ) -> tuple[float, torch.Tensor]:
        """One re-quantization with scales `s` moves a value `v` by at most `u·|v| + (1/2 + 30u)·s`, `u` the scale
        dtype's unit roundoff (2^-8 for bf16), for values of the group the scale was computed from:
        - `u·|v|`: the value is rounded to the scale dtype first (the library quantizes the weight in that dtype);
        - `s/2`: rounding to the nearest code;
        - `23u·s`: the quotient `v / s` is rounded to the scale dtype before it is rounded to a code (a quotient
          just under a half rounds up to it: at most 8u codes off), and the clamp: `s = amax / 7.5` rounded down
          leaves the largest value at up to `7.5 (1 + u)^3` codes, which the clamp takes to 7 (up to 0.5 + 22.5u);
        - `7u·s`: the decoded product `q·s` is rounded to the scale dtype (|q| <= 7 where it is inexact)."""
        unit = torch.finfo(parts["scale"].dtype).eps / 2
        scale = parts["scale"].to(torch.float64).repeat_interleave(weight.params["group_size"], dim=1)
        return unit, scale * (0.5 + 30 * unit)

    def _parts(self, weight: QuantizedWeight, packed: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = {"packed": packed, "scale": scale}
        if "shape" in weight.parts:
            dtype = torch_dtype(weight.params["shape_dtype"])
            parts["shape"] = torch.tensor(weight.shape, dtype=dtype, device=packed.device)
        return parts


# -- detection -----------------------------------------------------------------------------------------------------


def _pack_quantized_groups(
    config: dict[str, Any],
) -> Iterator[tuple[str, list[str], dict[str, Any] | None, str | None]]:
    """(name, targets, settings, why not) of every compressed-tensors config group that stores its weights
    pack-quantized: settings None, with the option named, where this module cannot merge them."""
    found = quantization_config(config)
    if found is None or found[1].get("quant_method") != "compressed-tensors":
        return
    path, quant = found
    groups = quant.get("config_groups")
    if not isinstance(groups, dict):
        return
    for group_name, scheme in groups.items():
        if not isinstance(scheme, dict) or not isinstance(scheme.get("weights"), dict):
            continue
        if (scheme.get("format") or quant.get("format")) != "pack-quantized":
            continue
        settings, problem = _settings(scheme["weights"], f"{path}.config_groups.{group_name}.weights")
        yield group_name, list(scheme.get("targets") or []), settings, problem


def _declared_schemes(config: dict[str, Any]) -> list[tuple[str, list[str], dict[str, Any] | None]]:
    """(name, targets, settings) of every pack-quantized config group; [] when the config declares none."""
    return [(name, targets, settings) for name, targets, settings, _ in _pack_quantized_groups(config)]


def unmergeable_settings(config: dict[str, Any]) -> list[str]:
    """Why the pack-quantized groups this module cannot merge are so, option by option: their weights are left to
    `unsupported` (copied when untouched, refused by name when touched)."""
    return [problem for *_, problem in _pack_quantized_groups(config) if problem]


def _settings(weights: dict[str, Any], key: str) -> tuple[dict[str, Any] | None, str | None]:
    """A pack-quantized group's weight settings, or None and why this module cannot merge them (the option named)."""
    bits, kind, strategy, group = (weights.get(k) for k in ("num_bits", "type", "strategy", "group_size"))
    problem = None
    if bits != NUM_BITS:
        problem = f"has num_bits {bits!r}: only 4-bit pack-quantized weights can be merged"
    elif kind != "int":
        problem = f"has type {kind!r}: only type int pack-quantized weights can be merged"
    elif weights.get("symmetric") is not True:
        problem = "has symmetric false: asymmetric weights (zero points, weight_zero_point) are not supported yet"
    elif strategy not in STRATEGIES:
        problem = f"has strategy {strategy!r}: only {' and '.join(STRATEGIES)} scales are supported"
    elif strategy == "group" and not (isinstance(group, int) and not isinstance(group, bool) and group > 0):
        problem = f"has group_size {group!r}: strategy group needs a positive integer"
    elif weights.get("actorder") not in (None, False, "weight", "static"):
        problem = f"has actorder {weights['actorder']!r}: activation-ordered groups (weight_g_idx) are not supported"
    elif weights.get("dynamic") not in (None, False):
        problem = f"has dynamic {weights['dynamic']!r}: merging needs stored weight scales"
    elif weights.get("scale_dtype") is not None:
        problem = f"has scale_dtype {weights['scale_dtype']!r}: only scales in the weights' own dtype are supported"
    if problem is not None:
        return None, f"{key} {problem}"
    return {"strategy": strategy, "group_size": group if strategy == "group" else None}, None


def _scheme_for(
    module: str, schemes: list[tuple[str, list[str], dict[str, Any]]], problems: list[str]
) -> dict[str, Any] | None:
    """The settings of the config group a module belongs to. A target is `re:<regex>` (matched from the start, as the
    library matches), a module name, or a class name such as "Linear", which the headers cannot check: it is taken
    to match. Groups that match with different settings make the module ambiguous."""
    matching = [settings for _, targets, settings in schemes if any(_targets(module, t) for t in targets)]
    if not matching:
        matching = [settings for _, _, settings in schemes] if len(schemes) == 1 else []
    if not matching:
        problems.append(f"{module}.weight_packed is in no pack-quantized config group's targets")
        return None
    if any(settings is None for settings in matching):
        return None  # a group this module cannot merge: its weights are refused when touched (unsupported.py)
    if any(settings != matching[0] for settings in matching):
        problems.append(f"{module}.weight_packed matches pack-quantized config groups with different settings")
        return None
    return matching[0]


def _targets(module: str, target: str) -> bool:
    if target.startswith("re:"):
        try:
            return re.match(target.removeprefix("re:"), module) is not None
        except re.error as exc:
            raise CheckpointFormatError(
                f"config.json quantization_config target {target!r} is not a valid regular expression ({exc}); fix "
                "the config"
            ) from None
    return target == module or target[:1].isupper()  # a class name ("Linear"): assumed to match


def _weight(
    module: str, refs: dict[str, TensorRef], settings: dict[str, Any], problems: list[str]
) -> QuantizedWeight | None:
    packed = refs[f"{module}.weight_packed"]
    scale = refs.get(f"{module}.weight_scale")
    shape = refs.get(f"{module}.weight_shape")
    start = len(problems)
    name, entry = packed.entry.name, packed.entry
    if f"{module}.weight" in refs:
        other = refs[f"{module}.weight"].file
        problems.append(
            f"{name} ({packed.file}) is stored beside an unquantized {module}.weight ({other}): a module is one or "
            "the other; remove the stale one"
        )
    for extra, why in (("weight_zero_point", "zero points"), ("weight_g_idx", "activation-ordered groups")):
        if f"{module}.{extra}" in refs:
            problems.append(f"{module}.{extra} ({refs[f'{module}.{extra}'].file}): {why} are not supported")
    if entry.dtype != "I32" or len(entry.shape) != 2:
        problems.append(f"{name} ({packed.file}) is {entry.dtype} {list(entry.shape)}; packed weights are 2-D I32")
    if scale is None:
        problems.append(f"{name} ({packed.file}) has no {module}.weight_scale anywhere in the base")
    if shape is not None and (shape.entry.dtype not in SHAPE_DTYPES or shape.entry.shape != (2,)):
        problems.append(
            f"{shape.entry.name} ({shape.file}) is {shape.entry.dtype} {list(shape.entry.shape)}; expected I64 or "
            "I32 [2]"
        )
    if len(problems) > start:
        return None
    assert scale is not None
    out, words = entry.shape
    columns = words * VALUES_PER_WORD
    if columns == 0:
        problems.append(f"{name} ({packed.file}) is {list(entry.shape)}: a weight with no input features")
        return None
    group = settings["group_size"] or columns
    expected = (out, math.ceil(columns / group))
    stored = scale.entry.shape
    fits = stored == expected and columns % group == 0
    if scale.entry.dtype not in SCALE_DTYPES:
        problems.append(f"{scale.entry.name} ({scale.file}) is {scale.entry.dtype}; scales are BF16, F16 or F32")
    elif fits:
        pass
    elif len(stored) == 2 and stored[0] == out and columns - VALUES_PER_WORD < stored[1] * group < columns:
        problems.append(
            f"{name} ({packed.file}) has {stored[1] * group} input features by its scale {scale.entry.name}, not a "
            f"multiple of {VALUES_PER_WORD}: packed words that end in padding are not supported"
        )
    else:
        problems.append(
            f"{scale.entry.name} ({scale.file}) is {list(stored)}; {name} {list(entry.shape)} packs a "
            f"{[out, columns]} weight, which with groups of {group} needs scales {list(expected)}"
        )
    if len(problems) > start:
        return None
    parts = {"packed": packed, "scale": scale}
    params: dict[str, Any] = {
        "num_bits": NUM_BITS,
        "strategy": settings["strategy"],
        "group_size": group,
        "scale_dtype": scale.entry.dtype,
    }
    if shape is not None:
        parts["shape"] = shape
        params["shape_dtype"] = shape.entry.dtype
    return QuantizedWeight(
        format=KEY, name=f"{module}.weight", shape=(out, columns), parts=parts, primary="packed", params=params
    )


def _check_shape(weight: QuantizedWeight, parts: dict[str, torch.Tensor]) -> None:
    """The stored `weight_shape` must be the shape the headers give: a checkpoint whose rows end in padding values
    (input features not a multiple of 8, which only `weight_shape` tells) is refused here."""
    shape = parts.get("shape")
    if shape is None:
        return
    stored = tuple(int(v) for v in shape.reshape(-1).tolist())
    if stored != weight.shape:
        name = weight.parts["shape"].entry.name
        raise CheckpointFormatError(
            f"{name} ({weight.parts['shape'].file}) holds {list(stored)}, but {weight.parts['packed'].entry.name} "
            f"and its scales are a {list(weight.shape)} weight: input features that are not a multiple of "
            f"{VALUES_PER_WORD} (packed words ending in padding) are not supported"
        )
