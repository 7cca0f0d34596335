"""The command line: a dry-run plan that writes nothing, and validation that names what is wrong."""

from __future__ import annotations

import json
import shutil

import pytest

from prefect_lora_merge.cli import main
from prefect_lora_merge.core.pipeline import merge_checkpoint


def test_plan_is_a_dry_run_listing_every_shard_with_touched_tensors_and_memory(llama_case, tmp_path, capsys):
    out = tmp_path / "never-written"
    args = ["plan", "--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir), "--output", str(out)]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    shard_files = sorted(p.name for p in llama_case.base_dir.glob("*.safetensors"))
    assert [row["shard"] for row in report["shards"]] == shard_files
    # 2 layers × 7 projections, each changed by one LoRA pair.
    assert sum(row["touched"] for row in report["shards"]) == 14
    assert report["summary"]["adapter_tensors"] == 28
    assert all(row["estimated_peak_bytes"] > 0 for row in report["shards"])
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "dry run: nothing was written" in text and all(f in text for f in shard_files)
    assert not out.exists()


@pytest.fixture
def merged_output(llama_case, tmp_path):
    out = tmp_path / "merged"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(out), device="cpu")
    return out


def _validate(capsys, out, *extra) -> tuple[int, str, str]:
    try:
        code = main(["validate", "--output", str(out), *extra])
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_validate_passes_a_correct_output(merged_output, capsys):
    code, out, _ = _validate(capsys, merged_output)
    assert code == 0 and out.startswith("passed")


def test_validate_names_the_shard_with_a_flipped_byte(merged_output, capsys):
    shard = sorted(merged_output.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out, err = _validate(capsys, merged_output)
    assert code == 1
    assert f"FAIL {merged_output}/{shard.name}: sha256" in out
    assert err.startswith("lora-merge: error: validation failed") and shard.name in err


def test_validate_names_a_tensor_removed_from_shard_and_index(merged_output, llama_case, capsys):
    from checkpoint_tools import read_raw_header, write_raw_header

    shard = sorted(merged_output.glob("*.safetensors"))[0]
    header, body = read_raw_header(shard)
    victim = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header.pop(victim)["data_offsets"]
    write_raw_header(shard, header, body[:begin])
    index_path = merged_output / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][victim]
    index_path.write_text(json.dumps(index))
    inputs = ["--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir)]
    code, out, _ = _validate(capsys, merged_output, *inputs)
    assert code == 1
    assert f"tensor {victim!r} of the base is missing from the output" in out


def test_validate_refuses_an_output_without_manifest(merged_output, capsys):
    (merged_output / "lora-merge-manifest.json").unlink()
    code, out, _ = _validate(capsys, merged_output)
    assert code == 1 and "the merge did not finish" in out


def test_storage_options_must_be_a_json_object(llama_case, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(
            [
                "plan",
                "--base",
                str(llama_case.base_dir),
                "--adapter",
                str(llama_case.adapter_dir),
                "--output",
                str(tmp_path / "o"),
                "--storage-options",
                "[1, 2]",
            ]
        )
    assert exited.value.code == 1
    assert "--storage-options must be a JSON object" in capsys.readouterr().err


def test_a_copy_of_the_output_elsewhere_still_validates(merged_output, tmp_path, capsys):
    moved = shutil.copytree(merged_output, tmp_path / "moved")
    code, out, _ = _validate(capsys, moved)
    assert code == 0, out
