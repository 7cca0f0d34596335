"""Storage faults on a real S3 server, injected with botocore hooks on the client the merge itself uses."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import zoo
from botocore.exceptions import ConnectionClosedError
from peft import LoraConfig
from s3_server import BUCKET
from transformers import LlamaForCausalLM

from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import REPORT_FILE
from prefect_lora_merge.core.storage import Location
from prefect_lora_merge.flows import run_merge

BLOCK = 5 * 2**20  # S3's smallest part: every shard below is uploaded in several parts


@pytest.fixture(scope="module")
def sizeable(tmp_path_factory):
    """A llama whose shards (~6 MB) need multipart uploads, and an all-linear adapter."""
    root = tmp_path_factory.mktemp("sizeable")
    base, adapter = zoo._dirs(root, "llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(zoo._tiny_llama_config(hidden_size=256, intermediate_size=1024, vocab_size=4096))
    zoo._save_base(model, base, torch.float32)
    zoo._build_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter, seed=7, notes=[])
    reference = root / "reference"
    merge_checkpoint(str(base), str(adapter), str(reference), device="cpu")
    return base, adapter, reference


def _upload_inputs(s3, base: Path, adapter: Path, prefix: str) -> tuple[str, str]:
    fs = s3.fs()
    fs.put(str(base), f"{BUCKET}/{prefix}/base", recursive=True)
    fs.put(str(adapter), f"{BUCKET}/{prefix}/adapter", recursive=True)
    return f"s3://{BUCKET}/{prefix}/base", f"s3://{BUCKET}/{prefix}/adapter"


def _weights(s3, prefix: str) -> dict[str, str]:
    fs = s3.fs()
    return {
        p.rsplit("/", 1)[1]: hashlib.sha256(fs.cat_file(p)).hexdigest()
        for p in fs.find(f"{BUCKET}/{prefix}")
        if p.endswith((".safetensors", ".json"))
        and "/.lora-merge/" not in p
        and not p.endswith(("manifest.json", REPORT_FILE))
    }


def _local_weights(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.iterdir()
        if p.is_file() and p.suffix in (".safetensors", ".json") and not p.name.endswith(("manifest.json", REPORT_FILE))
    }


class Faults:
    """before-send hooks that fail chosen S3 requests the way a flaky network does (connection closed)."""

    def __init__(self, location: Location, operations: tuple[str, ...]) -> None:
        self.fs = location.fs
        self.fs.connect()
        self.operations = operations
        self.injected = 0
        self.seen = 0
        self.fail = lambda url, n: False
        for operation in operations:
            self.fs.s3.meta.events.register(f"before-send.s3.{operation}", self._hook)

    def _hook(self, request, **_):
        self.seen += 1
        if self.fail(request.url, self.seen):
            self.injected += 1
            raise ConnectionClosedError(endpoint_url=request.url)

    def remove(self) -> None:
        for operation in self.operations:
            self.fs.s3.meta.events.unregister(f"before-send.s3.{operation}", self._hook)


def test_transient_faults_on_reads_and_part_uploads_still_give_identical_output(s3, sizeable):
    base, adapter, reference = sizeable
    options = s3.storage_options(default_block_size=BLOCK)
    base_uri, adapter_uri = _upload_inputs(s3, base, adapter, "transient")
    out = f"s3://{BUCKET}/transient/merged"
    faults = Faults(Location.parse(out, options), ("GetObject", "UploadPart", "PutObject"))
    faults.fail = lambda url, n: n % 4 == 1  # every fourth request dies; botocore's retries must absorb it
    try:
        result = merge_checkpoint(base_uri, adapter_uri, out, device="cpu", storage_options=options)
    finally:
        faults.remove()
    assert faults.injected >= 10, f"only {faults.injected} faults were injected: the test would prove nothing"
    assert result.report.passed
    assert _weights(s3, "transient/merged") == _local_weights(reference)


@pytest.mark.usefixtures("prefect_server")
def test_a_permanent_upload_fault_fails_the_run_commits_nothing_for_that_shard_and_a_rerun_finishes(s3, sizeable):
    base, adapter, reference = sizeable
    # Few retries, so the permanent fault surfaces in seconds rather than minutes.
    options = s3.storage_options(
        default_block_size=BLOCK, config_kwargs={"retries": {"mode": "standard", "max_attempts": 2}}
    )
    out = f"s3://{BUCKET}/permanent/merged"
    location = Location.parse(out, options)
    location.fs.retries = 1
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    victim = shards[1]
    faults = Faults(location, ("UploadPart", "PutObject", "CreateMultipartUpload"))
    faults.fail = lambda url, n: f"/{victim}" in url and "/.lora-merge/" not in url
    params = MergeParameters(
        base=str(base), adapter=str(adapter), output=out, device="cpu", workers=2, storage_options=options
    )
    try:
        with pytest.raises(Exception, match=f"1 of {len(shards)} shard.*{victim}.*nothing was committed"):
            run_merge(params)
    finally:
        faults.remove()
    assert faults.injected > 0
    written = {p.rsplit("/", 1)[1] for p in location.fs.find(f"{BUCKET}/permanent/merged")}
    assert victim not in written and f"{victim}.json" not in written
    assert set(shards) - {victim} <= written, "the other shards finished before the run failed"
    assert "lora-merge-manifest.json" not in written

    summary = run_merge(params)
    assert summary.merged_shards == [victim]
    assert summary.resumed_shards == sorted(set(shards) - {victim})
    assert _weights(s3, "permanent/merged") == _local_weights(reference)
