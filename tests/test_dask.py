"""Shards on a Dask cluster (prefect-dask): placement within each worker's memory and GPUs, a local cluster of worker
processes, an existing cluster by address, and a worker killed mid-shard that still leaves byte-identical output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_crash_resume import PLUGIN, Output, _published

from prefect_lora_merge.core.errors import LoraMergeError
from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.resources import WORKER_RUNTIME_BYTES, WorkerCapacity, place_on_cluster

GiB = 2**30


def worker(address: str, threads: int = 1, memory: int = 0, **resources: float) -> WorkerCapacity:
    return WorkerCapacity(address, threads, memory, dict(resources))


# -- where shards may run ---------------------------------------------------------------------------------------------


def test_a_worker_holds_as_many_shards_as_its_threads_and_memory_allow():
    workers = [
        worker("tcp://a", threads=4, memory=WORKER_RUNTIME_BYTES + 2 * GiB),  # memory for 2 shards of 1 GiB
        worker("tcp://b", threads=1, memory=WORKER_RUNTIME_BYTES + 8 * GiB),  # memory for 8, one thread
        worker("tcp://c", threads=2),  # no memory limit: its threads
    ]
    placement = place_on_cluster(workers, 1 * GiB, gpu=False, cluster="tcp://s")
    assert placement.slots == 2 + 1 + 2
    assert placement.workers is None, "every worker can hold a shard"
    assert placement.resources == {}
    assert "tcp://s" in placement.reason and "--nthreads 1" in placement.reason, "worker a may be crowded"


def test_workers_too_small_for_one_shard_are_left_out():
    workers = [worker("tcp://small", memory=WORKER_RUNTIME_BYTES + GiB // 2), worker("tcp://big", memory=8 * GiB)]
    placement = place_on_cluster(workers, 1 * GiB, gpu=False, cluster="tcp://s")
    assert placement.workers == ("tcp://big",), "held away from the small worker by address"
    assert placement.slots == 1
    assert "1 left out" in placement.reason
    assert "--resources MEMORY=<bytes>" in placement.reason, "an address hold breaks when a worker restarts"


def test_a_memory_resource_keeps_shards_off_small_workers_without_holding_them_by_address():
    workers = [worker("tcp://small", MEMORY=GiB // 2), worker("tcp://big", MEMORY=8 * GiB)]
    placement = place_on_cluster(workers, 1 * GiB, gpu=False, cluster="tcp://s")
    assert placement.workers is None, "a restarted worker keeps its resources, not its address"
    assert placement.resources == {"MEMORY": float(GiB)}
    assert placement.slots == 1 and "1 left out" in placement.reason


def test_an_advertised_memory_resource_is_claimed_by_every_shard_task():
    workers = [worker("tcp://a", threads=8, MEMORY=3 * GiB), worker("tcp://b", threads=8, MEMORY=1 * GiB)]
    placement = place_on_cluster(workers, 1 * GiB, gpu=False, cluster="tcp://s")
    assert placement.slots == 3 + 1
    assert placement.resources == {"MEMORY": float(GiB)}, "Dask then enforces each worker's memory itself"


def test_a_cuda_merge_runs_only_on_workers_that_advertise_gpus():
    workers = [worker("tcp://cpu", threads=8), worker("tcp://gpu", threads=8, GPU=2)]
    placement = place_on_cluster(workers, 1 * GiB, gpu=True, cluster="tcp://s")
    assert placement.workers is None, "the GPU resource each task claims keeps it off tcp://cpu"
    assert placement.slots == 2, "one shard per GPU"
    assert placement.resources == {"GPU": 1.0}


@pytest.mark.parametrize(
    ("workers", "gpu", "expected"),
    [
        ([], False, "has no workers"),
        ([worker("tcp://a", threads=4)], True, "dask worker --resources GPU=1"),
        ([worker("tcp://a", memory=WORKER_RUNTIME_BYTES + 100)], False, "larger --memory-limit"),
    ],
)
def test_a_cluster_that_cannot_hold_a_shard_is_refused_with_what_to_do(workers, gpu, expected):
    with pytest.raises(LoraMergeError, match="tcp://s") as refused:
        place_on_cluster(workers, 1 * GiB, gpu=gpu, cluster="tcp://s")
    assert expected in str(refused.value)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"dask_address": "tcp://x:8786"}, "need runner dask"),
        ({"runner": "dask", "dask_address": "tcp://x:8786", "dask_workers": 2}, "give one of them"),
        ({"runner": "dask", "workers": 2}, "use dask_workers"),
    ],
)
def test_dask_options_that_contradict_each_other_are_refused(values, expected):
    with pytest.raises(ValueError, match=expected):
        MergeParameters(base="b", adapter="a", output="o", **values)


def test_the_cli_names_the_option_at_fault(tmp_path, capsys):
    from prefect_lora_merge.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--base", "b", "--adapter", "a", "--output", str(tmp_path), "--dask-address", "tcp://x:1"])
    assert "dask_address and dask_workers need runner dask" in capsys.readouterr().err


# -- merges on a cluster --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(llama_case, tmp_path_factory):
    """The single-machine merge every cluster merge must equal byte for byte."""
    out = tmp_path_factory.mktemp("single-machine") / "merged"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), device="cpu")
    return out


@pytest.mark.slow
def test_a_merge_on_an_existing_cluster_by_address_claims_each_workers_memory(
    prefect_server, llama_case, reference, tmp_path
):
    from distributed import LocalCluster

    from prefect_lora_merge.flows import lora_merge

    # Threads of this process (so they report to the test's Prefect server), each worker advertising memory.
    with LocalCluster(
        n_workers=2,
        threads_per_worker=2,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
        resources={"MEMORY": 4 * GiB},
    ) as cluster:
        params = MergeParameters(
            base=str(llama_case.base_dir),
            adapter=str(llama_case.adapter_dir),
            output=str(tmp_path / "merged"),
            device="cpu",
            runner="dask",
            dask_address=cluster.scheduler_address,
        )
        summary = lora_merge(params)
        finished_on_cluster = cluster.scheduler.task_prefixes["merge_one_shard"].state_counts["memory"]
    assert summary.runner == "dask"
    assert summary.workers == 4, "two workers, two threads each, memory for many shards"
    assert finished_on_cluster == len(list(llama_case.base_dir.glob("*.safetensors"))), "every shard ran there"
    assert summary.validation_passed
    assert Output(tmp_path).published() == _published(reference)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_worker_killed_mid_shard_still_gives_output_identical_to_a_single_machine_merge(
    prefect_server, llama_case, reference, tmp_path, request, storage
):
    from prefect.settings import PREFECT_API_URL

    s3 = request.getfixturevalue("s3") if storage == "s3" else None
    out = Output(tmp_path, s3)
    killed = tmp_path / "killed-worker"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_API_URL=PREFECT_API_URL.value(),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # Every process of the cluster loads the crash plugin; the first to write its second shard is SIGKILLed
        # on its third write, and only that one (LORA_MERGE_KILL_ONCE).
        PYTHONPATH=os.pathsep.join([str(PLUGIN), env.get("PYTHONPATH", "")]),
        LORA_MERGE_KILL_AT="inside-shard-write",
        LORA_MERGE_KILL_ONCE=str(killed),
    )
    if s3 is not None:
        env.update(s3.env())
    command = [
        *(sys.executable, "-m", "prefect_lora_merge.cli", "run", "--json", "--device", "cpu"),
        *("--runner", "dask", "--dask-workers", "2"),
        *("--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", out.uri),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.exists(), "a worker process was killed mid-shard"
    assert run.returncode == 0, f"Dask runs the killed worker's shard again, in the same run: {run.stderr[-3000:]}"
    summary = json.loads(run.stdout)
    assert summary["runner"] == "dask" and summary["workers"] == 2
    assert summary["validation_passed"]
    assert out.published() == _published(reference)
    assert out.leftovers() == [], "the killed worker's partial write is not left behind"


def test_without_prefect_dask_the_error_says_what_to_install(monkeypatch, llama_case, tmp_path):
    import builtins

    from prefect_lora_merge.core.plan import make_plan
    from prefect_lora_merge.flows.runners import shard_runner

    real_import = builtins.__import__

    def no_prefect_dask(name, *args, **kwargs):
        if name == "prefect_dask":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_prefect_dask)
    params = MergeParameters(
        base=str(llama_case.base_dir), adapter=str(llama_case.adapter_dir), output=str(tmp_path), runner="dask"
    )
    plan = make_plan(params.base, params.adapter, params.output, device="cpu")
    with pytest.raises(LoraMergeError, match=r"pip install 'prefect-lora-merge\[dask\]'"):
        with shard_runner(params, plan):
            pass
    assert not Path(tmp_path, "lora-merge-manifest.json").exists()


def test_a_cuda_merge_on_a_local_cluster_is_refused_naming_dask_address(llama_case, tmp_path):
    from prefect_lora_merge.core.plan import make_plan
    from prefect_lora_merge.flows.runners import shard_runner

    params = MergeParameters(
        base=str(llama_case.base_dir), adapter=str(llama_case.adapter_dir), output=str(tmp_path), runner="dask"
    )
    plan = make_plan(params.base, params.adapter, params.output, device="cpu")
    on_gpu = plan.model_copy(update={"job": plan.job.model_copy(update={"device": "cuda"})})
    with pytest.raises(LoraMergeError, match="--dask-address .*--runner threads"):
        with shard_runner(params, on_gpu):
            pass


def test_a_local_cluster_too_large_for_max_memory_names_dask_workers(llama_case, tmp_path):
    from prefect_lora_merge.core.plan import make_plan
    from prefect_lora_merge.flows.runners import shard_runner

    plan = make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), str(tmp_path), device="cpu")
    params = MergeParameters(
        base=str(llama_case.base_dir),
        adapter=str(llama_case.adapter_dir),
        output=str(tmp_path),
        runner="dask",
        dask_workers=8,
        max_memory=str(2 * plan.estimated_peak_bytes),  # room for two shards at once
    )
    with pytest.raises(LoraMergeError, match="--dask-workers 8 needs about .* use --dask-workers 2 or fewer"):
        with shard_runner(params, plan):
            pass
