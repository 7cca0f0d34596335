"""Quantized base checkpoints this tool cannot merge into yet, recognised by the tensors they store.

NVFP4, GPTQ and AWQ checkpoints (and compressed-tensors, MXFP4 or bitsandbytes ones in a variant the formats here do
not read, or without the quantization_config that says how to read them) keep a weight as packed integers with
companion tensors (scales, code books, shapes), often under other
names than the weight's: `q_proj.weight` as U8 [n, 1] beside `q_proj.weight.absmax`, `q_proj.weight` as
`q_proj.qweight`. A LoRA delta cannot be added to those bytes. Planning refuses a merge that touches one by naming
the format, instead of reporting a packed tensor's shape as a mismatch; quantized weights the adapter does not touch
are copied byte for byte like any other tensor. The formats the tool merges into are the other modules here, listed
in `formats.FORMATS`; their tensors are passed in as `supported` and never reported.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..errors import UnsupportedBaseError
from ..safetensors_format import FLOAT_DTYPES, TensorEntry
from . import FORMATS
from .base import quantization_config
from .int4_packed import unmergeable_settings

# (stored tensor name pattern, the weight's name as modules see it, the format) for formats whose companion tensors
# say what they are. Each `weight` group is what an adapter targets.
_COMPANIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    # bitsandbytes 4-bit (Params4bit): packed U8 weight + absmax, quant_map, quant_state.bitsandbytes__<type>
    (re.compile(r"^(?P<weight>.+)\.quant_state\.bitsandbytes__(?P<kind>\w+)$"), "bitsandbytes {kind}"),
    # bitsandbytes 8-bit (LLM.int8()): I8 weight + the row scales SCB
    (re.compile(r"^(?P<module>.+)\.SCB$"), "bitsandbytes int8"),
    # MXFP4 (GPT-OSS experts): <param>_blocks (U8 pairs of e2m1 codes) + <param>_scales (U8 e8m0 exponents)
    (re.compile(r"^(?P<weight>.+)_blocks$"), "MXFP4"),
    # compressed-tensors pack-quantized: weight_packed (I32) + weight_scale + weight_shape
    (re.compile(r"^(?P<module>.+)\.weight_packed$"), "compressed-tensors"),
    # GPTQ / AWQ: qweight (I32) + scales + qzeros
    (re.compile(r"^(?P<module>.+)\.qweight$"), "GPTQ/AWQ"),
)


class UnsupportedWeight(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # the weight as modules see it (what an adapter targets)
    scheme: str  # "bitsandbytes nf4", "MXFP4", ...
    stored: str  # the tensor the checkpoint stores its codes in


class UnsupportedBase(BaseModel):
    """The quantized weights of a base checkpoint, and how to refuse a merge into them."""

    model_config = ConfigDict(frozen=True)

    where: str  # the base, for messages
    method: str | None  # config.json's quantization_config.quant_method
    weights: dict[str, UnsupportedWeight]
    why: str | None = None  # the settings of a format the tool reads that make these weights unmergeable

    def refusal(self, touched: list[UnsupportedWeight]) -> UnsupportedBaseError:
        first = touched[0]
        if first.scheme.startswith("bitsandbytes") and self.method != "bitsandbytes":
            return UnsupportedBaseError(
                f"{self.where} stores {first.name} as {first.scheme} ({first.stored}), but its config.json has no "
                "bitsandbytes quantization_config, which says how those tensors are read; put back the config.json "
                "transformers saved with the checkpoint"
            )
        declared = f", config.json quantization_config.quant_method {self.method!r}" if self.method else ""
        more = f" and {len(touched) - 1} more" if len(touched) > 1 else ""
        stored = "" if first.stored == first.name else f", stored as {first.stored}"
        return UnsupportedBaseError(
            f"{self.where} is a quantized checkpoint ({first.scheme}{declared}): the adapter changes "
            f"{len(touched)} quantized weight(s) ({first.name}{stored}{more}), and {first.scheme} bases are not "
            f"supported yet{f' ({self.why})' if self.why else ''} (the tool merges into "
            f"{', '.join(f.label for f in FORMATS)} ones); merge into the "
            "unquantized base this checkpoint was quantized from (then quantize the merged output again if needed)"
        )


def find_quantized(
    where: str, config: dict[str, Any], catalog: dict[str, TensorEntry], supported: set[str]
) -> UnsupportedBase | None:
    """The base's quantized weights, from their tensors' names and dtypes, or None when it has none. `supported`:
    the stored parts of weights in formats the tool merges (`formats.FORMATS`)."""
    method, declared = _declared_scheme(config)
    weights: dict[str, UnsupportedWeight] = {}
    for stored, entry in catalog.items():
        if stored in supported:
            continue
        for pattern, scheme in _COMPANIONS:
            match = pattern.match(stored)
            if match is None:
                continue
            if "module" in match.groupdict():
                name = f"{match['module']}.weight"
                codes = name if name in catalog else stored
                if scheme == "bitsandbytes int8" and (name not in catalog or catalog[name].dtype in FLOAT_DTYPES):
                    continue  # an SCB beside a float weight is not LLM.int8()
            else:
                name = match["weight"]
                codes = stored if scheme == "MXFP4" else name
                if scheme == "MXFP4" and f"{name}_scales" not in catalog:
                    continue
            label = scheme.format(kind=match.groupdict().get("kind", ""))
            if scheme in ("compressed-tensors", "GPTQ/AWQ") and declared:
                label = declared
            weights[name] = UnsupportedWeight(name=name, scheme=label, stored=codes)
        # A weight the config declares quantized, stored as integers or FP8 under its own name (compressed-tensors
        # int-/float-quantized, fbgemm FP8, ...): no companion naming the format, but not a float either.
        if declared and stored.endswith(".weight") and entry.dtype not in FLOAT_DTYPES and stored not in weights:
            weights[stored] = UnsupportedWeight(name=stored, scheme=declared, stored=stored)
    if not weights:
        return None
    why = "; ".join(unmergeable_settings(config))  # [] unless compressed-tensors
    return UnsupportedBase(where=where, method=method, weights=weights, why=why or None)


def _declared_scheme(config: dict[str, Any]) -> tuple[str | None, str | None]:
    """(quant_method, a readable name of the scheme) from config.json's quantization_config, if any."""
    found = quantization_config(config)
    quant = found[1] if found else {}
    if not quant.get("quant_method"):
        return None, None
    method = str(quant["quant_method"])
    if method == "bitsandbytes":
        if quant.get("load_in_4bit") or quant.get("_load_in_4bit"):
            return method, f"bitsandbytes {quant.get('bnb_4bit_quant_type') or 'fp4'}"
        return method, "bitsandbytes int8"
    if method == "mxfp4":
        return method, "MXFP4"
    if method == "compressed-tensors" and quant.get("format"):
        return method, f"compressed-tensors {quant['format']}"
    return method, method
