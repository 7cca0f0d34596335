"""Shards no adapter touches are copied by the storage itself when base and output share a filesystem.

Their bytes never pass through the tool: the kernel copies them locally, the S3 server copies them on S3. The
output is byte-identical to a merge that streamed them, manifest included, and the run reports the bytes copied.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
from checkpoint_tools import edit_adapter_tensors, shards
from s3_server import BUCKET

from prefect_lora_merge.core import recompute
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import REPORT_FILE
from prefect_lora_merge.core.safetensors_format import read_header
from prefect_lora_merge.core.storage import Location
from prefect_lora_merge.core.validate import validate_output

MANIFEST = "lora-merge-manifest.json"


@pytest.fixture(scope="module")
def layer0_case(llama_case, tmp_path_factory):
    """The llama base with an adapter that touches only layer 0: the shards holding nothing of it stay untouched."""
    root = tmp_path_factory.mktemp("layer0")
    base = root / "base"
    shutil.copytree(llama_case.base_dir, base)
    adapter = root / "adapter"
    shutil.copytree(llama_case.adapter_dir, adapter)
    edit_adapter_tensors(adapter, lambda tensors: [tensors.pop(k) for k in list(tensors) if ".layers.0." not in k])
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    touched = {file for name, file in index.items() if name.startswith("model.layers.0.") and "proj" in name}
    untouched = sorted({p.name for p in shards(base)} - touched)
    assert touched and untouched, "the fixture needs both kinds of shard"
    return base, adapter, untouched


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reads_of(monkeypatch) -> list[tuple[str, int | None, int | None]]:
    """Every read the merge makes through the storage layer: (location URI/file, start, end)."""
    reads: list[tuple[str, int | None, int | None]] = []
    original = Location.read_bytes

    def recording(self, name, start=None, end=None):
        reads.append((self.describe(name), start, end))
        return original(self, name, start, end)

    monkeypatch.setattr(Location, "read_bytes", recording)
    return reads


def _small_validation_samples(monkeypatch) -> int:
    """Validation compares a few byte ranges of each copied shard with the base: make them small enough that the
    shard's data could not hide in them, and return the most they read from one shard."""
    monkeypatch.setattr(recompute, "COPY_SAMPLE_BYTES", 64)
    return recompute.COPY_SAMPLES * recompute.COPY_SAMPLE_BYTES


def _data_bytes_read(reads, location: Location, file: str) -> int:
    """Bytes of `file` read past its header: the tensor data that went through the tool."""
    data_start, path = read_header(location, file).data_start, location.describe(file)
    return sum(max(0, (end or 2**62) - max(start or 0, data_start)) for name, start, end in reads if name == path)


def test_untouched_shards_are_copied_by_the_kernel_and_never_read_by_the_tool(layer0_case, tmp_path, monkeypatch):
    base, adapter, untouched = layer0_case
    streamed_out = tmp_path / "streamed"
    with monkeypatch.context() as patch:
        patch.setattr(Location, "copy_from", lambda self, source, name: False)  # the client path, for reference
        streamed = merge_checkpoint(str(base), str(adapter), str(streamed_out))
    assert not any(r.copied_server_side for r in streamed.receipts)

    reads = _reads_of(monkeypatch)
    sampled = _small_validation_samples(monkeypatch)
    out = tmp_path / "copied"
    result = merge_checkpoint(str(base), str(adapter), str(out))

    copied = sorted(r.file for r in result.receipts if r.copied_server_side)
    assert copied == untouched
    for file in untouched:
        assert (out / file).read_bytes() == (base / file).read_bytes()
        assert _data_bytes_read(reads, Location.parse(str(base)), file) <= sampled, f"{file} went through the tool"
    # Same bytes as streaming them, manifest included: its sha256 of a copied shard was taken from the output.
    for path in sorted(streamed_out.iterdir()):
        if path.is_file() and path.name != REPORT_FILE:  # the report records each run's timings
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    manifest = json.loads((out / MANIFEST).read_text())
    for file in untouched:
        assert manifest["files"][file]["sha256"] == _sha256((base / file).read_bytes())
        assert next(s for s in manifest["shards"] if s["file"] == file)["sha256"] == manifest["files"][file]["sha256"]
    assert validate_output(Location.parse(str(out))).passed
    assert not [p for p in out.rglob("*") if ".partial-" in p.name]


