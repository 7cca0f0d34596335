"""Update planning: turning the adapter's keys into updates of base tensors, or into a list of every problem.

Every adapter tensor must land on exactly one base tensor with the right shape (found by `names.NameResolver`), or
planning fails before a byte is written, listing every offending key: a mismatch with the base, an adapter that
contradicts itself, or an update PEFT cannot merge either.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Literal

from pydantic import BaseModel

from ..adapter import TRAINING_ONLY_TENSORS, AdapterIndex, AdapterTensor, adapter_scale, rank_problems
from ..adapters import AdapterSet
from ..errors import AdapterMismatchError, InconsistentAdapterError, UnsupportedAdapterError
from ..formats.base import TensorRef
from ..formats.unsupported import UnsupportedBase, UnsupportedWeight
from ..safetensors_format import FLOAT_DTYPES, ShardHeader
from ..update import PARAMETER_FORMS, Update, update_keys
from .model import PlannedTensor
from .names import HEAD_WEIGHT, NameResolver, rewrites

# transformers v5 fuses per-expert Linear weights into one 3-D parameter in memory; checkpoints keep them apart.
# fused parameter name -> alternatives, each a tuple of per-expert module names concatenated along the output dim.
EXPERT_SPLITS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
# transformers models built on GPT-2's Conv1D (weights stored (in, out)), and the module names that are Conv1D.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Architectures without any Conv1D: a square weight there is nn.Linear whatever fan_in_fan_out says.
LINEAR_ONLY_HINT = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3",
        "phi3",
        "deepseek_v2",
        "deepseek_v3",
        "kimi_k2",
        "llava",
        "olmoe",
    }
)
# transformers MoE blocks whose fused expert weights are stored (E, in, out) (`is_transposed = True`).
TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>lora_A|lora_B)\.(?P<param>weight|bias)$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<role>A|B)$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(\.weight)?$")
_TOKENS_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta$")
# A module's tensor under a PEFT wrapper: the base copy beside an adapted layer (`base_layer`), or beside a
# modules_to_save copy when PEFT saves the embedding layers of a resized vocabulary (`original_module`, and
# `modules_to_save`, a duplicate of the copy `<module>.weight` that PEFT's loader ignores).
_BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.(base_layer|original_module|modules_to_save)\.(?P<param>weight|bias)$")
# The out_proj of an nn.MultiheadAttention, which PEFT wraps inside the attention's own LoRA layer.
_MHA_OUT_PROJ = re.compile(r"^(?P<attention>.+)\.base_layer\.out_proj$")


class _Group(BaseModel):
    module: str
    A: str | None = None
    B: str | None = None
    B_bias: str | None = None
    magnitude: str | None = None
    embedding: bool = False


class _Unsupported(str):
    """A planning problem that is not a mismatch with the base: an update PEFT cannot merge either."""


def plan_updates(
    adapter: AdapterIndex,
    resolver: NameResolver,
    config: dict[str, Any],
    quantized_weights: set[str],
    unsupported: UnsupportedBase | None = None,
) -> tuple[dict[str, list[Update]], dict[str, list[str]], dict[str, int | bool]]:
    groups: dict[str, _Group] = {}
    replacements: list[tuple[str, str]] = []  # (adapter key, tensor name as PEFT saw it)
    token_keys: list[tuple[str, str]] = []
    training_only: list[tuple[str, str, str]] = []  # (adapter key, module, variant)
    problems: list[str] = []
    variants = [found for flag, found in TRAINING_ONLY_TENSORS.items() if adapter.raw_config.get(flag) is not None]

    for key in adapter.tensors:
        if m := _LORA_KEY.match(key):
            group = groups.setdefault(m["module"], _Group(module=m["module"]))
            if m["role"] == "lora_A":
                group.A = key
            elif m["param"] == "weight":
                group.B = key
            else:
                group.B_bias = key
        elif m := _EMBED_KEY.match(key):
            group = groups.setdefault(m["module"], _Group(module=m["module"]))
            group.embedding = True
            setattr(group, m["role"], key)
        elif m := _MAGNITUDE_KEY.match(key):
            groups.setdefault(m["module"], _Group(module=m["module"])).magnitude = key
        elif m := _TOKENS_KEY.match(key):
            token_keys.append((key, m["module"]))
        elif m := _BASE_LAYER_KEY.match(key):
            replacements.append((key, f"{m['module']}.{m['param']}"))
        elif found := _training_only(key, variants):
            training_only.append((key, *found))
        elif re.search(r"\.(lora_\w+|hada_\w+|lokr_\w+|ia3_\w+)(\.|$)", key):
            problems.append(f"{key} is not a LoRA tensor this tool knows how to merge")
        else:
            replacements.append((key, key))

    if unsupported is not None:
        touched = _touched_quantized(unsupported, resolver, adapter, groups, replacements, token_keys)
        if touched:
            raise unsupported.refusal(touched)

    updates: dict[str, list[Update]] = defaultdict(list)
    usage: dict[str, list[str]] = {}
    config_updates: dict[str, int | bool] = {}
    replaced_shapes: dict[str, tuple[int, ...]] = {}

    # Tensors a LoRA variant saves for training only: applied nowhere (an empty usage), as in PEFT's merge; each
    # must belong to a module whose LoRA factors are in the adapter.
    for key, module, variant in training_only:
        group = groups.get(module)
        if group is None or group.A is None or group.B is None:
            problems.append(f"{key}: a {variant} tensor for {module}, which has no LoRA A and B in the adapter")
        else:
            usage[key] = []
    for variant in sorted({v for _, _, v in training_only}):
        names = sorted({k.rpartition(f"{m}.")[2] for k, m, v in training_only if v == variant})
        resolver.decisions.append(
            f"{variant}: its {sum(1 for *_, v in training_only if v == variant)} training-only tensor(s) "
            f"({', '.join(names)}) are not part of the merge; PEFT merges {variant} as the plain LoRA delta"
        )

    def shape_of(target: str) -> tuple[int, ...]:
        """A tensor's shape as later updates see it: after a full replacement (a resized embedding, say)."""
        return replaced_shapes.get(target, resolver.catalog[target].shape)

    def add(target: str, update: Update) -> None:
        updates[target].append(update)
        for k in update_keys(update):
            usage.setdefault(k, []).append(target)

    # A trained copy of a tied embedding or head makes the two paths differ in the trained model: the output gets a
    # head of its own, so every update of the head lands on it (and none on the embedding).
    copies = _trained_copies_of_tied(adapter, resolver, replacements)
    if copies:
        resolver.untie()
        config_updates.update(_untie_updates(config))

    # Full-tensor replacements come first: PEFT loads them into the base before any delta is merged on top.
    resized: dict[str, tuple[int, int]] = {}  # tensor -> rows in the base, rows in the adapter
    for key, name in replacements:
        target, why = resolver.resolve(name)
        if target is None:
            problems.append(f"{key}: {why}")
            continue
        module = name.rpartition(".")[0]
        base_shape, new_shape = resolver.catalog[target].shape, adapter.tensors[key].shape
        if target in replaced_shapes and replaced_shapes[target] != new_shape:
            problems.append(
                f"{key}: shape {list(new_shape)} differs from {list(replaced_shapes[target])}, which another adapter "
                f"tensor replacing {target} has; the adapter file is inconsistent"
            )
            continue
        if new_shape != base_shape and target in quantized_weights:
            problems.append(
                f"{key}: shape {list(new_shape)} would replace the quantized weight {target} {list(base_shape)}; a "
                "quantized weight keeps its shape; merge into the unquantized base to change it"
            )
            continue
        if new_shape != base_shape:
            if len(new_shape) == 2 and len(base_shape) == 2 and new_shape[1] == base_shape[1]:
                config_updates.update(_vocab_update(config, base_shape[0], new_shape[0]))
                resized[target] = (base_shape[0], new_shape[0])
            else:
                problems.append(f"{key}: shape {list(new_shape)} does not fit {target} {list(base_shape)}")
                continue
        replaced_shapes[target] = tuple(new_shape)
        add(target, Update(kind="replace", module=module, adapter_tensors=(key,)))

    for group in groups.values():
        problems += _plan_group(group, adapter, resolver, add, shape_of, usage)

    for key, module in token_keys:
        problems += _plan_tokens(key, module, adapter, resolver, add, shape_of)

    # PEFT merges module by module in model order; on a tied tensor the embedding's own updates come before the
    # ones redirected from lm_head. Within that: full replacements, then deltas, then token rows.
    # A replacement from `base_layer.weight` is the base copy PEFT loads before merging anything, also on a tied
    # tensor, so it always comes first; among one module's replacements the base copies come before the trained one.
    for tensor_updates in updates.values():
        tensor_updates.sort(key=lambda u: merge_order(u, resolver))
    # Only the last full replacement of a tensor counts: those before it are not read (their keys change nothing).
    for target, tensor_updates in updates.items():
        last = max((i for i, u in enumerate(tensor_updates) if u.kind == "replace"), default=0)
        superseded = [k for u in tensor_updates[:last] for k in update_keys(u)]
        if superseded:
            for k in superseded:
                usage[k].remove(target)
            del tensor_updates[:last]
            resolver.decisions.append(
                f"superseded replacements: {', '.join(superseded)} would replace all of {target}, and "
                f"{tensor_updates[0].adapter_tensors[0]} replaces it after them (as PEFT loads them): only the last "
                "is merged"
            )
    for target, (old_rows, new_rows) in resized.items():
        key = next(u.adapter_tensors[0] for u in reversed(updates[target]) if u.kind == "replace")
        resolver.decisions.append(
            f"resized embedding: {target} goes from {old_rows} to {new_rows} rows (the adapter saved the resized "
            f"tensor as {key})"
        )
    if resolver.untied is not None:
        embedding, head = resolver.untied
        rows = {name: shape_of(name)[0] for name in resolver.untied}
        if rows[embedding] != rows[head]:
            short, long = sorted(resolver.untied, key=lambda n: rows[n])
            problems.append(
                f"{short}: the untied output needs it with {rows[long]} rows, as {long} has (a resized vocabulary), "
                f"but the adapter holds no {short} of that size, so the trained model's new rows are unknown; save "
                "the adapter again with save_embedding_layers=True (PEFT then stores both embedding layers)"
            )
        if embedding in quantized_weights:
            problems.append(f"{embedding} is quantized: this tool cannot untie a quantized embedding from its head")
        resolver.decisions.append(_untie_decision(embedding, head, copies, updates.get(head, [])))
    for target in updates:
        dtype = resolver.catalog[target].dtype
        if dtype not in FLOAT_DTYPES and target not in quantized_weights:
            problems.append(
                f"{target} is {dtype}: this tool merges into bf16/fp16/fp32/fp64 tensors only (a quantized base "
                "needs dequantizing first)"
            )

    contradictions = _contradictions(adapter, updates, resolver)
    if contradictions:
        raise InconsistentAdapterError(
            f"the adapter {adapter.location.uri} contradicts itself ({len(contradictions)} problem(s))",
            contradictions,
            "Fix adapter_config.json, or save the adapter again from training; nothing was written",
        )
    if problems and all(isinstance(p, _Unsupported) for p in problems):
        raise UnsupportedAdapterError(
            f"{len(problems)} adapter tensor(s) from {adapter.location.uri} are not a weight update PEFT can merge: "
            + "; ".join(problems[:8])
            + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
            + "; nothing was written"
        )
    if problems:
        hint = "Check that the adapter was trained on this base model"
        if adapter.config.base_model_name_or_path:
            hint += f" (the adapter says it was trained on {adapter.config.base_model_name_or_path!r})"
        raise AdapterMismatchError(
            f"{len(problems)} adapter tensor(s) from {adapter.location.uri} cannot be merged into the base",
            problems,
            hint + "; nothing was written",
        )
    return dict(updates), usage, config_updates


