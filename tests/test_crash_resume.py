"""kill -9 at any point, then a re-run with a fresh Prefect database: the same bytes, and no committed shard redone.

The killed run and the re-run are real `lora-merge run` processes. Crashes are injected by tests/crash_plugin
(put on the child's PYTHONPATH); the tool has no crash hooks of its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from checkpoint_tools import tree_digest
from s3_server import BUCKET

from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import REPORT_FILE

pytestmark = pytest.mark.usefixtures("prefect_server")

PLUGIN = Path(__file__).parent / "crash_plugin"
KILL_POINTS = [
    "between-shards",
    "inside-shard-write",
    "after-commit-before-record",
    "during-consolidation",
    "before-manifest",
]


def _published(directory: Path) -> dict[str, str]:
    """sha256 of the published files (the state directory is bookkeeping, the report records timings)."""
    return {k: v for k, v in tree_digest(directory).items() if not k.startswith(".lora-merge/") and k != REPORT_FILE}


class Output:
    """Where a crash test writes: a local directory, or a prefix on the S3 server."""

    def __init__(self, tmp_path: Path, s3=None) -> None:
        self.s3 = s3
        self.prefix = f"crash-{tmp_path.name}/merged"
        self.uri = f"s3://{BUCKET}/{self.prefix}" if s3 else str(tmp_path / "merged")

    def _key(self, name: str) -> str:
        return f"{BUCKET}/{self.prefix}/{name}".rstrip("/")

    def files(self, sub: str = "") -> list[str]:
        if self.s3 is None:
            root = Path(self.uri) / sub
            return sorted(p.name for p in root.iterdir() if p.is_file()) if root.exists() else []
        fs = self.s3.fs()
        if not fs.exists(self._key(sub)):
            return []
        return sorted(e["name"].rsplit("/", 1)[1] for e in fs.ls(self._key(sub), detail=True) if e["type"] == "file")

    def read(self, name: str) -> bytes:
        return (Path(self.uri) / name).read_bytes() if self.s3 is None else self.s3.fs().cat_file(self._key(name))

    def published(self) -> dict[str, str]:
        return {name: hashlib.sha256(self.read(name)).hexdigest() for name in self.files() if name != REPORT_FILE}

    def leftovers(self) -> list[str]:
        """Partial files (local) or in-progress multipart uploads (S3) under the output."""
        if self.s3 is None:
            return [p.name for p in Path(self.uri).rglob("*.partial-*")]
        uploads = self.s3.fs().list_multipart_uploads(BUCKET)
        return [u["Key"] for u in uploads if u["Key"].startswith(self.prefix)]


def _cli(
    case,
    output: str,
    prefect_home: Path,
    *,
    api_url=None,
    s3=None,
    kill_at=None,
    pause_marker=None,
    wait=True,
    device="cpu",
    adapters=None,
):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if s3 is not None:
        env.update(s3.env())  # credentials and endpoint through the standard AWS variables
    if kill_at or pause_marker:
        env["LORA_MERGE_KILL_AT"] = kill_at or ""
        env["LORA_MERGE_PAUSE_MARKER"] = str(pause_marker or "")
        env["PYTHONPATH"] = os.pathsep.join([str(PLUGIN), env.get("PYTHONPATH", "")])
    command = [
        *(sys.executable, "-m", "prefect_lora_merge.cli", "run", "--json", "--device", device, "--workers", "1"),
        *("--base", str(case.base_dir), "--output", output),
        *(arg for adapter in adapters or [str(case.adapter_dir)] for arg in ("--adapter", adapter)),
    ]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(llama_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "merged"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), device="cpu")
    return out


@pytest.mark.parametrize("storage", ["local", "s3"])
@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_kill_9_then_rerun_on_a_fresh_prefect_database_gives_identical_output(
    llama_case, reference, tmp_path, request, kill_at, storage
):
    from prefect.settings import PREFECT_API_URL

    s3 = request.getfixturevalue("s3") if storage == "s3" else None
    out = Output(tmp_path, s3)
    killed = _cli(llama_case, out.uri, tmp_path / "prefect-1", api_url=PREFECT_API_URL.value(), s3=s3, kill_at=kill_at)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    assert "lora-merge-manifest.json" not in out.files(), "a killed run never looks finished"
    # Shards committed with a sha256 are resumed; a shard the storage copied server-side has none until validation
    # takes it, so it proves nothing and the storage copies it again (no bytes through the tool either way).
    records = {
        name.removesuffix(".json"): json.loads(out.read(f".lora-merge/shards/{name}"))
        for name in out.files(".lora-merge/shards")
    }
    committed = sorted(name for name, record in records.items() if record["sha256"])
    shards = sorted(p.name for p in llama_case.base_dir.glob("*.safetensors"))
    for name in set(shards) & set(out.files()):  # whatever is under a shard's final name is whole
        assert out.read(name) == (reference / name).read_bytes(), name

    # A fresh PREFECT_HOME: an ephemeral server with a new database, as on another machine.
    rerun = _cli(llama_case, out.uri, tmp_path / "prefect-2", s3=s3)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout)
    assert summary["resumed_shards"] == committed, "every shard committed before the kill is skipped"
    assert sorted(summary["merged_shards"] + summary["resumed_shards"]) == shards
    assert out.published() == _published(reference)
    assert out.leftovers() == [], "no partial file or orphaned multipart upload is left behind"


def _killed_between_shards(case, out: Path, prefect_home: Path, device: str) -> list[str]:
    """A `lora-merge run --device DEVICE` killed after its second shard; the shards it committed."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    killed = _cli(case, str(out), prefect_home, api_url=api, kill_at="between-shards", device=device)
    assert killed.returncode == -9, killed.stdout + killed.stderr
    committed = sorted(p.name.removesuffix(".json") for p in (out / ".lora-merge" / "shards").iterdir())
    assert len(committed) == 2
    return committed


