"""Validation proves an output: every way of damaging a merged checkpoint is caught, and the failure names the file
and the tensor. The numbers check recomputes the merge from base + adapter, so it catches what checksums cannot:
a wrong value written before the checksum was taken."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from checkpoint_tools import read_raw_header, shards, write_raw_header
from s3_server import BUCKET

from prefect_lora_merge.cli import main
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import make_plan
from prefect_lora_merge.core.storage import Location
from prefect_lora_merge.core.validate import validate_output

MANIFEST = "lora-merge-manifest.json"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def merged(llama_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("validated") / "merged"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out))
    return out


@pytest.fixture
def damaged(merged, tmp_path):
    """A private copy of the merged output to damage."""
    return shutil.copytree(merged, tmp_path / "damaged")


def _validate(case, out):
    plan = make_plan(str(case.base_dir), str(case.adapter_dir), str(out))
    return validate_output(Location.parse(str(out)), plan)


def _reseal(out, *files: str) -> None:
    """Write the damaged files' true sizes and sha256 into the manifest: damage done before the checksums were
    taken (a merge bug), which only the recomputation can see."""
    path = out / MANIFEST
    manifest = json.loads(path.read_text())
    for name in files:
        data = (out / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    path.write_text(json.dumps(manifest))


def _touched(case, out) -> dict[str, str]:
    plan = make_plan(str(case.base_dir), str(case.adapter_dir), str(out))
    return {t.name: s.file for s in plan.shards for t in s.touched}


def _data_offset(path, tensor: str) -> int:
    header, body = read_raw_header(path)
    return len(path.read_bytes()) - len(body) + header[tensor]["data_offsets"][0]


def test_a_correct_output_passes_every_check_with_its_numbers_recomputed(llama_case, merged):
    report = _validate(llama_case, merged)
    assert report.passed, report.failures
    touched = _touched(llama_case, merged)
    assert {n.tensor for n in report.numbers} == set(touched), "every touched tensor is recomputed"
    for numbers in report.numbers:
        assert numbers.rows_checked == numbers.rows, "tensors this small are recomputed whole"
        assert numbers.flips <= 0.01
        assert numbers.relative_change is not None and 0 < numbers.relative_change < 10
    assert report.checks["tensors recomputed"] == len(touched)
    assert report.checks["adapter tensors"] == 2 * len(touched), "each lora_A/lora_B counted once, by one check"
    assert report.checks["copied byte ranges"] > 0


def test_a_wrong_value_in_a_touched_tensor_is_caught_even_with_matching_checksums(llama_case, damaged):
    tensor, file = sorted(_touched(llama_case, damaged).items())[0]
    path = damaged / file
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, tensor) + 4 * 7 + 3] ^= 0x40  # the exponent of the 8th value of row 0 (float32)
    path.write_bytes(bytes(raw))
    _reseal(damaged, file)
    report = _validate(llama_case, damaged)
    assert not report.passed
    assert any(
        f"{file}: {tensor} rows 0–" in f
        and "differ from base + adapter recomputed in float64" in f
        and "row 0, column 7" in f
        for f in report.failures
    ), report.failures


def test_a_shard_replaced_by_the_base_original_is_caught_as_a_missing_delta(llama_case, damaged):
    tensor, file = sorted(_touched(llama_case, damaged).items())[0]
    shutil.copyfile(llama_case.base_dir / file, damaged / file)
    _reseal(damaged, file)
    report = _validate(llama_case, damaged)
    assert not report.passed
    named = [f for f in report.failures if f.startswith(f"{file}: {tensor} rows")]
    assert named and "differ from base + adapter recomputed in float64" in named[0], report.failures


def test_a_changed_byte_in_a_copied_tensor_is_caught_by_comparing_with_the_base(llama_case, damaged):
    plan = make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), str(damaged))
    shard = next(s for s in plan.shards if any(not t.computed for t in s.tensors))
    copied = next(t for t in shard.tensors if not t.computed)
    path = damaged / shard.file
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, copied.name)] ^= 0x01
    path.write_bytes(bytes(raw))
    _reseal(damaged, shard.file)
    report = _validate(llama_case, damaged)
    assert f"{shard.file}: {copied.name} should be the base's bytes" in " ".join(report.failures), report.failures


def test_a_flipped_byte_is_caught_by_the_manifest_checksum(llama_case, damaged):
    file = sorted(p.name for p in shards(damaged))[2]
    raw = bytearray((damaged / file).read_bytes())
    raw[-3] ^= 0xFF
    (damaged / file).write_bytes(bytes(raw))
    report = validate_output(Location.parse(str(damaged)))  # without base and adapter: checksums alone
    assert any(f.startswith(f"{damaged}/{file}: sha256") for f in report.failures), report.failures


def test_a_truncated_shard_is_named_with_its_sizes(llama_case, damaged):
    file = sorted(p.name for p in shards(damaged))[1]
    data = (damaged / file).read_bytes()
    (damaged / file).write_bytes(data[:-100])
    report = _validate(llama_case, damaged)
    expected = f"{damaged}/{file} is {len(data) - 100} bytes, the manifest says {len(data)} (truncated or replaced)"
    assert expected in report.failures, report.failures


def test_an_index_entry_pointing_to_the_wrong_shard_is_named(llama_case, damaged):
    index = json.loads((damaged / INDEX).read_text())
    files = list(index["weight_map"].values())
    tensor, file = next((t, f) for t, f in sorted(index["weight_map"].items()) if files.count(f) > 1)
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != file)
    index["weight_map"][tensor] = other
    (damaged / INDEX).write_text(json.dumps(index))
    _reseal(damaged, INDEX)
    report = _validate(llama_case, damaged)
    assert f"{INDEX} maps {tensor!r} to {other}, but that shard has no such tensor" in report.failures
    assert any(f"{file}: tensor {tensor!r} is not mapped to this shard" in f for f in report.failures), report.failures


def test_a_manifest_checksum_that_does_not_match_is_named(llama_case, damaged):
    manifest = json.loads((damaged / MANIFEST).read_text())
    file = sorted(manifest["files"])[0]
    manifest["files"][file]["sha256"] = "0" * 64
    (damaged / MANIFEST).write_text(json.dumps(manifest))
    report = _validate(llama_case, damaged)
    assert any(
        f.startswith(f"{damaged}/{file}: sha256") and "differs from the manifest's 0000" in f for f in report.failures
    )


def test_a_tensor_removed_from_a_shard_and_the_index_is_named(llama_case, damaged):
    path = sorted(shards(damaged))[0]
    header, body = read_raw_header(path)
    victim = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, _ = header.pop(victim)["data_offsets"]
    write_raw_header(path, header, body[:begin])
    index = json.loads((damaged / INDEX).read_text())
    del index["weight_map"][victim]
    index["metadata"]["total_size"] -= len(body) - begin
    (damaged / INDEX).write_text(json.dumps(index))
    _reseal(damaged, path.name, INDEX)
    report = _validate(llama_case, damaged)
    assert report.failures == [f"{path.name}: tensor {victim!r} of the base is missing from the output"]


def test_large_tensors_are_sampled_in_runs_of_rows(llama_case, merged, monkeypatch):
    from prefect_lora_merge.core import recompute

    monkeypatch.setattr(recompute, "ALL_ROWS_UP_TO", 16)
    monkeypatch.setattr(recompute, "RUN_VALUES", 64)
    report = _validate(llama_case, merged)
    assert report.passed, report.failures
    sampled = [n for n in report.numbers if n.rows_checked < n.rows]
    assert sampled and all(n.rows_checked >= 2 for n in sampled)


def test_numbers_check_the_merge_on_the_s3_server(llama_case, s3, tmp_path):
    out = f"s3://{BUCKET}/validated-{tmp_path.name}"
    options = s3.storage_options()
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), out, storage_options=options)
    plan = make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), out, storage_options=options)
    report = validate_output(plan.job.output, plan)
    assert report.passed, report.failures
    assert {n.tensor for n in report.numbers} == set(_touched(llama_case, tmp_path / "unused"))
    assert torch.tensor([n.flips for n in report.numbers]).max() <= 0.01


def test_forward_compares_the_loaded_output_with_peft_logits(llama_case, merged, capsys):
    plan = make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), str(merged))
    report = validate_output(plan.job.output, plan, forward=True)
    assert report.passed, report.failures
    forward = report.forward
    assert forward is not None and forward.architecture == "LlamaForCausalLM" and forward.passed
    assert forward.relative_diff <= forward.allowed < forward.adapter_effect / 2, "the check could see a lost delta"

    inputs = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir)]
    assert main(["validate", "--output", str(merged), *inputs, "--forward"]) == 0
    assert "forward (LlamaForCausalLM, 32 tokens): logits" in capsys.readouterr().out


def test_forward_catches_an_output_that_loads_but_lost_its_delta(llama_case, damaged):
    """Every touched shard replaced by the base's own, the manifest resealed: the model loads and runs."""
    touched_files = sorted(set(_touched(llama_case, damaged).values()))
    for file in touched_files:
        shutil.copyfile(llama_case.base_dir / file, damaged / file)
    _reseal(damaged, *touched_files)
    plan = make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), str(damaged))
    report = validate_output(plan.job.output, plan, forward=True)
    assert report.forward is not None and not report.forward.passed
    assert any(
        "logits of the merged model loaded with transformers differ from PEFT's merge" in f for f in report.failures
    )


def test_forward_needs_the_base_and_the_adapter(merged, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["validate", "--output", str(merged), "--forward"])
    assert exited.value.code == 1
    assert "--forward needs --base and --adapter" in capsys.readouterr().err
