"""Validation: prove an output is complete and is what the plan says, naming the file and tensor of each failure."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from pydantic import BaseModel

from .consolidate import MANIFEST_FILE, Manifest, read_manifest
from .errors import LoraMergeError
from .forward import ForwardCheck, forward_check
from .merge import keep_large_buffers_off_the_heap
from .plan import INDEX_FILE, MergePlan
from .recompute import TensorNumbers, check_numbers
from .safetensors_format import ShardHeader, read_header, weight_map_problem
from .storage import PIECE_BYTES, Location


class ValidationReport(BaseModel):
    output: str
    passed: bool
    failures: list[str]
    checks: dict[str, int]  # what was checked, and how many of each
    seconds: float
    # sha256 of the files the manifest to be had none for (shards the storage copied server-side), hashed here
    checksums_taken: dict[str, str] = {}
    # per computed tensor, what recomputing its sampled rows from base + adapter found (with a plan only)
    numbers: list[TensorNumbers] = []
    # validate --forward: logits of the output loaded with transformers against PEFT's merge
    forward: ForwardCheck | None = None

    def largest_changes(self) -> list[TensorNumbers]:
        """The recomputed tensors the merge changed, largest ‖ΔW‖/‖W‖ first."""
        changed = [n for n in self.numbers if n.relative_change is not None]
        return sorted(changed, key=lambda n: n.relative_change or 0.0, reverse=True)


def validate_output(
    output: Location, plan: MergePlan | None = None, manifest: Manifest | None = None, *, forward: bool = False
) -> ValidationReport:
    """Structure and integrity always; with a plan, also structure against it, adapter coverage, and the numbers:
    sampled rows of every computed tensor recomputed from base + adapter, sampled bytes of copied ones compared.

    Checksums are taken from `manifest` when given (a merge about to publish it), else from the output's own."""
    started = time.perf_counter()
    keep_large_buffers_off_the_heap()
    failures: list[str] = []
    checks: Counter[str] = Counter()
    if manifest is None:
        manifest = _manifest(output, failures)
    index = _index(output, failures)
    checksums_taken: dict[str, str] = {}
    if manifest is not None:
        checksums_taken = _check_files(output, manifest, failures, checks)
    headers: dict[str, ShardHeader] = {}
    if index is not None:
        headers = _check_index(output, index, failures, checks)
    numbers: list[TensorNumbers] = []
    if plan is not None:
        _check_against_plan(plan, headers, manifest, failures, checks)
        numbers = check_numbers(plan, headers, failures, checks)
    elif manifest is not None:
        _check_coverage_from_manifest(manifest, failures, checks)
    forward_result = None
    if forward:
        if plan is None:
            raise LoraMergeError("the forward check needs the base and the adapter (a plan)")
        forward_result = forward_check(plan, failures)
        checks["forward passes"] += 1
    return ValidationReport(
        output=output.uri,
        passed=not failures,
        failures=failures,
        checks=dict(checks),
        seconds=time.perf_counter() - started,
        checksums_taken=checksums_taken,
        numbers=numbers,
        forward=forward_result,
    )


def _manifest(output: Location, failures: list[str]) -> Manifest | None:
    try:
        manifest = read_manifest(output)
    except LoraMergeError as exc:
        failures.append(str(exc))
        return None
    if manifest is None:
        failures.append(f"{output.describe(MANIFEST_FILE)} is missing: the merge did not finish (re-run it)")
    return manifest


def _index(output: Location, failures: list[str]) -> dict | None:
    if not output.exists(INDEX_FILE):
        failures.append(f"{output.describe(INDEX_FILE)} is missing")
        return None
    try:
        index = output.read_json(INDEX_FILE)
    except LoraMergeError as exc:
        failures.append(str(exc))
        return None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        failures.append(f"{output.describe(INDEX_FILE)} has no weight_map")
        return None
    problem = weight_map_problem(index["weight_map"])
    if problem:
        failures.append(f"{output.describe(INDEX_FILE)}: {problem}")
        return None
    return index


CHECKSUM_CHUNK_BYTES = 2 * PIECE_BYTES


def _check_files(output: Location, manifest: Manifest, failures: list[str], checks: Counter[str]) -> dict[str, str]:
    """Check every file's size and sha256 against the manifest; return the sha256 of those it had none for."""
    present = set(output.list_files())

    def check(item: tuple[str, int, str | None]) -> tuple[str | None, str | None]:
        name, size, sha = item
        if name not in present:
            return f"{output.describe(name)} is listed in the manifest but missing", None
        actual = output.size(name)
        if actual != size:
            return f"{output.describe(name)} is {actual} bytes, the manifest says {size} (truncated or replaced)", None
        digest = hashlib.sha256()
        # One buffer per file, reused chunk after chunk; small, so the 4 files hashed at once add little to the peak
        # memory (64 MiB chunks made it grow with the number of shards).
        buffer = memoryview(bytearray(min(size, CHECKSUM_CHUNK_BYTES)))
        for start in range(0, size, CHECKSUM_CHUNK_BYTES):
            chunk = buffer[: min(size, start + CHECKSUM_CHUNK_BYTES) - start]
            output.read_into(name, start, chunk)
            digest.update(chunk)
        if sha is None:  # a server-side copy: hashed here, for the first time
            return None, digest.hexdigest()
        if digest.hexdigest() != sha:
            found = digest.hexdigest()
            return f"{output.describe(name)}: sha256 {found[:16]}… differs from the manifest's {sha[:16]}…", None
        return None, None

    items = [(n, r.bytes, r.sha256) for n, r in manifest.files.items()]
    taken: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for (name, _, _), (problem, sha) in zip(items, pool.map(check, items), strict=True):
            checks["file checksums"] += 1
            if problem:
                failures.append(problem)
            if sha is not None:
                taken[name] = sha
    return taken