def test_a_merge_killed_on_one_device_resumes_on_another(llama_case, reference, tmp_path):
    out = tmp_path / "merged"
    committed = _killed_between_shards(llama_case, out, tmp_path / "prefect-1", "cpu")

    rerun = _cli(llama_case, str(out), tmp_path / "prefect-2", device="auto")

    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["resumed_shards"] == committed, "the device is not part of the merge's identity"
    assert Output(tmp_path).published() == _published(reference)


def test_a_merge_started_by_the_flow_is_finished_by_merge_checkpoint(llama_case, reference, tmp_path):
    out = tmp_path / "merged"
    committed = _killed_between_shards(llama_case, out, tmp_path / "prefect-1", "auto")  # the CLI's default

    result = merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))

    assert result.report.passed
    assert sorted(r.file for r in result.receipts if r.resumed) == committed
    assert Output(tmp_path).published() == _published(reference)


def test_a_merge_of_several_adapters_killed_between_shards_resumes_to_the_same_bytes(llama_case, tmp_path):
    import zoo
    from peft import LoraConfig
    from prefect.settings import PREFECT_API_URL

    second = zoo.build_adapter_for(
        llama_case, tmp_path / "second", LoraConfig(r=2, use_rslora=True, target_modules=["q_proj", "up_proj"]), 7
    )
    adapters = [str(llama_case.adapter_dir), f"{second}:-0.5"]
    reference = tmp_path / "uninterrupted"
    merge_checkpoint(str(llama_case.base_dir), adapters, str(reference))
    out = tmp_path / "merged"
    api = PREFECT_API_URL.value()
    killed = _cli(
        llama_case, str(out), tmp_path / "prefect-1", api_url=api, kill_at="between-shards", adapters=adapters
    )
    assert killed.returncode == -9, killed.stdout + killed.stderr
    committed = sorted(p.name.removesuffix(".json") for p in (out / ".lora-merge" / "shards").iterdir())
    assert len(committed) == 2

    rerun = _cli(llama_case, str(out), tmp_path / "prefect-2", adapters=adapters)

    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["resumed_shards"] == committed
    assert Output(tmp_path).published() == _published(reference)
    # The same adapters at another weight are another merge: refused, the output untouched.
    other = _cli(llama_case, str(out), tmp_path / "prefect-3", adapters=[adapters[0], f"{second}:0.5"])
    assert other.returncode == 1 and "another" in other.stderr, other.stderr
    assert Output(tmp_path).published() == _published(reference)


def test_of_two_concurrent_runs_on_one_output_only_one_writes(llama_case, tmp_path):
    from prefect.settings import PREFECT_API_URL

    out, marker = tmp_path / "merged", tmp_path / "first-is-merging"
    api = PREFECT_API_URL.value()
    first = _cli(llama_case, str(out), tmp_path / "prefect-1", api_url=api, pause_marker=marker, wait=False)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first run never committed a shard"
            time.sleep(0.2)
        before = tree_digest(out)
        second = _cli(llama_case, str(out), tmp_path / "prefect-2", api_url=api)
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"being written by another run: {socket.gethostname()}:{first.pid}:" in lines[0]
        assert tree_digest(out) == before, "the refused run wrote nothing"
    finally:
        first.kill()
        first.communicate()
