"""The merge as a Prefect flow on a real Prefect server: one task per shard, consolidated, validated."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import time

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
    # The replaced merge wrote it: its manifest records its size and sha256 (the proof the tool needs to delete it).
    manifest["files"]["stale-from-the-old-merge.safetensors"] = {"bytes": 1, "sha256": hashlib.sha256(b"x").hexdigest()}
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
    run = capsys.readouterr().out
    assert "validation passed in" in run and "of the merge's time" in run
    assert re.search(r"largest change ‖ΔW‖/‖W‖: [0-9.e-]+ on model\.layers\.\d\.\S+\.weight", run), run
    assert main(["validate", "--output", str(out), *inputs]) == 0
    checked = capsys.readouterr().out
    assert checked.startswith("passed") and "14 tensors recomputed" in checked, checked


async def _artifacts(flow_run_id) -> list[dict]:
    """The flow run's artifacts, through the server's REST API (the 3.8 client sends nulls its server refuses)."""
    async with get_client() as client:
        response = await client._client.post(
            "/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}}, "limit": 50}
        )
        response.raise_for_status()
        return response.json()


def test_a_run_publishes_its_report_and_artifacts(llama_case, tmp_path):
    out = tmp_path / "reported"
    state = lora_merge(_params(llama_case, out), return_state=True)
    assert state.is_completed()
    artifacts = {a["type"]: a for a in asyncio.run(_artifacts(state.state_details.flow_run_id))}
    assert set(artifacts) == {"progress", "table", "markdown"}

    assert artifacts["progress"]["data"] == pytest.approx(100.0), "every shard finished"
    table = artifacts["table"]["data"]
    rows = json.loads(table) if isinstance(table, str) else table
    shard_files = sorted(p.name for p in llama_case.base_dir.glob("*.safetensors"))
    assert [r["shard"] for r in rows] == shard_files
    manifest = json.loads((out / "lora-merge-manifest.json").read_text())
    assert {r["shard"]: r["sha256"] for r in rows} == {f: manifest["files"][f]["sha256"] for f in shard_files}
    assert {r["outcome"] for r in rows} == {"merged", "copied server-side"}, "lm_head's shard is untouched"
    assert sum(r["touched"] for r in rows) == 14
    # measured per shard, in the table and in lora-merge-report.json, agreeing with each other and with the files
    report = {f["file"]: f for f in json.loads((out / "lora-merge-report.json").read_text())["shards"]}
    assert sorted(report) == shard_files
    for row in rows:
        figures = report[row["shard"]]
        if row["outcome"] != "merged":
            assert figures["peak_memory_bytes"] is None
            continue
        assert figures["bytes_written"] == row["bytes"] == (out / row["shard"]).stat().st_size
        assert figures["bytes_read"] == row["bytes read"] > 0
        assert 0 < figures["peak_memory_bytes"] and figures["estimated_peak_bytes"] > 0
        assert row["peak MiB above start"] <= row["estimate MiB"] and not row["above estimate"]

    summary = artifacts["markdown"]["data"]
    assert summary.startswith(f"# LoRA merge into `{out}`") and "## Passed" in summary
    assert "| tensors recomputed | 14 |" in summary and "## Largest changes ‖ΔW‖/‖W‖" in summary
    assert re.search(r"^\| 0 \| 7 \| [0-9.e-]+ \| [0-9.e-]+ \| █+ \|$", summary, re.M), "layer 0: 7 projections"
    assert re.search(r"^\| 1 \| 7 \| ", summary, re.M), summary

    report = json.loads((out / "lora-merge-report.json").read_text())
    assert report["passed"] and len(report["numbers"]) == 14
    assert "lora-merge-report.json" not in manifest["files"], "the report records timings: not part of the output"


def test_a_failed_validation_puts_the_failures_first_in_the_summary(llama_case, tmp_path, monkeypatch):
    from prefect_lora_merge.core import recompute

    # A merge whose arithmetic disagrees with the recomputation: the recomputation sees a different adapter scale.
    real = recompute._apply_rows
    monkeypatch.setattr(recompute, "_apply_rows", lambda u, *a: real(u.model_copy(update={"scale": 3 * u.scale}), *a))
    out = tmp_path / "refused"
    state = lora_merge(_params(llama_case, out), return_state=True)
    assert state.is_failed()
    summary = next(a for a in asyncio.run(_artifacts(state.state_details.flow_run_id)) if a["type"] == "markdown")[
        "data"
    ]
    assert re.fullmatch(r"## FAILED: \d+ problem\(s\)", summary.splitlines()[2]), summary
    assert "differ from base + adapter recomputed in float64" in summary.splitlines()[4]
    assert not (out / "lora-merge-manifest.json").exists(), "nothing is published"
    assert not json.loads((out / "lora-merge-report.json").read_text())["passed"]


def test_shards_in_flight_finish_before_the_flow_lets_the_output_go(prefect_server, llama_case, tmp_path):
    """An error while shards run: the flow's shard loop waits for the ones in flight before it leaves (and so
    before the output's lease is released), so no shard task writes after another run has taken the output."""
    import threading

    from prefect import flow, task

    from prefect_lora_merge.core.plan import make_plan
    from prefect_lora_merge.flows.merge import _bounded
    from prefect_lora_merge.flows.runners import ShardRunner

    plan = make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), str(tmp_path / "out"), device="cpu")
    assert len(plan.shards) >= 2
    first_done = threading.Event()
    finished: list[str] = []

    @task
    def shard_task(file: str) -> str:
        if file == plan.shards[0].file:
            first_done.set()
        else:
            first_done.wait(10)
            time.sleep(1.0)  # still running when the caller gives up
        finished.append(file)
        return file

    @flow
    def leaves_early() -> list[str]:
        runner = ShardRunner("threads", len(plan.shards), 1, "test", lambda shard: shard_task.submit(shard.file))
        shards = _bounded(plan, runner)
        next(shards)
        shards.close()  # what an exception in the caller's loop does
        return list(finished)

    assert sorted(leaves_early()) == sorted(s.file for s in plan.shards), "every shard in flight had finished"
