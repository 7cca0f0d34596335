"""Planning a merge: base discovery, the quantized format, name resolution and update planning, put together into
the one `MergePlan` every later step works from. Planning reads only headers, the index, config.json and the
adapter's config and header."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..adapter import load_adapter_index
from ..adapter_spec import AdapterSpec
from ..adapters import AdapterSet, WeightedAdapter
from ..credentials import StorageCredentials
from ..errors import LoraMergeError, UnsupportedBaseError
from ..fingerprint import merge_fingerprint
from ..formats.bitsandbytes import AsQuantized
from ..formats.unsupported import find_quantized
from ..storage import Location, refuse_output_inside_inputs
from .discovery import base_layout, check_index, is_extra_file, parse_config, read_headers
from .model import MergeJob, MergePlan, PlannedTensor, ShardPlan
from .names import NameResolver
from .quantized import (
    OutputDtype,
    as_quantized_weights,
    find_quantized_weights,
    mode_decision,
    output_mode,
    qlora_hint,
    quantization_config_keys,
    quantized_roles,
    resolver_entries,
    round_trip_decision,
)
from .several import plan_adapter_set
from .updates import replaced_shape, untied_head

Adapters = str | Location | AdapterSpec | Sequence[str | Location | AdapterSpec]


def make_plan(
    base: str | Location,
    adapter: Adapters,
    output: str | Location,
    *,
    device: str = "cpu",
    storage_options: dict[str, Any] | None = None,
    credentials: StorageCredentials | None = None,
    output_dtype: OutputDtype = "auto",
    min_delta_cosine: float | None = None,
    as_quantized: AsQuantized | None = None,
) -> MergePlan:
    """Plan a merge. `output_dtype` matters only for a quantized base (block-FP8, INT4, MXFP4): `auto` (= `bf16`
    there) writes every quantized weight dequantized to bf16; `keep` (`fp8`, its older name) keeps untouched
    quantized weights as they are and re-quantizes touched ones in the base's format. `as_quantized` (a 16-bit
    base only) puts every Linear weight through bitsandbytes' 4-bit round trip before the delta: the weights a QLoRA
    adapter was trained against."""

    def located(where: str | Location, what: str) -> Location:
        if isinstance(where, Location):
            return where
        return Location.parse(where, storage_options, credentials=credentials, what=what)

    base_loc, output_loc = located(base, "--base"), located(output, "--output")
    specs = _adapter_specs(adapter)
    adapter_locs = [located(where, "--adapter") for where, _ in specs]
    for where in adapter_locs:
        refuse_output_inside_inputs(output_loc, base=base_loc, adapter=where)
    _refuse_repeats(adapter_locs, specs)

    files, weight_map, index_metadata, has_index = base_layout(base_loc)
    headers, versions = read_headers(base_loc, files)
    check_index(base_loc, headers, weight_map)
    config_bytes = base_loc.read_bytes("config.json") if base_loc.exists("config.json") else None
    config = parse_config(base_loc, config_bytes)
    adapters = AdapterSet(
        members=tuple(
            WeightedAdapter(index=load_adapter_index(where), weight=weight)
            for where, (_, weight) in zip(adapter_locs, specs, strict=True)
        )
    )

    catalog = {t.name: t for h in headers for t in h.tensors}
    fmt, weights = find_quantized_weights(
        base_loc.uri, config, headers, lambda ref: base_loc.read_bytes(ref.file, *ref.span)
    )
    mode = output_mode(output_dtype, fmt, base_loc.uri)
    if as_quantized is not None:
        weights = as_quantized_weights(base_loc.uri, fmt, headers, config, as_quantized)
    # An adapter targets a quantized weight by its own name: resolution sees it in place of its stored parts.
    parts = {name for w in weights.values() for name in w.stored_names}
    visible = {n: e for n, e in catalog.items() if n not in parts}
    resolver_catalog = {**visible, **resolver_entries(weights)}
    unsupported = find_quantized(base_loc.uri, config, catalog, supported=parts)
    if as_quantized is not None and unsupported is not None:
        raise UnsupportedBaseError(
            f"--as-quantized simulates a 4-bit load of a 16-bit base, and {base_loc.uri} is quantized already "
            f"({next(iter(unsupported.weights.values())).scheme}); leave --as-quantized off"
        )
    if fmt is not None and mode == "bf16" and unsupported is not None:
        # bf16 drops quantization_config, which the weights left quantized would still need to be read at all.
        first = min(unsupported.weights.values(), key=lambda w: w.name)
        raise UnsupportedBaseError(
            f"--output-dtype bf16 dequantizes {base_loc.uri}'s {fmt.label} weights and removes quantization_config, "
            f"but {len(unsupported.weights)} other quantized weight(s) ({first.name}: {first.scheme}"
            f"{f', {unsupported.why}' if unsupported.why else ''}) cannot be dequantized by this tool and would lose "
            "the config that describes them; use --output-dtype keep"
        )
    (updates, usage, config_updates), resolver = plan_adapter_set(
        adapters, lambda: NameResolver(resolver_catalog, config), config, set(weights), unsupported
    )
    # a round-tripped weight is written like a dequantized one (in its own dtype), whatever the mode
    roles = quantized_roles(weights, updates, "bf16" if as_quantized is not None else mode)
    config_removals = quantization_config_keys(config) if fmt is not None and mode == "bf16" else ()
    if fmt is not None:
        resolver.decisions.append(mode_decision(fmt, weights, updates, mode))
    if as_quantized is not None:
        resolver.decisions.append(round_trip_decision(as_quantized, weights, updates))
    for member in adapters.members:
        hint = qlora_hint(member.index.raw_config, fmt, as_quantized)
        if hint is not None and hint not in resolver.decisions:
            resolver.decisions.append(hint)

    shards = []
    for header in headers:
        planned = []
        for entry in header.tensors:
            role = roles.get(entry.name)
            if role is None:
                tensor_updates = tuple(updates.get(entry.name, ()))
                shape = replaced_shape(tensor_updates, adapters) or entry.shape
            else:  # a quantized weight's updates are carried by its primary part, the others only compute with them
                primary = role.role == role.weight.primary
                tensor_updates = tuple(updates.get(role.weight.name, ())) if primary else ()
                dequantized = role.write == "dequantized"
                shape = role.weight.shape if dequantized else entry.shape
            planned.append(PlannedTensor(base=entry, shape=shape, updates=tensor_updates, quantized=role))
        if resolver.untied is not None and resolver.untied[0] in header.by_name():
            planned.append(untied_head(header, *resolver.untied, updates, adapters))
        shards.append(
            ShardPlan(
                file=header.file,
                base_size=header.file_size,
                base_header_bytes=header.header_bytes,
                metadata=header.metadata,
                tensors=tuple(planned),
            )
        )
    base_files = set(base_loc.list_files())
    extra = tuple(sorted(f for f in base_files if is_extra_file(f)))
    job = MergeJob(
        base=base_loc,
        base_versions=versions,
        adapters=adapters,
        output=output_loc,
        device=device,
        min_delta_cosine=min_delta_cosine,
        fingerprint=merge_fingerprint(
            base_headers=headers,
            base_versions=versions,
            base_config=config_bytes,
            adapters=adapters,
            # A block-FP8 base kept in FP8 is hashed under the name that mode had while it was the only quantized
            # format, so outputs merged before `keep` existed keep their identity (and resume).
            output_dtype=(
                "fp8"
                if mode == "keep" and fmt is not None and fmt.key == "block-fp8"
                else f"{mode}+as-quantized:{as_quantized.model_dump_json()}"
                if as_quantized is not None
                else mode
            ),
        ),
    )
    return MergePlan(
        job=job,
        shards=tuple(shards),
        base_has_index=has_index,
        index_metadata=index_metadata,
        extra_files=extra,
        config_updates=config_updates,
        config_removals=config_removals,
        output_dtype=mode,
        quantized_format=fmt.label if fmt is not None else None,
        as_quantized=as_quantized,
        decisions=tuple(resolver.decisions),
        adapter_usage=usage,
    )


def _adapter_specs(adapter: Adapters) -> list[tuple[str | Location, float]]:
    """(where, weight) of each adapter named: one or several, each a Location, an AdapterSpec or `PATH[:WEIGHT]`."""
    given = [adapter] if isinstance(adapter, (str, Location, AdapterSpec)) else list(adapter)
    if not given:
        raise LoraMergeError("no adapter given: name at least one with --adapter PATH[:WEIGHT]")
    specs: list[tuple[str | Location, float]] = []
    for one in given:
        if isinstance(one, str):
            one = AdapterSpec.parse(one)
        specs.append((one.uri, one.weight) if isinstance(one, AdapterSpec) else (one, 1.0))
    return specs


def _refuse_repeats(locations: list[Location], specs: list[tuple[str | Location, float]]) -> None:
    seen: dict[str, int] = {}
    for position, where in enumerate(locations):
        key = where.uri.rstrip("/")
        if key in seen:
            total = specs[seen[key]][1] + specs[position][1]
            raise LoraMergeError(
                f"--adapter {where.uri} is given twice (adapters {seen[key] + 1} and {position + 1}); give it once, "
                f"with the weights summed ({AdapterSpec(uri=where.uri, weight=total or 1)}) if that is what you mean"
            )
        seen[key] = position
