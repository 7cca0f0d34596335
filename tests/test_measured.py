"""What a shard merge measures about itself, next to the plan's estimate."""

from __future__ import annotations

from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.state import measured_line


def test_every_merged_shard_measures_its_bytes_time_and_memory_consistently(llama_case, tmp_path):
    out = tmp_path / "out"
    result = merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))
    assert result.report.passed
    copied = [r for r in result.receipts if r.copied_server_side]
    assert copied and all(r.measured is None for r in copied), "the storage copied untouched shards: nothing to time"
    for receipt, shard in zip(result.receipts, result.plan.shards, strict=True):
        if receipt.copied_server_side:
            continue
        m = receipt.measured
        assert m is not None, receipt.file
        assert m.bytes_written == (out / receipt.file).stat().st_size == receipt.bytes
        assert (
            shard.base_header_bytes
            < m.bytes_read
            <= shard.base_size
            + sum(ref.entry.nbytes for t in shard.tensors if t.quantized for ref in t.quantized.others)
        )
        assert 0 < m.seconds <= receipt.seconds and m.compute_seconds <= m.seconds
        assert m.peak_memory_bytes >= m.start_memory_bytes > 0
        assert m.estimated_peak_bytes == shard.peak_bytes(result.plan.job.adapters)
        assert not m.above_estimate, measured_line(receipt)
        assert m.gpu_peak_bytes is None
        assert receipt.file in measured_line(receipt) and "estimate" in measured_line(receipt)


def test_a_resumed_shard_measures_nothing(llama_case, tmp_path):
    out = tmp_path / "out"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))
    again = merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))
    assert all(r.resumed and r.measured is None for r in again.receipts)
    assert measured_line(again.receipts[0]).endswith(": resumed")


def test_the_report_lists_every_shard_of_the_run_with_its_figures(llama_case, tmp_path):
    import json

    from prefect_lora_merge.core.plan import REPORT_FILE

    out = tmp_path / "out"
    result = merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))
    shards = json.loads((out / REPORT_FILE).read_text())["shards"]
    assert [s["file"] for s in shards] == [s.file for s in result.plan.shards]
    for entry in shards:
        assert {"file", "seconds", "bytes_read", "bytes_written", "peak_memory_bytes", "estimated_peak_bytes"} <= set(
            entry
        )
        if entry["how"] == "merged":
            assert entry["bytes_written"] == (out / entry["file"]).stat().st_size
            assert entry["peak_memory_bytes"] > 0 and not entry["above_estimate"]
        else:
            assert entry["how"] == "copied" and entry["peak_memory_bytes"] is None