def _training_only(key: str, variants: list[tuple[str, re.Pattern[str]]]) -> tuple[str, str] | None:
    """(module, variant) of a tensor that one of the adapter's LoRA variants saves for training only."""
    for variant, pattern in variants:
        if m := pattern.match(key):
            return m["module"], variant
    return None


def _touched_quantized(
    quantized: UnsupportedBase,
    resolver: NameResolver,
    adapter: AdapterIndex,
    groups: dict[str, _Group],
    replacements: list[tuple[str, str]],
    token_keys: list[tuple[str, str]],
) -> list[UnsupportedWeight]:
    """The base's quantized weights that the adapter would change. A target is found by the usual name rules,
    among the stored tensors first (bitsandbytes keeps the codes under the weight's name), then among the names of
    the weights that packed tensors stand for (`q_proj.weight` for `q_proj.weight_packed`). A fused expert
    parameter (`experts.gate_up_proj`) touches the per-expert weights it is stored as, packed ones included."""
    packed = NameResolver({w.name: resolver.catalog[w.stored] for w in quantized.weights.values()}, resolver.config)
    names = [name for _, name in replacements] + [f"{module}.weight" for _, module in token_keys]
    for module in groups:
        plain = module
        while plain.endswith(".base_layer"):
            plain = plain[: -len(".base_layer")]
        names.append(f"{plain}.weight")
        for param in _targeted_parameters(plain, adapter.config.target_parameters or []):
            names.append(f"{plain}.{param}")
            layout = _parameter_layout(plain, param, packed)
            if layout is not None and not isinstance(layout[3], str):
                names += [name for expert in layout[3] for name in expert]
    touched: dict[str, UnsupportedWeight] = {}
    for name in names:
        target, _ = resolver.resolve(name)
        if target is None:
            target, _ = packed.resolve(name)
        if target in quantized.weights:
            touched.setdefault(target, quantized.weights[target])
    return sorted(touched.values(), key=lambda w: w.name)


