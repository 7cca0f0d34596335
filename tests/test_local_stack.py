"""The production-like stack (infra/local_stack.py) as a user meets it: its Prefect UI, on 127.0.0.1 and talking to
the stack's own server, and merges whose S3 credentials come from prefect-aws blocks saved through the server's API,
their secrets never reaching the server's records."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "infra"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from local_stack import start_stack, stop_stack

    stack = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        yield stack
    finally:
        stop_stack(stack)


def _get(url: str, accept: str = "application/json") -> tuple[int, str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as answer:  # follows the UI's redirect to its default version
        return answer.status, answer.geturl(), answer.read().decode()


def test_the_stack_serves_the_prefect_ui_on_loopback_pointed_at_its_own_server(stack):
    import psutil

    status, _, body = _get(f"{stack.ui_url}/ui-settings")
    settings = json.loads(body)
    assert settings["api_url"] == stack.api_url, "the UI's API is the stack's server, not Prefect's default port"
    assert _get(f"{settings['api_url']}/health")[0] == 200, "the API the UI is told about answers"
    status, landed, page = _get(f"{stack.ui_url}/", accept="text/html")
    assert status == 200 and "<title>Prefect Server</title>" in page, landed

    server = psutil.Process(stack.pids["prefect-server"])
    assert server.environ().get("PREFECT_SERVER_ANALYTICS_ENABLED") == "false", "telemetry stays off"
    processes = [psutil.Process(pid) for pid in stack.pids.values()]
    groups = {os.getpgid(p.pid) for p in processes}
    listening = [
        (proc.name(), c.laddr)
        for proc in psutil.process_iter()
        if _in_groups(proc, groups)
        for c in proc.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert any(addr.port == int(stack.api_url.rsplit(":", 1)[1].split("/")[0]) for _, addr in listening)
    assert all(addr.ip == "127.0.0.1" for _, addr in listening), f"every server listens on loopback: {listening}"


def _in_groups(process, groups: set[int]) -> bool:
    try:
        return os.getpgid(process.pid) in groups
    except (ProcessLookupError, PermissionError):
        return False


def _api(stack):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: stack.api_url})


def _identity(stack, name: str) -> tuple[str, str]:
    """A new S3 identity on the stack's SeaweedFS whose secret exists nowhere else: only a block will hold it."""
    from seaweedfs import S3Server

    root = Path(stack.root, "s3")
    server = S3Server(
        endpoint_url=stack.s3_endpoint,
        access_key=stack.env["AWS_ACCESS_KEY_ID"],
        secret_key=stack.env["AWS_SECRET_ACCESS_KEY"],
        data_dir=root,
        log_path=root / "weed.log",
        ports=stack.s3_ports,
    )
    key, secret = f"{name}-{secrets.token_hex(4)}", secrets.token_hex(20)
    server.add_identity(name, key, secret, ("Read", "Write", "List", "Tagging"))
    return key, secret


