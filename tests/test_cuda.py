"""The CUDA path: same plan, touched tensors computed on the GPU. Skipped where there is no GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch
import zoo

from prefect_lora_merge.core.errors import LoraMergeError
from prefect_lora_merge.core.merge import resolve_device
from prefect_lora_merge.core.pipeline import merge_checkpoint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case_name", ["llama_dora", "llama_rslora_bf16", "mixtral_fused"])
def test_cuda_merge_matches_peft_within_one_rounding(case_name, tmp_path):
    case = zoo.CASES[case_name](tmp_path)
    out = tmp_path / "merged-cuda"
    result = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), device="cuda")
    assert all(r.device.startswith("cuda") for r in result.receipts if r.touched)
    oracle = zoo.peft_merged_state_dict(case)
    ours = zoo.loaded_state_dict(out, case)
    # GPU matmuls may sum in another order: allow fp32 ulps, or one bf16 step.
    tolerance = dict(rtol=1e-5, atol=1e-5) if case.dtype == torch.float32 else dict(rtol=2**-7, atol=1e-6)
    for key, expected in oracle.items():
        torch.testing.assert_close(ours[key], expected, **tolerance, msg=key)


def test_asking_for_cuda_without_a_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
        return
    with pytest.raises(LoraMergeError, match="this machine has no CUDA device .*use --device cpu"):
        resolve_device("cuda")
    assert resolve_device("auto").type == "cpu"
