"""The merge as a Prefect flow on a real Prefect server: one task per shard, consolidated, validated."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import zoo
from checkpoint_tools import edit_adapter_tensors
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.sorting import TaskRunSort

from prefect_lora_merge.cli import main
from prefect_lora_merge.core.errors import OutputLocationError
from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.flows import lora_merge, run_merge

pytestmark = pytest.mark.usefixtures("prefect_server")


async def _task_runs(flow_run_id):
    async with get_client() as client:
        return await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )


def _params(case, out, **overrides) -> MergeParameters:
    values = dict(base=str(case.base_dir), adapter=str(case.adapter_dir), output=str(out), device="cpu", workers=2)
    return MergeParameters(**{**values, **overrides})


def test_flow_runs_one_task_per_shard_then_consolidates_and_validates(llama_case, tmp_path):
    out = tmp_path / "merged"
    state = lora_merge(_params(llama_case, out), return_state=True)
    assert state.is_completed()
    summary = state.result()
    shard_files = sorted(p.name for p in llama_case.base_dir.glob("*.safetensors"))
    assert summary.shards == len(shard_files) >= 3 and summary.validation_passed

    runs = asyncio.run(_task_runs(state.state_details.flow_run_id))
    names = sorted(r.name for r in runs)
    expected = sorted([*(f"merge-{f}" for f in shard_files), "plan", "consolidate", "validate"])
    assert names == expected
    assert all(r.state.is_completed() for r in runs), [(r.name, r.state.type) for r in runs]

    manifest = json.loads((out / "lora-merge-manifest.json").read_text())
    side_files = ["config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer_config.json"]
    assert sorted(manifest["files"]) == sorted([*shard_files, *side_files])
    # The flow's output is PEFT's merge, not only what the plan says.
    oracle = zoo.peft_merged_state_dict(llama_case)
    ours = zoo.loaded_state_dict(out, llama_case)
    for key, expected_tensor in oracle.items():
        assert ours[key].allclose(expected_tensor, rtol=1e-6, atol=1e-6), key


def _scaled_adapter(case, target):
    """The same adapter with one B matrix doubled: another merge of the same base."""
    shutil.copytree(case.adapter_dir, target)

    def scale(tensors):
        key = next(k for k in sorted(tensors) if k.endswith("lora_B.weight"))
        tensors[key] = tensors[key] * 2

    edit_adapter_tensors(target, scale)
    return target


def test_output_holding_another_merge_is_refused_unless_overwrite(llama_case, tmp_path):
    out = tmp_path / "merged"
    run_merge(_params(llama_case, out))
    first_manifest = (out / "lora-merge-manifest.json").read_bytes()
    other = _scaled_adapter(llama_case, tmp_path / "adapter-2")
    with pytest.raises(OutputLocationError, match="already holds a merge of other inputs"):
        run_merge(_params(llama_case, out, adapter=str(other)))
    assert (out / "lora-merge-manifest.json").read_bytes() == first_manifest, "a refused run must leave it as it was"
    (out / "stale-from-the-old-merge.safetensors").write_bytes(b"x")
    manifest = json.loads((out / "lora-merge-manifest.json").read_text())
    manifest["files"]["stale-from-the-old-merge.safetensors"] = {"bytes": 1, "sha256": "0" * 64}
    (out / "lora-merge-manifest.json").write_text(json.dumps(manifest))
    assert run_merge(_params(llama_case, out, adapter=str(other), overwrite=True)).validation_passed
    assert not (out / "stale-from-the-old-merge.safetensors").exists(), "files of the replaced merge are removed"
    assert (
        json.loads((out / "lora-merge-manifest.json").read_bytes())["fingerprint"]
        != json.loads(first_manifest)["fingerprint"]
    )


def test_cli_run_then_validate_against_base_and_adapter(llama_case, tmp_path, capsys):
    out = tmp_path / "merged"
    inputs = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir)]
    assert main(["run", *inputs, "--output", str(out), "--device", "cpu", "--workers", "2"]) == 0
    assert "validation passed" in capsys.readouterr().out
    assert main(["validate", "--output", str(out), *inputs]) == 0
    assert capsys.readouterr().out.startswith("passed")
