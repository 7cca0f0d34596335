"""Merge state kept in the output's own storage: the only source of truth for resuming.

Layout under the output:
- `.lora-merge/run.json`: the fingerprint of the merge this output belongs to (written before any shard);
- `.lora-merge/shards/<shard>.json`: one record per committed shard, written after its data;
- `lora-merge-manifest.json`: the commit point of the whole merge (see consolidate.py).

A re-run, on any machine and with a fresh Prefect database, skips every shard whose record carries this merge's
fingerprint and whose object is present with the recorded size.
"""

from __future__ import annotations

import json
import time

from pydantic import BaseModel

from .errors import LoraMergeError, OutputLocationError
from .fp8 import DeltaSurvival
from .plan import INDEX_FILE, MANIFEST_FILE, REPORT_FILE, MergeJob, MergePlan, ShardPlan
from .storage import Location

STATE_DIR = ".lora-merge"
RUN_FILE = f"{STATE_DIR}/run.json"


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
    fp8_deltas: list[DeltaSurvival] = []  # per re-quantized FP8 weight: how much of its delta survived


class ShardReceipt(ShardRecord):
    """A record plus how this run got it."""

    seconds: float
    device: str
    resumed: bool = False
    copied_server_side: bool = False  # by the storage itself, not through this process (how, not what: not recorded)

    def record(self) -> ShardRecord:
        return ShardRecord(**self.model_dump(include=set(ShardRecord.model_fields)))


def record_name(shard_file: str) -> str:
    return f"{STATE_DIR}/shards/{shard_file}.json"


def write_record(output: Location, record: ShardRecord) -> None:
    output.write_bytes(record_name(record.file), record.model_dump_json(indent=2).encode())


def committed_record(job: MergeJob, shard: ShardPlan) -> ShardRecord | None:
    """The record of this shard from an earlier run of the same merge, if its object is still there, whole."""
    output = job.output
    name = record_name(shard.file)
    if not output.exists(name):
        return None
    try:
        record = ShardRecord.model_validate_json(output.read_bytes(name))
    except (LoraMergeError, ValueError):
        return None  # unreadable record: merge the shard again
    if record.fingerprint != job.fingerprint or not output.exists(shard.file):
        return None
    return record if output.size(shard.file) == record.bytes else None


def claim_output(plan: MergePlan, *, overwrite: bool = False) -> None:
    """Make the output this merge's: refuse one that holds another merge (unless `overwrite`), withdraw the
    manifest of a finished run before anything is rewritten, and record this merge's fingerprint."""
    output = plan.job.output
    previous = _previous_fingerprint(output)
    if previous is not None and previous != plan.fingerprint:
        if not overwrite:
            raise OutputLocationError(
                f"{output.uri} already holds a merge of other inputs (fingerprint {previous[:12]}, this merge "
                f"{plan.fingerprint[:12]}); pass --overwrite to replace it or choose another --output"
            )
        _remove_other_merge(plan)
    output.discard_partial_writes()
    output.remove(MANIFEST_FILE)
    output.remove(REPORT_FILE)  # it describes an earlier run
    if previous != plan.fingerprint:
        output.write_bytes(RUN_FILE, json.dumps({"fingerprint": plan.fingerprint, "started": time.time()}).encode())


def _previous_fingerprint(output: Location) -> str | None:
    for name in (RUN_FILE, MANIFEST_FILE):
        if output.exists(name):
            try:
                value = output.read_json(name)
            except LoraMergeError:
                continue
            if isinstance(value, dict) and isinstance(value.get("fingerprint"), str):
                return value["fingerprint"]
    return None


def _remove_other_merge(plan: MergePlan) -> None:
    """--overwrite: drop the other merge's state and the files it wrote that this merge will not rewrite."""
    output = plan.job.output
    ours = {s.file for s in plan.shards} | set(plan.extra_files) | {INDEX_FILE}
    if output.exists(MANIFEST_FILE):
        try:
            listed = output.read_json(MANIFEST_FILE).get("files", {})
        except (LoraMergeError, AttributeError):
            listed = {}
        for name in sorted(set(listed) - ours):
            output.remove(name)
    output.remove_tree(STATE_DIR)