_KIND_ORDER = {"replace": 0, "delta": 1, "rows": 2}


def merge_order(update: Update, resolver: NameResolver) -> tuple[bool, bool, int, int]:
    """Where an update goes among its tensor's updates (a sort key; the sort is stable): full replacements first,
    the base copies among them before the trained one; then the tensor's own updates before those redirected to it
    from a tied module; within each, deltas before token rows."""
    return (
        update.kind != "replace",
        update.module in resolver.tied_redirects,
        _KIND_ORDER[update.kind],
        _replacement_rank(update.adapter_tensors[0]) if update.kind == "replace" else 0,
    )


def _replacement_rank(key: str) -> int:
    """The order of one module's full replacements, as PEFT loads them: the base copies it saves beside an adapted
    or wrapped layer, then the duplicate of a trained copy, then the trained copy (`<module>.weight`)."""
    if ".base_layer." in key or ".original_module." in key:
        return 0
    return 1 if ".modules_to_save." in key else 2


def _trained_copies_of_tied(
    adapter: AdapterIndex, resolver: NameResolver, replacements: list[tuple[str, str]]
) -> list[str]:
    """The adapter's trained copies (modules_to_save) of an embedding or head that the checkpoint stores as one tied
    tensor: PEFT trains such a copy on its own path (the other keeps the base tensor), so the trained model's
    embedding and head differ. Not with ensure_weight_tying, where PEFT shares one copy between the two."""
    embedding = resolver.tied_embedding()
    if embedding is None or adapter.raw_config.get("ensure_weight_tying"):
        return []
    wrapped = adapter.config.modules_to_save or []
    copies = []
    for key, name in replacements:
        module = name.rpartition(".")[0]
        # PEFT wraps every module whose name ends with a modules_to_save entry.
        if _replacement_rank(key) < 2 or not any(module.endswith(entry) for entry in wrapped):
            continue
        stored, _ = resolver.stored(name)
        if stored == embedding or (stored is None and HEAD_WEIGHT.search(name)):
            copies.append(key)
    return copies


