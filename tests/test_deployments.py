"""Deployments: deployments/prefect.yaml as Prefect reads it, `lora-merge serve`'s same trigger, the Python API as a
subflow, and end to end: a real Prefect server and process worker (infra/local_stack.py), `prefect deploy` from the
YAML, an adapter-ready event, and the triggered merge on the local S3 server with a passing validation."""

from __future__ import annotations

import copy
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


def _deployed(template: dict, monkeypatch: pytest.MonkeyPatch, **environment: str) -> dict:
    """`template` as `prefect deploy` stores it: its {{ $VAR }} placeholders filled from the environment."""
    from prefect.utilities.templating import apply_values

    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    return apply_values(copy.deepcopy(template), {}, remove_notset=False)


def _triggered(parameters: dict, event: dict) -> dict:
    """A deployed trigger's parameters as the Prefect server renders them for the run an event starts."""
    from prefect.server.events.actions import RunDeployment
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate

    parameters = copy.deepcopy(parameters)
    RunDeployment._upgrade_v1_templates(parameters)
    return hydrate(parameters, HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": event}))


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


@pytest.mark.parametrize(
    ("announced", "overwrite"),
    [({}, False), ({"overwrite": False}, False), ({"overwrite": True}, True)],
    ids=["another-tools-event", "announce", "announce-overwrite"],
)
def test_an_adapter_ready_event_renders_to_valid_merge_parameters(monkeypatch, announced, overwrite):
    (trigger,) = _deployment()["triggers"]
    deployed = _deployed(trigger["parameters"], monkeypatch, LORA_MERGE_BASE="s3://models/base")
    event = {"payload": {"adapter": "s3://adapters/run-7", "output": "s3://merged/run-7", **announced}}
    params = MergeParameters.model_validate(_triggered(deployed, event)["params"])
    assert (params.base, params.adapter, params.output) == (
        "s3://models/base",
        "s3://adapters/run-7",
        "s3://merged/run-7",
    )
    assert params.overwrite is overwrite, "another adapter's merge is replaced only when the event says so"
    assert params.wait_for_output, "two events for one output queue instead of failing"


def test_an_event_that_announces_several_adapters_renders_to_a_list_of_them(monkeypatch):
    (trigger,) = _deployment()["triggers"]
    deployed = _deployed(trigger["parameters"], monkeypatch, LORA_MERGE_BASE="s3://models/base")
    adapters = ["s3://adapters/domain", "s3://adapters/chat:0.5", "s3://adapters/unlearn:-1"]
    event = {"payload": {"adapter": adapters, "output": "s3://merged/blend"}}
    params = MergeParameters.model_validate(_triggered(deployed, event)["params"])
    assert params.adapter == adapters
    assert [(s.uri, s.weight) for s in params.adapter_specs()] == [
        ("s3://adapters/domain", 1.0),
        ("s3://adapters/chat", 0.5),
        ("s3://adapters/unlearn", -1.0),
    ]


def test_the_example_schedule_is_inactive_and_replaces_last_nights_merge(monkeypatch):
    (schedule,) = _deployment()["schedules"]
    assert schedule["active"] is False
    environment = {"LORA_MERGE_BASE": "b", "LORA_MERGE_NIGHTLY_ADAPTER": "a", "LORA_MERGE_NIGHTLY_OUTPUT": "o"}
    params = MergeParameters.model_validate(_deployed(schedule["parameters"], monkeypatch, **environment)["params"])
    assert (params.base, params.adapter, params.output) == ("b", "a", "o")
    assert params.overwrite, "the adapter at that path changes every night"


def test_serve_gives_its_schedule_the_yaml_schedules_parameters(monkeypatch):
    from prefect_lora_merge.flows import deployment

    (schedule,) = _deployment()["schedules"]
    environment = {"LORA_MERGE_BASE": "b", "LORA_MERGE_NIGHTLY_ADAPTER": "a", "LORA_MERGE_NIGHTLY_OUTPUT": "o"}
    served: dict = {}
    monkeypatch.setattr("prefect_lora_merge.flows.merge.lora_merge.serve", lambda **kwargs: served.update(kwargs))
    with _api_url("http://127.0.0.1:9/api"):
        deployment.serve("b", cron="0 3 * * *", adapter="a", output="o")
    (cron,) = served["schedules"]
    assert cron.parameters == _deployed(schedule["parameters"], monkeypatch, **environment)


def test_serve_refuses_credentials_in_the_parameters_it_would_store(monkeypatch):
    from prefect_lora_merge.core.errors import LoraMergeError
    from prefect_lora_merge.flows import deployment

    monkeypatch.setattr("prefect_lora_merge.flows.merge.lora_merge.serve", lambda **kwargs: None)
    options = {"client_kwargs": {"endpoint_url": "http://s3"}, "secret": "s3cr3t"}
    with _api_url("http://127.0.0.1:9/api"), pytest.raises(LoraMergeError, match="--storage-options secret: .*AWS_"):
        deployment.serve("b", storage_options=options)
    with _api_url("http://127.0.0.1:9/api"):
        deployment.serve("b", storage_options={"client_kwargs": {"endpoint_url": "http://s3"}})


def test_serve_with_a_storage_block_gives_its_runs_the_blocks_name_and_no_secret(monkeypatch):
    from prefect_lora_merge.flows import deployment

    served: dict = {}
    monkeypatch.setattr("prefect_lora_merge.flows.merge.lora_merge.serve", lambda **kwargs: served.update(kwargs))
    with _api_url("http://127.0.0.1:9/api"):
        deployment.serve("s3://models/b", cron="0 3 * * *", adapter="s3://a/x", output="s3://m/x", storage_block="prod")
    (trigger,) = served["triggers"]
    event = {"payload": {"adapter": "s3://adapters/run-7", "output": "s3://merged/run-7"}}
    triggered = MergeParameters.model_validate(_triggered(trigger.parameters, event)["params"])
    (cron,) = served["schedules"]
    scheduled = MergeParameters.model_validate(cron.parameters["params"])
    assert triggered.storage_block == scheduled.storage_block == "prod"
    assert triggered.storage_options == scheduled.storage_options == {}


def _api_url(url: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: url})


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
        with pytest.raises(LoraMergeError, match=r"give --adapter \(repeatable\) and --output"):
            serve("s3://b", cron="0 3 * * *")
        with pytest.raises(LoraMergeError, match="give --cron too"):
            serve("s3://b", adapter=["a", "b:0.5"], output="o")
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


