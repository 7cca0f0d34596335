"""Consolidation: the index and the non-weight files; then, once validation has passed, the manifest.

The manifest is the commit point: it is written last, only for an output that passed validation. An output
without one is unfinished, whatever else it holds.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from pydantic import BaseModel

from .errors import LoraMergeError
from .formats.bitsandbytes import AsQuantized
from .plan import ALGORITHM_VERSION, INDEX_FILE, MANIFEST_FILE, MergePlan
from .state import ShardReceipt, ShardRecord, discard_partial_writes
from .storage import Location

TOOL_NAME = "prefect-lora-merge"


class FileRecord(BaseModel):
    bytes: int
    sha256: str | None  # None only before validation, for a shard copied server-side; never in a published manifest


class Manifest(BaseModel):
    """The last file a merge writes: an output without it is not a finished merge.

    Deterministic (no times, no per-run details), so a resumed merge publishes the same bytes as one that ran
    without interruption."""

    tool: str = TOOL_NAME
    tool_version: str
    algorithm_version: str = ALGORITHM_VERSION
    fingerprint: str
    output_dtype: str = "keep"  # keep (every tensor in its base format), or bf16 for a dequantized quantized base
    as_quantized: AsQuantized | None = None  # the 4-bit round trip of an --as-quantized merge
    base: dict[str, Any]
    adapter: dict[str, Any]
    decisions: list[str]
    files: dict[str, FileRecord]
    shards: list[ShardRecord]


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(TOOL_NAME)
    except PackageNotFoundError:
        return "0+unknown"


def read_manifest(output: Location) -> Manifest | None:
    if not output.exists(MANIFEST_FILE):
        return None
    try:
        return Manifest.model_validate(output.read_json(MANIFEST_FILE))
    except LoraMergeError:
        raise
    except Exception as exc:
        raise LoraMergeError(f"{output.describe(MANIFEST_FILE)} is not a valid manifest ({exc})") from None


def consolidate(plan: MergePlan, receipts: list[ShardReceipt]) -> Manifest:
    """Write the index and copy the non-weight files; return the manifest to publish once validation passes."""
    output, base = plan.job.output, plan.job.base
    by_file = {r.file: r for r in receipts}
    missing = [s.file for s in plan.shards if s.file not in by_file]
    if missing:
        raise LoraMergeError(f"cannot consolidate: shard(s) {', '.join(missing[:5])} were not merged; re-run the merge")
    for shard in plan.shards:
        size = output.size(shard.file)
        if size != by_file[shard.file].bytes:
            raise LoraMergeError(
                f"{output.describe(shard.file)} is {size} bytes but its merge wrote {by_file[shard.file].bytes}; "
                "re-run the merge"
            )
    # Every shard is committed, so a partial write still here was left by a writer that died mid-shard (a killed
    # Dask worker, whose shard ran again elsewhere): nothing will finish it.
    discard_partial_writes(output)

    files: dict[str, FileRecord] = {r.file: FileRecord(bytes=r.bytes, sha256=r.sha256) for r in receipts}
    weight_map = {t.name: s.file for s in plan.shards for t in s.written}
    total_size = sum(e.nbytes for s in plan.shards for e in s.output_entries())
    metadata = {k: v for k, v in plan.index_metadata.items() if k != "total_size"}
    index = {"metadata": {**metadata, "total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    files[INDEX_FILE] = _write(output, INDEX_FILE, _json_bytes(index))

    for name in plan.extra_files:
        data = base.read_bytes(name)
        if name == "config.json" and (plan.config_updates or plan.config_removals):
            data = _json_bytes(_updated_config(json.loads(data), plan.config_updates, plan.config_removals))
        files[name] = _write(output, name, data)

    adapters = plan.job.adapters
    adapter = adapters.first
    manifest = Manifest(
        tool_version=tool_version(),
        fingerprint=plan.fingerprint,
        output_dtype=plan.output_dtype,
        as_quantized=plan.as_quantized,
        base={"uri": base.uri, "shards": {s.file: s.base_size for s in plan.shards}},
        adapter={
            "uri": adapter.location.uri if adapters.plain else adapters.label,
            "file": adapter.file,
            "version": adapter.version,
            "tensors": sorted(adapters.tensors),
            "usage": plan.adapter_usage,
            **(
                {}
                if adapters.plain
                else {
                    "members": [
                        {
                            "uri": m.index.location.uri,
                            "file": m.index.file,
                            "version": m.index.version,
                            "weight": m.weight,
                        }
                        for m in adapters.members
                    ]
                }
            ),
        },
        decisions=list(plan.decisions),
        files=dict(sorted(files.items())),
        shards=[r.record() for r in sorted(receipts, key=lambda r: r.file)],
    )
    return manifest


def with_checksums(manifest: Manifest, checksums: dict[str, str]) -> Manifest:
    """The manifest with the sha256 of server-side copies filled in from the validation pass that hashed them."""
    files = {
        name: record if record.sha256 else FileRecord(bytes=record.bytes, sha256=checksums.get(name))
        for name, record in manifest.files.items()
    }
    shards = [r if r.sha256 else r.model_copy(update={"sha256": checksums.get(r.file)}) for r in manifest.shards]
    return manifest.model_copy(update={"files": files, "shards": shards})


def publish_manifest(output: Location, manifest: Manifest) -> None:
    """The commit point: after this write, readers take the output as a finished merge."""
    unhashed = [name for name, record in manifest.files.items() if not record.sha256]
    if unhashed:  # cannot happen unless a bug slipped in: a published manifest vouches for every byte
        raise LoraMergeError(f"internal error: no sha256 for {', '.join(unhashed[:3])}; the manifest was not written")
    output.write_bytes(MANIFEST_FILE, _json_bytes(manifest.model_dump(mode="json")))


def _write(output: Location, name: str, data: bytes) -> FileRecord:
    output.write_bytes(name, data)
    return FileRecord(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode()


def _updated_config(
    config: dict[str, Any], updates: dict[str, int | bool], removals: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A copy of `config` with dotted keys set to new values and others removed."""
    config = copy.deepcopy(config)

    def parent_of(dotted: str) -> tuple[dict[str, Any], str]:
        scope = config
        *parents, leaf = dotted.split(".")
        for parent in parents:
            scope = scope[parent]
        return scope, leaf

    for dotted, value in updates.items():
        scope, leaf = parent_of(dotted)
        scope[leaf] = value
    for dotted in removals:
        scope, leaf = parent_of(dotted)
        scope.pop(leaf, None)
    return config
