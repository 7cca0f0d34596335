"""Reading PEFT LoRA adapters: the config, the tensor index, and tensors on demand (ranged reads)."""

from __future__ import annotations

import functools
import io
import json
import math
import re
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .credentials import StorageCredentials
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
    exclude_modules: Any = None
    target_parameters: list[str] | None = None
    modules_to_save: list[str] | None = None
    trainable_token_indices: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    use_bdlora: BlockDiagonal | None = None
    ensure_weight_tying: bool = False
    peft_version: str | None = None
    base_model_name_or_path: str | None = None

    def alpha(self, key: str, rule: str) -> float:
        """lora_alpha for the module or parameter `key` under one of PEFT's pattern rules."""
        chosen = self._pattern_choice(self.alpha_pattern, key, rule)
        return float(self.alpha_pattern.get(chosen, self.lora_alpha)) if chosen is not None else float(self.lora_alpha)

    def rank_key(self, key: str, rule: str) -> str | None:
        """The rank_pattern entry that sets r for the module or parameter `key` under one of PEFT's pattern rules
        (the same rules as alpha's), or None: then r applies."""
        chosen = self._pattern_choice(self.rank_pattern, key, rule)
        return chosen if chosen in self.rank_pattern else None

    def _pattern_choice(self, patterns: dict[str, Any], key: str, rule: str) -> str | None:
        """The pattern key PEFT's rule picks for `key` among `patterns` (rank_pattern or alpha_pattern). Before
        0.14 one key was picked from rank_pattern and alpha_pattern together, and the name itself stood for no
        match; 0.14 picked from the pattern's own dict; from 0.15 on `pattern_key` decides (None: no match)."""
        if rule == "0.13":
            return next((k for k in [*self.rank_pattern, *self.alpha_pattern] if re.match(rf".*\.{k}$", key)), key)
        if rule == "0.14":
            return next((k for k in patterns if re.match(rf".*\.{k}$", key)), key)
        return pattern_key(patterns, key)

    def rank(self, key: str, rule: str) -> int:
        chosen = self.rank_key(key, rule)
        return int(self.rank_pattern[chosen]) if chosen is not None else self.r

    def targets_module(self, name: str) -> bool | None:
        """Whether PEFT gives the module `name` a LoRA layer from `target_modules` (its
        `check_target_module_exists`): a string is a regex matched against the whole name ("all-linear": every
        linear layer), a list matches a name equal to an entry or ending in "." + entry, then restricted by
        `layers_to_transform` / `layers_pattern`; `exclude_modules` wins. None where the config does not say
        (neither target_modules nor target_parameters: PEFT would pick modules by model type)."""
        if self.target_modules is None and self.target_parameters is None:
            return None
        if _named_by(self.exclude_modules, name):
            return False
        targets = self.target_modules
        if targets is None:
            return False
        if isinstance(targets, str):
            return targets.lower() == "all-linear" or re.fullmatch(targets, name) is not None
        if name in targets:
            return True
        if not _named_by(targets, name):
            return False
        layers = self.layers_to_transform
        if layers is None or layers == []:
            return True
        pattern_cfg = self.layers_pattern
        patterns = [] if not pattern_cfg else [pattern_cfg] if isinstance(pattern_cfg, str) else list(pattern_cfg)
        # The first numbered segment is the layer index (not an expert index further down the name).
        found = None if patterns else re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
        for pattern in patterns:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if found:
                break
        if found is None:
            return False
        index = int(found["idx"])
        return index == layers if isinstance(layers, int) else index in layers

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


def _named_by(entries: Any, name: str) -> bool:
    """PEFT's list rule for target_modules / exclude_modules (a string is a full-match regex)."""
    if not entries:
        return False
    if isinstance(entries, str):
        return re.fullmatch(entries, name) is not None
    return any(name == str(e) or name.endswith(f".{e}") for e in entries)


