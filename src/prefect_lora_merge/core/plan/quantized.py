"""Quantized bases in the plan: which format the base's weights are in, what the output keeps of it, and what each
stored part of a quantized weight becomes (`QuantizedRole`)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from ..errors import CheckpointFormatError, LoraMergeError
from ..formats import FORMATS, WeightFormat
from ..formats.base import QuantizedWeight, TensorRef, quantization_configs
from ..formats.bitsandbytes import CONV1D_MODEL_TYPES, AsQuantized, round_trip_weights
from ..safetensors_format import ShardHeader, TensorEntry
from ..update import Update
from .model import QuantizedRole

OutputDtype = Literal["auto", "bf16", "keep", "fp8"]
OUTPUT_DTYPES = ("auto", "bf16", "keep", "fp8")  # fp8: what `keep` was called while block-FP8 was the only format


def stored_refs(headers: list[ShardHeader]) -> dict[str, TensorRef]:
    """Every stored tensor of the base by name, with where its bytes are."""
    return {e.name: TensorRef(file=h.file, data_start=h.data_start, entry=e) for h in headers for e in h.tensors}


def find_quantized_weights(
    where: str, config: dict[str, Any], headers: list[ShardHeader], read: Callable[[TensorRef], bytes]
) -> tuple[WeightFormat | None, dict[str, QuantizedWeight]]:
    """The base's quantized weight format and its weights by logical name, from config.json and the headers (and
    the few small tensors a format keeps its settings in, through `read`)."""
    refs = stored_refs(headers)
    found = [(fmt, weights) for fmt in FORMATS if (weights := fmt.detect(config, refs, where, read))]
    if len(found) > 1:
        raise CheckpointFormatError(
            f"{where} holds weights of {len(found)} quantized formats ({', '.join(f.label for f, _ in found)}); a "
            "checkpoint in one format is merged, a mixture is not"
        )
    return found[0] if found else (None, {})


def as_quantized_weights(
    where: str, fmt: WeightFormat | None, headers: list[ShardHeader], config: dict[str, Any], settings: AsQuantized
) -> dict[str, QuantizedWeight]:
    """The base's weights that `--as-quantized` puts through the 4-bit round trip (a 16-bit base only)."""
    if fmt is not None:
        raise LoraMergeError(
            f"--as-quantized simulates a 4-bit load of a 16-bit base, and {where} is {fmt.label} already: its weights "
            "are the ones a model loaded from it computes with; leave --as-quantized off"
        )
    tied = "lm_head.weight" if config.get("tie_word_embeddings") else None
    conv1d = str(config.get("model_type")) in CONV1D_MODEL_TYPES
    weights = round_trip_weights(stored_refs(headers), settings, tied, conv1d)
    if not weights:
        raise LoraMergeError(
            f"--as-quantized: {where} has no 2-D floating Linear weight a 4-bit load would quantize; leave it off"
        )
    return weights


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
    if output_dtype in ("keep", "fp8") and not fmt.keeps:
        raise LoraMergeError(
            f"--output-dtype {output_dtype}: {where} is {fmt.label}, which this tool writes in bf16 only (bitsandbytes "
            "quantizes when a model loads, from its bf16 weights); leave --output-dtype at auto, and load the merged "
            "model with a BitsAndBytesConfig to get it in 4 or 8 bits again"
        )
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


def round_trip_decision(settings: AsQuantized, weights: dict[str, QuantizedWeight], updates: dict[str, Any]) -> str:
    touched = sum(1 for name in weights if name in updates)
    return (
        f"--as-quantized {settings.quant_type}: {len(weights)} Linear weight(s) put through bitsandbytes' 4-bit round "
        f"trip ({settings.describe()}) before the delta, as the QLoRA model the adapter was trained with computes "
        f"({touched} of them touched); embeddings, MoE experts and routers (not Linear layers in transformers) and "
        f"{', '.join(settings.skip) if settings.skip else 'the output head'} kept as stored"
    )


# How 4-bit bitsandbytes repos are named (Unsloth's `*-bnb-4bit`, `*-4bit-bnb`, `*-bnb-nf4`).
_QUANTIZED_REPO = re.compile(r"bnb[-_.]?4bit|4bit[-_.]?bnb|bnb[-_.]?nf4", re.IGNORECASE)


def qlora_hint(
    adapter_config: dict[str, Any], fmt: WeightFormat | None, as_quantized: AsQuantized | None
) -> str | None:
    """Where the adapter says it was trained on a bitsandbytes 4-bit checkpoint: the two merges a QLoRA adapter can
    have, and which one this is."""
    trained_on = adapter_config.get("base_model_name_or_path")
    if not isinstance(trained_on, str) or not _QUANTIZED_REPO.search(trained_on):
        return None
    if fmt is not None and fmt.key == "bnb-4bit":
        return (
            f"the adapter was trained on {trained_on} (bitsandbytes 4-bit): this merge adds its delta to the weights "
            "bitsandbytes dequantizes, the ones it was trained against; to merge into the original 16-bit weights "
            "instead, pass that checkpoint as --base (with --as-quantized nf4 and the settings it was quantized with, "
            "that gives about this merge back); see the README's QLoRA section for which to choose"
        )
    if fmt is None and as_quantized is None:
        return (
            f"the adapter was trained on {trained_on} (bitsandbytes 4-bit) and this base is 16-bit: the delta goes "
            "onto the 16-bit weights, not the 4-bit ones it was trained against; pass --as-quantized nf4 to merge "
            "into those instead (the run then reports, per tensor, how far apart the two are: ‖Q(W) − W‖ / ‖ΔW‖)"
        )
    return None
