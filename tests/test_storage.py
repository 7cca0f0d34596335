"""Storage: a write either lands whole under its final name or not at all."""

from __future__ import annotations

import pytest

from prefect_lora_merge.core.buffers import BufferPool
from prefect_lora_merge.core.errors import OutputLocationError, StorageError
from prefect_lora_merge.core.storage import Location, refuse_output_inside_inputs


@pytest.mark.parametrize("uri", ["local", "memory://lora-merge-test/atomic"])
def test_a_write_that_raises_leaves_nothing_under_the_final_name(uri, tmp_path):
    location = Location.parse(str(tmp_path / "out") if uri == "local" else uri)
    with pytest.raises(RuntimeError, match="boom"):
        with location.atomic_writer("shard.safetensors") as handle:
            handle.write(b"x" * 1_000_000)
            raise RuntimeError("boom")
    assert not location.exists("shard.safetensors")
    assert location.list_files() == []  # no temp file left behind either
    location.write_bytes("shard.safetensors", b"abc")
    assert location.read_bytes("shard.safetensors") == b"abc"


def test_a_short_ranged_read_is_an_error_not_data(tmp_path):
    location = Location.parse(str(tmp_path))
    location.write_bytes("f", b"0123456789")
    assert location.read_bytes("f", 2, 5) == b"234"
    with pytest.raises(Exception, match="shorter than its header says"):
        location.read_bytes("f", 5, 20)


@pytest.mark.parametrize(
    ("output", "refused"),
    [("base", True), ("base/sub", True), (".", True), ("adapter/x", True), ("elsewhere", False), ("base-2", False)],
)
def test_output_may_not_overlap_an_input(tmp_path, output, refused):
    base, adapter = Location.parse(str(tmp_path / "base")), Location.parse(str(tmp_path / "adapter"))
    out = Location.parse(str(tmp_path / output))
    if refused:
        with pytest.raises(OutputLocationError, match="overlaps"):
            refuse_output_inside_inputs(out, base=base, adapter=adapter)
    else:
        refuse_output_inside_inputs(out, base=base, adapter=adapter)


def test_symlinked_output_into_the_base_is_refused(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "base")
    base, adapter = Location.parse(str(tmp_path / "base")), Location.parse(str(tmp_path / "adapter"))
    with pytest.raises(OutputLocationError):
        refuse_output_inside_inputs(Location.parse(str(tmp_path / "link" / "out")), base=base, adapter=adapter)


@pytest.mark.parametrize("uri", ["local", "memory://lora-merge-test/read-into"])
def test_reading_into_a_buffer_gives_the_same_bytes_and_refuses_a_short_file(uri, tmp_path):
    location = Location.parse(str(tmp_path / "in") if uri == "local" else uri)
    location.write_bytes("f", bytes(range(256)) * 100)
    buffer = memoryview(bytearray(1000))
    location.read_into("f", 300, buffer)
    assert bytes(buffer) == location.read_bytes("f", 300, 1300)
    with pytest.raises(StorageError, match=r"asked for bytes 25000\.\.26000 and got .*shorter than its header says"):
        location.read_into("f", 25_000, buffer)


def test_pooled_buffers_are_reused_smallest_fitting_first_and_the_largest_kept():
    pool = BufferPool(keep_bytes=1 << 20)
    first = pool.take(1000)
    first_buffer = first.obj
    pool.give(first)
    with pytest.raises(ValueError, match="released"):
        first[0]  # the view handed back is dead: nothing can write through it any more
    again = pool.take(800)
    assert again.obj is first_buffer and len(again) == 800, "the smallest free buffer that fits is reused"
    assert pool.take(800).obj is not first_buffer, "a buffer is handed out once until it comes back"
    pool.give(again)
    pool.give(pool.take(2 << 20))  # more than the pool keeps: dropped, the small one stays
    assert pool.take(10).obj is first_buffer
    assert len(pool.take(1500).obj) == 1500
    big = pool.take(8 << 20)
    big_buffer = big.obj
    pool = BufferPool(keep_bytes=16 << 20)
    pool.give(big)
    assert pool.take(4096).obj is not big_buffer, "a small piece never holds a buffer the budgets count as small"
    assert pool.take(5 << 20).obj is big_buffer