def _untie_updates(config: dict[str, Any]) -> dict[str, bool]:
    """tie_word_embeddings: false at the top of config.json and in its text_config: transformers ties weights by the
    config of each model class it builds, and a config without the key gets its class's default (often true)."""
    updates = {"tie_word_embeddings": False}
    if isinstance(config.get("text_config"), dict):
        updates["text_config.tie_word_embeddings"] = False
    return updates


def _untie_decision(embedding: str, head: str, copies: list[str], updates: list[Update]) -> str:
    replaced = [u.adapter_tensors[0] for u in updates if u.kind == "replace"]
    value = f"the adapter's {replaced[-1]}" if replaced else f"the base's {embedding}"
    if any(u.kind == "delta" for u in updates):
        value += " plus its LoRA delta"
    modules = sorted({key.rpartition(".")[0] for key in copies})
    return (
        f"untied embeddings: the checkpoint stores only {embedding}, shared with the output head, but the adapter "
        f"trained its own copy of {' and '.join(modules)} (modules_to_save), so the trained model's embedding and head "
        f"are different tensors; the output stores {head} apart ({value}) and config.json gets tie_word_embeddings: "
        "false"
    )


def _contradictions(adapter: AdapterIndex, updates: dict[str, list[Update]], resolver: NameResolver) -> list[str]:
    """Where the planned updates show the adapter disagreeing with itself: a tensor that cannot be a LoRA weight
    (integers or booleans), a config r that is not its tensors' rank, LoRA tensors on modules that target_modules
    does not name. PEFT loads an adapter by its config: it would refuse such an adapter, or drop those tensors."""
    cfg = adapter.config
    found: dict[str, None] = {}  # ordered, without repeats (a fused update is planned once per expert)
    ranks: dict[str, int] = {}
    for target, tensor_updates in updates.items():
        base_dtype = resolver.catalog[target].dtype
        for update in tensor_updates:
            keys = update_keys(update)
            if update.kind == "replace":
                dtype = adapter.tensors[keys[0]].dtype
                if dtype not in FLOAT_DTYPES and base_dtype.startswith(("F", "BF")):
                    found[
                        f"{keys[0]} is {dtype} but replaces the floating-point {target} ({base_dtype}): a trained "
                        "copy of a float weight cannot be integers; save the module's real weights"
                    ] = None
                continue
            for key in keys:
                dtype = adapter.tensors[key].dtype
                if dtype not in FLOAT_DTYPES:
                    found[
                        f"{key} is {dtype}: LoRA weights are F16, BF16, F32 or F64 (integer, boolean or FP8 values "
                        "would be merged as numbers they do not stand for); save the adapter's trained weights, not a "
                        "quantized or converted copy"
                    ] = None
            if update.kind == "delta" and update.rank is not None:
                ranks.setdefault(update.module, update.rank)
    found.update(dict.fromkeys(rank_problems(adapter, ranks)))

    # target_parameters updates (fused experts) are matched by target_parameters when planned; every other LoRA
    # module must be one that target_modules gives a layer, or one PEFT ties to a targeted embedding.
    planned = [u for us in updates.values() for u in us]
    modules = sorted(
        {_lora_module(u.adapter_tensors[0]) for u in planned if u.kind == "delta" and u.form not in PARAMETER_FORMS}
    )
    untargeted = [
        m
        for m in modules
        if cfg.targets_module(m) is False and not (cfg.ensure_weight_tying and m in resolver.tied_redirects)
    ]
    described = f"target_modules {_abridged(cfg.target_modules)}"
    if cfg.layers_to_transform not in (None, []):
        described += f" with layers_to_transform {_abridged(cfg.layers_to_transform)}"
    if cfg.exclude_modules:
        described += f" and exclude_modules {_abridged(cfg.exclude_modules)}"
    if untargeted and len(untargeted) == len(modules):
        found[
            f"{described} match none of the adapter's {len(modules)} LoRA module(s) (such as {modules[0]}): PEFT "
            "would find no layer to load them into"
        ] = None
    elif untargeted:
        more = f" (and {len(untargeted) - 4} more)" if len(untargeted) > 4 else ""
        found[
            f"{described} do not match {len(untargeted)} of the adapter's {len(modules)} LoRA module(s): "
            f"{', '.join(untargeted[:4])}{more}; PEFT would not load their tensors"
        ] = None
    return list(found)


