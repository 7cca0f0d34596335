"""Reading PEFT LoRA adapters: the config, the tensor index, and tensors on demand (ranged reads)."""

from __future__ import annotations

import functools
import io
import json
import re
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from .errors import AdapterError, UnsupportedAdapterError
from .safetensors_format import DTYPES, TensorEntry, dtype_name, read_header, tensor_from_bytes
from .storage import Location

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# init_lora_weights values whose adapters only make sense together with a modified base weight.
_BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "loftq")

# LoRA variants whose merge is the plain LoRA delta (PEFT's `merge_safe`/`merge_unsafe` call `get_delta_weight`
# alone) and which save tensors used in training only: config field -> (variant, the keys of those tensors).
# VeLoRA's `lora_velora_embed` is the projection of its compressed backward pass; MonteCLoRA's sampler holds the
# priors of its Monte Carlo perturbations (parameters std_prior and expert_weights_prior, buffers gaussian_var_prior
# and expert_weights).
TRAINING_ONLY_TENSORS: dict[str, tuple[str, re.Pattern[str]]] = {
    "velora_config": ("VeLoRA", re.compile(r"^(?P<module>.+)\.lora_velora_embed$")),
    "monteclora_config": (
        "MonteCLoRA",
        re.compile(
            r"^(?P<module>.+)\.lora_monteclora_sampler\.(std_prior|expert_weights_prior|gaussian_var_prior|expert_weights)$"
        ),
    ),
}
# Fields of LoraConfig that each select a LoRA variant; PEFT builds no layer with two of them.
_VARIANT_FIELDS = ("use_dora", "velora_config", "monteclora_config", "use_bdlora")


class BlockDiagonal(BaseModel):
    """PEFT's BdLoraConfig (`use_bdlora`): which modules store LoRA A or LoRA B block-diagonal, in how many blocks."""

    model_config = ConfigDict(frozen=True)

    target_modules_bd_a: list[str] | None = None
    target_modules_bd_b: list[str] | None = None
    nblocks: int = 1
    match_strict: bool = True

    def side(self, module: str) -> str | None:
        """Which factor of a module is block-diagonal by PEFT's rule (a pattern that is a substring of the module's
        name): "A", "B", "both" (PEFT refuses to build that) or None (a plain LoRA factor pair)."""
        in_a = any(p in module for p in self.target_modules_bd_a or [])
        in_b = any(p in module for p in self.target_modules_bd_b or [])
        return "both" if in_a and in_b else "A" if in_a else "B" if in_b else None


class AdapterConfig(BaseModel):
    """The fields of PEFT's LoraConfig that change what a merge writes."""

    model_config = ConfigDict(frozen=True)

    r: int = 8
    lora_alpha: float = 8
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    bias: str = "none"
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    target_modules: Any = None
    target_parameters: list[str] | None = None
    modules_to_save: list[str] | None = None
    trainable_token_indices: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    use_bdlora: BlockDiagonal | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None

    def alpha(self, key: str, rule: str) -> float:
        """lora_alpha for the module or parameter `key` under one of PEFT's pattern rules."""
        if rule == "0.13":  # one key from rank_pattern + alpha_pattern together, then looked up in alpha_pattern
            patterns = [*self.rank_pattern, *self.alpha_pattern]
            chosen = next((k for k in patterns if re.match(rf".*\.{k}$", key)), key)
            return float(self.alpha_pattern.get(chosen, self.lora_alpha))
        if rule == "0.14":
            chosen = next((k for k in self.alpha_pattern if re.match(rf".*\.{k}$", key)), key)
            return float(self.alpha_pattern.get(chosen, self.lora_alpha))
        chosen = pattern_key(self.alpha_pattern, key)
        return float(self.alpha_pattern[chosen]) if chosen else float(self.lora_alpha)

    def pattern_rule(self) -> str | None:
        """Which PEFT version's rank/alpha pattern rule made this adapter; None when the config does not say."""
        match = re.match(r"(\d+)\.(\d+)", self.peft_version or "")
        if not match:
            return None
        version = (int(match[1]), int(match[2]))
        return "0.13" if version < (0, 14) else "0.14" if version < (0, 15) else "current"


