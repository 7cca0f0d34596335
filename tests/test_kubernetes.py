"""The cluster files: the Kubernetes work-pool job template and the Dask cluster spec, sized from a real plan and
checked offline against the schemas Prefect, Kubernetes and the dask-kubernetes operator use (no cluster here)."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import uuid
from pathlib import Path

import pytest
import yaml

from prefect_lora_merge.cli import main
from prefect_lora_merge.core.plan import make_plan
from prefect_lora_merge.core.resources import WORKER_RUNTIME_BYTES
from prefect_lora_merge.core.sizing import GiB, dask_cluster, job_variables, merge_pod

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra" / "kubernetes" / "work-pool-job-template.json"
EXAMPLE_CLUSTER = ROOT / "infra" / "kubernetes" / "dask-cluster.example.yaml"
KUBERNETES = "1.33"  # the Kubernetes API version the manifests are checked against


def _strict_pod_manifest(manifest: dict) -> dict:
    """prefect-kubernetes requires `completions`/`parallelism` in the pod template (it compares with its own base
    manifest); Kubernetes has them on the Job spec, so a strict check looks past them."""
    manifest = copy.deepcopy(manifest)
    for key in ("completions", "parallelism"):
        manifest["spec"]["template"]["spec"].pop(key, None)
    return manifest


def _dask_cluster_schema() -> dict:
    """The DaskCluster CRD's openAPIV3Schema as the dask-kubernetes wheel ships it, made strict about unknown keys
    (the CRD allows them, so a misspelt field would otherwise pass)."""
    spec = importlib.util.find_spec("dask_kubernetes")
    assert spec is not None, "dask-kubernetes (a test dependency) ships the DaskCluster CRD"
    crd_path = Path(spec.submodule_search_locations[0]).joinpath(
        "operator", "deployment", "helm", "dask-kubernetes-operator", "crds", "daskcluster.yaml"
    )
    crd = yaml.safe_load(crd_path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]

    def strict(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node = {**node, "additionalProperties": False}
            return {key: strict(value) for key, value in node.items()}
        return [strict(item) for item in node] if isinstance(node, list) else node

    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"].update(
        apiVersion={"const": "kubernetes.dask.org/v1"}, kind={"const": "DaskCluster"}, metadata={"type": "object"}
    )
    return schema


def _check_dask_cluster(document: dict) -> None:
    import jsonschema
    import kubernetes_validate

    errors = [e.message for e in jsonschema.Draft4Validator(_dask_cluster_schema()).iter_errors(document)]
    assert errors == []
    for part in ("worker", "scheduler"):
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": part}, "spec": document["spec"][part]["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES, strict=True)


@pytest.fixture(scope="module")
def plan(llama_case, tmp_path_factory):
    output = tmp_path_factory.mktemp("k8s") / "merged"
    return make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), str(output), device="cpu")


def test_the_work_pool_template_is_valid_for_prefect_and_renders_a_valid_kubernetes_job(plan):
    import kubernetes_validate
    from prefect.client.schemas.objects import FlowRun
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.schema_tools import is_valid_schema
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads(TEMPLATE.read_text())
    validate_base_job_template(template)  # every {{ variable }} is declared
    is_valid_schema(template["variables"], preprocess=False)

    pod = merge_pod(plan.estimated_peak_bytes, 2, gpus=1)
    values = job_variables(pod, "registry.example/lora-merge:1", env={"AWS_ENDPOINT_URL": "http://s3.local:8333"})
    configuration = asyncio.run(
        KubernetesWorkerJobConfiguration.from_template_and_values(template, values, client=object())
    )
    configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="merry-merge"))  # as the worker does
    manifest = configuration.job_manifest
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/lora-merge:1"
    assert container["resources"]["requests"]["memory"] == pod.memory
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "AWS_ENDPOINT_URL", "value": "http://s3.local:8333"} in container["env"]
    kubernetes_validate.validate(_strict_pod_manifest(manifest), KUBERNETES, strict=True)


def test_the_job_holds_the_shards_it_merges_at_once_and_the_process():
    pod = merge_pod(3 * GiB, 4)
    assert pod.memory_bytes == 4 * 3 * GiB + WORKER_RUNTIME_BYTES
    assert pod.memory == "13Gi" and pod.cpu == "9" and pod.gpus == 0


def test_a_bad_variable_value_is_refused_by_the_templates_schema():
    from prefect.utilities.schema_tools import ValidationError, validate

    template = json.loads(TEMPLATE.read_text())
    with pytest.raises(ValidationError, match="memory"):
        validate({"image": "x", "memory": "lots"}, template["variables"], raise_on_error=True, ignore_required=True)


def test_plan_writes_the_cluster_files_sized_from_its_estimate(plan, llama_case, tmp_path, capsys):
    out = tmp_path / "k8s"
    code = main(
        ["plan", "--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir)]
        + ["--output", str(tmp_path / "merged"), "--device", "cpu", "--kubernetes", str(out)]
        + ["--image", "registry.example/lora-merge:1", "--dask-workers", "3", "--gpu"]
    )
    printed = capsys.readouterr()
    assert code == 0 and "dry run" in printed.out
    assert "need PREFECT_API_URL" in printed.err, "without --prefect-api-url the workers would not report"
    assert not (tmp_path / "merged").exists(), "planning writes nothing to the output"
    variables = json.loads((out / "job-variables.json").read_text())
    assert variables == job_variables(merge_pod(plan.estimated_peak_bytes, 1, gpus=1), "registry.example/lora-merge:1")
    cluster = yaml.safe_load((out / "dask-cluster.yaml").read_text())
    _check_dask_cluster(cluster)
    worker = cluster["spec"]["worker"]
    (container,) = worker["spec"]["containers"]
    assert worker["replicas"] == 3
    assert f"MEMORY={plan.estimated_peak_bytes} GPU=1" in container["args"], "what --runner dask places shards by"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_plan_json_keeps_stdout_to_the_plan_and_sets_the_workers_prefect_api(llama_case, tmp_path, capsys):
    out = tmp_path / "k8s"
    api = "http://prefect-server.prefect:4200/api"
    code = main(
        ["plan", "--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--json"]
        + ["--output", str(tmp_path / "merged"), "--device", "cpu", "--kubernetes", str(out)]
        + ["--image", "registry.example/lora-merge:1", "--prefect-api-url", api]
    )
    printed = capsys.readouterr()
    assert code == 0 and json.loads(printed.out)["summary"]["shards"] >= 1, "stdout holds the JSON plan alone"
    assert "wrote" in printed.err and "need PREFECT_API_URL" not in printed.err
    cluster = yaml.safe_load((out / "dask-cluster.yaml").read_text())
    _check_dask_cluster(cluster)
    (container,) = cluster["spec"]["worker"]["spec"]["containers"]
    assert {"name": "PREFECT_API_URL", "value": api} in container["env"]
    assert json.loads((out / "job-variables.json").read_text())["env"] == {"PREFECT_API_URL": api}


def test_the_example_dask_cluster_in_infra_is_a_valid_daskcluster():
    _check_dask_cluster(yaml.safe_load(EXAMPLE_CLUSTER.read_text()))


def test_a_misspelt_field_in_a_dask_cluster_is_caught():
    import jsonschema

    cluster = dask_cluster("c", "img", 2, GiB, gpu=True)
    cluster["spec"]["worker"]["replica"] = cluster["spec"]["worker"].pop("replicas")
    errors = list(jsonschema.Draft4Validator(_dask_cluster_schema()).iter_errors(cluster))
    assert any("replica" in e.message for e in errors)


def test_kubernetes_files_need_an_image(llama_case, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            ["plan", "--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir)]
            + ["--output", str(tmp_path / "m"), "--kubernetes", str(tmp_path / "k8s")]
        )
    assert "--kubernetes needs --image" in capsys.readouterr().err