def _lora_module(key: str) -> str:
    """The module a LoRA tensor belongs to, as target_modules names it: a LoRA PEFT puts on a layer inside a
    targeted one (the out_proj of an nn.MultiheadAttention, under its `base_layer`) belongs to the targeted one."""
    module = re.split(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)(?:\.|$)", key)[0]
    return module.split(".base_layer.")[0]


def _abridged(value: Any) -> str:
    """A config value for a message: long lists cut to their first entries."""
    if isinstance(value, list | tuple | set) and len(value) > 6:
        return repr(sorted(map(str, value))[:6])[:-1] + f", ... ({len(value)} in all)]"
    return repr(value)


def _vocab_update(config: dict[str, Any], old_rows: int, new_rows: int) -> dict[str, int]:
    if config.get("vocab_size") == old_rows:
        return {"vocab_size": new_rows}
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("vocab_size") == old_rows:
        return {"text_config.vocab_size": new_rows}
    return {}


def _plan_group(
    group: _Group, adapter: AdapterIndex, resolver: NameResolver, add: Any, shape_of: Any, usage: dict[str, list[str]]
) -> list[str]:
    module = group.module
    if group.A is None or group.B is None:
        present = [k for k in (group.A, group.B, group.B_bias, group.magnitude) if k]
        return [f"{module}: has {present} but not both LoRA A and B; the adapter file is incomplete"]
    A, B = adapter.tensors[group.A], adapter.tensors[group.B]
    if len(A.shape) < 2 or len(B.shape) < 2:
        return [f"{group.A}: LoRA A {list(A.shape)} / B {list(B.shape)} are not matrices; the adapter file is damaged"]
    cfg = adapter.config
    attention = _MHA_OUT_PROJ.match(module)
    if attention and resolver.resolve(f"{attention['attention']}.in_proj_weight")[0] is not None:
        return _plan_attention(group, attention["attention"], "out_proj", adapter, resolver, add, shape_of, usage)

    # Parameters targeted with `target_parameters` are nested as module(.base_layer)*; PEFT strips the nesting
    # when it matches names.
    depth = 0
    plain = module
    while plain.endswith(".base_layer"):
        plain, depth = plain[: -len(".base_layer")], depth + 1
    weight_name = f"{plain}.weight"
    target, why = resolver.resolve(weight_name)
    parameters = _targeted_parameters(plain, cfg.target_parameters or [])
    # A bare target_parameters entry ("down_proj") also ends an ordinary Linear's name; a module whose weight
    # exists is a module target.
    if parameters and target is None:
        return _plan_parameter(group, plain, parameters, A, B, adapter, resolver, add)
    if target is None and resolver.resolve(f"{plain}.in_proj_weight")[0] is not None:
        return _plan_attention(group, plain, "in_proj", adapter, resolver, add, shape_of, usage)
    if target is None:
        return [f"{group.A}: {why}"]
    if cfg.use_dora != bool(group.magnitude):
        return [
            f"{group.A}: adapter_config.json says use_dora={cfg.use_dora} but {plain} "
            f"{'has no' if cfg.use_dora else 'has a'} DoRA magnitude vector; the adapter is inconsistent "
            "(merging it either way would silently change the result)"
        ]
    base_shape = shape_of(target)
    groups = _conv_groups(A.shape, B.shape, base_shape)
    if groups > 1:
        return [
            _Unsupported(
                f"{group.A}: {target} is a grouped convolution (groups = {groups}): PEFT cannot merge a LoRA on a "
                "conv layer with groups > 1 either (its merge raises NotImplementedError); use the adapter unmerged, "
                f"or train it without targeting {plain}"
            )
        ]
    rank = A.shape[0]
    alpha, scale = adapter_scale(adapter, plain, rank)
    keys = (group.A, group.B)
    problems = []
    expanded = _block_diagonal(group, plain, A, B, base_shape, cfg, target)
    if isinstance(expanded, str):
        return [expanded]
    a_shape, b_shape, block_diagonal = expanded
    form, expected = None, None
    if len(A.shape) < 2 or len(B.shape) < 2 or b_shape[1] != rank:
        pass
    elif group.embedding:
        form, expected = "embedding", (A.shape[1], B.shape[0])
    elif len(base_shape) >= 3:
        form = "conv"
        expected = (B.shape[0], A.shape[1], *A.shape[2:]) if len(A.shape) == len(base_shape) else None
        if B.shape[2:] and any(d != 1 for d in B.shape[2:]):
            expected = None
    else:
        form, problem = _linear_orientation(plain, (b_shape[0], a_shape[1]), tuple(base_shape), cfg, resolver)
        if problem:
            return [f"{group.A}: {problem}"]
        expected = tuple(base_shape) if form else None
    if form is None or expected != tuple(base_shape):
        problems.append(
            f"{group.A}: LoRA A {list(A.shape)} / B {list(B.shape)} give a delta that does not fit {target} "
            f"{list(base_shape)}"
        )
        return problems
    if group.magnitude:
        mag = adapter.tensors[group.magnitude].shape
        want = {"embedding": base_shape[1], "linear_t": base_shape[1]}.get(form, base_shape[0])
        if math.prod(mag) != want or max(mag, default=0) != want:  # conv DoRA stores (1, out, 1, 1)
            problems.append(f"{group.magnitude}: DoRA magnitude {list(mag)} does not fit {target} {list(base_shape)}")
            return problems
    add(
        target,
        Update(
            kind="delta",
            form=form,
            module=plain,
            adapter_tensors=keys,
            rank=rank,
            alpha=alpha,
            scale=scale,
            magnitude=group.magnitude,
            block_diagonal=block_diagonal,
            nblocks=cfg.use_bdlora.nblocks if block_diagonal and cfg.use_bdlora else None,
        ),
    )
    if group.B_bias:
        bias, why = resolver.resolve(f"{plain}.bias")
        if bias is None:
            problems.append(
                f"{group.B_bias}: lora_bias is set but the base has no bias for {plain} ({why}); PEFT cannot merge "
                "this either"
            )
        elif shape_of(bias) != adapter.tensors[group.B_bias].shape:
            problems.append(f"{group.B_bias}: shape does not fit {bias}")
        else:
            add(
                bias,
                Update(
                    kind="delta",
                    form="bias",
                    module=plain,
                    adapter_tensors=(group.B_bias,),
                    rank=rank,
                    alpha=alpha,
                    scale=scale,
                ),
            )
    return problems