def pattern_key(patterns: dict[str, Any], name: str) -> str | None:
    """PEFT's `get_pattern_key` (0.15+): the first key (dict order) for which `(.*\\.)?(key)$` matches."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def adapter_scale(adapter: AdapterIndex, key: str, rank: int) -> tuple[float, float]:
    """(alpha, scale) of one module or parameter. The rank comes from the tensors' shapes; alpha from the
    pattern rule of the PEFT version that saved the adapter. Configs that do not record their version are
    accepted only where every rule gives the same alpha."""
    cfg = adapter.config
    rule = cfg.pattern_rule()
    if rule is None:
        alphas = {cfg.alpha(key, r) for r in ("0.13", "0.14", "current")}
        if len(alphas) > 1:
            raise AdapterError(
                f"{adapter.location.describe(CONFIG_FILE)}: alpha for {key} depends on the PEFT version that saved "
                f"the adapter ({sorted(alphas)}: PEFT changed its rank/alpha pattern rule in 0.14 and 0.15) and the "
                'config has no peft_version; add "peft_version": "<the version used for training>" to it'
            )
        alpha = alphas.pop()
    else:
        alpha = cfg.alpha(key, rule)
    return alpha, (alpha / rank**0.5 if cfg.use_rslora else alpha / rank)


def parse_config(raw: dict[str, Any], where: str) -> AdapterConfig:
    """Check an adapter_config.json is a plain LoRA adapter this tool can merge exactly, and read it."""
    peft_type = str(raw.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UnsupportedAdapterError(
            f"{where}: peft_type is {raw.get('peft_type')!r}; only LoRA adapters (peft_type LORA) can be merged here"
        )
    refusals = []
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        refusals.append(
            f"init_lora_weights={init!r} adapters were trained against a base that the initialisation changed; "
            "convert the adapter to a plain LoRA first (PEFT's `path_initial_model_for_weight_conversion` on save)"
        )
    if raw.get("layer_replication"):
        refusals.append(
            "layer_replication builds layers that the base checkpoint does not have; merge it with PEFT in memory"
        )
    for flag, what in (
        ("use_qalora", "QA-LoRA"),
        ("alora_invocation_tokens", "activated LoRA (aLoRA) applies only after its invocation tokens"),
        ("arrow_config", "Arrow routing"),
        ("kasa_config", "KaSA"),
    ):
        if raw.get(flag):
            refusals.append(f"{flag} is set ({what}): not a plain weight update, cannot be merged by this tool")
    variants = [flag for flag in _VARIANT_FIELDS if raw.get(flag)]
    if len(variants) > 1:
        refusals.append(f"{' and '.join(variants)} are set together: PEFT has no LoRA variant that combines them")
    bd = raw.get("use_bdlora")
    if bd and (not isinstance(bd, dict) or not isinstance(bd.get("nblocks", 1), int) or bd.get("nblocks", 1) < 1):
        refusals.append(f"use_bdlora must be PEFT's BdLoraConfig with a positive integer nblocks, not {bd!r}")
    if refusals:
        raise UnsupportedAdapterError(f"{where}: " + "; ".join(refusals))
    if raw.get("bias", "none") not in ("none", "all", "lora_only"):
        raise AdapterError(f"{where}: bias must be 'none', 'all' or 'lora_only', not {raw.get('bias')!r}")
    known = set(AdapterConfig.model_fields)
    try:
        return AdapterConfig(**{k: v for k, v in raw.items() if k in known and v is not None})
    except Exception as exc:  # pydantic's message names the field
        raise AdapterError(f"{where}: invalid adapter config: {exc}") from None


class AdapterTensor(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # as stored in the file
    dtype: str
    shape: tuple[int, ...]
    begin: int = 0  # absolute byte range in the safetensors file (unused for .bin)
    end: int = 0


class AdapterIndex(BaseModel):
    """What the adapter holds, read from its config and its file's header: no tensor data."""

    model_config = ConfigDict(frozen=True)

    location: Location
    file: str
    config: AdapterConfig
    raw_config: dict[str, Any]
    tensors: dict[str, AdapterTensor]  # keyed by module-relative name (PEFT prefix removed)
    version: dict[str, Any]


