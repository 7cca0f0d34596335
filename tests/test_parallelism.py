"""How many shards run at once, from the plan's memory estimate; and the shard pipeline's writer thread."""

from __future__ import annotations

import contextlib
import math
import re
import threading

import pytest
import torch

from prefect_lora_merge.cli import main
from prefect_lora_merge.core import lora_math
from prefect_lora_merge.core import merge as merge_module
from prefect_lora_merge.core.errors import LoraMergeError, StorageError
from prefect_lora_merge.core.merge import merge_shard
from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import make_plan
from prefect_lora_merge.core.resources import choose_parallelism, parse_size
from prefect_lora_merge.core.state import record_name
from prefect_lora_merge.core.storage import Location

GIB = 2**30


@pytest.mark.parametrize(
    ("text", "size"),
    [("16GiB", 16 * GIB), ("500MB", 500 * 10**6), ("1.5TB", 1_500 * 10**9), ("2000000", 2_000_000), ("64 mib", 2**26)],
)
def test_sizes_are_read_in_decimal_and_binary_units(text, size):
    assert parse_size(text) == size


def test_a_size_that_is_not_one_names_the_option_and_the_form():
    with pytest.raises(LoraMergeError, match=r"--max-memory 'lots' is not a size: write it like 16GiB"):
        parse_size("lots")
    with pytest.raises(ValueError, match="max_memory 'lots' is not a size"):
        MergeParameters(base="b", adapter="a", output="o", max_memory="lots")


def test_shards_at_once_are_bounded_by_cpus_shards_and_memory():
    by_cpus = choose_parallelism(GIB, 100, max_memory=64 * GIB, cpus=4)
    assert (by_cpus.workers, by_cpus.threads) == (4, 1) and "4 CPUs" in by_cpus.reason
    by_memory = choose_parallelism(GIB, 100, max_memory=5 * GIB // 2, cpus=16)
    assert (by_memory.workers, by_memory.threads) == (2, 7) and "memory" in by_memory.reason
    by_shards = choose_parallelism(GIB, 3, max_memory=64 * GIB, cpus=16)
    assert (by_shards.workers, by_shards.threads) == (3, 4) and "3 shard(s)" in by_shards.reason
    alone = choose_parallelism(GIB, 1, max_memory=2 * GIB, cpus=2)
    assert (alone.workers, alone.threads) == (1, 1), "one CPU is left to the reading and writing threads"


def test_a_budget_below_one_shard_is_refused_before_anything_runs():
    with pytest.raises(LoraMergeError, match=r"needs about 3.00 GiB.*budget of 2.00 GiB \(--max-memory\).*raise"):
        choose_parallelism(3 * GIB, 10, max_memory=2 * GIB, cpus=8)


def test_without_max_memory_a_shard_larger_than_the_default_budget_runs_alone(monkeypatch):
    monkeypatch.setattr("prefect_lora_merge.core.resources.available_memory", lambda: 2 * GIB)
    alone = choose_parallelism(3 * GIB, 10, cpus=8)
    assert (alone.workers, alone.threads) == (1, 7) and "more than 80% of the memory available now" in alone.reason


def test_workers_beyond_the_budget_are_refused_naming_both_options():
    with pytest.raises(LoraMergeError, match=r"--workers 4 needs about 4.00 GiB.*--max-memory 3.00 GiB.*--workers 3"):
        choose_parallelism(GIB, 10, workers=4, max_memory=3 * GIB, cpus=8)
    assert choose_parallelism(GIB, 10, workers=4, cpus=8).workers == 4, "without --max-memory, --workers is obeyed"


def test_the_estimate_covers_the_largest_tensor_and_both_pipeline_buffers(llama_case, tmp_path):
    plan = make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), str(tmp_path / "out"))
    largest = max(math.prod(t.shape) for s in plan.shards for t in s.touched)
    buffers = merge_module.READ_AHEAD_BYTES + merge_module.WRITE_BEHIND_BYTES
    assert plan.estimated_peak_bytes >= 4 * largest + buffers, "the float32 product of the largest touched tensor"


def test_the_cli_refuses_a_memory_budget_below_one_shard_and_writes_nothing(llama_case, tmp_path, capsys):
    out = tmp_path / "merged"
    inputs = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", str(out)]
    with pytest.raises(SystemExit) as exited:
        main(["run", *inputs, "--device", "cpu", "--max-memory", "1MiB"])
    assert exited.value.code != 0
    assert re.search(r"needs about \d+ MiB .* budget of 1 MiB \(--max-memory\); raise", capsys.readouterr().err)
    assert not out.exists()


def test_the_flow_reports_the_shards_it_ran_at_once(llama_case, tmp_path, prefect_server, capsys):
    out = tmp_path / "merged"
    inputs = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", str(out)]
    assert main(["run", *inputs, "--device", "cpu", "--max-memory", "64GiB", "--workers", "1"]) == 0
    assert "(1 shard(s) at once, " in capsys.readouterr().out


def test_the_threads_apply_to_the_elementwise_passes_only_and_are_restored(llama_case, tmp_path, monkeypatch):
    torchs_own = merge_module._torch_threads()  # torch's count when the first shard merge of this process started
    in_tiles: list[int] = []
    in_products: list[int] = []
    original_tiles, original_product = merge_module.tiles, lora_math.lora_product

    def tiles(*args, **kwargs):
        in_tiles.append(torch.get_num_threads())
        return original_tiles(*args, **kwargs)

    def lora_product(*args, **kwargs):
        in_products.append(torch.get_num_threads())
        return original_product(*args, **kwargs)

    monkeypatch.setattr(merge_module, "tiles", tiles)
    monkeypatch.setattr(lora_math, "lora_product", lora_product)
    plan = make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), str(tmp_path / "out"))
    for shard in [s for s in plan.shards if s.touched][:2]:
        merge_shard(plan.job, shard, threads=1)
    assert in_tiles and set(in_tiles) == {1}
    assert in_products and set(in_products) == {torchs_own}, "products run with torch's own count, as PEFT's do"
    assert torch.get_num_threads() == torchs_own
    seen_by_a_new_thread: list[int] = []
    thread = threading.Thread(target=lambda: seen_by_a_new_thread.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert seen_by_a_new_thread == [torchs_own], "a shard's setting does not leak into threads started later"


def test_a_write_failure_in_the_writer_thread_fails_the_shard_and_commits_nothing(llama_case, tmp_path, monkeypatch):
    original = Location.atomic_writer

    class Failing:
        def __init__(self, handle):
            self.handle, self.writes = handle, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 2:  # the header went through; the first data does not
                raise OSError(28, "No space left on device")
            return self.handle.write(data)

    @contextlib.contextmanager
    def atomic_writer(self, name):
        with original(self, name) as handle:
            yield Failing(handle) if name.endswith(".safetensors") else handle

    monkeypatch.setattr(Location, "atomic_writer", atomic_writer)
    out = tmp_path / "merged"
    first = sorted(p.name for p in llama_case.base_dir.glob("*.safetensors"))[0]
    with pytest.raises(StorageError, match=rf"writing .*{first} failed \(.*No space left on device\); nothing was"):
        merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), device="cpu")
    assert not list(out.glob("*.safetensors")), "no shard is published from a failed write"
    assert not list(out.glob(".*partial*")), "the hidden temporary is removed"
    assert not (out / record_name(first)).exists()
