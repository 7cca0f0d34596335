"""Planning the updates of a set of adapters: each adapter planned as it would be alone, then their updates put
together on the tensors they share.

The rule, whatever the order the adapters are given in: a tensor starts from its full replacement (modules_to_save)
if an adapter has one, else from the base; every adapter's LoRA delta is added, multiplied by that adapter's weight,
and rounded to the output dtype once; trainable token rows are set last. What is not a delta cannot be weighted or
summed, so:
- a full replacement or token rows come only from an adapter at weight 1, and two adapters that replace the same
  tensor, or set the same token row, must hold the same values (then they count once);
- a DoRA adapter is merged alone at weight 1: its magnitude rescales the whole weight to the norm it learned for
  W + its own ΔW, which no other delta or weight preserves.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from ..adapters import AdapterSet
from ..errors import InconsistentAdapterError, UnsupportedAdapterError
from ..formats.unsupported import UnsupportedBase
from ..update import Update, update_keys
from .names import NameResolver
from .updates import _MAGNITUDE_KEY, _replacement_rank, _untie_updates, merge_order, plan_updates

UNTIED = "untied embeddings:"  # how the decision that gives the output a head of its own starts

PlannedUpdates = tuple[dict[str, list[Update]], dict[str, list[str]], dict[str, int | bool]]


def plan_adapter_set(
    adapters: AdapterSet,
    make_resolver: Callable[[], NameResolver],
    config: dict[str, Any],
    quantized_weights: set[str],
    unsupported: UnsupportedBase | None = None,
) -> tuple[PlannedUpdates, NameResolver]:
    """(updates by base tensor, adapter key -> tensors it changes, config.json updates), with qualified keys, and
    the resolver whose decisions and untied head the plan keeps."""
    if adapters.plain:
        resolver = make_resolver()
        return plan_updates(adapters.first, resolver, config, quantized_weights, unsupported), resolver
    _refuse_dora(adapters)
    resolver = make_resolver()
    planned = _plan_each(adapters, resolver, config, quantized_weights, unsupported)
    untied_by = next((i for i, (_, untied) in enumerate(planned) if untied), None)
    if untied_by is not None and untied_by > 0:
        # An adapter after the first unties the head: the ones before it were planned with lm_head redirected to the
        # tied embedding. Plan them all again against the untied output, so every head update lands on the head;
        # the decision that says why is the one that adapter's own planning made.
        why = [d for d in resolver.decisions if d.startswith(f"{adapters.describe(untied_by)}: {UNTIED}")]
        resolver = make_resolver()
        resolver.untie()
        planned = _plan_each(adapters, resolver, config, quantized_weights, unsupported)
        resolver.decisions += why
    updates: dict[str, list[Update]] = defaultdict(list)
    usage: dict[str, list[str]] = {}
    config_updates: dict[str, int | bool] = _untie_updates(config) if resolver.untied is not None else {}
    conflicts: list[str] = []
    for position, ((member_updates, member_usage, member_config), _) in enumerate(planned):
        member = adapters.members[position]
        for target, tensor_updates in member_updates.items():
            for update in tensor_updates:
                if update.kind != "delta" and member.weight != 1 and not _base_copy(update):
                    raise _unweighable(adapters, position, update, target)
                updates[target].append(_qualified(adapters, position, update))
        for key, targets in member_usage.items():
            usage[adapters.qualify(position, key)] = list(targets)
        for key, value in member_config.items():
            if key in config_updates and config_updates[key] != value:
                conflicts.append(
                    f"{adapters.describe(position)} sets config.json {key} to {value!r}, an adapter before it to "
                    f"{config_updates[key]!r}"
                )
            config_updates[key] = value
    for target, tensor_updates in updates.items():
        tensor_updates.sort(key=lambda u: merge_order(u, resolver))
        owners = _same_replacements(adapters, target, tensor_updates, usage, resolver, conflicts)
        conflicts += _same_token_rows(adapters, target, tensor_updates)
        conflicts += _values_overridden(adapters, target, tensor_updates, owners)
    if conflicts:
        raise InconsistentAdapterError(
            f"the adapters {adapters.label} disagree on {len(conflicts)} tensor(s) that cannot be summed",
            conflicts,
            "Merge them in separate passes, in the order you mean (the second pass's --base is the first's output), "
            "or drop the conflicting modules_to_save or trainable tokens from one adapter; nothing was written",
        )
    resolver.decisions.insert(0, _set_decision(adapters))
    return (dict(updates), usage, config_updates), resolver


def _plan_each(
    adapters: AdapterSet,
    resolver: NameResolver,
    config: dict[str, Any],
    quantized_weights: set[str],
    unsupported: UnsupportedBase | None,
) -> list[tuple[PlannedUpdates, bool]]:
    """Each adapter's own plan against the shared resolver, and whether planning it untied the head; the decisions
    it adds name the adapter."""
    planned = []
    for position, member in enumerate(adapters.members):
        was_untied = resolver.untied is not None
        before = list(resolver.decisions)
        result = plan_updates(member.index, resolver, config, quantized_weights, unsupported)
        # Only the adapter that unties the head says why (the others find it untied already).
        added = [d for d in resolver.decisions if d not in before and not (was_untied and d.startswith(UNTIED))]
        resolver.decisions[:] = before + [f"{adapters.describe(position)}: {d}" for d in added]
        planned.append((result, not was_untied and resolver.untied is not None))
    return planned


def _qualified(adapters: AdapterSet, position: int, update: Update) -> Update:
    """The update with its adapter's qualified keys and, for a delta, its adapter's weight in the scale."""
    weight = adapters.members[position].weight
    changes: dict[str, Any] = {
        "adapter_tensors": tuple(adapters.qualify(position, k) for k in update.adapter_tensors),
        "magnitude": adapters.qualify(position, update.magnitude) if update.magnitude else None,
    }
    if update.kind == "delta":
        changes["scale"] = update.scale * weight
    return update.model_copy(update=changes)


def _refuse_dora(adapters: AdapterSet) -> None:
    for position, member in enumerate(adapters.members):
        dora = member.index.config.use_dora or any(_MAGNITUDE_KEY.match(k) for k in member.index.tensors)
        if dora:
            alone = "with other adapters" if adapters.several else f"at weight {member.weight:g}"
            raise UnsupportedAdapterError(
                f"{adapters.describe(position)} is a DoRA adapter (use_dora), which this tool merges only alone at "
                f"weight 1, not {alone}: DoRA rescales each weight to the norm it learned for the base plus its own "
                "ΔW, so it neither adds to other adapters' deltas nor scales by a weight. Merge it in a pass of its "
                f"own (--adapter {member.index.location.uri}), and the others in another pass whose --base is that "
                "pass's output (or the other way round, as your training did); nothing was written"
            )


def _unweighable(adapters: AdapterSet, position: int, update: Update, target: str) -> UnsupportedAdapterError:
    what = "trainable token rows" if update.kind == "rows" else "a full copy (modules_to_save, or a saved base layer)"
    return UnsupportedAdapterError(
        f"{adapters.describe(position)}: {update.adapter_tensors[0]} is {what} of {target}, trained values rather "
        "than a delta, which a weight other than 1 cannot scale; give this adapter weight 1, or save it without "
        "modules_to_save / trainable tokens; nothing was written"
    )


def _same_replacements(
    adapters: AdapterSet,
    target: str,
    updates: list[Update],
    usage: dict[str, list[str]],
    resolver: NameResolver,
    conflicts: list[str],
) -> set[int]:
    """Two adapters' full replacements of one tensor: the same values count once (the later adapter's keys change
    nothing, as a superseded replacement), different ones are a conflict. Returns the adapters that hold the
    tensor's replacement (none: it starts from the base)."""
    replacements = [u for u in updates if u.kind == "replace"]
    if not replacements:
        return set()
    first = replacements[0]
    owners = {adapters.position_of(first.adapter_tensors[0])}
    if len(replacements) < 2:
        return owners
    kept = adapters.read(first.adapter_tensors[0])
    for other in replacements[1:]:
        key = other.adapter_tensors[0]
        value = adapters.read(key)
        if value.shape != kept.shape or not torch.equal(value.to(torch.float64), kept.to(torch.float64)):
            conflicts.append(
                f"{target}: {adapters.describe(adapters.position_of(first.adapter_tensors[0]))} and "
                f"{adapters.describe(adapters.position_of(key))} both replace it (modules_to_save) with different "
                f"values ({first.adapter_tensors[0]}, {key})"
            )
            continue
        updates.remove(other)
        owners.add(adapters.position_of(key))
        for k in update_keys(other):
            usage[k].remove(target)
        resolver.decisions.append(
            f"{target}: {key} is the same copy as {first.adapter_tensors[0]} (modules_to_save of both adapters): "
            "applied once"
        )
    return owners