def rank_problems(adapter: AdapterIndex, ranks: dict[str, int]) -> list[str]:
    """Modules or parameters (key -> the rank their tensors have) whose r in the config (r, or their rank_pattern
    entry under the pattern rule of the PEFT version that saved the adapter) is another rank, grouped by what the
    config says. PEFT builds its layers from the config, and then cannot load such tensors into them."""
    cfg = adapter.config
    rule = cfg.pattern_rule()
    rules = ("0.13", "0.14", "current") if rule is None else (rule,)
    wrong: dict[tuple[str, int], list[str]] = {}
    for key, rank in ranks.items():
        said = {cfg.rank(key, r) for r in rules}
        if rank not in said:
            entries = sorted({k for r in rules if (k := cfg.rank_key(key, r)) is not None})
            source = f"rank_pattern {', '.join(map(repr, entries))}" if entries else "r"
            wrong.setdefault((f"r = {' or '.join(map(str, sorted(said)))} (from {source})", rank), []).append(key)
    where = adapter.location.describe(CONFIG_FILE)
    problems = []
    for (said, rank), keys in wrong.items():
        names = (
            keys[0]
            if len(keys) == 1
            else f"{len(keys)} modules ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        )
        problems.append(
            f"{names}: LoRA tensors of rank {rank}, but {where} gives {said}; PEFT could not load this adapter: set "
            "r / rank_pattern to the rank it was trained with"
        )
    return problems


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
        config = AdapterConfig(**{k: v for k, v in raw.items() if k in known and v is not None})
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e['input']!r})" for e in exc.errors())
        raise AdapterError(f"{where}: invalid adapter config: {fields}") from None
    ranks = [f"r is {config.r}"] if config.r < 1 else []
    ranks += [f"rank_pattern[{k!r}] is {v}" for k, v in config.rank_pattern.items() if v < 1]
    if ranks:
        raise AdapterError(
            f"{where}: {', '.join(ranks)}; a LoRA rank is a positive integer (the rows of lora_A): set it to the "
            "rank the adapter was trained with"
        )
    malformed = _malformed_targeting(config)
    if malformed:
        raise AdapterError(f"{where}: {'; '.join(malformed)}; fix the config (PEFT could not load it either)")
    return config


def _malformed_targeting(config: AdapterConfig) -> list[str]:
    """The fields that say which modules get LoRA layers, where they are not what PEFT reads: a regex string or a
    list of names (layer indices: an int or a list of ints), and regexes that compile."""
    problems = []
    for field in ("target_modules", "exclude_modules", "layers_pattern"):
        value = getattr(config, field)
        if value is None:
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            patterns = value if field == "layers_pattern" else []
        elif isinstance(value, str):
            patterns = [value]
        else:
            problems.append(f"{field} must be a string or a list of strings, not {value!r}")
            continue
        problems += [f"{field} {p!r} is not a valid regular expression" for p in patterns if not _compiles(p)]
    for field in ("rank_pattern", "alpha_pattern"):
        problems += [
            f"{field} key {k!r} is not a valid regular expression" for k in getattr(config, field) if not _compiles(k)
        ]
    layers = config.layers_to_transform
    if layers is not None and not (
        type(layers) is int or isinstance(layers, list) and all(type(i) is int for i in layers)
    ):
        problems.append(f"layers_to_transform must be a layer index or a list of them, not {layers!r}")
    return problems


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


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
    _check_weights(location.describe(file), tensors)
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


def _check_weights(where: str, tensors: list[AdapterTensor]) -> None:
    """Refuse an adapter file that holds nothing to merge: no tensors, or tensors with a zero-size dimension."""
    if not tensors:
        raise AdapterError(
            f"{where} holds no tensors: there is nothing to merge, and the output would be a copy of the base. "
            "Check that training saved the adapter's weights (save_pretrained writes lora_A/lora_B for every "
            "targeted module)"
        )
    empty = [t for t in tensors if math.prod(t.shape) == 0]
    if empty and len(empty) == len(tensors):
        raise AdapterError(
            f"every tensor in {where} is empty ({len(tensors)} tensors, e.g. {tensors[0].name} of shape "
            f"{list(tensors[0].shape)}): the adapter was saved under DeepSpeed ZeRO-3 with its parameters "
            "partitioned across ranks, not gathered. Save it again with `stage3_gather_16bit_weights_on_model_save: "
            "true` in the DeepSpeed config, or through accelerate (`accelerator.get_state_dict(model)` passed to "
            "`accelerator.unwrap_model(model).save_pretrained(..., state_dict=...)`), or recover the weights from "
            "the ZeRO checkpoint with DeepSpeed's zero_to_fp32.py"
        )
    if empty:
        shown = ", ".join(f"{t.name} {list(t.shape)}" for t in empty[:4])
        more = f" (and {len(empty) - 4} more)" if len(empty) > 4 else ""
        raise AdapterError(
            f"{where}: {len(empty)} tensor(s) have a zero-size dimension: {shown}{more}; an empty LoRA tensor (rank "
            "0, or a ZeRO-3 partition saved without gathering) holds nothing to merge: re-save the adapter with its "
            "full weights"
        )


@functools.lru_cache(maxsize=2)
def _load_bin_cached(
    uri: str, options_key: str, credentials: StorageCredentials | None, file: str, version_key: str
) -> dict[str, torch.Tensor]:
    return _read_bin(Location(uri=uri, storage_options=json.loads(options_key), credentials=credentials), file)


def _load_bin(location: Location, file: str) -> dict[str, torch.Tensor]:
    # Keyed by the file's version too: a long-lived worker must not merge a replaced adapter from its cache.
    version = json.dumps(location.version(file), sort_keys=True)
    options = json.dumps(location.storage_options, sort_keys=True)
    return _load_bin_cached(location.uri, options, location.credentials, file, version)


def _read_bin(location: Location, file: str) -> dict[str, torch.Tensor]:
    data = location.read_bytes(file)  # a storage failure is reported as one, not as an unreadable file
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
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
