"""The identity of a merge (its fingerprint) is exactly what decides the bytes it writes.

Where the arithmetic runs, checks that only pass or fail a run, and the adapter's provenance notes leave the bytes
alone: an output merged with one of them differing is the same merge (resumable, and `validate --base --adapter`
passes on it). A change of anything that changes the bytes makes it another merge.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from checkpoint_tools import edit_adapter_config, edit_adapter_tensors

from prefect_lora_merge.cli import main
from prefect_lora_merge.core.plan import make_plan


def _fingerprint(case, tmp_path, adapter=None, **options) -> str:
    return make_plan(str(case.base_dir), str(adapter or case.adapter_dir), str(tmp_path / "out"), **options).fingerprint


DEVICES = [
    None,  # the default, auto
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("device", DEVICES, ids=["default", "cpu", "cuda"])
def test_validate_with_base_and_adapter_passes_on_the_output_of_a_run_on_any_device(
    llama_case, tmp_path, capsys, device
):
    out = str(tmp_path / "out")
    base, adapter = str(llama_case.base_dir), str(llama_case.adapter_dir)
    chosen = ["--device", device] if device else []
    assert main(["run", "--base", base, "--adapter", adapter, "--output", out, *chosen]) == 0
    capsys.readouterr()

    assert main(["validate", "--output", out, "--base", base, "--adapter", adapter]) == 0
    assert capsys.readouterr().out.startswith("passed"), "the README's own validate command passes"


def test_the_fingerprint_ignores_what_does_not_change_a_byte(llama_case, tmp_path):
    adapter = shutil.copytree(llama_case.adapter_dir, tmp_path / "adapter")
    reference = _fingerprint(llama_case, tmp_path, adapter)
    assert _fingerprint(llama_case, tmp_path, adapter, device="auto") == reference
    assert _fingerprint(llama_case, tmp_path, adapter, device="cuda:1") == reference
    assert _fingerprint(llama_case, tmp_path, adapter, min_delta_cosine=0.99) == reference
    assert make_plan(str(llama_case.base_dir), str(adapter), str(tmp_path / "elsewhere")).fingerprint == reference
    edit_adapter_config(adapter, base_model_name_or_path="/some/other/mount/of/the/base", inference_mode=False)
    assert _fingerprint(llama_case, tmp_path, adapter) == reference


def test_the_fingerprint_changes_with_anything_that_changes_the_bytes(llama_case, tmp_path):
    adapter = shutil.copytree(llama_case.adapter_dir, tmp_path / "adapter")
    reference = _fingerprint(llama_case, tmp_path, adapter)
    edit_adapter_config(adapter, lora_alpha=3)
    scaled = _fingerprint(llama_case, tmp_path, adapter)
    assert scaled != reference

    def perturb(tensors):
        key = next(iter(tensors))
        tensors[key] = tensors[key] + 1

    edit_adapter_tensors(adapter, perturb)
    assert _fingerprint(llama_case, tmp_path, adapter) not in (reference, scaled)

    base = shutil.copytree(llama_case.base_dir, tmp_path / "base")  # same bytes and mtimes, another path
    original = _fingerprint(llama_case, tmp_path)
    assert make_plan(str(base), str(llama_case.adapter_dir), str(tmp_path / "out")).fingerprint == original
    config = base / "config.json"
    config.write_text(config.read_text().replace('"vocab_size"', '"unused": 1, "vocab_size"', 1))
    assert make_plan(str(base), str(llama_case.adapter_dir), str(tmp_path / "out")).fingerprint != original