def _values_overridden(adapters: AdapterSet, target: str, updates: list[Update], owners: set[int]) -> list[str]:
    """A tensor one adapter replaces (or sets token rows of) and another changes: the copy was trained from the
    base, not from the other adapter's result, and token rows set last would discard the other's change to them;
    no order of the two is the obvious one, so the merge does not pick one."""
    conflicts = []
    if owners:
        others = sorted({adapters.position_of(u.adapter_tensors[0]) for u in updates} - owners)
        if others:
            conflicts.append(
                f"{target}: {', '.join(adapters.describe(p) for p in sorted(owners))} replace(s) it with a full copy "
                f"(modules_to_save), which {', '.join(adapters.describe(p) for p in others)} also change(s)"
            )
    row_setters = {adapters.position_of(u.adapter_tensors[0]) for u in updates if u.kind == "rows"}
    for setter in sorted(row_setters):
        changers = {adapters.position_of(u.adapter_tensors[0]) for u in updates if u.kind != "rows"}
        others = sorted(changers - {setter} - owners)
        if others and not owners:
            conflicts.append(
                f"{target}: {adapters.describe(setter)} sets trainable token rows of it, which "
                f"{', '.join(adapters.describe(p) for p in others)} also change(s)"
            )
    return conflicts


def _base_copy(update: Update) -> bool:
    """A replacement that is PEFT's saved copy of the base layer (`base_layer.weight`): where the merge starts
    from, not a trained value, so any weight applies to the deltas on top of it."""
    return update.kind == "replace" and _replacement_rank(update.adapter_tensors[0]) == 0