def _cli(stack, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`lora-merge` as a user runs it against the stack's server: no AWS_* variable, so no credentials but the
    block's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(
        PREFECT_API_URL=stack.api_url,
        PREFECT_HOME=str(tmp_path / "client"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        AWS_EC2_METADATA_DISABLED="true",
        AWS_CONFIG_FILE=str(tmp_path / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "no-aws-credentials"),
    )
    return subprocess.run(
        [sys.executable, "-m", "prefect_lora_merge.cli", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _what_the_server_keeps(stack, run_name: str) -> str:
    """Everything the Prefect server holds about one flow run: the run (its parameters), its task runs, its logs
    and its artifacts, as JSON."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    with _api(stack), get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs(limit=50) if r.name == run_name]
        assert runs, f"no flow run {run_name}"
        (run,) = runs
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
        logs, of_logs = [], LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
        while page := client.read_logs(log_filter=of_logs, limit=200, offset=len(logs)):  # the API's largest page
            logs += page
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
        assert logs and tasks and artifacts, "the run left logs, task runs and artifacts to look through"
        return json.dumps(
            {
                "run": run.model_dump(mode="json"),
                "tasks": [t.model_dump(mode="json") for t in tasks],
                "logs": [log.model_dump(mode="json") for log in logs],
                "artifacts": [a.model_dump(mode="json") for a in artifacts],
            }
        )


@pytest.mark.slow
def test_a_merge_reads_and_writes_s3_with_a_blocks_credentials_that_the_server_never_shows(stack, llama_case, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect_aws import AwsCredentials, MinIOCredentials, S3Bucket

    from prefect_lora_merge.core.pipeline import merge_checkpoint

    admin = {k.removeprefix("AWS_").lower(): v for k, v in stack.env.items() if k.startswith("AWS_")}
    import s3fs

    fs = s3fs.S3FileSystem(
        key=admin["access_key_id"],
        secret=admin["secret_access_key"],
        endpoint_url=stack.s3_endpoint,
        skip_instance_cache=True,
    )
    fs.put(f"{llama_case.base_dir}/", f"{stack.bucket}/models/base/", recursive=True)
    fs.put(f"{llama_case.adapter_dir}/", f"{stack.bucket}/adapters/run-1/", recursive=True)
    key, secret = _identity(stack, "merger")
    with _api(stack):
        AwsCredentials(
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name="us-east-1",
            aws_client_parameters={"endpoint_url": stack.s3_endpoint},
        ).save("merger")
        S3Bucket(
            bucket_name=stack.bucket,
            credentials=MinIOCredentials(
                minio_root_user=key,
                minio_root_password=secret,
                aws_client_parameters={"endpoint_url": stack.s3_endpoint},
            ),
        ).save("merge-bucket")

    inputs = ["--base", f"s3://{stack.bucket}/models/base", "--adapter", f"s3://{stack.bucket}/adapters/run-1"]
    reference = tmp_path / "reference"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(reference), device="cpu")

    # Threads of the flow's process, with the AWS credentials block; a local Dask cluster, with the bucket block
    # (its workers read the block themselves).
    for output, block, runner in [
        ("merged/threads", "merger", []),
        ("merged/dask", "s3-bucket/merge-bucket", ["--runner", "dask", "--dask-workers", "1"]),
    ]:
        done = _cli(
            stack,
            tmp_path,
            "run",
            *inputs,
            "--output",
            f"s3://{stack.bucket}/{output}",
            "--storage-block",
            block,
            "--device",
            "cpu",
            *runner,
            "--json",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert secret not in done.stdout + done.stderr
        summary = json.loads(done.stdout)
        assert summary["validation_passed"] and summary["merged_shards"]
        for name in sorted(p.name for p in reference.glob("*.safetensors")):
            assert fs.cat_file(f"{stack.bucket}/{output}/{name}") == (reference / name).read_bytes(), name

    with _api(stack), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(limit=50)
    assert len(runs) == 2
    assert sorted(run.parameters["params"]["storage_block"] for run in runs) == ["merger", "s3-bucket/merge-bucket"]
    for run in runs:
        assert not run.parameters["params"].get("storage_options"), "the block's name is the only storage parameter"
        kept = _what_the_server_keeps(stack, run.name)
        assert secret not in kept, f"flow run {run.name}: the block's secret reached the server's records"

    # validate reads the output with the block too (outside any flow: the block from PREFECT_API_URL)
    checked = _cli(
        stack,
        tmp_path,
        "validate",
        "--output",
        f"s3://{stack.bucket}/merged/threads",
        "--storage-block",
        "aws-credentials/merger",
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("passed")


@pytest.mark.slow
def test_a_storage_block_the_server_lacks_is_refused_before_anything_is_written(stack, tmp_path):
    done = _cli(
        stack,
        tmp_path,
        "plan",
        "--base",
        f"s3://{stack.bucket}/models/base",
        "--adapter",
        f"s3://{stack.bucket}/adapters/run-1",
        "--output",
        f"s3://{stack.bucket}/never",
        "--storage-block",
        "nosuch",
    )
    assert done.returncode == 1
    assert "--storage-block nosuch: the Prefect server at " + stack.api_url in done.stderr
    assert "prefect block ls" in done.stderr
