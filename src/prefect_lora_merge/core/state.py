"""Merge state kept in the output's own storage: the only source of truth for resuming.

Layout under the output:
- `.lora-merge/run.json`: the fingerprint of the merge this output belongs to (written before any shard);
- `.lora-merge/shards/<shard>.json`: one record per committed shard, written after its data;
- `lora-merge-manifest.json`: the commit point of the whole merge (see consolidate.py).

A re-run, on any machine and with a fresh Prefect database, skips every shard whose record carries this merge's
fingerprint and says what this plan would write, and whose object is present with the recorded size and sha256.

Everything here may be stale, damaged or planted: it is read as untrusted input, and the tool removes only what it
can prove it wrote (names it generates, strictly inside the output, whose bytes match their record).
"""

from __future__ import annotations

import json
import time
from collections import Counter

from pydantic import AliasChoices, BaseModel, Field

from .errors import LoraMergeError, OutputLocationError
from .formats.survival import DeltaSurvival, RoundTripShift
from .lease import LEASE_FILE
from .plan import INDEX_FILE, MANIFEST_FILE, OWN_FILES, REPORT_FILE, MergeJob, MergePlan, ShardPlan, update_keys
from .storage import PARTIAL_WRITE, Location, safe_name

STATE_DIR = ".lora-merge"
RUN_FILE = f"{STATE_DIR}/run.json"
SHARDS_DIR = f"{STATE_DIR}/shards"
STATE_DIRECTORIES = ("", STATE_DIR, SHARDS_DIR)  # where this tool writes: where a crashed write can leave a partial


class ShardRecord(BaseModel):
    """What a committed output shard is: deterministic, so a resumed merge records the same as an uninterrupted one."""

    file: str
    bytes: int
    # None for a shard the storage copied server-side: its bytes never passed through this tool, so the hash is
    # taken by the validation pass, which reads every output file anyway, and published in the manifest.
    sha256: str | None
    fingerprint: str
    tensors: int
    touched: list[str]
    applied: list[str]  # adapter keys, once per application
    # per re-quantized weight: how much of its delta survived (`fp8_deltas` in records of earlier versions)
    delta_survivals: list[DeltaSurvival] = Field([], validation_alias=AliasChoices("delta_survivals", "fp8_deltas"))
    # per touched weight of an --as-quantized merge: the round trip's shift next to the delta
    round_trip_shifts: list[RoundTripShift] = []


class ShardMeasure(BaseModel):
    """What merging one shard measured in this run (not part of its record: another run measures otherwise)."""

    seconds: float  # wall time of the merge proper (reading the header to the last byte written)
    bytes_read: int  # from the base: the shard's header and the tensors' bytes (other shards' parts included)
    bytes_written: int  # the output shard's size
    read_wait_seconds: float  # the computing thread waiting for storage reads (or the read-ahead budget)
    write_wait_seconds: float  # ... for storage writes and hashing (or the write-behind budget)
    peak_memory_bytes: int  # the merging process's peak resident size while the shard ran (a Dask worker's there)
    start_memory_bytes: int  # its resident size when the shard started: the peak above it is the shard's (alone)
    gpu_peak_bytes: int | None = None  # torch's peak allocated on the GPU while it ran, on cuda
    estimated_peak_bytes: int  # the plan's estimate of the shard's working memory

    @property
    def above_estimate(self) -> bool:
        """The process grew by more than the plan estimated for this shard (alone in its process: a bug in the
        estimate; beside other shards, theirs count too)."""
        return self.peak_memory_bytes - self.start_memory_bytes > self.estimated_peak_bytes

    @property
    def compute_seconds(self) -> float:
        return max(0.0, self.seconds - self.read_wait_seconds - self.write_wait_seconds)

    @property
    def throughput(self) -> float:
        """Bytes written per second of wall time."""
        return self.bytes_written / self.seconds if self.seconds > 0 else 0.0


class ShardReceipt(ShardRecord):
    """A record plus how this run got it."""

    seconds: float
    device: str
    resumed: bool = False
    copied_server_side: bool = False  # by the storage itself, not through this process (how, not what: not recorded)
    measured: ShardMeasure | None = None  # merged by this run (not resumed, not copied by the storage)

    def record(self) -> ShardRecord:
        return ShardRecord(**self.model_dump(include=set(ShardRecord.model_fields)))


class ShardFigures(BaseModel):
    """One shard of this run in `lora-merge-report.json`: how it got done and, where it was merged, what that
    measured next to the plan's estimate."""

    file: str
    how: str  # merged, resumed (committed by an earlier run), copied (by the storage, server-side)
    seconds: float
    bytes_read: int
    bytes_written: int
    read_wait_seconds: float | None = None
    write_wait_seconds: float | None = None
    compute_seconds: float | None = None
    peak_memory_bytes: int | None = None  # measured: the process's peak while the shard ran
    start_memory_bytes: int | None = None
    gpu_peak_bytes: int | None = None
    estimated_peak_bytes: int | None = None
    above_estimate: bool = False


