"""Validation: prove an output is complete and is what the plan says, naming the file and tensor of each failure."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch
from pydantic import BaseModel

from .consolidate import MANIFEST_FILE, Manifest, read_manifest
from .errors import LoraMergeError
from .formats.survival import RoundTripShift
from .forward import ForwardCheck, forward_check
from .merge import keep_large_buffers_off_the_heap
from .plan import INDEX_FILE, MergePlan
from .recompute import TensorNumbers, check_non_finite, check_numbers
from .safetensors_format import DTYPES, ShardHeader, read_header, torch_dtype, weight_map_problem
from .state import ShardFigures, ShardRecord
from .storage import PIECE_BYTES, Location, safe_name


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
    # an --as-quantized merge: per touched weight, ‖Q(W) − W‖ / ‖ΔW‖ (from the shard records), largest first
    round_trip_shifts: list[RoundTripShift] = []
    # what this run measured per shard (a merge's validation only; `lora-merge validate` merges nothing)
    shards: list[ShardFigures] = []

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
    headers: dict[str, ShardHeader] = {}
    if index is not None:
        headers = _check_index(output, index, failures, checks)
    checksums_taken: dict[str, str] = {}
    non_finite: dict[tuple[str, str], int] = {}
    if manifest is not None:
        spans = _computed_spans(plan, headers) if plan is not None else {}
        checksums_taken = _check_files(output, manifest, failures, checks, spans, non_finite)
    numbers: list[TensorNumbers] = []
    if plan is not None:
        _check_against_plan(plan, headers, manifest, failures, checks)
        numbers = check_numbers(plan, headers, failures, checks)
        check_non_finite(plan, headers, non_finite, failures, checks)
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
        round_trip_shifts=largest_shifts(manifest.shards) if manifest is not None else [],
    )


def largest_shifts(records: list[ShardRecord]) -> list[RoundTripShift]:
    """Every round-tripped weight's shift next to its delta, largest ‖Q(W) − W‖ / ‖ΔW‖ first."""
    shifts = [s for r in records for s in r.round_trip_shifts]
    return sorted(shifts, key=lambda s: float("inf") if s.ratio is None else s.ratio, reverse=True)


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

Span = tuple[str, str, int, int]  # a tensor, its dtype, and its bytes [begin, end) in its file
SCANNED_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


def _check_files(
    output: Location,
    manifest: Manifest,
    failures: list[str],
    checks: Counter[str],
    spans: dict[str, list[Span]],
    non_finite: dict[tuple[str, str], int],
) -> dict[str, str]:
    """Check every file's size and sha256 against the manifest; return the sha256 of those it had none for.

    On the way, count the NaN/Inf values in the `spans` of each file (the tensors the merge computed) into
    `non_finite`: the numbers check samples rows, this pass reads every byte anyway."""
    present = set(output.list_files())

    def check(item: tuple[str, int, str | None]) -> tuple[str | None, str | None, dict[str, int]]:
        name, size, sha = item
        if not safe_name(name):
            where = output.describe(MANIFEST_FILE)
            return f"{where} lists {name!r}, which is no file inside the output (a tampered manifest?)", None, {}
        if name not in present:
            return f"{output.describe(name)} is listed in the manifest but missing", None, {}
        actual = output.size(name)
        if actual != size:
            return (
                f"{output.describe(name)} is {actual} bytes, the manifest says {size} (truncated or replaced)",
                None,
                {},
            )
        scan = _NonFiniteScan(spans.get(name, []))
        # One 16 MiB buffer per file, reused chunk after chunk; small, so the 4 files hashed at once add little to
        # the peak memory (64 MiB chunks made it grow with the number of shards).
        found = output.sha256(name, CHECKSUM_CHUNK_BYTES, on_chunk=scan.feed)
        if sha is None:  # a server-side copy: hashed here, for the first time
            return None, found, scan.found
        if found != sha:
            return f"{output.describe(name)}: sha256 {found[:16]}… differs from the manifest's {sha[:16]}…", None, {}
        return None, None, scan.found

    items = [(n, r.bytes, r.sha256) for n, r in manifest.files.items()]
    taken: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for (name, _, _), (problem, sha, found) in zip(items, pool.map(check, items), strict=True):
            checks["file checksums"] += 1
            if name in spans:
                checks["computed tensors scanned for NaN/Inf"] += len(spans[name])
            if problem:
                failures.append(problem)
            if sha is not None:
                taken[name] = sha
            non_finite.update({(name, tensor): count for tensor, count in found.items()})
    return taken