def _conv_groups(a: tuple[int, ...], b: tuple[int, ...], base: tuple[int, ...]) -> int:
    """The `groups` of a conv layer that a LoRA's factors imply (1 for anything else): PEFT's lora_A sees every
    input channel (r, in, k..), its lora_B is grouped (out, r/groups, 1..), the base weight is (out, in/groups, k..)."""
    if len(base) < 3 or len(a) != len(base) or len(b) != len(base) or not base[1] or a[1] % base[1]:
        return 1
    groups = a[1] // base[1]
    return groups if b[0] == base[0] and b[1] * groups == a[0] else 1


def _block_diagonal(
    group: _Group,
    module: str,
    A: AdapterTensor,
    B: AdapterTensor,
    base_shape: tuple[int, ...],
    cfg: Any,
    target: str,
) -> tuple[tuple[int, ...], tuple[int, ...], Literal["A", "B"] | None] | str:
    """(A's shape, B's shape, the block-diagonal factor) as the merge multiplies them, or the problem, for BD-LoRA
    (`use_bdlora`): PEFT's BlockDiagonalLinear stores an (out, in) factor as its nblocks diagonal blocks side by
    side, (out, in / nblocks), and its merge expands it with `torch.block_diag(*weight.chunk(nblocks))`."""
    side = cfg.use_bdlora.side(module) if cfg.use_bdlora else None
    if side is None:
        return tuple(A.shape), tuple(B.shape), None
    if side == "both":
        return _Unsupported(
            f"{group.A}: use_bdlora: {module} matches both target_modules_bd_a and target_modules_bd_b (PEFT refuses "
            "to build such a layer)"
        )
    if group.embedding or len(base_shape) != 2 or len(A.shape) != 2 or len(B.shape) != 2:
        return _Unsupported(f"{group.A}: BD-LoRA (use_bdlora) is defined for Linear layers, not {target}")
    blocks = cfg.use_bdlora.nblocks
    factor = A if side == "A" else B
    if factor.shape[0] % blocks:
        return f"{group.A}: LoRA {side} {list(factor.shape)} does not split into use_bdlora's {blocks} diagonal blocks"
    if side == "A":
        return (A.shape[0], A.shape[1] * blocks), tuple(B.shape), "A"
    return tuple(A.shape), (B.shape[0], B.shape[1] * blocks), "B"