def shard_figures(receipt: ShardReceipt) -> ShardFigures:
    m = receipt.measured
    if m is None:
        how = "resumed" if receipt.resumed else "copied"
        return ShardFigures(
            file=receipt.file,
            how=how,
            seconds=receipt.seconds,
            bytes_read=0,
            bytes_written=0 if receipt.resumed else receipt.bytes,
        )
    return ShardFigures(
        file=receipt.file,
        how="merged",
        seconds=m.seconds,
        bytes_read=m.bytes_read,
        bytes_written=m.bytes_written,
        read_wait_seconds=m.read_wait_seconds,
        write_wait_seconds=m.write_wait_seconds,
        compute_seconds=m.compute_seconds,
        peak_memory_bytes=m.peak_memory_bytes,
        start_memory_bytes=m.start_memory_bytes,
        gpu_peak_bytes=m.gpu_peak_bytes,
        estimated_peak_bytes=m.estimated_peak_bytes,
        above_estimate=m.above_estimate,
    )


def record_name(shard_file: str) -> str:
    return f"{SHARDS_DIR}/{shard_file}.json"


def write_record(output: Location, record: ShardRecord) -> None:
    output.write_bytes(record_name(record.file), record.model_dump_json(indent=2).encode())


def expected_applied(shard: ShardPlan) -> Counter[str]:
    """The adapter keys a merge of `shard` applies, each as often as it applies it."""
    return Counter(k for t in shard.tensors for u in t.updates for k in update_keys(u))


def committed_record(job: MergeJob, shard: ShardPlan) -> ShardRecord | None:
    """The record of this shard from an earlier run of the same merge, if the object under the shard's name is
    still exactly what the record says (size and sha256: read whole) and the record says what this plan would.

    Records and objects are input like any other (damaged, tampered with, or the object corrupted after the run):
    anything that does not match makes the shard merge again, replacing the object. A record without a sha256 (a
    shard the storage copied server-side) proves nothing about the bytes: the storage copies it again."""
    output = job.output
    name = record_name(shard.file)
    if not output.exists(name) or output.is_link(name):
        return None
    try:
        record = ShardRecord.model_validate_json(output.read_bytes(name))
    except (LoraMergeError, ValueError):
        return None  # unreadable record: merge the shard again
    if (
        record.fingerprint != job.fingerprint
        or record.file != shard.file
        or record.tensors != len(shard.tensors)
        or record.touched != [t.name for t in shard.touched]
        or Counter(record.applied) != expected_applied(shard)
        or record.sha256 is None
        or not output.exists(shard.file)
        or output.is_link(shard.file)
        or output.size(shard.file) != record.bytes
    ):
        return None
    return record if output.sha256(shard.file) == record.sha256 else None


def output_names(plan: MergePlan) -> list[str]:
    """Every file this merge writes in the output, its state files included."""
    shards = [s.file for s in plan.shards]
    return [*shards, INDEX_FILE, *plan.extra_files, *OWN_FILES, RUN_FILE, *map(record_name, shards)]


def claim_output(plan: MergePlan, *, overwrite: bool = False) -> None:
    """Make the output this merge's: refuse one that holds another merge, or files that are not a merge of this
    tool at all (unless `overwrite`), withdraw the manifest of a finished run before anything is rewritten, and
    record this merge's fingerprint. Call it holding the output's lease."""
    output = plan.job.output
    # Before any write: no link (into the base, say), file or directory in the way of what this merge writes.
    for directory in (STATE_DIR, SHARDS_DIR):
        output.writable_path(directory, directory=True)
    for name in output_names(plan):
        output.writable_path(name)
    previous = _previous_fingerprint(output)
    if previous is None:
        foreign = _foreign_entries(output)
        if foreign and not overwrite:
            shown = ", ".join(foreign[:5]) + (f" (and {len(foreign) - 5} more)" if len(foreign) > 5 else "")
            raise OutputLocationError(
                f"{output.uri} is not empty and holds no merge of this tool ({shown}); choose an empty or new "
                "--output, or pass --overwrite to write the merge into it (files it does not write are kept)"
            )
    elif previous != plan.fingerprint:
        if not overwrite:
            raise OutputLocationError(
                f"{output.uri} already holds a merge of other inputs (fingerprint {previous[:12]}, this merge "
                f"{plan.fingerprint[:12]}); pass --overwrite to replace it or choose another --output"
            )
        _remove_other_merge(plan)
    discard_partial_writes(output)
    output.remove(MANIFEST_FILE)
    output.remove(REPORT_FILE)  # it describes an earlier run
    if previous != plan.fingerprint:
        output.write_bytes(RUN_FILE, json.dumps({"fingerprint": plan.fingerprint, "started": time.time()}).encode())


