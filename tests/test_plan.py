"""Planning: how adapter names find checkpoint tensors, and PEFT's rank/alpha rules."""

from __future__ import annotations

import shutil

import pytest
import torch
from checkpoint_tools import tree_digest, write_adapter, write_checkpoint
from peft.utils.other import get_pattern_key

from prefect_lora_merge.core.adapter import pattern_key
from prefect_lora_merge.core.errors import AdapterError, AdapterMismatchError
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import make_plan


def lora(module: str, out: int = 8, inp: int = 8, r: int = 2) -> dict:
    return {f"{module}.lora_A.weight": torch.randn(r, inp), f"{module}.lora_B.weight": torch.randn(out, r)}


def targets(plan) -> dict[str, list[str]]:
    return {t.name: [u.module for u in t.updates] for s in plan.shards for t in s.touched}


def plan_for(tmp_path, checkpoint_names, adapter_modules, **config):
    base = write_checkpoint(tmp_path / "base", {n: torch.randn(8, 8) for n in checkpoint_names})
    adapter_tensors = {k: v for m in adapter_modules for k, v in lora(m).items()}
    adapter = write_adapter(tmp_path / "adapter", adapter_tensors, **config)
    return make_plan(str(base), str(adapter), str(tmp_path / "out"))


def test_exact_names_match_first(tmp_path):
    plan = plan_for(
        tmp_path, ["model.layers.0.q_proj.weight", "x.model.layers.0.q_proj.weight"], ["model.layers.0.q_proj"]
    )
    assert targets(plan) == {"model.layers.0.q_proj.weight": ["model.layers.0.q_proj"]}


def test_multimodal_prefixes_are_rewritten_to_the_checkpoint_layout(tmp_path):
    plan = plan_for(
        tmp_path,
        ["language_model.model.layers.0.self_attn.q_proj.weight"],
        ["model.language_model.layers.0.self_attn.q_proj"],
    )
    assert list(targets(plan)) == ["language_model.model.layers.0.self_attn.q_proj.weight"]


def test_a_unique_suffix_matches_when_nothing_else_does(tmp_path):
    plan = plan_for(tmp_path, ["backbone.model.layers.0.q_proj.weight"], ["model.layers.0.q_proj"])
    assert list(targets(plan)) == ["backbone.model.layers.0.q_proj.weight"]


def test_an_ambiguous_suffix_is_an_error_listing_the_candidates(tmp_path):
    with pytest.raises(AdapterMismatchError, match="ambiguous") as error:
        plan_for(
            tmp_path, ["a.model.layers.0.q_proj.weight", "b.model.layers.0.q_proj.weight"], ["model.layers.0.q_proj"]
        )
    assert "a.model.layers.0.q_proj.weight" in str(error.value) and "b.model.layers.0.q_proj.weight" in str(error.value)


def test_layer_numbers_are_never_stripped_to_force_a_match(tmp_path):
    with pytest.raises(AdapterMismatchError, match="model.layers.5.q_proj.weight has no matching tensor"):
        plan_for(tmp_path, ["model.layers.0.q_proj.weight"], ["model.layers.5.q_proj"])


def test_every_unmatched_key_is_listed_and_nothing_is_written(tmp_path):
    with pytest.raises(AdapterMismatchError) as error:
        plan_for(tmp_path, ["model.layers.0.q_proj.weight"], ["model.layers.7.q_proj", "model.layers.8.v_proj"])
    assert len(error.value.problems) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_proj",
        "model.layers.10.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "lm_head",
        "model.layers.0.mlp.experts.gate_up_proj",
    ],
)
def test_rank_and_alpha_patterns_follow_peft_first_match_rule(name):
    patterns = {
        "layers.1.self_attn.q_proj": 1,
        "q_proj": 2,
        "^model.layers.0.self_attn.q_proj": 3,
        "mlp\\..*_proj": 4,
        "experts.gate_up_proj": 5,
    }
    theirs = get_pattern_key(list(patterns), name)
    assert pattern_key(patterns, name) == (theirs if theirs in patterns else None)


def test_alpha_pattern_sets_the_scale_per_module(tmp_path):
    plan = plan_for(
        tmp_path,
        ["model.layers.0.q_proj.weight", "model.layers.0.v_proj.weight"],
        ["model.layers.0.q_proj", "model.layers.0.v_proj"],
        alpha_pattern={"v_proj": 16},
        use_rslora=False,
    )
    scales = {t.name: t.updates[0].scale for s in plan.shards for t in s.touched}
    assert scales == {"model.layers.0.q_proj.weight": 2.0, "model.layers.0.v_proj.weight": 8.0}


