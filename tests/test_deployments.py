"""Deployments: deployments/prefect.yaml as Prefect reads it, `lora-merge serve`'s same trigger, the Python API as a
subflow, and end to end: a real Prefect server and process worker (infra/local_stack.py), `prefect deploy` from the
YAML, an adapter-ready event, and the triggered merge on the local S3 server with a passing validation."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import MANIFEST_FILE, REPORT_FILE

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
sys.path.insert(0, str(ROOT / "infra"))


def _deployment() -> dict:
    (deployment,) = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    return deployment


def _render(template: object, **values: object) -> object:
    """Fill `{{ name.path }}` placeholders the way Prefect does for whole-string templates (enough for this YAML)."""
    if isinstance(template, dict):
        return {k: _render(v, **values) for k, v in template.items()}
    if isinstance(template, str) and template.startswith("{{") and template.endswith("}}"):
        path = template[2:-2].strip().split(".")
        value = values[path[0]]
        for part in path[1:]:
            value = value[part]
        return value
    return template


# -- the YAML -----------------------------------------------------------------------------------------------------


def test_prefect_yaml_is_a_valid_prefect_project_whose_entrypoint_is_the_merge_flow():
    from prefect.cli.deploy._models import PrefectYamlModel
    from prefect.flows import load_flow_from_entrypoint

    project = PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))
    (deployment,) = project.deployments
    flow = load_flow_from_entrypoint(deployment.entrypoint)
    assert flow.name == "lora-merge"
    assert deployment.work_pool.name == "lora-merge"
    assert deployment.enforce_parameter_schema


def test_the_yaml_trigger_is_the_one_lora_merge_serve_uses():
    from prefect.events import DeploymentEventTrigger

    from prefect_lora_merge.flows.deployment import adapter_ready_trigger

    (trigger,) = _deployment()["triggers"]
    from_yaml = DeploymentEventTrigger.model_validate(trigger)
    served = adapter_ready_trigger("{{ $LORA_MERGE_BASE }}")
    assert from_yaml.model_dump() == served.model_dump()


def test_an_adapter_ready_event_renders_to_valid_merge_parameters():
    (trigger,) = _deployment()["triggers"]
    event = {"payload": {"adapter": "s3://adapters/run-7", "output": "s3://merged/run-7"}}
    rendered = _render(trigger["parameters"], event=event, **{"$LORA_MERGE_BASE": "s3://models/base"})
    params = MergeParameters.model_validate(rendered["params"])
    assert (params.adapter, params.output) == ("s3://adapters/run-7", "s3://merged/run-7")
    assert params.wait_for_output, "two events for one output queue instead of failing"


def test_the_example_schedule_is_inactive_and_gives_complete_parameters():
    (schedule,) = _deployment()["schedules"]
    assert schedule["active"] is False
    values = {"$LORA_MERGE_BASE": "b", "$LORA_MERGE_NIGHTLY_ADAPTER": "a", "$LORA_MERGE_NIGHTLY_OUTPUT": "o"}
    MergeParameters.model_validate(_render(schedule["parameters"], **values)["params"])


def test_the_flow_parameter_schema_is_the_merge_parameters_model():
    from prefect.utilities.callables import parameter_schema

    from prefect_lora_merge.flows import lora_merge

    schema = parameter_schema(lora_merge.fn).model_dump()
    assert schema["required"] == ["params"]
    definition = schema["definitions"]["MergeParameters"]
    assert set(definition["properties"]) == set(MergeParameters.model_fields)


# -- serve and announce need a server ---------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return subprocess.run(
        [sys.executable, "-m", "prefect_lora_merge.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["serve", "--base", "b"], "lora-merge serve needs a Prefect server"),
        (["announce", "--adapter", "a", "--output", "o"], "PREFECT_API_URL is not set"),
    ],
)
def test_serve_and_announce_without_a_prefect_server_say_what_to_set(args, expected):
    result = _cli(*args)
    assert result.returncode == 1
    assert expected in result.stderr and "PREFECT_API_URL" in result.stderr


def test_a_serve_schedule_needs_the_adapter_and_output_it_merges(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_lora_merge.core.errors import LoraMergeError
    from prefect_lora_merge.flows.deployment import serve

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        with pytest.raises(LoraMergeError, match="give --adapter and --output"):
            serve("s3://b", cron="0 3 * * *")
        with pytest.raises(LoraMergeError, match="not a cron expression"):
            serve("s3://b", cron="at three", adapter="a", output="o")


# -- the Python API ---------------------------------------------------------------------------------------------


def test_a_users_flow_runs_the_merge_as_a_subflow_and_gets_the_manifest_and_validation(
    prefect_server, llama_case, tmp_path
):
    from prefect import flow

    from prefect_lora_merge import MergeParameters as Exported
    from prefect_lora_merge import lora_merge

    @flow
    def post_training(adapter: str) -> dict:
        summary = lora_merge(
            Exported(base=str(llama_case.base_dir), adapter=adapter, output=str(tmp_path / "merged"), device="cpu")
        )
        return {"manifest": summary.manifest, "passed": summary.validation_passed, "report": summary.validation_report}

    result = post_training(str(llama_case.adapter_dir))
    assert result["passed"]
    assert result["manifest"] == str(tmp_path / "merged" / MANIFEST_FILE)
    assert json.loads(Path(result["manifest"]).read_text())["files"], "the manifest lists the published files"
    assert json.loads(Path(result["report"]).read_text())["passed"] is True


# -- end to end ------------------------------------------------------------------------------------------------


@pytest.fixture
def stack(tmp_path):
    from local_stack import start_stack, stop_stack

    stack = start_stack(tmp_path / "stack")
    try:
        yield stack
    finally:
        stop_stack(stack)


def _s3(stack):
    import s3fs

    env = stack.env
    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
        client_kwargs={"region_name": env["AWS_DEFAULT_REGION"]},
        skip_instance_cache=True,
    )


def _flow_runs(stack) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
        return client.read_flow_runs(limit=50, sort=FlowRunSort.START_TIME_DESC)


@pytest.mark.slow
def test_an_adapter_ready_event_starts_a_deployed_merge_on_s3_that_validates(stack, llama_case, tmp_path):
    fs = _s3(stack)
    fs.put(f"{llama_case.base_dir}/", f"{stack.bucket}/models/base/", recursive=True)
    fs.put(f"{llama_case.adapter_dir}/", f"{stack.bucket}/adapters/run-1/", recursive=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(stack.env, PREFECT_HOME=str(tmp_path / "client"), PREFECT_SERVER_ANALYTICS_ENABLED="false")

    deploy = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--all"],
        env={**env, "LORA_MERGE_BASE": f"s3://{stack.bucket}/models/base"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    assert "successfully created" in deploy.stdout

    output = f"s3://{stack.bucket}/merged/run-1"
    for _ in range(2):  # the same adapter announced twice: the second run waits for the first, then resumes it
        announce = subprocess.run(
            [sys.executable, "-m", "prefect_lora_merge.cli", "announce"]
            + ["--adapter", f"s3://{stack.bucket}/adapters/run-1", "--output", output],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert announce.returncode == 0, announce.stderr

    deadline = time.monotonic() + 300
    while True:
        runs = _flow_runs(stack)
        if len(runs) == 2 and all(run.state and run.state.is_final() for run in runs):
            break
        assert time.monotonic() < deadline, f"the triggered runs did not finish: {[str(r.state) for r in runs]}"
        time.sleep(2)
    assert [run.state.type.value for run in runs] == ["COMPLETED", "COMPLETED"], [str(r.state) for r in runs]
    for run in runs:
        assert run.parameters["params"]["adapter"] == f"s3://{stack.bucket}/adapters/run-1", "taken from the event"
        assert run.parameters["params"]["output"] == output

    report = json.loads(fs.cat_file(f"{stack.bucket}/merged/run-1/{REPORT_FILE}"))
    assert report["passed"] and report["checks"]["tensors recomputed"] > 0
    manifest = json.loads(fs.cat_file(f"{stack.bucket}/merged/run-1/{MANIFEST_FILE}"))
    reference = tmp_path / "reference"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(reference), device="cpu")
    for name in sorted(p.name for p in reference.glob("*.safetensors")):
        merged = fs.cat_file(f"{stack.bucket}/merged/run-1/{name}")
        assert merged == (reference / name).read_bytes(), f"{name} differs from a single-machine merge"
        assert manifest["files"][name]["sha256"] == hashlib.sha256(merged).hexdigest()