def test_a_corrupted_copy_is_caught_by_the_published_checksum(layer0_case, tmp_path):
    base, adapter, untouched = layer0_case
    out = tmp_path / "merged"
    merge_checkpoint(str(base), str(adapter), str(out))
    damaged = out / untouched[0]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    report = validate_output(Location.parse(str(out)))
    assert not report.passed
    assert any(untouched[0] in f and "sha256" in f for f in report.failures), report.failures


def test_a_resumed_merge_keeps_copied_shards_and_publishes_the_same_manifest(layer0_case, tmp_path):
    base, adapter, untouched = layer0_case
    out = tmp_path / "merged"
    merge_checkpoint(str(base), str(adapter), str(out))
    first_manifest = (out / MANIFEST).read_bytes()
    (out / MANIFEST).unlink()  # as if the run died during validation
    again = merge_checkpoint(str(base), str(adapter), str(out))
    assert all(r.resumed for r in again.receipts)
    assert (out / MANIFEST).read_bytes() == first_manifest


def test_the_flow_reports_the_bytes_the_storage_copied(layer0_case, tmp_path, prefect_server):
    from prefect_lora_merge.core.options import MergeParameters
    from prefect_lora_merge.flows.merge import run_merge

    base, adapter, untouched = layer0_case
    params = MergeParameters(base=str(base), adapter=str(adapter), output=str(tmp_path / "merged"), device="cpu")
    summary = run_merge(params)
    assert summary.bytes_copied_server_side == sum((base / f).stat().st_size for f in untouched)
    assert summary.bytes_written == sum(p.stat().st_size for p in shards(tmp_path / "merged"))
    again = run_merge(params)  # everything committed: nothing written, nothing copied
    assert again.bytes_written == 0 and again.bytes_copied_server_side == 0


def test_on_s3_the_server_copies_untouched_shards_within_the_bucket(layer0_case, s3, tmp_path, monkeypatch):
    base, adapter, untouched = layer0_case
    fs = s3.fs()
    fs.put(str(base), f"{BUCKET}/copy-base", recursive=True)
    options = s3.storage_options()
    s3_base = Location.parse(f"s3://{BUCKET}/copy-base", options)

    local_out = tmp_path / "local"
    merge_checkpoint(str(base), str(adapter), str(local_out))

    reads = _reads_of(monkeypatch)
    sampled = _small_validation_samples(monkeypatch)
    result = merge_checkpoint(s3_base.uri, str(adapter), f"s3://{BUCKET}/copy-out", storage_options=options)
    assert sorted(r.file for r in result.receipts if r.copied_server_side) == untouched
    for file in untouched:
        assert _data_bytes_read(reads, s3_base, file) <= sampled, f"{file} went through the tool"
    for path in shards(local_out):
        assert fs.cat_file(f"{BUCKET}/copy-out/{path.name}") == path.read_bytes(), path.name
    published = json.loads(fs.cat_file(f"{BUCKET}/copy-out/{MANIFEST}"))
    local = json.loads((local_out / MANIFEST).read_text())
    assert published["files"] == local["files"]
    assert validate_output(Location.parse(f"s3://{BUCKET}/copy-out", options)).passed

    # Base on local disk, output on S3: no common filesystem, so the same shards are streamed instead.
    streamed = merge_checkpoint(str(base), str(adapter), f"s3://{BUCKET}/copy-out-2", storage_options=options)
    assert not any(r.copied_server_side for r in streamed.receipts)
    assert json.loads(fs.cat_file(f"{BUCKET}/copy-out-2/{MANIFEST}"))["files"] == local["files"]


def test_without_copy_file_range_the_local_copy_still_lands_whole(tmp_path, monkeypatch):
    import errno
    import os

    def unsupported(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    source, target = Location.parse(str(tmp_path / "a")), Location.parse(str(tmp_path / "b"))
    data = os.urandom(3 * 2**20 + 5)
    source.write_bytes("x.bin", data)
    assert target.copy_from(source, "x.bin")
    assert (tmp_path / "b" / "x.bin").read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["x.bin"]
    assert not Location.parse("memory://elsewhere").copy_from(source, "x.bin"), "no common filesystem: no copy"
