"""The merge flow: plan → one task per base shard (bounded parallelism) → consolidate → validate."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel
from tqdm import tqdm

from prefect_lora_merge.core.errors import LoraMergeError, ValidationFailed
from prefect_lora_merge.core.formats.survival import WARN_COSINE, DeltaSurvival, RoundTripShift
from prefect_lora_merge.core.lease import Lease, output_lease
from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.core.plan import MANIFEST_FILE, REPORT_FILE, MergePlan, ShardPlan
from prefect_lora_merge.core.recompute import TensorNumbers
from prefect_lora_merge.core.state import ShardFigures, ShardReceipt, claim_output
from prefect_lora_merge.flows.artifacts import ShardProgress, publish_shard_table, publish_summary
from prefect_lora_merge.flows.runners import ShardRunner, shard_runner
from prefect_lora_merge.tasks import consolidate_output, plan_merge, validate_merge


class MergeSummary(BaseModel):
    """What `lora_merge` returns: where the merged checkpoint and its manifest are, and how validation went (a
    failed validation raises `ValidationFailed` instead, and publishes no manifest)."""

    output: str
    manifest: str  # the manifest's URI: published last, only after validation passed
    validation_report: str  # the validation report's URI, beside the manifest
    fingerprint: str
    shards: int
    tensors_touched: int
    merged_shards: list[str]
    resumed_shards: list[str]  # committed by an earlier run of the same merge, skipped
    bytes_written: int  # output shard bytes this run produced (resumed shards not counted)
    bytes_copied_server_side: int  # of those, bytes the storage copied itself (untouched shards): none via this host
    seconds: float
    workers: int = 1  # shards merged at once
    compute_threads: int = 1  # compute threads per shard (0: each Dask worker's own default)
    runner: str = "threads"  # where the shards ran: threads of the flow's process, or dask
    # Kept in a quantized format: the re-quantized weight that kept the least of its delta, those under WARN_COSINE
    worst_delta_survival: DeltaSurvival | None = None
    weak_delta_survivals: list[DeltaSurvival] = []
    # --as-quantized: per touched weight, ‖Q(W) − W‖ / ‖ΔW‖, largest first (how much the round trip matters)
    round_trip_shifts: list[RoundTripShift] = []
    # what each shard of this run measured (as in lora-merge-report.json), and the merged one that grew most
    shard_figures: list[ShardFigures] = []
    largest_measured_peak: ShardFigures | None = None
    validation_passed: bool
    validation_checks: dict[str, int]
    validation_seconds: float = 0.0  # part of `seconds`
    # the touched tensor the merge changed most, by ‖output − base‖ / ‖base‖ on the rows validation recomputed
    largest_change: TensorNumbers | None = None
    decisions: list[str]


class ShardsFailed(LoraMergeError):
    """Some shard tasks failed; the others finished and are on storage."""


# The flow itself keeps at most `ShardRunner.slots` shard tasks submitted, so the task runner needs no bound.
@flow(name="lora-merge", task_runner=ThreadPoolTaskRunner(), validate_parameters=True)
def lora_merge(params: MergeParameters) -> MergeSummary:
    started = time.perf_counter()
    plan = plan_merge(params)  # reads only: bad inputs are refused before anything is written
    output = plan.job.output
    # The runner refuses what it cannot run before the lease writes anything; `_bounded` lets no shard task outlive
    # the lease.
    with (
        _one_run_per_output(output.uri, wait=params.wait_for_output),
        shard_runner(params, plan) as runner,
        output_lease(output, break_lock=params.break_lock, wait=params.wait_for_output, on_wait=_waiting_for),
    ):
        claim_output(plan, overwrite=params.overwrite)
        return _merge(plan, runner, started)


# A killed run's slot returns to the limit this long after its last renewal (Prefect's minimum lease).
OUTPUT_SLOT_LEASE_SECONDS = 60


@contextmanager
def _one_run_per_output(output: str, *, wait: bool) -> Iterator[None]:
    """With `wait` and a Prefect server, hold the output's slot in a global concurrency limit of 1 (created on first
    use), so runs on one output start in turn. The output's own lease decides in the end (it also guards runs on
    other Prefect servers, or on none): a waiting run then waits for that too."""
    from prefect.settings import PREFECT_API_URL

    if not wait:
        yield
        return
    logger = get_run_logger()
    if not PREFECT_API_URL.value():
        logger.info("no Prefect server (PREFECT_API_URL): waiting on the output's lease alone")
        yield
        return
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = output_limit_name(output)
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, 1)
        except ObjectAlreadyExists:
            pass  # another run created it a moment ago
    logger.info("waiting for the slot of %s (global concurrency limit %s)", output, name)
    # A failed renewal of the slot does not stop a merge: the output's lease still keeps writers apart.
    with concurrency(
        name,
        occupy=1,
        lease_duration=OUTPUT_SLOT_LEASE_SECONDS,
        strict=True,
        raise_on_lease_renewal_failure=False,
    ):
        logger.info("took the slot of %s", output)
        yield
    logger.info("released the slot of %s", output)


def _waiting_for(holder: Lease) -> None:
    get_run_logger().info("waiting for the run that holds the output: %s", holder.describe())


def output_limit_name(output: str) -> str:
    """The global concurrency limit that queues runs on `output` (a hash: limit names cannot hold a URI's '/')."""
    return "lora-merge-output-" + hashlib.sha256(output.encode()).hexdigest()[:16]


def _merge(plan: MergePlan, runner: ShardRunner, started: float) -> MergeSummary:
    logger = get_run_logger()
    logger.info(
        "planned %d shards, %d tensors touched, estimated peak memory %.0f MiB per shard; shards: %s",
        len(plan.shards),
        sum(len(s.touched) for s in plan.shards),
        plan.estimated_peak_bytes / 2**20,
        runner.reason,
    )
    progress = ShardProgress(plan)
    receipts: list[ShardReceipt] = []
    failures: list[str] = []
    with tqdm(
        total=sum(s.base_size for s in plan.shards),
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=None,
        leave=False,
    ) as bar:
        for shard, future in _bounded(plan, runner):
            try:
                receipts.append(future.result())
            except Exception as exc:  # every shard gets its chance before the flow fails
                failures.append(f"{shard.file}: {exc}")
            bar.update(shard.base_size)
            progress.advance(shard.base_size)
    if failures:
        publish_shard_table(plan, receipts, {})
        publish_summary(plan, failures, None, time.perf_counter() - started)
        raise ShardsFailed(
            f"{len(failures)} of {len(plan.shards)} shard(s) failed (the others are written; re-run to finish): "
            + "; ".join(failures[:3])
        )
    deltas = sorted((d for r in receipts for d in r.delta_survivals), key=lambda d: d.cosine)
    weak = [d for d in deltas if d.cosine < WARN_COSINE]
    for d in weak[:20]:
        logger.warning(
            "%s: re-quantized, only cosine %.3f of its delta survived (relative error %.2f); "
            "--output-dtype bf16 keeps all of it",
            d.tensor,
            d.cosine,
            d.relative_error,
        )
    manifest = consolidate_output(plan, receipts)
    try:
        report = validate_merge(plan, manifest, receipts)
    except ValidationFailed as failed:
        publish_shard_table(plan, receipts, {})
        publish_summary(plan, failed.failures, None, time.perf_counter() - started)
        raise
    publish_shard_table(plan, receipts, report.checksums_taken)
    publish_summary(plan, [], report, time.perf_counter() - started)
    return MergeSummary(
        output=plan.job.output.uri,
        manifest=plan.job.output.describe(MANIFEST_FILE),
        validation_report=plan.job.output.describe(REPORT_FILE),
        fingerprint=plan.fingerprint,
        shards=len(plan.shards),
        tensors_touched=sum(len(r.touched) for r in receipts),
        merged_shards=sorted(r.file for r in receipts if not r.resumed),
        resumed_shards=sorted(r.file for r in receipts if r.resumed),
        bytes_written=sum(r.bytes for r in receipts if not r.resumed),
        bytes_copied_server_side=sum(r.bytes for r in receipts if r.copied_server_side and not r.resumed),
        seconds=time.perf_counter() - started,
        workers=runner.slots,
        compute_threads=runner.threads or 0,
        runner=runner.kind,
        worst_delta_survival=deltas[0] if deltas else None,
        weak_delta_survivals=weak,
        round_trip_shifts=report.round_trip_shifts,
        shard_figures=report.shards,
        largest_measured_peak=max(
            (f for f in report.shards if f.peak_memory_bytes is not None),
            key=lambda f: (f.peak_memory_bytes or 0) - (f.start_memory_bytes or 0),
            default=None,
        ),
        validation_passed=report.passed,
        validation_checks=report.checks,
        validation_seconds=report.seconds,
        largest_change=next(iter(report.largest_changes()), None),
        decisions=list(plan.decisions),
    )


def _bounded(plan: MergePlan, runner: ShardRunner) -> Iterator[tuple[ShardPlan, PrefectFuture[ShardReceipt]]]:
    """Shard tasks in plan order, at most `runner.slots` submitted at a time; each (shard, future) as it finishes."""
    waiting = list(reversed(plan.shards))
    running: dict[PrefectFuture[ShardReceipt], ShardPlan] = {}
    try:
        while waiting or running:
            while waiting and len(running) < runner.slots:
                shard = waiting.pop()
                running[runner.submit(shard)] = shard
            future = next(as_completed(list(running)))
            yield running.pop(future), future
    finally:
        # Left early (an error in the caller): the shards in flight finish before the flow lets the output's lease
        # go, so none of them writes after another run has taken it (a cluster would run them on regardless).
        for future in running:
            future.wait()


def run_merge(params: MergeParameters) -> MergeSummary:
    """Run the flow (on PREFECT_API_URL, or an ephemeral server)."""
    return lora_merge(params)
