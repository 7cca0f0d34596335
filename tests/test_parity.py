"""Parity with PEFT: a streamed, file-level merge must equal `PeftModel.merge_and_unload()` on every zoo case.

Each case (tests/zoo.py) is built once per module; the merge runs once per case. fp32 outputs must match PEFT's
fp32 merge to within a few ulps, bf16 outputs must equal PEFT's fp32 result rounded once, bit for bit. Tensors the
adapter does not touch must come out byte-identical, in the same shards, under the same names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import zoo
from safetensors import safe_open

CASE_NAMES = list(zoo.CASES)

# fp32 tolerance: our merge and PEFT's may sum in a different order; 1e-6 is a few ulps at these magnitudes.
FP32_RTOL = 1e-6
FP32_ATOL = 1e-6


@dataclass
class Built:
    case: zoo.Case
    root: Path
    # Checkpoint tensor names (base layout) whose values PEFT's merge changes.
    peft_changed: set[str]


@dataclass
class Merged:
    built: Built
    out_dir: Path


@pytest.fixture(scope="module", params=CASE_NAMES)
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp(request.param)
    case = zoo.CASES[request.param](root)
    return Built(case, root, zoo.peft_changed_checkpoint_keys(case, root / "peft-merged"))


@pytest.fixture(scope="module")
def merged(built: Built) -> Merged:
    # Imported here so the zoo/oracle tests above still run while the pipeline is being written.
    from prefect_lora_merge.core.pipeline import merge_checkpoint

    out_dir = built.root / "merged"
    merge_checkpoint(
        base=str(built.case.base_dir), adapter=str(built.case.adapter_dir), output=str(out_dir), device="cpu"
    )
    return Merged(built, out_dir)


def _index(directory: Path) -> dict[str, str]:
    return json.loads((directory / zoo.INDEX_NAME).read_text())["weight_map"]


def _raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    # Byte view: unlike torch.equal on values, it tells -0.0 from 0.0 and compares NaN payloads.
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def test_peft_merge_changes_every_adapter_key_type(built: Built) -> None:
    """Guard against vacuous parity: each kind of adapter tensor in the case must move some base tensor."""
    missing = [k for k in built.case.expect_changed if k not in built.peft_changed]
    assert built.peft_changed, f"{built.case.name}: PEFT's merge changed nothing"
    assert not missing, f"{built.case.name}: PEFT's merge left these unchanged: {missing}"


def test_merged_checkpoint_matches_peft_merge_and_unload(merged: Merged) -> None:
    case = merged.built.case
    oracle = zoo.peft_merged_state_dict(case)
    ours = zoo.loaded_state_dict(merged.out_dir, case)
    assert ours.keys() == oracle.keys()
    failures = []
    for key, expected in oracle.items():
        actual = ours[key]
        if actual.dtype != expected.dtype or actual.shape != expected.shape:
            failures.append(f"{key}: {actual.dtype}{tuple(actual.shape)} != {expected.dtype}{tuple(expected.shape)}")
            continue
        if case.dtype == torch.float32:
            ok = torch.allclose(actual, expected, rtol=FP32_RTOL, atol=FP32_ATOL)
        else:
            ok = torch.equal(actual, expected)
        if not ok:
            diff = (actual.float() - expected.float()).abs()
            failures.append(f"{key}: max abs diff {diff.max().item():.3g} at {int((diff > 0).sum())} elements")
    assert not failures, f"{case.name}: {len(failures)} tensor(s) differ from PEFT:\n  " + "\n  ".join(failures)


def test_fp32_merge_is_bit_identical_to_peft(merged: Merged) -> None:
    """Stricter than the tolerance above: same fp32 operations in the same order as PEFT give the same bits.

    Kept separate so a summation-order difference (an ulp) is not confused with a wrong merge.
    """
    case = merged.built.case
    if case.dtype != torch.float32:
        pytest.skip("bf16 parity is already bit-exact in test_merged_checkpoint_matches_peft_merge_and_unload")
    oracle = zoo.peft_merged_state_dict(case)
    ours = zoo.loaded_state_dict(merged.out_dir, case)
    failures = []
    for key, expected in oracle.items():
        if not torch.equal(ours[key], expected):
            diff = (ours[key].float() - expected.float()).abs()
            failures.append(f"{key}: max abs diff {diff.max().item():.3g} at {int((diff > 0).sum())} elements")
    assert not failures, f"{case.name}: not bit-identical to PEFT:\n  " + "\n  ".join(failures)


def test_output_keeps_the_base_shard_layout(merged: Merged) -> None:
    base_dir, out_dir = merged.built.case.base_dir, merged.out_dir
    base_shards = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert sorted(p.name for p in out_dir.glob("*.safetensors")) == base_shards
    assert _index(out_dir) == _index(base_dir)
    for shard in base_shards:
        with safe_open(base_dir / shard, "pt") as b, safe_open(out_dir / shard, "pt") as o:
            assert sorted(o.keys()) == sorted(b.keys()), shard
            for key in b.keys():
                bs, os_ = b.get_slice(key), o.get_slice(key)
                assert (os_.get_dtype(), os_.get_shape()) == (bs.get_dtype(), bs.get_shape()), f"{shard}:{key}"


def test_untouched_tensors_are_byte_identical(merged: Merged) -> None:
    built = merged.built
    base_dir, out_dir = built.case.base_dir, merged.out_dir
    untouched = 0
    changed_by_us_only = []
    for shard in sorted(p.name for p in base_dir.glob("*.safetensors")):
        with safe_open(base_dir / shard, "pt") as b, safe_open(out_dir / shard, "pt") as o:
            for key in b.keys():
                if key in built.peft_changed:
                    continue
                untouched += 1
                if not torch.equal(_raw_bytes(o.get_tensor(key)), _raw_bytes(b.get_tensor(key))):
                    changed_by_us_only.append(f"{shard}:{key}")
    assert untouched, "every tensor is touched: the byte-identity check would be vacuous"
    assert not changed_by_us_only, f"{built.case.name}: changed though PEFT leaves them alone: {changed_by_us_only}"


def test_side_files_of_the_base_are_carried_over(merged: Merged) -> None:
    base_dir, out_dir = merged.built.case.base_dir, merged.out_dir
    side_files = [p.name for p in base_dir.iterdir() if p.is_file() and not p.name.endswith(".safetensors")]
    side_files.remove(zoo.INDEX_NAME)
    missing = [name for name in side_files if not (out_dir / name).exists()]
    assert not missing, f"not copied to the output: {missing}"
    # A tokenizer file has nothing to do with the merge: it must come through unchanged.
    assert (out_dir / "tokenizer_config.json").read_bytes() == (base_dir / "tokenizer_config.json").read_bytes()


def test_tile_by_tile_merge_gives_the_same_bytes_as_whole_tensors(llama_case, tmp_path, monkeypatch):
    """The zoo's weights fit in one tile; 64-value tiles cut every touched weight into many, edges included."""
    from checkpoint_tools import shards

    from prefect_lora_merge.core import tiling
    from prefect_lora_merge.core.pipeline import merge_checkpoint

    whole = tmp_path / "whole"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(whole))
    monkeypatch.setattr(tiling, "TILE_VALUES", 64)
    tiled = tmp_path / "tiled"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(tiled))
    for path in shards(whole):
        assert (tiled / path.name).read_bytes() == path.read_bytes(), path.name
