"""kill -9 at any point, then a re-run with a fresh Prefect database: the same bytes, and no committed shard redone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from checkpoint_tools import tree_digest

from prefect_lora_merge.core.pipeline import merge_checkpoint

pytestmark = pytest.mark.usefixtures("prefect_server")

PLUGIN = Path(__file__).parent / "crash_plugin"


def _published(directory: Path) -> dict[str, str]:
    return {k: v for k, v in tree_digest(directory).items() if not k.startswith(".lora-merge/")}


def _cli(
    case,
    out: Path,
    prefect_home: Path,
    *,
    kill_at: str | None = None,
    api_url: str | None = None,
    pause_marker: Path | None = None,
    start_only: bool = False,
):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if kill_at or pause_marker:
        env["LORA_MERGE_KILL_AT"] = kill_at or ""
        env["LORA_MERGE_PAUSE_MARKER"] = str(pause_marker or "")
        env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN), env.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        "-m",
        "prefect_lora_merge.cli",
        "run",
        "--base",
        str(case.base_dir),
        "--adapter",
        str(case.adapter_dir),
        "--output",
        str(out),
        "--device",
        "cpu",
        "--workers",
        "1",
        "--json",
    ]
    if start_only:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(llama_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "merged"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), device="cpu")
    return out


@pytest.mark.parametrize(
    "kill_at",
    ["between-shards", "inside-shard-write", "after-commit-before-record", "during-consolidation", "before-manifest"],
)
def test_kill_9_then_rerun_on_a_fresh_prefect_database_gives_identical_output(llama_case, reference, tmp_path, kill_at):
    from prefect.settings import PREFECT_API_URL

    out = tmp_path / "merged"
    killed = _cli(llama_case, out, tmp_path / "prefect-1", kill_at=kill_at, api_url=PREFECT_API_URL.value())
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert not (out / "lora-merge-manifest.json").exists(), "a killed run never looks finished"
    committed = sorted(p.name.removesuffix(".json") for p in (out / ".lora-merge" / "shards").glob("*.json"))
    shards = sorted(p.name for p in llama_case.base_dir.glob("*.safetensors"))
    for name in shards:  # whatever is under a shard's final name is whole: committed, or absent
        if (out / name).exists() and name not in committed:
            assert (out / name).read_bytes() == (reference / name).read_bytes()

    rerun = _cli(llama_case, out, tmp_path / "prefect-2")  # fresh PREFECT_HOME: an ephemeral server, a new DB
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["resumed_shards"] == committed, "every shard committed before the kill is skipped"
    assert sorted(summary["merged_shards"] + summary["resumed_shards"]) == shards
    assert _published(out) == _published(reference)
    assert not list(out.glob(".*.partial-*")), "no temporary file is left behind"


def test_of_two_concurrent_runs_on_one_output_only_one_writes(llama_case, tmp_path):
    import socket
    import time

    from prefect.settings import PREFECT_API_URL

    out, marker = tmp_path / "merged", tmp_path / "first-is-merging"
    first = _cli(
        llama_case, out, tmp_path / "prefect-1", api_url=PREFECT_API_URL.value(), pause_marker=marker, start_only=True
    )
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first run never committed a shard"
            time.sleep(0.2)
        before = tree_digest(out)
        second = _cli(llama_case, out, tmp_path / "prefect-2", api_url=PREFECT_API_URL.value())
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"being written by another run: {socket.gethostname()}:{first.pid}:" in lines[0]
        assert tree_digest(out) == before, "the refused run wrote nothing"
    finally:
        first.kill()
        first.communicate()
