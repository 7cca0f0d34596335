"""Several adapters in one pass: W + Σ wᵢ·ΔWᵢ, each ΔWᵢ with its own adapter's scaling.

The oracle is PEFT's own combination of adapters, `add_weighted_adapter(..., combination_type="cat")` followed by
`merge_and_unload()`; the result must also equal applying the adapters one after another. What is not a delta
(DoRA, modules_to_save copies) is refused where it cannot be combined, with a message that says what to do.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import zoo
from peft import LoraConfig, PeftModel

from prefect_lora_merge.cli import main
from prefect_lora_merge.core.adapter_spec import AdapterSpec
from prefect_lora_merge.core.errors import (
    InconsistentAdapterError,
    LoraMergeError,
    OutputLocationError,
    UnsupportedAdapterError,
)
from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import MANIFEST_FILE, make_plan

# The second and third adapters: other ranks, rsLoRA, their own patterns, targets that overlap the first's
# (every linear layer) on q/k/o/gate and v/up/down.
SECOND = dict(
    r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"],
    alpha_pattern={"k_proj": 16},
)  # fmt: skip
THIRD = dict(
    r=6, lora_alpha=3, target_modules=["v_proj", "up_proj", "down_proj"], rank_pattern={"layers.1.mlp.up_proj": 3}
)


@pytest.fixture(scope="module")
def adapters(llama_case, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("more-adapters")
    second = zoo.build_adapter_for(llama_case, root / "second", LoraConfig(**SECOND), seed=11)
    third = zoo.build_adapter_for(llama_case, root / "third", LoraConfig(**THIRD), seed=12)
    return [llama_case.adapter_dir, second, third]


def peft_weighted_merge(case: zoo.Case, adapter_dirs: list[Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """PEFT's merge of the adapters combined with `add_weighted_adapter(..., "cat")`, in fp32 (rounded by the caller).

    PEFT's combined adapter takes use_rslora from the first adapter while setting its alpha to the summed rank, so the
    first adapter given to it must be a plain LoRA (every case here puts one first)."""
    model = case.model_cls.from_pretrained(str(case.base_dir), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(model, str(adapter_dirs[0]), adapter_name="a0")
        names = ["a0"]
        for i, where in enumerate(adapter_dirs[1:], 1):
            peft_model.load_adapter(str(where), adapter_name=f"a{i}")
            names.append(f"a{i}")
        assert not peft_model.peft_config["a0"].use_rslora
        peft_model.add_weighted_adapter(names, weights, "mix", combination_type="cat")
        peft_model.set_adapter("mix")
        merged = peft_model.merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _spec(where: Path, weight: float) -> str:
    return f"{where}:{weight}"


def _within_one_rounding(ours: torch.Tensor, exact: torch.Tensor) -> bool:
    """|ours − exact| is at most one step of ours's dtype at exact's magnitude (exact in fp32)."""
    if ours.dtype == torch.float32:
        return torch.allclose(ours, exact, rtol=1e-5, atol=1e-6)
    mantissa = {torch.bfloat16: 7, torch.float16: 10}[ours.dtype]
    step = torch.exp2(torch.floor(torch.log2(exact.abs().clamp_min(1e-30))) - mantissa)
    return bool(((ours.float() - exact).abs() <= step).all())


def _compare(ours: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], base: dict[str, torch.Tensor]):
    assert ours.keys() == oracle.keys()
    wrong = [k for k in oracle if not _within_one_rounding(ours[k], oracle[k])]
    assert not wrong, f"{len(wrong)} tensor(s) differ from PEFT by more than one rounding: {wrong[:5]}"
    changed = [k for k in oracle if not torch.equal(ours[k], base[k])]
    return changed


@pytest.mark.parametrize("weights", [[1.0, 0.5], [0.8, -1.0, 0.7]], ids=["two-adapters", "three-adapters-one-negative"])
def test_several_adapters_in_one_pass_equal_peft_add_weighted_adapter_cat(llama_case, adapters, tmp_path, weights):
    dirs = adapters[: len(weights)]
    out = tmp_path / "merged"

    result = merge_checkpoint(
        str(llama_case.base_dir), [_spec(d, w) for d, w in zip(dirs, weights, strict=True)], str(out)
    )

    assert result.report.passed
    oracle = peft_weighted_merge(llama_case, dirs, weights)
    base = zoo.loaded_state_dict(llama_case.base_dir, llama_case)
    changed = _compare(zoo.loaded_state_dict(out, llama_case), oracle, base)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        assert name in changed, f"{name}: a later adapter's target must be merged"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    members = manifest["adapter"]["members"]
    assert [m["weight"] for m in members] == weights
    assert [m["uri"] for m in members] == [str(d) for d in dirs]
    usage = manifest["adapter"]["usage"]
    assert {key.partition(":")[0] for key in usage} == {str(i + 1) for i in range(len(dirs))}
    assert all(usage.values()), "every adapter tensor of every adapter lands somewhere"


def test_a_bf16_base_gets_two_adapters_within_one_rounding_of_peft(tmp_path):
    case = zoo.build_llama_rslora_bf16(tmp_path / "bf16")  # its adapter is rsLoRA with rank and alpha patterns
    plain = zoo.build_adapter_for(
        case, tmp_path / "plain", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"]), seed=5
    )
    dirs, weights = [plain, case.adapter_dir], [-0.5, 1.25]
    out = tmp_path / "merged"

    merge_checkpoint(str(case.base_dir), [_spec(d, w) for d, w in zip(dirs, weights, strict=True)], str(out))

    oracle = peft_weighted_merge(case, dirs, weights)  # fp32: ours is that, rounded once to bf16
    ours = zoo.loaded_state_dict(out, case)
    base = zoo.loaded_state_dict(case.base_dir, case)
    assert _compare(ours, oracle, base)
    assert all(v.dtype == torch.bfloat16 for v in ours.values())


def test_applying_adapters_one_after_another_gives_the_same_tensors(llama_case, adapters, tmp_path):
    first, second = adapters[0], adapters[1]
    one_pass = tmp_path / "one-pass"
    merge_checkpoint(str(llama_case.base_dir), [str(first), _spec(second, -0.75)], str(one_pass))
    step = tmp_path / "step-1"
    merge_checkpoint(str(llama_case.base_dir), str(first), str(step))
    two_passes = tmp_path / "step-2"
    merge_checkpoint(str(step), _spec(second, -0.75), str(two_passes))

    ours, sequential = zoo.read_checkpoint(one_pass), zoo.read_checkpoint(two_passes)
    assert ours.keys() == sequential.keys()
    for name, value in ours.items():
        assert torch.allclose(value, sequential[name], rtol=1e-5, atol=1e-6), name


def test_lora_merge_validate_passes_on_several_adapters_and_finds_a_missing_one(llama_case, adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    given = ["--adapter", str(adapters[0]), "--adapter", _spec(adapters[1], 0.5)]
    assert main(["plan", "--base", str(llama_case.base_dir), *given, "--output", str(out), "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["summary"]
    assert planned["adapters"] == [{"uri": str(adapters[0]), "weight": 1.0}, {"uri": str(adapters[1]), "weight": 0.5}]
    merge_checkpoint(str(llama_case.base_dir), [str(adapters[0]), _spec(adapters[1], 0.5)], str(out))

    code = main(["validate", "--output", str(out), "--base", str(llama_case.base_dir), *given, "--forward", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["passed"], report
    assert report["forward"]["passed"]

    # Only the first adapter: the output is another merge, and validation says so.
    with pytest.raises(SystemExit) as failed:
        main(["validate", "--output", str(out), "--base", str(llama_case.base_dir), *given[:2], "--json"])
    assert failed.value.code == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["passed"]
    assert any("for another merge" in f for f in report["failures"]), report["failures"]


def test_other_weights_on_the_same_output_are_another_merge(llama_case, adapters, tmp_path):
    out = tmp_path / "merged"
    merge_checkpoint(str(llama_case.base_dir), [str(adapters[0]), _spec(adapters[1], 0.5)], str(out))
    with pytest.raises(OutputLocationError, match="another|other"):
        merge_checkpoint(str(llama_case.base_dir), [str(adapters[0]), _spec(adapters[1], 0.25)], str(out))
    again = merge_checkpoint(str(llama_case.base_dir), [str(adapters[0]), _spec(adapters[1], 0.5)], str(out))
    assert all(r.resumed for r in again.receipts), "the same set and weights resume"


def test_one_adapter_at_weight_one_is_the_merge_it_always_was(llama_case, tmp_path):
    alone = make_plan(str(llama_case.base_dir), str(llama_case.adapter_dir), str(tmp_path / "o"))
    as_list = make_plan(str(llama_case.base_dir), [f"{llama_case.adapter_dir}:1"], str(tmp_path / "o"))
    halved = make_plan(str(llama_case.base_dir), f"{llama_case.adapter_dir}:0.5", str(tmp_path / "o"))
    assert as_list.fingerprint == alone.fingerprint
    assert set(alone.adapter_usage) == set(llama_case_keys(llama_case)), "a single adapter keeps plain keys"
    assert halved.fingerprint != alone.fingerprint
    scales = {u.scale for s in alone.shards for t in s.touched for u in t.updates}
    halved_scales = {u.scale for s in halved.shards for t in s.touched for u in t.updates}
    assert halved_scales == {s * 0.5 for s in scales}


def llama_case_keys(case: zoo.Case) -> list[str]:
    return [k.removeprefix("base_model.model.") for k in zoo.adapter_keys(case.adapter_dir)]


# -- what cannot be combined ----------------------------------------------------------------------------------


def test_a_dora_adapter_is_merged_alone_and_the_refusal_says_how(llama_case, tmp_path):
    dora = zoo.build_adapter_for(
        llama_case, tmp_path / "dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), seed=3
    )
    for given in ([str(llama_case.adapter_dir), str(dora)], [f"{dora}:0.5"]):
        with pytest.raises(UnsupportedAdapterError, match="DoRA") as caught:
            make_plan(str(llama_case.base_dir), given, str(tmp_path / "out"))
        assert str(dora) in str(caught.value) and "pass of its own" in str(caught.value)
    assert not (tmp_path / "out").exists()


def _with_copy(case: zoo.Case, where: Path, seed: int) -> Path:
    config = LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    return zoo.build_adapter_for(case, where, config, seed=seed)


def test_two_adapters_that_save_the_same_module_must_agree(llama_case, tmp_path):
    one, other = _with_copy(llama_case, tmp_path / "one", 21), _with_copy(llama_case, tmp_path / "other", 22)
    with pytest.raises(InconsistentAdapterError, match="lm_head") as caught:
        make_plan(str(llama_case.base_dir), [str(one), str(other)], str(tmp_path / "out"))
    assert "modules_to_save" in str(caught.value) and "separate passes" in str(caught.value)

    # The same copy in both (one adapter saved twice, say): applied once, and the merge validates.
    same = tmp_path / "same"
    same.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (same / name).write_bytes((one / name).read_bytes())
    result = merge_checkpoint(str(llama_case.base_dir), [str(one), str(same)], str(tmp_path / "merged"))
    assert result.report.passed
    assert any("applied once" in d for d in result.plan.decisions)
    head = zoo.read_checkpoint(tmp_path / "merged")["lm_head.weight"]
    alone = merge_checkpoint(str(llama_case.base_dir), str(one), str(tmp_path / "alone"))
    assert alone.report.passed
    assert torch.equal(head, zoo.read_checkpoint(tmp_path / "alone")["lm_head.weight"])


def test_a_saved_module_cannot_be_weighted(llama_case, tmp_path):
    copy = _with_copy(llama_case, tmp_path / "copy", 23)
    with pytest.raises(UnsupportedAdapterError, match="weight 1") as caught:
        make_plan(str(llama_case.base_dir), [str(llama_case.adapter_dir), f"{copy}:0.5"], str(tmp_path / "out"))
    assert "lm_head" in str(caught.value) and "modules_to_save" in str(caught.value)


def test_the_same_adapter_twice_is_refused_with_the_summed_weight(llama_case, tmp_path):
    with pytest.raises(LoraMergeError, match="given twice") as caught:
        make_plan(
            str(llama_case.base_dir), [str(llama_case.adapter_dir), f"{llama_case.adapter_dir}/:0.5"], str(tmp_path)
        )
    assert f"{llama_case.adapter_dir}:1.5" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "uri", "weight"),
    [
        ("adapters/run-7", "adapters/run-7", 1.0),
        ("adapters/run-7:0.5", "adapters/run-7", 0.5),
        ("s3://bucket/run-7", "s3://bucket/run-7", 1.0),
        ("s3://bucket/run-7:-1", "s3://bucket/run-7", -1.0),
        ("s3://bucket/run:3:1", "s3://bucket/run:3", 1.0),
        ("run-7:2e-1", "run-7", 0.2),
        ("C:\\adapters\\run", "C:\\adapters\\run", 1.0),
    ],
)
def test_an_adapter_is_path_then_optional_weight_after_the_last_colon(text, uri, weight):
    assert AdapterSpec.parse(text) == AdapterSpec(uri=uri, weight=weight)
    params = MergeParameters(base="b", adapter=[text], output="o")
    assert params.adapter_specs() == (AdapterSpec(uri=uri, weight=weight),)


@pytest.mark.parametrize("text", ["run:nan", "run:inf", "run:-Infinity", "run:1e999", ""])
def test_a_weight_that_is_not_a_finite_number_is_refused_before_anything_runs(text, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["plan", "--base", "b", "--adapter", text, "--output", "o"])
    assert caught.value.code == 2
    assert "--adapter" in capsys.readouterr().err
    with pytest.raises(ValueError, match="adapter"):
        MergeParameters(base="b", adapter=[text], output="o")


def _deltas_only(case: zoo.Case, plan, where: Path) -> Path:
    """The case's adapter without its full copies and token rows (and their config): its deltas alone."""
    from safetensors.torch import load_file, save_file

    deltas = {
        k for s in plan.shards for t in s.touched for u in t.updates if u.kind == "delta" for k in u.adapter_tensors
    }
    tensors = load_file(case.adapter_dir / "adapter_model.safetensors")
    kept = {k: v for k, v in tensors.items() if k.removeprefix("base_model.model.") in deltas}
    config = json.loads((case.adapter_dir / "adapter_config.json").read_text())
    config.update(modules_to_save=None, trainable_token_indices=None)
    where.mkdir()
    save_file(kept, where / "adapter_model.safetensors")
    (where / "adapter_config.json").write_text(json.dumps(config))
    return where