def _check_index(output: Location, index: dict, failures: list[str], checks: Counter[str]) -> dict[str, ShardHeader]:
    weight_map: dict[str, str] = index["weight_map"]
    headers: dict[str, ShardHeader] = {}
    for file in sorted(set(weight_map.values())):
        try:
            headers[file] = read_header(output, file)
            checks["shard headers"] += 1
        except LoraMergeError as exc:
            failures.append(str(exc))
    for file, header in headers.items():
        for entry in header.tensors:
            if weight_map.get(entry.name) != file:
                failures.append(
                    f"{output.describe(file)}: tensor {entry.name!r} is not mapped to this shard by {INDEX_FILE} "
                    f"(it says {weight_map.get(entry.name)!r})"
                )
    stored = {file: {e.name for e in h.tensors} for file, h in headers.items()}
    for name, file in weight_map.items():
        checks["index entries"] += 1
        if file in headers and name not in stored[file]:
            failures.append(f"{INDEX_FILE} maps {name!r} to {file}, but that shard has no such tensor")
    total = sum(e.nbytes for h in headers.values() for e in h.tensors)
    declared = (index.get("metadata") or {}).get("total_size")
    if declared != total and len(headers) == len(set(weight_map.values())):
        failures.append(f"{INDEX_FILE}: metadata.total_size is {declared}, the shards hold {total} tensor bytes")
    return headers


def _check_against_plan(
    plan: MergePlan,
    headers: dict[str, ShardHeader],
    manifest: Manifest | None,
    failures: list[str],
    checks: Counter[str],
) -> None:
    planned_files = {s.file for s in plan.shards}
    for extra in sorted(set(headers) - planned_files):
        failures.append(f"{plan.job.output.describe(extra)} is not a shard of the base: extra tensors in the output")
    for shard in plan.shards:
        header = headers.get(shard.file)
        if header is None:
            failures.append(f"{plan.job.output.describe(shard.file)}: shard missing from the output or its index")
            continue
        got = {e.name: e for e in header.tensors}
        for tensor in shard.tensors:
            checks["tensors"] += 1
            entry = got.pop(tensor.name, None)
            if tensor.dropped:
                if entry is not None:
                    failures.append(
                        f"{shard.file}: tensor {tensor.name!r} is a scale grid of a weight written in bf16 and should "
                        "not be in the output"
                    )
                continue
            if entry is None:
                failures.append(f"{shard.file}: tensor {tensor.name!r} of the base is missing from the output")
            elif entry.dtype != tensor.dtype or entry.shape != tensor.shape:
                failures.append(
                    f"{shard.file}: tensor {tensor.name!r} is {entry.dtype} {list(entry.shape)}, planned "
                    f"{tensor.dtype} {list(tensor.shape)}"
                )
        for name in sorted(got):
            failures.append(f"{shard.file}: tensor {name!r} is not in the base shard (extra tensor)")
    planned = Counter(k for key, targets in plan.adapter_usage.items() for k in [key] * len(targets))
    unused = sorted(set(plan.job.adapter.tensors) - set(plan.adapter_usage))
    for key in unused:
        failures.append(f"adapter tensor {key} is not applied anywhere")
    if manifest is not None:
        if manifest.fingerprint != plan.fingerprint:
            failures.append(
                f"the output's manifest is for another merge (fingerprint {manifest.fingerprint[:12]}, "
                f"expected {plan.fingerprint[:12]})"
            )
        _compare_applied(planned, Counter(k for r in manifest.shards for k in r.applied), failures, checks)


def _check_coverage_from_manifest(manifest: Manifest, failures: list[str], checks: Counter[str]) -> None:
    usage = manifest.adapter.get("usage") or {}
    planned = Counter(k for key, targets in usage.items() for k in [key] * len(targets))
    for key in sorted(set(manifest.adapter.get("tensors") or []) - set(usage)):
        failures.append(f"adapter tensor {key} is not applied anywhere")
    _compare_applied(planned, Counter(k for r in manifest.shards for k in r.applied), failures, checks)


def _compare_applied(planned: Counter[str], applied: Counter[str], failures: list[str], checks: Counter[str]) -> None:
    for key in sorted(set(planned) | set(applied)):
        checks["adapter tensors"] += 1
        if planned[key] != applied[key]:
            failures.append(f"adapter tensor {key} was applied {applied[key]} time(s), planned {planned[key]}")