def discard_partial_writes(output: Location) -> int:
    """Remove what crashed writes left wherever this tool writes in the output, except a write of the lease in
    progress (the lease's renewal runs beside the merge)."""
    return output.discard_partial_writes(STATE_DIRECTORIES, keep=(LEASE_FILE,))


def _previous_fingerprint(output: Location) -> str | None:
    for name in (RUN_FILE, MANIFEST_FILE):
        if output.exists(name) and not output.is_link(name):
            try:
                value = output.read_json(name)
            except LoraMergeError:
                continue
            if isinstance(value, dict) and isinstance(value.get("fingerprint"), str):
                return value["fingerprint"]
    return None


def _foreign_entries(output: Location) -> list[str]:
    """What the output holds besides this run's own lease (and the partial writes of this tool, removed next)."""
    found = []
    for entry in output.list_entries():
        if entry == STATE_DIR and not output.is_link(STATE_DIR):
            found += [
                f"{STATE_DIR}/{e}"
                for e in output.list_entries(STATE_DIR)
                if f"{STATE_DIR}/{e}" != LEASE_FILE and not PARTIAL_WRITE.match(e)
            ]
        elif not PARTIAL_WRITE.match(entry):
            found.append(entry)
    return found


def _remove_other_merge(plan: MergePlan) -> None:
    """--overwrite of another merge: drop that merge's shard records and run file, and the files it wrote that this
    merge will not rewrite. A file is removed only where that merge's manifest or a shard record names it, inside
    the output, and its size and sha256 are the ones recorded: proof that this tool wrote it. The lease (this run's)
    stays."""
    output = plan.job.output
    ours = set(output_names(plan))
    written: dict[str, tuple[int, str | None]] = {}
    for record in _records(output):
        written[record.file] = (record.bytes, record.sha256)
    try:
        listed = output.read_json(MANIFEST_FILE).get("files", {}) if output.exists(MANIFEST_FILE) else {}
    except (LoraMergeError, AttributeError):
        listed = {}
    if isinstance(listed, dict):
        for name, entry in listed.items():
            if isinstance(entry, dict):
                written.setdefault(name, (entry.get("bytes"), entry.get("sha256")))
    for name, (size, sha) in sorted(written.items()):
        if name in ours or not safe_name(name) or name.startswith(STATE_DIR + "/") or not isinstance(sha, str):
            continue
        if not output.exists(name) or output.is_link(name) or output.fs.isdir(output.path(name)):
            continue
        if output.size(name) == size and output.sha256(name) == sha:
            output.remove(name)
    for entry in output.list_entries(SHARDS_DIR):
        if entry.endswith(".json"):
            output.remove(f"{SHARDS_DIR}/{entry}")
    output.remove(RUN_FILE)


def _records(output: Location) -> list[ShardRecord]:
    """The readable shard records under the output (of whichever merge wrote them)."""
    records = []
    for entry in output.list_entries(SHARDS_DIR):
        name = f"{SHARDS_DIR}/{entry}"
        if not entry.endswith(".json") or output.is_link(name):
            continue
        try:
            records.append(ShardRecord.model_validate_json(output.read_bytes(name)))
        except (LoraMergeError, ValueError):
            continue
    return records


def measured_line(receipt: ShardReceipt) -> str:
    """One line on what merging a shard measured, for the task's log."""
    m = receipt.measured
    if m is None:
        return f"{receipt.file}: {'resumed' if receipt.resumed else 'copied by the storage'}"
    over = " — ABOVE the estimate (a bug in the estimate)" if m.above_estimate else ""
    gpu = f", GPU peak {m.gpu_peak_bytes / 2**20:.0f} MiB" if m.gpu_peak_bytes is not None else ""
    return (
        f"{receipt.file}: {m.seconds:.2f} s, read {m.bytes_read / 2**20:.1f} MiB, wrote {m.bytes_written / 2**20:.1f} "
        f"MiB ({m.throughput / 2**20:.0f} MiB/s); waited {m.read_wait_seconds:.2f} s on reads and "
        f"{m.write_wait_seconds:.2f} s on writes, computed {m.compute_seconds:.2f} s; process peak "
        f"{m.peak_memory_bytes / 2**20:.0f} MiB ({(m.peak_memory_bytes - m.start_memory_bytes) / 2**20:.0f} MiB above "
        f"its start), estimate {m.estimated_peak_bytes / 2**20:.0f} MiB{gpu}{over}"
    )
