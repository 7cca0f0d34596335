"""Block-FP8 weights (DeepSeek-V3/R1/V3.1, Kimi-K2): dequantize, re-quantize, and how much of a delta survived.

A quantized weight `W [M, N]` is stored as `float8_e4m3fn` codes `q` and a float32 grid `S [ceil(M/bm), ceil(N/bn)]`
(`weight_scale_inv`, which despite its name multiplies): `W[i, j] = q[i, j] * S[i // bm, j // bn]`. Edge blocks are
ragged (`kv_a_proj_with_mqa` is 576 × 7168 with a 5 × 56 grid).

Everything here works on blocked views (`[Mb, bm, Nb, bn]` against `[Mb, 1, Nb, 1]`), never on a scale grid
expanded to the weight's size: that would cost one more full-size tensor of memory traffic per step.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel

E4M3_MAX = 448.0
# A re-quantized weight whose realised delta points less than this way along the intended one is reported.
FP8_WARN_COSINE = 0.9
MIN_AMAX = 1e-4  # DeepSeek's quantizer: an all-zero block still gets a finite, non-zero scale

# e4m3fn bits moved into a float16 (sign to bit 15, exponent and mantissa to bits 7..13) read as 2^-8 times the
# value, subnormals included: float16's exponent bias is 15, e4m3's is 7. Integer shifts and a float16 -> float32
# conversion are vectorised on CPU; PyTorch's own float8 -> float32 conversion is a scalar loop there.
_E4M3_VIA_FP16_FACTOR = 2.0**8
# CPU work goes a band of block rows at a time, so that the several passes over each value hit the cache instead of
# memory: measured 4x faster than whole-tensor passes on a 7168 x 16384 weight.
_BAND_VALUES = 1 << 20


def codes_to_float32(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> float32, exactly (NaN codes excepted: no checkpoint holds them, and a merge refuses NaN)."""
    if codes.device.type != "cpu":
        return codes.to(torch.float32)
    bits = codes.view(torch.uint8).to(torch.int16)
    # (b << 7) puts the sign in bit 14; adding 1 << 14 for a set sign carries it into bit 15 (int16 wraps).
    half = (bits << 7).add_((bits >> 7) << 14)
    return half.view(torch.float16).to(torch.float32).mul_(_E4M3_VIA_FP16_FACTOR)


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """`x` as [Mb, bm, Nb, bn], zero-padded to whole blocks where its edges are ragged (a view when they are not)."""
    rows, cols = x.shape
    bm, bn = block
    mb, nb = math.ceil(rows / bm), math.ceil(cols / bn)
    if (rows, cols) != (mb * bm, nb * bn):
        padded = x.new_zeros((mb * bm, nb * bn))
        padded[:rows, :cols] = x
        x = padded
    return x.view(mb, bm, nb, bn)


def _unblock(blocks: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return blocks.reshape(blocks.shape[0] * blocks.shape[1], -1)[:rows, :cols]


def _bands(rows: int, cols: int, block: tuple[int, int], device: torch.device) -> range:
    """Row offsets of the bands to process: whole block rows, about _BAND_VALUES values each (one band on a GPU)."""
    if device.type != "cpu":
        return range(0, rows, max(rows, 1))
    step = block[0] * max(1, _BAND_VALUES // max(1, block[0] * cols))
    return range(0, rows, step)


def scale_grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The weight of FP8 `codes` [M, N] with block `scales` [ceil(M/bm), ceil(N/bn)]: computed in float32, then
    rounded once to `dtype`."""
    rows, cols = codes.shape
    scales = scales.to(device=codes.device, dtype=torch.float32)
    out = torch.empty((rows, cols), dtype=dtype, device=codes.device)
    bands = _bands(rows, cols, block, codes.device)
    for start in bands:
        stop = min(rows, start + bands.step)
        values = codes_to_float32(codes[start:stop])
        blocks = _blocks(values, block)
        grid = scales[start // block[0] : start // block[0] + blocks.shape[0]]
        blocks.mul_(grid[:, None, :, None])
        out[start:stop] = _unblock(blocks, stop - start, cols)
    return out


def quantize(weight: torch.Tensor, block: tuple[int, int], *, ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) for a float32 weight, the way DeepSeek's own quantizer does it.

    Per block: `s = max(amax, 1e-4) / 448`, rounded up to a power of two for `scale_fmt: ue8m0`;
    `q = clamp(w / s, ±448)` cast to e4m3. The edges are padded with zeros, which leave each block's amax alone.
    """
    rows, cols = weight.shape
    codes = torch.empty((rows, cols), dtype=torch.float8_e4m3fn, device=weight.device)
    scales = torch.empty(scale_grid_shape((rows, cols), block), dtype=torch.float32, device=weight.device)
    bands = _bands(rows, cols, block, weight.device)
    for start in bands:
        stop = min(rows, start + bands.step)
        blocks = _blocks(weight[start:stop].to(torch.float32), block)
        grid = blocks.abs().amax(dim=(1, 3)).clamp_(min=MIN_AMAX).div_(E4M3_MAX)
        if ue8m0:
            grid = _next_power_of_two(grid)
        scaled = blocks / grid[:, None, :, None]
        codes[start:stop] = _unblock(scaled.clamp_(-E4M3_MAX, E4M3_MAX), stop - start, cols).to(torch.float8_e4m3fn)
        scales[start // block[0] : start // block[0] + grid.shape[0]] = grid
    return codes, scales


def _next_power_of_two(x: torch.Tensor) -> torch.Tensor:
    """The smallest power of two >= x, exactly (log2 in float32 misjudges values next to a power of two)."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = exponent - (mantissa == 0.5).to(exponent.dtype)
    return torch.ldexp(torch.ones_like(x), exponent)


class DeltaSurvival(BaseModel):
    """How much of an intended weight change ΔW a re-quantized FP8 weight still carries.

    `cosine` of realised vs intended ΔW (1 = same direction); `relative_norm` ‖realised‖/‖intended‖ (1 = same size);
    `relative_error` ‖realised − intended‖/‖intended‖ (0 = all of it survived)."""

    tensor: str
    cosine: float
    relative_norm: float
    relative_error: float


def delta_survival(tensor: str, intended: torch.Tensor, realised: torch.Tensor) -> DeltaSurvival:
    """Compare the intended ΔW with the realised one. Sums are taken a chunk at a time in float32 (dot products
    accumulate blockwise there) and added up in float64, with no full-size temporary."""
    dot = norm_i2 = norm_r2 = err2 = 0.0
    flat_i, flat_r = intended.reshape(-1).float(), realised.reshape(-1).float()
    for start in range(0, flat_i.numel(), _CHUNK):
        i, r = flat_i[start : start + _CHUNK], flat_r[start : start + _CHUNK]
        dot += float(torch.dot(i, r))
        norm_i2 += float(torch.dot(i, i))
        norm_r2 += float(torch.dot(r, r))
        diff = r - i
        err2 += float(torch.dot(diff, diff))
    norm_i, norm_r = math.sqrt(norm_i2), math.sqrt(norm_r2)
    if norm_i == 0.0:
        return DeltaSurvival(tensor=tensor, cosine=1.0 if norm_r == 0 else 0.0, relative_norm=0.0, relative_error=0.0)
    cosine = dot / (norm_i * norm_r) if norm_r else 0.0
    return DeltaSurvival(
        tensor=tensor, cosine=cosine, relative_norm=norm_r / norm_i, relative_error=math.sqrt(err2) / norm_i
    )


_CHUNK = 1 << 20