def _plan_attention(
    group: _Group,
    attention: str,
    part: Literal["in_proj", "out_proj"],
    adapter: AdapterIndex,
    resolver: NameResolver,
    add: Any,
    shape_of: Any,
    usage: dict[str, list[str]],
) -> list[str]:
    """A LoRA on an nn.MultiheadAttention, as PEFT 0.21's `lora.MultiheadAttention` merges it.

    PEFT wraps the module (its LoRA updates `in_proj_weight`) and its out_proj, a LoRA Linear saved under
    `<attention>.base_layer.out_proj`; both get the attention module's r and alpha. Its merge adds the in_proj delta
    to `in_proj_weight` and the out_proj delta to `out_proj.weight`, each rounded to the weight's dtype and added in
    it, then merges the out_proj's own LoRA layer, which adds the out_proj delta a second time, as a Linear does (and
    lora_bias's bias once). Its forward merges and unmerges the same way, so the trained model saw that weight. The
    in_proj's lora_B.bias is used by neither."""
    A, B = adapter.tensors[group.A], adapter.tensors[group.B]
    name = f"{attention}.in_proj_weight" if part == "in_proj" else f"{attention}.out_proj.weight"
    target, why = resolver.resolve(name)
    if target is None:
        return [f"{group.A}: {why}"]
    if group.magnitude or adapter.config.use_dora:
        return [_Unsupported(f"{group.A}: PEFT has no DoRA for nn.MultiheadAttention ({attention}), nor a merge of it")]
    if adapter.config.use_bdlora:
        return [_Unsupported(f"{group.A}: BD-LoRA (use_bdlora) is defined for Linear layers, not {attention}")]
    base_shape = tuple(shape_of(target))
    rank = A.shape[0]
    if len(A.shape) != 2 or len(B.shape) != 2 or B.shape[1] != rank or (B.shape[0], A.shape[1]) != base_shape:
        return [
            f"{group.A}: LoRA A {list(A.shape)} / B {list(B.shape)} give a delta that does not fit {target} "
            f"{list(base_shape)}"
        ]
    alpha, scale = adapter_scale(adapter, attention, rank)
    dtype = resolver.catalog[target].dtype
    common: dict[str, Any] = dict(
        kind="delta", form="linear", adapter_tensors=(group.A, group.B), rank=rank, alpha=alpha, scale=scale
    )
    rounded_to = dtype if dtype in ("F16", "BF16") else None
    add(target, Update(module=f"{attention}.{part}", rounded_to=rounded_to, **common))
    if part == "out_proj":
        add(target, Update(module=group.module, **common))
    decision = (
        f"nn.MultiheadAttention {attention}: merged as PEFT 0.21 merges it: the in_proj delta into in_proj_weight, "
        "the out_proj delta into out_proj.weight twice (by MultiheadAttention.merge, then by out_proj's own LoRA "
        "merge; PEFT's forward applies it twice as well)"
    )
    if decision not in resolver.decisions:
        resolver.decisions.append(decision)
    if not group.B_bias:
        return []
    if part == "in_proj":
        usage[group.B_bias] = []
        resolver.decisions.append(
            f"{group.B_bias}: not merged: PEFT's nn.MultiheadAttention adds no in_proj LoRA bias (neither its merge "
            "nor its forward uses it)"
        )
        return []
    bias, why = resolver.resolve(f"{attention}.out_proj.bias")
    if bias is None:
        return [f"{group.B_bias}: lora_bias is set but the base has no bias for {attention}.out_proj ({why})"]
    if shape_of(bias) != adapter.tensors[group.B_bias].shape:
        return [f"{group.B_bias}: shape does not fit {bias}"]
    add(bias, Update(**{**common, "form": "bias", "adapter_tensors": (group.B_bias,)}, module=group.module))
    return []


def _linear_orientation(
    module: str, delta_shape: tuple[int, int], base_shape: tuple[int, ...], cfg: Any, resolver: NameResolver
) -> tuple[str | None, str | None]:
    """("linear" | "linear_t" | None, problem): is the weight stored (out, in) like nn.Linear or (in, out) like
    GPT-2's Conv1D? PEFT decides per module type (it forces fan_in_fan_out on for Conv1D, off for Linear) and
    saves whichever value it set last, so the config's flag cannot be trusted for every module."""
    out_features, in_features = delta_shape
    as_linear = base_shape == (out_features, in_features)
    as_conv1d = base_shape == (in_features, out_features)
    if as_linear and as_conv1d:  # square: the shape cannot tell
        conv1d = resolver.model_type in CONV1D_MODEL_TYPES and module.rpartition(".")[2] in CONV1D_MODULES
        if cfg.fan_in_fan_out and not conv1d and resolver.model_type not in LINEAR_ONLY_HINT:
            return None, (
                f"cannot tell whether {module} is stored (in, out) like a Conv1D or (out, in) like nn.Linear: "
                f"fan_in_fan_out is set and model_type {resolver.model_type!r} is not one this tool knows"
            )
        return ("linear_t" if conv1d else "linear"), None
    if as_linear:
        return "linear", None
    if as_conv1d:
        return "linear_t", None
    return None, None


def _targeted_parameters(module: str, target_parameters: list[str]) -> list[str]:
    names = []
    for target in sorted(set(target_parameters)):
        param = target.rpartition(".")[2]
        full = f"{module}.{param}"
        if full == target or full.endswith("." + target):
            names.append(param)
    return names


