"""Tensor dtypes: fp16 overflow is caught after rounding, fp64 keeps its precision, quantized bases are refused."""

from __future__ import annotations

import pytest
import torch
from checkpoint_tools import write_adapter, write_checkpoint
from safetensors.torch import load_file

from prefect_lora_merge.core.errors import AdapterMismatchError, LoraMergeError
from prefect_lora_merge.core.pipeline import merge_checkpoint


def _merge(tmp_path, weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor):
    base = write_checkpoint(tmp_path / "base", {"m.q_proj.weight": weight})
    adapter = write_adapter(tmp_path / "adapter", {"m.q_proj.lora_A.weight": A, "m.q_proj.lora_B.weight": B})
    merge_checkpoint(str(base), str(adapter), str(tmp_path / "out"), device="cpu")
    return load_file(str(tmp_path / "out" / "model.safetensors"))["m.q_proj.weight"]


def test_an_fp16_merge_that_overflows_is_refused_not_written_as_inf(tmp_path):
    with pytest.raises(LoraMergeError, match="NaN/Inf.*beyond F16's range"):
        _merge(
            tmp_path,
            torch.full((4, 4), 65000.0, dtype=torch.float16),
            torch.full((2, 4), 10.0),
            torch.full((4, 2), 30.0),
        )
    assert not (tmp_path / "out" / "lora-merge-manifest.json").exists()


def test_fp64_tensors_are_merged_in_fp64(tmp_path):
    weight = torch.full((4, 4), 1 + 1e-12, dtype=torch.float64)
    A, B = torch.randn(2, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64) * 1e-9
    merged = _merge(tmp_path, weight, A.float(), B.float())
    expected = weight + (B.float().double() @ A.float().double()) * 2.0  # alpha 4 / r 2
    assert merged.dtype == torch.float64
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-15)


def test_a_quantized_fp8_base_tensor_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(AdapterMismatchError, match="m.q_proj.weight is F8_E4M3"):
        _merge(tmp_path, torch.ones(4, 4).to(torch.float8_e4m3fn), torch.randn(2, 4), torch.randn(4, 2))
    assert not (tmp_path / "out").exists()
