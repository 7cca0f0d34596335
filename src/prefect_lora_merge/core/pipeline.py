"""The whole merge without an orchestrator: plan → shards → consolidate → validate, in one process.

The Prefect flow runs the same steps as tasks; this function is the reference path for tests and for embedding
the merge in other Python code that does not want Prefect.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from .consolidate import Manifest, consolidate, publish_manifest, with_checksums
from .credentials import StorageCredentials
from .errors import ValidationFailed
from .formats.bitsandbytes import AsQuantized
from .lease import output_lease
from .merge import merge_or_resume_shard, resolve_device
from .plan import REPORT_FILE, MergePlan, OutputDtype, make_plan
from .plan.planner import Adapters
from .resources import choose_parallelism, parse_size
from .state import ShardReceipt, claim_output, shard_figures, write_record
from .validate import ValidationReport, validate_output


class MergeResult(BaseModel):
    plan: MergePlan
    receipts: list[ShardReceipt]
    manifest: Manifest
    report: ValidationReport


def merge_checkpoint(
    base: str,
    adapter: Adapters,
    output: str,
    *,
    device: str = "cpu",
    storage_options: dict[str, Any] | None = None,
    credentials: StorageCredentials | None = None,
    overwrite: bool = False,
    break_lock: bool = False,
    output_dtype: OutputDtype = "auto",
    min_delta_cosine: float | None = None,
    max_memory: int | str | None = None,
    as_quantized: AsQuantized | None = None,
) -> MergeResult:
    """The whole merge in this process, one shard after another (the Prefect flow runs shards in parallel)."""
    budget = None if max_memory is None else parse_size(max_memory)
    plan = make_plan(
        base,
        adapter,
        output,
        device=device,
        storage_options=storage_options,
        credentials=credentials,
        output_dtype=output_dtype,
        min_delta_cosine=min_delta_cosine,
        as_quantized=as_quantized,
    )
    threads = choose_parallelism(plan.estimated_peak_bytes, 1, workers=1, max_memory=budget).threads
    resolve_device(plan.job.device)  # a device this machine lacks is refused before the lease writes anything
    with output_lease(plan.job.output, break_lock=break_lock):
        claim_output(plan, overwrite=overwrite)
        receipts = [merge_or_resume_shard(plan.job, shard, threads) for shard in plan.shards]
        manifest = consolidate(plan, receipts)
        report, published = finish_validation(plan, manifest, receipts)
    return MergeResult(plan=plan, receipts=receipts, manifest=published, report=report)


def finish_validation(
    plan: MergePlan, manifest: Manifest, receipts: list[ShardReceipt] | None = None
) -> tuple[ValidationReport, Manifest]:
    """Validate a consolidated output against its plan and the manifest to be; publish the manifest only if it
    passes, so a failed output is never taken as done. The report goes beside it either way, before it.
    Returns the report and the manifest as published."""
    report = validate_output(plan.job.output, plan, manifest)
    if receipts is not None:  # what this run measured, shard by shard (the report is this run's, not the merge's)
        report = report.model_copy(update={"shards": [shard_figures(r) for r in receipts]})
    plan.job.output.write_bytes(REPORT_FILE, report.model_dump_json(indent=2).encode())
    if not report.passed:
        raise ValidationFailed(report.failures)
    published = with_checksums(manifest, report.checksums_taken)
    # Shards the storage copied server-side have records without a sha256 until now: give them the one just
    # taken, so a later run can prove them whole and resume them (a record without one is copied again).
    hashed = {r.file for r in manifest.shards if r.sha256 is None}
    for record in published.shards:
        if record.file in hashed:
            write_record(plan.job.output, record)
    publish_manifest(plan.job.output, published)
    return report, published