def _plan_parameter(
    group: _Group,
    module: str,
    parameters: list[str],
    A: AdapterTensor,
    B: AdapterTensor,
    adapter: AdapterIndex,
    resolver: NameResolver,
    add: Any,
) -> list[str]:
    """A LoRA on a fused 3-D expert parameter, written either to the fused tensor or to per-expert tensors."""
    layouts = {p: _parameter_layout(module, p, resolver) for p in parameters}
    candidates = []
    for param, found in layouts.items():
        if found is None:
            continue
        num_experts, d1, d2, targets = found
        if A.shape[0] % num_experts or not {(B.shape[0], A.shape[1]), (A.shape[1], B.shape[0])} & {(d1, d2)}:
            continue
        if not isinstance(targets, str) and (d1, d2) != (B.shape[0], A.shape[1]):
            continue  # per-expert Linear weights are always (out, in)
        candidates.append(param)
    if len(candidates) != 1:
        missing = [p for p, f in layouts.items() if f is None]
        why = (
            f"no tensor for {[f'{module}.{p}' for p in missing]} in the base"
            if missing and not candidates
            else f"A {list(A.shape)} / B {list(B.shape)} fit {len(candidates)} of the targeted parameters {parameters}"
        )
        return [f"{group.A}: {why}"]
    param = candidates[0]
    num_experts, d1, d2, targets = layouts[param]
    rank = A.shape[0] // num_experts
    alpha, scale = adapter_scale(adapter, f"{module}.{param}", rank)
    keys = (group.A, group.B)
    common = dict(
        module=f"{module}.{param}", adapter_tensors=keys, rank=rank, alpha=alpha, scale=scale, num_experts=num_experts
    )
    if isinstance(targets, str):
        # (E, out, in) unless the architecture stores (E, in, out) (PEFT follows the module's `is_transposed`);
        # only a square expert weight leaves the shapes unable to tell.
        as_eoi = (d1, d2) == (B.shape[0], A.shape[1])
        as_eio = (d1, d2) == (A.shape[1], B.shape[0])
        transposed = resolver.model_type in TRANSPOSED_EXPERT_MODEL_TYPES
        layout_name = "eio" if as_eio and (transposed or not as_eoi) else "eoi"
        add(targets, Update(kind="delta", form="experts", experts_layout=layout_name, **common))
        return []
    for expert, parts in enumerate(targets):
        start = 0
        for name in parts:
            rows = resolver.catalog[name].shape[0]
            add(name, Update(kind="delta", form="expert", expert=expert, rows=(start, start + rows), **common))
            start += rows
    return []


def _parameter_layout(
    module: str, param: str, resolver: NameResolver
) -> tuple[int, int, int, str | list[list[str]]] | None:
    """(experts, out, in, fused tensor name or per-expert tensor names) for a fused expert parameter."""
    fused, _ = resolver.resolve(f"{module}.{param}")
    if fused is not None:
        shape = resolver.catalog[fused].shape
        if len(shape) != 3 or shape[0] == 0:
            return None
        # Both storage orders exist ((E, out, in) and (E, in, out)); report (out, in) as (E, d1, d2) and let the
        # adapter's shapes pick: the caller checks A's in-dim and B's out-dim against them.
        return shape[0], shape[1], shape[2], fused
    prefixes = [module] + [p.rstrip(".") for p in rewrites(module + ".")]
    for prefix in prefixes:
        for parts in EXPERT_SPLITS.get(param, ((param,),)):
            if f"{prefix}.0.{parts[0]}.weight" not in resolver.catalog:
                continue
            experts: list[list[str]] = []
            while all(f"{prefix}.{len(experts)}.{p}.weight" in resolver.catalog for p in parts):
                experts.append([f"{prefix}.{len(experts)}.{p}.weight" for p in parts])
            shapes = [[resolver.catalog[n].shape for n in names] for names in experts]
            in_features = shapes[0][0][1]
            out_features = sum(s[0] for s in shapes[0])
            if any(len(s) != 2 or s[1] != in_features for row in shapes for s in row) or any(
                [s[0] for s in row] != [s[0] for s in shapes[0]] for row in shapes
            ):
                return None
            return len(experts), out_features, in_features, experts
    return None


def _plan_tokens(
    key: str, module: str, adapter: AdapterIndex, resolver: NameResolver, add: Any, shape_of: Any
) -> list[str]:
    indices_cfg = adapter.config.trainable_token_indices
    if isinstance(indices_cfg, dict):
        matching = [v for k, v in indices_cfg.items() if module == k or module.endswith("." + k)]
        indices = matching[0] if len(matching) == 1 else None
    else:
        indices = indices_cfg
    if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
        return [f"{key}: trainable_token_indices in the adapter config gives no index list for {module}"]
    target, why = resolver.resolve(f"{module}.weight")
    if target is None:
        return [f"{key}: {why}"]
    rows, cols = shape_of(target)[:2]
    delta = adapter.tensors[key].shape
    if tuple(delta) != (len(indices), cols) or any(i < 0 or i >= rows for i in indices):
        return [f"{key}: {list(delta)} is not {len(indices)} token rows that fit {target} [{rows}, {cols}]"]
    add(target, Update(kind="rows", module=module, adapter_tensors=(key,), indices=tuple(indices)))
    return []


def untied_head(
    header: ShardHeader, embedding: str, head: str, updates: dict[str, list[Update]], adapters: AdapterSet
) -> PlannedTensor:
    """The output head of an untied output: a tensor the base does not store, in the embedding's shard after the
    shard's own tensors, starting from the embedding's base bytes."""
    entry = header.by_name()[embedding]
    head_updates = tuple(updates.get(head, ()))
    return PlannedTensor(
        base=entry.model_copy(update={"name": head}),
        shape=replaced_shape(head_updates, adapters) or entry.shape,
        updates=head_updates,
        source=TensorRef(file=header.file, data_start=header.data_start, entry=entry),
    )


def replaced_shape(updates: tuple[Update, ...], adapters: AdapterSet) -> tuple[int, ...] | None:
    for update in reversed(updates):
        if update.kind == "replace":
            return tuple(adapters.tensors[update.adapter_tensors[0]].shape)
    return None
