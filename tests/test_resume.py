"""Resuming from the output's own state, and one writer per output."""

from __future__ import annotations

import json
import time

import pytest
from checkpoint_tools import tree_digest

from prefect_lora_merge.core.lease import LEASE_FILE, Lease, OutputLocked, output_lease
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import REPORT_FILE
from prefect_lora_merge.core.state import record_name
from prefect_lora_merge.core.storage import Location


def _published(directory) -> dict[str, str]:
    """sha256 of the published files (the state directory is bookkeeping, the report records timings)."""
    return {k: v for k, v in tree_digest(directory).items() if not k.startswith(".lora-merge/") and k != REPORT_FILE}


@pytest.fixture
def reference(llama_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "merged"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), device="cpu")
    return out


def _merge(case, out):
    return merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), device="cpu")


def test_a_rerun_merges_only_the_shards_without_a_committed_record(llama_case, reference, tmp_path):
    out = tmp_path / "merged"
    first = _merge(llama_case, out)
    assert not any(r.resumed for r in first.receipts)
    lost = first.receipts[1].file
    (out / lost).unlink()  # as if the run died before this shard was committed
    (out / record_name(lost)).unlink()
    (out / "lora-merge-manifest.json").unlink()
    again = _merge(llama_case, out)
    assert [r.file for r in again.receipts if not r.resumed] == [lost]
    assert _published(out) == _published(reference)


def test_a_shard_whose_object_does_not_match_its_record_is_merged_again(llama_case, reference, tmp_path):
    out = tmp_path / "merged"
    first = _merge(llama_case, out)
    damaged = first.receipts[0].file
    (out / damaged).write_bytes((out / damaged).read_bytes()[:-7])
    again = _merge(llama_case, out)
    assert [r.file for r in again.receipts if not r.resumed] == [damaged]
    assert _published(out) == _published(reference)


def test_a_record_of_another_merge_is_never_trusted(llama_case, tmp_path):
    out = tmp_path / "merged"
    first = _merge(llama_case, out)
    record_path = out / record_name(first.receipts[0].file)
    record = json.loads(record_path.read_text())
    record["fingerprint"] = "0" * 64
    record_path.write_text(json.dumps(record))
    again = _merge(llama_case, out)
    assert [r.file for r in again.receipts if not r.resumed] == [first.receipts[0].file]


def test_a_second_writer_is_refused_naming_the_lease_holder(llama_case, tmp_path):
    out = tmp_path / "merged"
    with output_lease(Location.parse(str(out))) as held:
        with pytest.raises(OutputLocked, match=f"being written by another run: {held.holder}"):
            _merge(llama_case, out)
    assert _merge(llama_case, out).report.passed
    assert not (out / LEASE_FILE).exists(), "a finished run gives its lease back"


def test_a_waiting_writer_takes_the_lease_once_the_holder_lets_it_go(tmp_path, monkeypatch):
    import threading

    from prefect_lora_merge.core import lease

    monkeypatch.setattr(lease, "WAIT_POLL_SECONDS", 0.05)
    output = Location.parse(str(tmp_path / "merged"))
    heard: list[str] = []
    with output_lease(output) as first:
        waiter_took: list[float] = []

        def wait_for_it() -> None:
            with output_lease(output, wait=True, on_wait=lambda holder: heard.append(holder.holder)):
                waiter_took.append(time.monotonic())

        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.5)
        assert not waiter_took, "it waits while the first writer holds the output"
        released = time.monotonic()
    waiter.join(timeout=10)
    assert waiter_took and waiter_took[0] >= released
    assert heard == [first.holder], "told once who it waits for"
    assert not (tmp_path / "merged" / LEASE_FILE).exists()


def _plant_lease(out, holder: str, expires: float) -> None:
    (out / ".lora-merge").mkdir(parents=True, exist_ok=True)
    (out / LEASE_FILE).write_text(Lease(holder=holder, acquired=time.time(), expires=expires).model_dump_json())


def test_a_live_lease_of_another_machine_holds_until_break_lock(llama_case, tmp_path):
    out = tmp_path / "merged"
    _plant_lease(out, "other-host:4242:abcd", time.time() + 600)
    with pytest.raises(OutputLocked, match="other-host:4242:abcd.*--break-lock"):
        _merge(llama_case, out)
    result = merge_checkpoint(
        str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), device="cpu", break_lock=True
    )
    assert result.report.passed


@pytest.mark.parametrize("holder", ["expired", "dead process on this host"])
def test_a_stale_lease_is_taken_over(llama_case, tmp_path, holder):
    import socket
    import subprocess
    import sys

    out = tmp_path / "merged"
    if holder == "expired":
        _plant_lease(out, "other-host:4242:abcd", time.time() - 1)
    else:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        _plant_lease(out, f"{socket.gethostname()}:{int(dead.stdout)}:abcd", time.time() + 600)
    assert _merge(llama_case, out).report.passed
