"""Every bad input gets a clear, one-line error naming the culprit, a non-zero exit, and no committed output."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_tools import (
    copy_adapter,
    edit_adapter_config,
    edit_adapter_tensors,
    read_raw_header,
    shards,
    tree_digest,
    write_raw_header,
)

from prefect_lora_merge.cli import main

pytestmark = pytest.mark.usefixtures("prefect_server")


@pytest.fixture
def inputs(llama_case, tmp_path):
    """A private copy of the llama base and adapter that a test may damage."""
    base = Path(shutil.copytree(llama_case.base_dir, tmp_path / "base"))
    adapter = copy_adapter(llama_case.adapter_dir, tmp_path / "adapter")
    return base, adapter, tmp_path / "out"


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    ours = [line for line in err if line.startswith("lora-merge: error:")]
    assert len(ours) == 1, err
    return exited.value.code, ours[0]


def assert_refused(capsys, base: Path, adapter: Path, out: Path, *expected: str) -> str:
    before = tree_digest(base), tree_digest(adapter)
    code, message = run_cli(capsys, "run", "--base", str(base), "--adapter", str(adapter), "--output", str(out))
    assert code == 1
    for fragment in expected:
        assert fragment in message, message
    assert not out.exists() or not any(out.iterdir()), "a refused merge must not write output"
    assert (tree_digest(base), tree_digest(adapter)) == before, "inputs must never be written"
    return message


def test_adapter_key_without_target_is_refused_with_the_key_named(capsys, inputs):
    base, adapter, out = inputs

    def add_ghost_layer(tensors):
        tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
        tensors["base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)

    edit_adapter_tensors(adapter, add_ghost_layer)
    assert_refused(capsys, base, adapter, out, "model.layers.9.self_attn.q_proj", "no matching tensor")


def test_shape_mismatch_is_refused_with_the_tensor_named(capsys, inputs):
    base, adapter, out = inputs
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"

    def widen(tensors):
        tensors[key] = torch.zeros(tensors[key].shape[0] + 3, tensors[key].shape[1])

    edit_adapter_tensors(adapter, widen)
    assert_refused(capsys, base, adapter, out, "model.layers.1.mlp.up_proj", "does not fit")


def test_adapter_for_another_model_is_refused(capsys, inputs, tmp_path):
    import zoo

    base, _, out = inputs
    gpt2 = zoo.build_gpt2_conv1d(tmp_path / "gpt2")
    message = assert_refused(capsys, base, gpt2.adapter_dir, out, "cannot be merged into the base")
    assert "transformer.h.0.attn.c_attn" in message


def test_truncated_shard_is_refused_naming_the_file(capsys, inputs):
    base, adapter, out = inputs
    shard = shards(base)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    assert_refused(capsys, base, adapter, out, shard.name, "truncated")


def test_header_whose_offsets_lie_is_refused_naming_the_tensor(capsys, inputs):
    base, adapter, out = inputs
    shard = shards(base)[0]
    header, body = read_raw_header(shard)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    victim = names[1]
    header[victim]["data_offsets"][0] -= 4  # overlaps its neighbour and claims 4 bytes too many
    write_raw_header(shard, header, body)
    assert_refused(capsys, base, adapter, out, shard.name, victim)


def test_absurdly_large_header_is_refused_before_reading_it(capsys, inputs):
    base, adapter, out = inputs
    shard = shards(base)[1]
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    shard.write_bytes(bytes(data))
    assert_refused(capsys, base, adapter, out, shard.name, "header")


@pytest.mark.parametrize("where", ["base itself", "inside base", "inside adapter"])
def test_output_overlapping_an_input_is_refused(capsys, inputs, where):
    base, adapter, _ = inputs
    out = {"base itself": base, "inside base": base / "merged", "inside adapter": adapter / "merged"}[where]
    before = tree_digest(base), tree_digest(adapter)
    code, message = run_cli(capsys, "run", "--base", str(base), "--adapter", str(adapter), "--output", str(out))
    assert code == 1 and "overlaps" in message and "--output" in message
    assert (tree_digest(base), tree_digest(adapter)) == before
    assert not (base / "merged").exists() and not (adapter / "merged").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"init_lora_weights": "pissa"}, "pissa"),
        ({"init_lora_weights": "olora"}, "olora"),
        ({"init_lora_weights": "corda"}, "corda"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication"),
        ({"peft_type": "LOHA"}, "LOHA"),
    ],
)
def test_unsupported_adapter_kinds_are_refused_with_the_reason(capsys, inputs, change, expected):
    base, adapter, out = inputs
    edit_adapter_config(adapter, **change)
    assert_refused(capsys, base, adapter, out, "adapter_config.json", expected)


def test_console_script_prints_exactly_one_error_line_and_exits_non_zero(inputs):
    base, adapter, out = inputs
    shard = shards(base)[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefect_lora_merge.cli",
            "plan",
            "--base",
            str(base),
            "--adapter",
            str(adapter),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-merge: error:") and shard.name in lines[0], result.stderr
    assert not out.exists()


def test_an_adapter_with_nan_values_fails_the_merge_naming_the_module(capsys, inputs):
    base, adapter, out = inputs
    key = "base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"

    def poison(tensors):
        tensors[key][0, 0] = float("nan")

    edit_adapter_tensors(adapter, poison)
    before = tree_digest(base)
    code, message = run_cli(capsys, "run", "--base", str(base), "--adapter", str(adapter), "--output", str(out))
    assert code == 1 and "NaN/Inf" in message and "model.layers.1.self_attn.o_proj" in message
    assert not (out / "lora-merge-manifest.json").exists(), "a failed merge is never published as complete"
    assert not list(out.glob(".*partial*")), "no temporary file is left behind"
    assert tree_digest(base) == before