def _logged_at(stack, run, message: str):
    """When `run` first logged a line starting with `message` (its last logs may reach the server after its final
    state: they are sent in batches)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + 60
    while True:
        with temporary_settings({PREFECT_API_URL: stack.api_url}), get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])), limit=200)
        times = [log.timestamp for log in logs if log.message.startswith(message)]
        if times:
            return min(times)
        assert time.monotonic() < deadline, f"flow run {run.name} logged no '{message}'"
        time.sleep(1)


@pytest.mark.slow
def test_an_adapter_ready_event_starts_a_deployed_merge_on_s3_that_validates(stack, llama_case, tmp_path):
    from local_stack import StackError, start_stack

    with pytest.raises(StackError, match="already running in .*local_stack.py stop"):
        start_stack(stack.root)
    fs = _s3(stack)
    fs.put(f"{llama_case.base_dir}/", f"{stack.bucket}/models/base/", recursive=True)
    fs.put(f"{llama_case.adapter_dir}/", f"{stack.bucket}/adapters/run-1/", recursive=True)
    fs.put(f"{llama_case.adapter_dir}/", f"{stack.bucket}/adapters/run-1-again/", recursive=True)
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
    # Several adapters in one event: a list in the payload, a list in the run's parameters.
    blend = [f"s3://{stack.bucket}/adapters/run-1", f"s3://{stack.bucket}/adapters/run-1-again:-0.5"]
    blend_output = f"s3://{stack.bucket}/merged/blend"
    announce = subprocess.run(
        [sys.executable, "-m", "prefect_lora_merge.cli", "announce", "--output", blend_output]
        + [arg for adapter in blend for arg in ("--adapter", adapter)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert announce.returncode == 0, announce.stderr

    deadline = time.monotonic() + 300
    while True:
        runs = _flow_runs(stack)
        if len(runs) == 3 and all(run.state and run.state.is_final() for run in runs):
            break
        assert time.monotonic() < deadline, f"the triggered runs did not finish: {[str(r.state) for r in runs]}"
        time.sleep(2)
    assert [run.state.type.value for run in runs] == ["COMPLETED"] * 3, [str(r.state) for r in runs]
    (blended,) = [run for run in runs if run.parameters["params"]["output"] == blend_output]
    assert blended.parameters["params"]["adapter"] == blend
    blend_report = json.loads(fs.cat_file(f"{stack.bucket}/merged/blend/{REPORT_FILE}"))
    assert blend_report["passed"], blend_report["failures"]
    runs = [run for run in runs if run is not blended]
    for run in runs:
        assert run.parameters["params"]["adapter"] == f"s3://{stack.bucket}/adapters/run-1", "taken from the event"
        assert run.parameters["params"]["output"] == output
    first, second = sorted(
        (_logged_at(stack, run, "took the slot"), _logged_at(stack, run, "released the slot")) for run in runs
    )
    assert first[1] <= second[0], "one run on the output at a time: the second took the output's slot after the first"

    report = json.loads(fs.cat_file(f"{stack.bucket}/merged/run-1/{REPORT_FILE}"))
    assert report["passed"] and report["checks"]["tensors recomputed"] > 0
    manifest = json.loads(fs.cat_file(f"{stack.bucket}/merged/run-1/{MANIFEST_FILE}"))
    reference = tmp_path / "reference"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(reference), device="cpu")
    for name in sorted(p.name for p in reference.glob("*.safetensors")):
        merged = fs.cat_file(f"{stack.bucket}/merged/run-1/{name}")
        assert merged == (reference / name).read_bytes(), f"{name} differs from a single-machine merge"
        assert manifest["files"][name]["sha256"] == hashlib.sha256(merged).hexdigest()
    again = tmp_path / "run-1-again"
    again.mkdir()
    for part in llama_case.adapter_dir.iterdir():
        (again / part.name).write_bytes(part.read_bytes())
    blended_here = tmp_path / "blend"
    merge_checkpoint(str(llama_case.base_dir), [str(llama_case.adapter_dir), f"{again}:-0.5"], str(blended_here))
    for name in sorted(p.name for p in blended_here.glob("*.safetensors")):
        assert fs.cat_file(f"{stack.bucket}/merged/blend/{name}") == (blended_here / name).read_bytes(), name
