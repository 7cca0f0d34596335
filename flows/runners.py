"""Where the shard tasks run: threads of the flow's own process, or a Dask cluster through prefect-dask.

Either way the flow submits one task per shard and keeps at most `ShardRunner.slots` of them in flight; what a shard
task does, and where its state lives (the output's storage), is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prefect.futures import PrefectFuture

from prefect_lora_merge.core.errors import LoraMergeError
from prefect_lora_merge.core.merge import resolve_device
from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.core.plan import MergePlan, ShardPlan
from prefect_lora_merge.core.resources import (
    WORKER_RUNTIME_BYTES,
    WorkerCapacity,
    choose_parallelism,
    parse_size,
    place_on_cluster,
)
from prefect_lora_merge.core.state import ShardReceipt
from prefect_lora_merge.tasks import merge_one_shard

# How long to wait for a Dask scheduler to answer before saying it cannot be reached.
DASK_CONNECT_TIMEOUT = "20s"


@dataclass(frozen=True)
class ShardRunner:
    kind: str  # threads or dask
    slots: int  # shard tasks in flight at once
    threads: int | None  # compute threads per shard (None: each worker's torch default)
    reason: str  # one line for the log: where the shards run and how many at once
    submit: Callable[[ShardPlan], PrefectFuture[ShardReceipt]]


@contextmanager
def shard_runner(params: MergeParameters, plan: MergePlan) -> Iterator[ShardRunner]:
    """The runner `params.runner` names, started (a local Dask cluster is started here and stopped on exit).

    Everything that can refuse the merge (a budget too small, a cluster without room or GPUs, a scheduler that does
    not answer) raises here, before the flow takes the output's lease: a refused merge writes nothing."""
    max_memory = None if params.max_memory is None else parse_size(params.max_memory)
    if params.runner == "threads":
        resolve_device(plan.job.device)  # the shards run on this machine: refuse a device it does not have
        parallelism = choose_parallelism(
            plan.estimated_peak_bytes, len(plan.shards), workers=params.workers, max_memory=max_memory
        )
        yield ShardRunner(
            "threads",
            parallelism.workers,
            parallelism.threads,
            parallelism.reason,
            lambda shard: merge_one_shard.submit(plan.job, shard, parallelism.threads),
        )
        return
    with _dask_runner(params, plan, max_memory) as runner:
        yield runner


@contextmanager
def _dask_runner(params: MergeParameters, plan: MergePlan, max_memory: int | None) -> Iterator[ShardRunner]:
    try:
        import dask
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise LoraMergeError(
            "--runner dask needs prefect-dask: pip install 'prefect-lora-merge[dask]' (on the flow's machine and "
            "on every Dask worker)"
        ) from None
    estimate = plan.estimated_peak_bytes
    gpu = plan.job.device.startswith("cuda")
    threads: int | None = None
    if gpu and not params.dask_address:
        raise LoraMergeError(
            f"device {plan.job.device} with --runner dask needs a cluster with GPU workers: give its scheduler as "
            "--dask-address (workers started with --resources GPU=1); a local cluster (--dask-workers) merges on "
            "the CPU (--device cpu), and this machine's GPU merges with --runner threads"
        )
    if params.dask_address:
        cluster = params.dask_address
        runner = DaskTaskRunner(address=cluster, client_kwargs={"timeout": DASK_CONNECT_TIMEOUT})
    else:
        local = choose_parallelism(
            estimate, len(plan.shards), workers=params.dask_workers, max_memory=max_memory, option="--dask-workers"
        )
        per_worker = max(local.budget // local.workers, estimate)
        threads = local.threads
        cluster = f"a local cluster of {local.workers} worker process(es)"
        runner = DaskTaskRunner(cluster_kwargs=_local_cluster(local.workers, per_worker))
    with runner:
        try:
            info = runner.client.scheduler_info(n_workers=-1)
        except (OSError, TimeoutError) as exc:
            raise LoraMergeError(
                f"the Dask scheduler at {cluster} did not answer within {DASK_CONNECT_TIMEOUT} ({exc}); check "
                "--dask-address and that the scheduler is running"
            ) from None
        workers = [
            WorkerCapacity(
                address=address,
                threads=int(worker.get("nthreads") or 1),
                memory_limit=int(worker.get("memory_limit") or 0),
                resources={k: float(v) for k, v in (worker.get("resources") or {}).items()},
            )
            for address, worker in info["workers"].items()
        ]
        placement = place_on_cluster(workers, estimate, gpu=gpu, cluster=cluster)
        annotations: dict[str, Any] = {}
        if placement.resources:
            annotations["resources"] = placement.resources
        if placement.workers is not None:
            annotations |= {"workers": list(placement.workers), "allow_other_workers": False}

        def submit(shard: ShardPlan) -> PrefectFuture[ShardReceipt]:
            with dask.annotate(**annotations):
                return runner.submit(merge_one_shard, {"job": plan.job, "shard": shard, "threads": threads})

        yield ShardRunner("dask", placement.slots, threads, placement.reason, submit)


def _local_cluster(workers: int, per_worker: int) -> dict[str, Any]:
    """A `distributed.LocalCluster` on 127.0.0.1: one process per concurrent shard, each with its share of the
    budget as a `MEMORY` resource (what its shards may use) and as its memory limit (plus the worker's own runtime),
    reporting to the flow's own Prefect server."""
    return {
        "n_workers": workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": None,  # the dashboard would listen on every interface
        "memory_limit": per_worker + WORKER_RUNTIME_BYTES,
        "resources": {"MEMORY": per_worker},
        "silence_logs": logging.WARNING,
        "env": {"PREFECT_API_URL": _api_url()},
    }


def _api_url() -> str:
    """The API this flow run reports to, so worker processes record their task runs there too (without it, each
    worker would start an ephemeral Prefect server of its own)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.api_url).rstrip("/")