def load_adapter_index(location: Location) -> AdapterIndex:
    if not location.exists(CONFIG_FILE):
        raise AdapterError(
            f"{location.describe(CONFIG_FILE)} not found: --adapter must point at a PEFT adapter directory "
            "(the output of `save_pretrained`)"
        )
    raw_config = location.read_json(CONFIG_FILE)
    if not isinstance(raw_config, dict):
        raise AdapterError(f"{location.describe(CONFIG_FILE)} is not a JSON object")
    config = parse_config(raw_config, location.describe(CONFIG_FILE))
    if location.exists(SAFETENSORS_FILE):
        file = SAFETENSORS_FILE
        header = read_header(location, file)
        entries: list[TensorEntry] = list(header.tensors)
        tensors = [
            AdapterTensor(
                name=e.name,
                dtype=e.dtype,
                shape=e.shape,
                begin=header.data_start + e.begin,
                end=header.data_start + e.end,
            )
            for e in entries
        ]
    elif location.exists(BIN_FILE):
        file = BIN_FILE
        state = _load_bin(location, file)
        tensors = [AdapterTensor(name=k, dtype=dtype_name(v.dtype), shape=tuple(v.shape)) for k, v in state.items()]
    else:
        raise AdapterError(
            f"{location.uri} has neither {SAFETENSORS_FILE} nor {BIN_FILE}: the adapter's weights are missing"
        )
    by_name: dict[str, AdapterTensor] = {}
    for tensor in tensors:
        if tensor.dtype not in DTYPES:
            raise AdapterError(
                f"{location.describe(file)}: tensor {tensor.name!r} has unsupported dtype {tensor.dtype}"
            )
        key = tensor.name.removeprefix(PEFT_PREFIX)
        # Older PEFT versions kept the adapter name in keys (`lora_A.default.weight`); the file format drops it.
        key = re.sub(
            r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.default(\b|$)", r".\1", key
        )
        by_name[key] = tensor
    return AdapterIndex(
        location=location,
        file=file,
        config=config,
        raw_config=raw_config,
        tensors=by_name,
        version=location.version(file),
    )


@functools.lru_cache(maxsize=2)
def _load_bin_cached(uri: str, options_key: str, file: str, version_key: str) -> dict[str, torch.Tensor]:
    return _read_bin(Location(uri=uri, storage_options=json.loads(options_key)), file)


def _load_bin(location: Location, file: str) -> dict[str, torch.Tensor]:
    # Keyed by the file's version too: a long-lived worker must not merge a replaced adapter from its cache.
    version = json.dumps(location.version(file), sort_keys=True)
    return _load_bin_cached(location.uri, json.dumps(location.storage_options, sort_keys=True), file, version)


def _read_bin(location: Location, file: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(location.read_bytes(file)), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AdapterError(
            f"{location.describe(file)} could not be read with torch.load(weights_only=True) ({exc}); "
            "re-save the adapter with safetensors (PEFT's default)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise AdapterError(f"{location.describe(file)} is not a flat state dict of tensors")
    return state


def read_adapter_tensor(adapter: AdapterIndex, key: str) -> torch.Tensor:
    """One adapter tensor, by its module-relative key, read with a ranged read."""
    spec = adapter.tensors[key]
    if adapter.file == BIN_FILE:
        return _load_bin(adapter.location, adapter.file)[spec.name]
    data = adapter.location.read_bytes(adapter.file, spec.begin, spec.end)
    return tensor_from_bytes(data, spec.dtype, spec.shape)