@pytest.mark.parametrize("name", list(zoo.CASES))
def test_every_kind_of_update_in_the_zoo_takes_its_adapters_weight(name, tmp_path):
    """Two copies of one adapter at 0.5 and 0.25 are that adapter at 0.75, on every form of delta (linear, Conv1D,
    embedding, conv, fused and per-expert experts, biases, on a saved base layer); an adapter with DoRA, a trained
    copy or token rows is refused at a weight other than 1."""
    case = zoo.CASES[name](tmp_path)
    alone = make_plan(str(case.base_dir), str(case.adapter_dir), str(tmp_path / "o"))
    updates = [u for s in alone.shards for t in s.touched for u in t.updates]
    if any(u.magnitude for u in updates):
        with pytest.raises(UnsupportedAdapterError, match="DoRA"):
            make_plan(str(case.base_dir), [f"{case.adapter_dir}:0.5"], str(tmp_path / "o"))
        return
    adapter = case.adapter_dir
    base_copy = (".base_layer.", ".original_module.")  # PEFT's saved base layer: the start, taken at any weight
    if any(
        u.kind == "rows" or u.kind == "replace" and not any(b in u.adapter_tensors[0] for b in base_copy)
        for u in updates
    ):
        with pytest.raises(UnsupportedAdapterError, match="weight 1"):
            make_plan(str(case.base_dir), [f"{case.adapter_dir}:0.5"], str(tmp_path / "o"))
        adapter = _deltas_only(case, alone, tmp_path / "deltas")
    twin = tmp_path / "twin"
    twin.mkdir()
    for part in adapter.iterdir():
        (twin / part.name).write_bytes(part.read_bytes())
    merge_checkpoint(str(case.base_dir), [f"{adapter}:0.5", f"{twin}:0.25"], str(tmp_path / "pair"))
    merge_checkpoint(str(case.base_dir), f"{adapter}:0.75", str(tmp_path / "weighted"))
    ours, expected = zoo.read_checkpoint(tmp_path / "pair"), zoo.read_checkpoint(tmp_path / "weighted")
    base = zoo.read_checkpoint(case.base_dir)
    assert ours.keys() == expected.keys()
    wrong = [k for k, v in ours.items() if v.is_floating_point() and not _within_one_rounding(v, expected[k].float())]
    assert not wrong, f"{name}: {wrong[:5]}"
    changed = {k for k, v in ours.items() if k in base and not torch.equal(v, base[k])}
    assert changed == {k for k, v in expected.items() if k in base and not torch.equal(v, base[k])}