def test_an_adapter_bin_file_is_read_with_weights_only_and_merges_the_same(llama_case, tmp_path):
    from safetensors.torch import load_file

    reference = tmp_path / "from-safetensors"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(reference), device="cpu")
    old_style = shutil.copytree(llama_case.adapter_dir, tmp_path / "adapter-bin")
    tensors = load_file(str(old_style / "adapter_model.safetensors"))
    (old_style / "adapter_model.safetensors").unlink()
    torch.save(tensors, old_style / "adapter_model.bin")
    merged = tmp_path / "from-bin"
    merge_checkpoint(str(llama_case.base_dir), str(old_style), str(merged), device="cpu")
    ours, theirs = tree_digest(merged), tree_digest(reference)
    shards = [n for n in theirs if n.endswith(".safetensors")]
    assert [ours[n] for n in shards] == [theirs[n] for n in shards]


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path):
    import pickle

    adapter = write_adapter(tmp_path / "adapter", lora("model.layers.0.q_proj"))
    (adapter / "adapter_model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    with open(adapter / "adapter_model.bin", "wb") as handle:
        pickle.dump({"x": Payload()}, handle)
    base = write_checkpoint(tmp_path / "base", {"model.layers.0.q_proj.weight": torch.randn(8, 8)})
    with pytest.raises(Exception, match="weights_only=True"):
        make_plan(str(base), str(adapter), str(tmp_path / "out"))


def _scales(plan) -> dict[str, float]:
    return {t.name: t.updates[0].scale for s in plan.shards for t in s.touched}


PATTERNS = {"rank_pattern": {"layers.0.q_proj": 2}, "alpha_pattern": {"q_proj": 16}}


@pytest.mark.parametrize(
    ("peft_version", "expected_scale"),
    [
        # <= 0.13: one key from rank_pattern + alpha_pattern together; "layers.0.q_proj" wins, it has no alpha
        ("0.13.2", 2.0),
        # >= 0.14: alpha_pattern is matched on its own
        ("0.14.0", 8.0),
        ("0.21.2", 8.0),
    ],
)
def test_alpha_follows_the_pattern_rule_of_the_peft_version_that_saved_the_adapter(
    tmp_path, peft_version, expected_scale
):
    plan = plan_for(
        tmp_path, ["model.layers.0.q_proj.weight"], ["model.layers.0.q_proj"], peft_version=peft_version, **PATTERNS
    )
    assert _scales(plan) == {"model.layers.0.q_proj.weight": expected_scale}


def test_an_unversioned_config_whose_patterns_mean_different_things_per_version_is_refused(tmp_path):
    with pytest.raises(AdapterError, match='add "peft_version"'):
        plan_for(tmp_path, ["model.layers.0.q_proj.weight"], ["model.layers.0.q_proj"], peft_version=None, **PATTERNS)


def test_an_unversioned_config_is_fine_where_every_rule_agrees(tmp_path):
    plan = plan_for(
        tmp_path,
        ["model.layers.0.q_proj.weight"],
        ["model.layers.0.q_proj"],
        peft_version=None,
        alpha_pattern={"q_proj": 16},
    )
    assert _scales(plan) == {"model.layers.0.q_proj.weight": 8.0}


def test_dora_config_without_magnitudes_is_refused_rather_than_merged_as_plain_lora(tmp_path):
    with pytest.raises(AdapterMismatchError, match="use_dora=True but model.layers.0.q_proj has no DoRA magnitude"):
        plan_for(tmp_path, ["model.layers.0.q_proj.weight"], ["model.layers.0.q_proj"], use_dora=True)


def test_a_bare_target_parameter_name_does_not_capture_a_linear_module_of_that_name(tmp_path):
    plan = plan_for(
        tmp_path,
        ["model.layers.0.mlp.down_proj.weight"],
        ["model.layers.0.mlp.down_proj"],
        target_modules=["down_proj"],
        target_parameters=["down_proj"],
    )
    assert list(targets(plan)) == ["model.layers.0.mlp.down_proj.weight"]


def test_a_merged_output_can_be_the_base_of_the_next_merge(llama_case, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    merge_checkpoint(str(llama_case.base_dir), str(llama_case.adapter_dir), str(first), device="cpu")
    result = merge_checkpoint(str(first), str(llama_case.adapter_dir), str(second), device="cpu")
    assert result.report.passed
    assert "lora-merge-manifest.json" not in result.plan.extra_files


def test_an_adapter_replaced_after_planning_is_not_merged(llama_case, tmp_path):
    import os

    from prefect_lora_merge.core.errors import LoraMergeError
    from prefect_lora_merge.core.merge import merge_shard

    adapter = shutil.copytree(llama_case.adapter_dir, tmp_path / "adapter")
    plan = make_plan(str(llama_case.base_dir), str(adapter), str(tmp_path / "out"))
    weights = adapter / "adapter_model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with pytest.raises(LoraMergeError, match="changed since the merge was planned"):
        merge_shard(plan.job, plan.shards[0])
