"""Cluster resources sized from the plan's per-shard estimate: the job variables of a Kubernetes work pool
(infra/kubernetes/work-pool-job-template.json) and a Dask cluster for the dask-kubernetes operator.

Plain data only (dicts a caller writes as JSON or YAML); nothing here talks to a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .resources import WORKER_RUNTIME_BYTES

GiB = 2**30
DASK_SCHEDULER_PORT = 8786
DASK_DASHBOARD_PORT = 8787


@dataclass(frozen=True)
class PodSize:
    """What one pod asks Kubernetes for: memory and CPUs as quantities, whole GPUs."""

    memory_bytes: int
    cpus: int
    gpus: int

    @property
    def memory(self) -> str:
        return f"{math.ceil(self.memory_bytes / GiB)}Gi"

    @property
    def cpu(self) -> str:
        return str(self.cpus)


def merge_pod(peak_per_shard: int, shards_at_once: int, *, gpus: int = 0) -> PodSize:
    """A pod that runs the whole flow with `shards_at_once` shard merges in its own threads: each shard's estimate,
    plus the process's runtime; two CPUs per shard (compute, and reader + writer) and one for the flow."""
    return PodSize(shards_at_once * peak_per_shard + WORKER_RUNTIME_BYTES, 2 * shards_at_once + 1, gpus)


def dask_worker_pod(peak_per_shard: int, *, gpu: bool) -> PodSize:
    """A Dask worker that merges one shard at a time (the operator runs one worker per pod)."""
    return PodSize(peak_per_shard + WORKER_RUNTIME_BYTES, 2, 1 if gpu else 0)


def job_variables(size: PodSize, image: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Values for infra/kubernetes/work-pool-job-template.json's variables (a deployment's `job_variables`)."""
    variables: dict[str, Any] = {"image": image, "memory": size.memory, "cpu": size.cpu, "gpu": str(size.gpus)}
    if env:
        variables["env"] = dict(env)
    return variables


def dask_cluster(
    name: str, image: str, workers: int, peak_per_shard: int, *, gpu: bool, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """A `DaskCluster` (kubernetes.dask.org/v1) whose workers each hold one shard merge: memory limit and a
    `MEMORY` resource from the plan's estimate (what `--runner dask` places shards by), and one GPU each when
    `gpu`. Merge on it with `lora-merge run --runner dask --dask-address tcp://<name>-scheduler:8786`."""
    size = dask_worker_pod(peak_per_shard, gpu=gpu)
    resources = f"MEMORY={peak_per_shard}" + (" GPU=1" if gpu else "")
    limits = {"memory": size.memory, "cpu": size.cpu}
    if gpu:
        limits["nvidia.com/gpu"] = "1"
    environment = [{"name": key, "value": value} for key, value in sorted((env or {}).items())]
    worker_container = {
        "name": "worker",
        "image": image,
        "args": [
            "dask",
            "worker",
            "--name",
            "$(DASK_WORKER_NAME)",
            "--nthreads",
            "1",
            "--memory-limit",
            str(size.memory_bytes),
            "--resources",
            resources,
            "--dashboard-address",
            "8788",
        ],
        "env": environment,
        "resources": {"requests": dict(limits), "limits": limits},
    }
    scheduler_container = {
        "name": "scheduler",
        "image": image,
        "args": ["dask", "scheduler", "--port", str(DASK_SCHEDULER_PORT), "--dashboard-address", ":8787"],
        "ports": [
            {"name": "tcp-comm", "containerPort": DASK_SCHEDULER_PORT, "protocol": "TCP"},
            {"name": "http-dashboard", "containerPort": DASK_DASHBOARD_PORT, "protocol": "TCP"},
        ],
        "resources": {"requests": {"memory": "2Gi", "cpu": "1"}, "limits": {"memory": "4Gi", "cpu": "2"}},
    }
    return {
        "apiVersion": "kubernetes.dask.org/v1",
        "kind": "DaskCluster",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "prefect-lora-merge"}},
        "spec": {
            "worker": {"replicas": workers, "spec": {"containers": [worker_container]}},
            "scheduler": {
                "spec": {"containers": [scheduler_container]},
                "service": {
                    "type": "ClusterIP",
                    "selector": {"dask.org/cluster-name": name, "dask.org/component": "scheduler"},
                    "ports": [
                        {"name": "tcp-comm", "protocol": "TCP", "port": DASK_SCHEDULER_PORT, "targetPort": "tcp-comm"},
                        {
                            "name": "http-dashboard",
                            "protocol": "TCP",
                            "port": DASK_DASHBOARD_PORT,
                            "targetPort": "http-dashboard",
                        },
                    ],
                },
            },
        },
    }