def test_a_later_adapters_copy_of_a_module_is_merged_and_checked_against_peft(llama_case, tmp_path, capsys):
    copy = _with_copy(llama_case, tmp_path / "copy", 24)  # lm_head's trained copy; the first adapter leaves lm_head
    out = tmp_path / "merged"
    given = ["--adapter", f"{llama_case.adapter_dir}:0.5", "--adapter", str(copy)]
    merge_checkpoint(str(llama_case.base_dir), [f"{llama_case.adapter_dir}:0.5", str(copy)], str(out))

    code = main(["validate", "--output", str(out), "--base", str(llama_case.base_dir), *given, "--forward", "--json"])

    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["forward"]["passed"], report
    saved = zoo.read_checkpoint(copy)  # not a checkpoint, but read_checkpoint reads any safetensors directory
    trained = next(
        v
        for k, v in saved.items()
        if k.endswith("lm_head.modules_to_save.default.weight")
        or (k.endswith("lm_head.weight") and "base_layer" not in k)
    )
    assert torch.equal(zoo.read_checkpoint(out)["lm_head.weight"], trained.to(torch.float32))


def test_a_copy_of_a_tensor_that_another_adapter_changes_is_refused(llama_case, tmp_path):
    head_lora = zoo.build_adapter_for(
        llama_case, tmp_path / "head-lora", LoraConfig(r=2, target_modules=["lm_head"]), seed=25
    )
    copy = _with_copy(llama_case, tmp_path / "copy", 26)
    with pytest.raises(InconsistentAdapterError, match="lm_head") as caught:
        make_plan(str(llama_case.base_dir), [str(head_lora), str(copy)], str(tmp_path / "out"))
    message = str(caught.value)
    assert "adapter 2" in message and "also change" in message and "separate passes" in message


