"""Quantized bases in the plan: which format the base's weights are in, what the output keeps of it, and what each
stored part of a quantized weight becomes (`QuantizedRole`)."""

from __future__ import annotations

from typing import Any, Literal

from ..errors import CheckpointFormatError, LoraMergeError
from ..formats import FORMATS, WeightFormat
from ..formats.base import QuantizedWeight, TensorRef, quantization_configs
from ..safetensors_format import ShardHeader, TensorEntry
from ..update import Update
from .model import QuantizedRole

OutputDtype = Literal["auto", "bf16", "keep", "fp8"]
OUTPUT_DTYPES = ("auto", "bf16", "keep", "fp8")  # fp8: what `keep` was called while block-FP8 was the only format


def find_quantized_weights(
    where: str, config: dict[str, Any], headers: list[ShardHeader]
) -> tuple[WeightFormat | None, dict[str, QuantizedWeight]]:
    """The base's quantized weight format and its weights by logical name, from config.json and the headers."""
    refs = {e.name: TensorRef(file=h.file, data_start=h.data_start, entry=e) for h in headers for e in h.tensors}
    found = [(fmt, weights) for fmt in FORMATS if (weights := fmt.detect(config, refs, where))]
    if len(found) > 1:
        raise CheckpointFormatError(
            f"{where} holds weights of {len(found)} quantized formats ({', '.join(f.label for f, _ in found)}); a "
            "checkpoint in one format is merged, a mixture is not"
        )
    return found[0] if found else (None, {})


def output_mode(output_dtype: str, fmt: WeightFormat | None, where: str) -> Literal["keep", "bf16"]:
    """What `--output-dtype` means for this base: `auto` is `bf16` for a quantized base; `keep` (or `fp8`, its
    older name) keeps its format; a base without quantized weights keeps every dtype."""
    if output_dtype not in OUTPUT_DTYPES:
        raise LoraMergeError(f"--output-dtype must be auto, bf16 or keep, not {output_dtype!r}")
    if fmt is None:
        if output_dtype in ("bf16", "fp8"):
            raise LoraMergeError(
                f"--output-dtype {output_dtype} converts quantized checkpoints, and {where} has no quantized weights "
                "this tool reads; leave --output-dtype at auto (every tensor keeps its dtype)"
            )
        return "keep"
    if output_dtype == "fp8" and fmt.key != "block-fp8":
        raise LoraMergeError(
            f"--output-dtype fp8 keeps a block-FP8 base's format, and {where} is {fmt.label}; use --output-dtype keep "
            "to keep its format, or bf16"
        )
    return "keep" if output_dtype in ("keep", "fp8") else "bf16"


def resolver_entries(weights: dict[str, QuantizedWeight]) -> dict[str, TensorEntry]:
    """The quantized weights as name resolution sees them: under their logical names and shapes, computed in
    float32 (what an adapter targets is the weight, not its packed parts)."""
    return {name: TensorEntry(name=name, dtype="F32", shape=w.shape, begin=0, end=0) for name, w in weights.items()}


def quantized_roles(
    weights: dict[str, QuantizedWeight], updates: dict[str, list[Update]], mode: str
) -> dict[str, QuantizedRole]:
    """Stored tensor name -> its role: every part of every weight in a bf16 output, the parts of touched weights
    in a kept one (untouched parts are copied)."""
    roles: dict[str, QuantizedRole] = {}
    for name, weight in weights.items():
        touched = tuple(updates.get(name, ()))
        for role, ref in weight.parts.items():
            primary = role == weight.primary
            if mode == "bf16":
                write = "dequantized" if primary else "dropped"
                roles[ref.entry.name] = QuantizedRole(write=write, role=role, weight=weight)
            elif touched:
                roles[ref.entry.name] = QuantizedRole(
                    write="requantized", role=role, weight=weight, weight_updates=() if primary else touched
                )
    return roles


def quantization_config_keys(config: dict[str, Any]) -> tuple[str, ...]:
    """Every quantization_config of config.json (the top level's and text_config's, where both have one)."""
    return tuple(key for key, _ in quantization_configs(config))


def mode_decision(fmt: WeightFormat, weights: dict[str, QuantizedWeight], updates: dict[str, Any], mode: str) -> str:
    """What the output does with the base's format, for the plan's decisions."""
    others = sorted({role for w in weights.values() for role in w.parts if role != w.primary})
    if mode == "bf16":
        return (
            f"{fmt.label} base written in bf16: {len(weights)} quantized weight(s) dequantized (merged where the "
            f"adapter touches them), their {'/'.join(others)} tensors dropped, quantization_config removed from "
            "config.json"
        )
    touched = sum(1 for name in weights if name in updates)
    return (
        f"{fmt.label} base kept in {fmt.label}: {touched} touched weight(s) re-quantized with fresh scales (see the "
        f"delta survival figures), {len(weights) - touched} untouched quantized weight(s) kept as they are"
    )
