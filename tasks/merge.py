"""The four steps of a merge as Prefect tasks. Each is a call into `prefect_lora_merge.core`, nothing more."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from prefect_lora_merge.blocks import storage_block
from prefect_lora_merge.core.consolidate import Manifest, consolidate
from prefect_lora_merge.core.errors import LoraMergeError, StorageAccessError, StorageError
from prefect_lora_merge.core.merge import merge_or_resume_shard
from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.core.pipeline import finish_validation
from prefect_lora_merge.core.plan import MergeJob, MergePlan, ShardPlan, make_plan
from prefect_lora_merge.core.state import ShardReceipt, measured_line
from prefect_lora_merge.core.validate import ValidationReport


def _transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry storage hiccups and unexpected errors; a bad input fails the same way every time, so never retry it."""
    try:
        state.result()
    except StorageAccessError:  # credentials, permissions, a missing bucket: the same answer next time
        return False
    except StorageError:
        return True
    except LoraMergeError:
        return False
    except Exception:
        return True
    return False


@task(name="plan-merge", task_run_name="plan", cache_policy=NO_CACHE)
def plan_merge(params: MergeParameters) -> MergePlan:
    """Read headers and the adapter; refuse bad inputs before anything is written."""
    return make_plan(
        params.base,
        params.adapter_specs(),
        params.output,
        device=params.device,
        storage_options=params.storage_options,
        credentials=storage_block(params.storage_block),
        output_dtype=params.output_dtype,
        min_delta_cosine=params.min_delta_cosine,
        as_quantized=params.round_trip(),
    )


@task(
    name="merge-shard",
    task_run_name="merge-{shard.file}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_transient,
)
def merge_one_shard(job: MergeJob, shard: ShardPlan, threads: int | None = None) -> ShardReceipt:
    """Merge one shard, or take its receipt from the output's own record when an earlier run committed it; log
    what the merge measured (one line)."""
    receipt = merge_or_resume_shard(job, shard, threads)
    if receipt.measured is not None:
        get_run_logger().info("%s", measured_line(receipt))
    return receipt


@task(name="consolidate", task_run_name="consolidate", cache_policy=NO_CACHE)
def consolidate_output(plan: MergePlan, receipts: list[ShardReceipt]) -> Manifest:
    return consolidate(plan, receipts)


@task(name="validate", task_run_name="validate", cache_policy=NO_CACHE)
def validate_merge(plan: MergePlan, manifest: Manifest, receipts: list[ShardReceipt]) -> ValidationReport:
    """Validate, then publish the manifest (the commit point) only if everything passed; the report also lists what
    each shard of this run measured."""
    report, _ = finish_validation(plan, manifest, receipts)
    return report