def test_an_adapter_that_unties_the_head_does_so_for_the_whole_set_in_either_order(tmp_path):
    case = zoo.build_tied_llama(tmp_path / "tied")
    head = zoo.build_adapter_for(case, tmp_path / "head", LoraConfig(r=2, target_modules=["lm_head", "q_proj"]), 3)
    embed_config = LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["embed_tokens"])
    embed = zoo.build_adapter_for(case, tmp_path / "embed", embed_config, 4)

    def planned(order: list[Path]) -> tuple[dict[str, list[tuple[str, ...]]], list[str]]:
        plan = make_plan(str(case.base_dir), [str(p) for p in order], str(tmp_path / "out"))
        by_path = {str(p): i + 1 for i, p in enumerate(order)}
        name = {f"{i}:": f"{p.name}:" for p, i in ((Path(k), v) for k, v in by_path.items())}
        touched = {
            t.name: sorted(tuple(name[k[:2]] + k[2:] for k in u.adapter_tensors) for u in t.updates)
            for s in plan.shards
            for t in s.touched
            if t.name in ("model.embed_tokens.weight", "lm_head.weight")
        }
        return touched, [d for d in plan.decisions if "untied embeddings" in d]

    first, first_why = planned([head, embed])
    second, second_why = planned([embed, head])
    assert first == second, "the order of the adapters does not decide where the head's updates land"
    assert all(k.startswith("head:") for u in first["lm_head.weight"] for k in u)
    assert first["model.embed_tokens.weight"] == [("embed:model.embed_tokens.weight",)]
    assert len(first_why) == len(second_why) == 1 and str(embed) in first_why[0] and str(embed) in second_why[0]