def _same_token_rows(adapters: AdapterSet, target: str, updates: list[Update]) -> list[str]:
    """Trainable token rows of one tensor from two adapters: rows both set must hold the same values."""
    rows = [u for u in updates if u.kind == "rows"]
    conflicts = []
    for i, one in enumerate(rows):
        for other in rows[i + 1 :]:
            if adapters.position_of(one.adapter_tensors[0]) == adapters.position_of(other.adapter_tensors[0]):
                continue
            common = sorted(set(one.indices or ()) & set(other.indices or ()))
            if not common:
                continue
            a, b = adapters.read(one.adapter_tensors[0]), adapters.read(other.adapter_tensors[0])
            at_a = {index: n for n, index in enumerate(one.indices or ())}
            at_b = {index: n for n, index in enumerate(other.indices or ())}
            differ = [t for t in common if not torch.equal(a[at_a[t]].to(b.dtype), b[at_b[t]])]
            if differ:
                conflicts.append(
                    f"{target}: {adapters.describe(adapters.position_of(one.adapter_tensors[0]))} and "
                    f"{adapters.describe(adapters.position_of(other.adapter_tensors[0]))} set token row(s) "
                    f"{differ[:8]} (trainable tokens) to different values"
                )
    return conflicts


def _set_decision(adapters: AdapterSet) -> str:
    terms = "".join(
        f" {'-' if m.weight < 0 else '+'} {'' if abs(m.weight) == 1 else f'{abs(m.weight):g}·'}ΔW{i + 1}"
        for i, m in enumerate(adapters.members)
    )
    named = "; ".join(f"{i + 1}: {m.index.location.uri} (weight {m.weight:g})" for i, m in enumerate(adapters.members))
    return (
        f"{len(adapters.members)} adapter(s) in one pass: W{terms}, each ΔW with its own adapter's scaling, "
        f"rounded to the output dtype once; adapter tensors are named <n>:<key> ({named})"
        if adapters.several
        else f"one adapter at weight {adapters.members[0].weight:g}: W{terms} ({adapters.first.location.uri})"
    )