def _computed_spans(plan: MergePlan, headers: dict[str, ShardHeader]) -> dict[str, list[Span]]:
    """Per output shard, where the tensors the merge computed (float ones) lie, by the output's own header."""
    spans: dict[str, list[Span]] = {}
    for shard in plan.shards:
        header = headers.get(shard.file)
        if header is None:
            continue
        written = header.by_name()
        for tensor in shard.tensors:
            entry = written.get(tensor.name)
            if not tensor.computed or tensor.dropped or entry is None or entry.dtype not in SCANNED_DTYPES:
                continue
            if entry.nbytes % DTYPES[entry.dtype][1]:
                continue  # not whole values: the header checks name it
            begin = header.data_start + entry.begin
            spans.setdefault(shard.file, []).append((tensor.name, entry.dtype, begin, begin + entry.nbytes))
    return spans


class _NonFiniteScan:
    """Counts NaN/Inf in some tensors of one file, from its bytes fed in order, chunk after chunk."""

    def __init__(self, spans: list[Span]) -> None:
        self.spans = sorted(spans, key=lambda s: s[2])
        self.found: dict[str, int] = {}  # tensor -> how many of its values are NaN/Inf
        self._next = 0  # spans before it end before the bytes still to come
        self._carry = b""  # the first bytes of a value that the previous chunk cut

    def feed(self, offset: int, chunk: memoryview) -> None:
        end = offset + len(chunk)
        while self._next < len(self.spans) and self.spans[self._next][3] <= offset:
            self._next += 1
        for name, dtype, begin, stop in self.spans[self._next :]:
            if begin >= end:
                break
            low, high = max(begin, offset), min(stop, end)
            size = DTYPES[dtype][1]
            cut = (low - begin) % size  # > 0 only at the start of a chunk, inside a value the last chunk began
            if cut:
                rest = min(high, low + size - cut)
                value = self._carry + bytes(chunk[low - offset : rest - offset])
                self._carry = value if len(value) < size else b""
                if len(value) == size:
                    self._count(name, dtype, memoryview(bytearray(value)))
                low = rest
            whole = (high - low) // size * size
            if whole:
                self._count(name, dtype, chunk[low - offset : low - offset + whole])
            if low + whole < high:
                self._carry = bytes(chunk[low + whole - offset : high - offset])

    def _count(self, name: str, dtype: str, data: memoryview) -> None:
        bad = _count_non_finite(torch.frombuffer(data, dtype=torch_dtype(dtype)))
        if bad:
            self.found[name] = self.found.get(name, 0) + bad


def _count_non_finite(values: torch.Tensor) -> int:
    if values.element_size() == 1:  # FP8: integer operations, ~10x faster than float ones on these
        # NaN/Inf codes have every exponent bit set (e4m3fn's NaN every mantissa bit too; it has no Inf): OR-ing in
        # the other bits makes exactly those codes 0xFF, -1 as int8.
        others = (0x80 if values.dtype == torch.float8_e4m3fn else 0x83) - 0x100
        flags = torch.bitwise_or(values.view(torch.int8), others)
        return 0 if int(flags.amax()) != -1 else int((flags == -1).sum())
    low, high = torch.aminmax(values)  # one pass; NaN propagates into both
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return 0
    return int((~torch.isfinite(values)).sum())


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
                        f"{shard.file}: tensor {tensor.name!r} is a part of a quantized weight written in bf16 and "
                        "should not be in the output"
                    )
                continue
            if entry is None:
                what = "of the base" if tensor.source is None else f"(untied from {tensor.source.entry.name})"
                failures.append(f"{shard.file}: tensor {tensor.name!r} {what} is missing from the output")
            elif entry.dtype != tensor.dtype or entry.shape != tensor.shape:
                failures.append(
                    f"{shard.file}: tensor {tensor.name!r} is {entry.dtype} {list(entry.shape)}, planned "
                    f"{tensor.dtype} {list(tensor.shape)}"
                )
        for name in sorted(got):
            failures.append(f"{shard.file}: tensor {name!r} is not in the base shard (extra tensor)")
    planned = Counter(k for key, targets in plan.adapter_usage.items() for k in [key] * len(targets))
    unused = sorted(set(plan.job.adapters.tensors) - set(plan.adapter_usage))
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
