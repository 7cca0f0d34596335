"""Adapters as training tools really leave them: un-gathered ZeRO-3 saves, empty files, a config that disagrees with
its tensors, integer weights, deltas that overflow the output dtype. Each is refused before anything is written, in
one line that names the file, tensor or config key and what to do; a NaN/Inf the merge writes is never published."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_tools import (
    copy_adapter,
    edit_adapter_config,
    edit_adapter_tensors,
    tree_digest,
)
from safetensors.torch import load_file

from prefect_lora_merge.cli import main

UP_1 = "base_model.model.model.layers.1.mlp.up_proj"


@pytest.fixture
def inputs(llama_case, tmp_path):
    """A private copy of the llama base (fp32) and its all-linear adapter (r 4, layer 0 q_proj r 8) to damage."""
    base = Path(shutil.copytree(llama_case.base_dir, tmp_path / "base"))
    adapter = copy_adapter(llama_case.adapter_dir, tmp_path / "adapter")
    return base, adapter, tmp_path / "out"


def cli(capsys, *args: str) -> tuple[int, str, list[str]]:
    """Run the command line in this process: (exit code, stdout, stderr lines)."""
    try:
        code = main(list(args))
    except SystemExit as exited:
        code = exited.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def assert_one_error_line(code: int, err: list[str], *expected: str) -> str:
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith("lora-merge: error: "), err
    message = err[0]
    for fragment in expected:
        assert fragment in message, message
    assert not re.search(r"\b[A-Z]\w*(Error|Exception)\b", message), f"an exception class reached the user: {message}"
    return message


def assert_refused(capsys, base: Path, adapter: Path, out: Path, *expected: str) -> str:
    """`lora-merge run` refuses at planning: one stderr line, exit 1, no output written, inputs untouched."""
    before = tree_digest(base), tree_digest(adapter)
    code, _, err = cli(capsys, "run", "--base", str(base), "--adapter", str(adapter), "--output", str(out))
    message = assert_one_error_line(code, err, *expected)
    assert not out.exists() or not any(out.iterdir()), "a refused merge must not write output"
    assert (tree_digest(base), tree_digest(adapter)) == before, "inputs must never be written"
    return message


def to_bin(adapter: Path) -> None:
    """The adapter's tensors as an older `adapter_model.bin` (torch.save), as pre-safetensors tools left them."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(tensors, adapter / "adapter_model.bin")


# -- nothing to merge -------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_an_adapter_saved_under_zero3_without_gathering_is_refused_saying_how_to_gather(capsys, inputs, file_format):
    base, adapter, out = inputs

    def partitioned(tensors):  # what PEFT's save writes when DeepSpeed ZeRO-3 keeps each parameter partitioned
        for key, value in tensors.items():
            tensors[key] = torch.empty(0, dtype=value.dtype)

    edit_adapter_tensors(adapter, partitioned)
    if file_format == "bin":
        to_bin(adapter)
    assert_refused(
        capsys,
        base,
        adapter,
        out,
        f"adapter_model.{file_format}",
        "ZeRO-3",
        "not gathered",
        "stage3_gather_16bit_weights_on_model_save: true",
        "get_state_dict",
        "zero_to_fp32",
    )


@pytest.mark.usefixtures("prefect_server")
def test_an_adapter_tensor_with_a_zero_size_dimension_is_refused_naming_it(capsys, inputs):
    base, adapter, out = inputs
    key = "base_model.model.model.layers.1.self_attn.k_proj"

    def rank_zero(tensors):
        tensors[f"{key}.lora_A.weight"] = torch.empty(0, 32)
        tensors[f"{key}.lora_B.weight"] = torch.empty(16, 0)

    edit_adapter_tensors(adapter, rank_zero)
    assert_refused(
        capsys, base, adapter, out, f"{key}.lora_A.weight [0, 32]", f"{key}.lora_B.weight [16, 0]", "zero-size"
    )


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_an_adapter_without_tensors_is_refused_not_published_as_a_copy_of_the_base(capsys, inputs, file_format):
    base, adapter, out = inputs
    edit_adapter_tensors(adapter, lambda tensors: tensors.clear())
    if file_format == "bin":
        to_bin(adapter)
    assert_refused(capsys, base, adapter, out, f"adapter_model.{file_format} holds no tensors", "nothing to merge")


# -- the config against the tensors -------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"r": 0}, "r is 0"),
        ({"rank_pattern": {"layers.0.self_attn.q_proj": 0}}, "rank_pattern['layers.0.self_attn.q_proj'] is 0"),
    ],
)
def test_a_rank_of_zero_in_the_config_is_refused_naming_the_key(capsys, inputs, change, expected):
    base, adapter, out = inputs
    edit_adapter_config(adapter, **change)
    assert_refused(capsys, base, adapter, out, "adapter_config.json", expected, "positive integer")


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # every module but layer 0's q_proj (rank 8 by its rank_pattern) has rank-4 tensors
        ({"r": 5}, ("13 modules (model.layers.0.mlp.down_proj", "rank 4", "r = 5 (from r)")),
        (
            {"rank_pattern": {"layers.0.self_attn.q_proj": 4}},
            ("model.layers.0.self_attn.q_proj: LoRA tensors of rank 8", "r = 4 (from rank_pattern "),
        ),
        # a rank_pattern entry that also catches modules trained at the default rank
        ({"rank_pattern": {"q_proj": 8}}, ("model.layers.1.self_attn.q_proj: LoRA tensors of rank 4", "r = 8")),
    ],
)
def test_a_config_r_that_is_not_the_rank_of_the_tensors_is_refused_naming_module_and_both(
    capsys, inputs, change, expected
):
    base, adapter, out = inputs
    edit_adapter_config(adapter, **change)
    assert_refused(capsys, base, adapter, out, "adapter_config.json", "PEFT could not load", *expected)


def test_fused_expert_ranks_are_rows_of_A_per_expert_and_must_match_the_config(tmp_path):
    """target_parameters on Mixtral's fused experts: A is (E·r, in). A real PEFT rank_pattern for gate_up_proj
    plans with the per-expert rank; the same tensors under a config that says otherwise are refused."""
    import zoo
    from peft import LoraConfig
    from transformers import MixtralConfig, MixtralForCausalLM

    from prefect_lora_merge.core.errors import InconsistentAdapterError
    from prefect_lora_merge.core.plan import make_plan

    base, adapter = zoo._dirs(tmp_path, "mixtral")
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    model = MixtralForCausalLM(config)
    zoo._save_base(model, base, torch.float32)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"gate_up_proj": 2},
    )
    zoo._build_adapter(model, lora, adapter, seed=1, notes=[])
    plan = make_plan(str(base), str(adapter), str(tmp_path / "out"))
    ranks = {u.module: u.rank for s in plan.shards for t in s.touched for u in t.updates}
    assert ranks == {
        "model.layers.0.self_attn.q_proj": 4,
        "model.layers.0.mlp.experts.gate_up_proj": 2,  # A is (4 experts · 2, 32)
        "model.layers.0.mlp.experts.down_proj": 4,
    }
    edit_adapter_config(adapter, rank_pattern={})
    with pytest.raises(InconsistentAdapterError) as refused:
        make_plan(str(base), str(adapter), str(tmp_path / "out"))
    assert refused.value.problems == [
        f"model.layers.0.mlp.experts.gate_up_proj: LoRA tensors of rank 2, but {adapter / 'adapter_config.json'} gives "
        "r = 4 (from r); PEFT could not load this adapter: set r / rank_pattern to the rank it was trained with"
    ]


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("target_modules", [["foo_proj"], r".*\.mlp\.fc\d", []])
def test_target_modules_that_match_none_of_the_adapters_modules_are_refused(capsys, inputs, target_modules):
    base, adapter, out = inputs
    edit_adapter_config(adapter, target_modules=target_modules)
    assert_refused(
        capsys,
        base,
        adapter,
        out,
        f"target_modules {target_modules!r} match none of the adapter's 14 LoRA module(s)",
        "model.layers.0.",
        "adapter_config.json",
    )


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"target_modules": ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
            ["do not match 2 of the adapter's 14 LoRA module(s)", "model.layers.0.self_attn.v_proj, model.layers.1"],
        ),
        (
            {"exclude_modules": ["layers.1.mlp.up_proj"]},
            ["and exclude_modules ['layers.1.mlp.up_proj'] do not match 1 of", ": model.layers.1.mlp.up_proj;"],
        ),
        (
            {"layers_to_transform": [0]},
            ["with layers_to_transform [0] do not match 7 of", "model.layers.1.mlp.down_proj", "(and 3 more)"],
        ),
    ],
)
def test_lora_tensors_on_a_module_the_config_does_not_target_are_refused(capsys, inputs, change, expected):
    """PEFT gives layers only to the modules its config targets: such tensors would not be loaded by PEFT."""
    base, adapter, out = inputs
    edit_adapter_config(adapter, **change)
    assert_refused(capsys, base, adapter, out, *expected)


MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.12.self_attn.q_proj",
    "model.layers.1.mlp.experts.3.down_proj",
    "transformer.h.2.attn.c_attn",
    "model.decoder.layers.3.fc1",
    "q_proj",
    "lm_head",
]


@pytest.mark.parametrize(
    "config",
    [
        {"target_modules": ["q_proj", "down_proj"]},
        {"target_modules": ["self_attn.q_proj", "lm_head"]},
        {"target_modules": ["layers.0.self_attn.q_proj"]},
        {"target_modules": ["proj"]},  # no substring match: a name part must end with the whole entry
        {"target_modules": r".*\.(q_proj|c_attn)"},
        {"target_modules": "q_proj|lm_head"},  # a string is a full-match regex
        {"target_modules": ["q_proj", "down_proj", "c_attn"], "layers_to_transform": [0, 2]},
        {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 1},
        {"target_modules": ["q_proj", "fc1"], "layers_to_transform": [3, 12], "layers_pattern": "layers"},
        {"target_modules": ["c_attn", "fc1"], "layers_to_transform": [2, 3], "layers_pattern": ["h", "layers"]},
        {"target_modules": ["q_proj", "down_proj"], "exclude_modules": ["layers.12.self_attn.q_proj"]},
        {"target_modules": ["q_proj", "lm_head"], "exclude_modules": r".*layers\.0\..*"},
    ],
)
def test_which_modules_the_config_targets_follows_peft(config):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from prefect_lora_merge.core.adapter import AdapterConfig

    theirs = LoraConfig(**config)
    ours = AdapterConfig(**config)
    assert [ours.targets_module(m) for m in MODULES] == [bool(check_target_module_exists(theirs, m)) for m in MODULES]


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize(("dtype", "name"), [(torch.int32, "I32"), (torch.int8, "I8"), (torch.bool, "BOOL")])
def test_integer_or_bool_lora_weights_are_refused_naming_the_tensor_and_dtype(capsys, inputs, dtype, name):
    base, adapter, out = inputs
    key = f"{UP_1}.lora_B.weight"

    def quantize(tensors):
        tensors[key] = (tensors[key] * 100).to(dtype)

    edit_adapter_tensors(adapter, quantize)
    assert_refused(capsys, base, adapter, out, f"model.layers.1.mlp.up_proj.lora_B.weight is {name}: LoRA weights are")


@pytest.mark.usefixtures("prefect_server")
def test_an_integer_modules_to_save_copy_of_a_float_weight_is_refused(capsys, inputs):
    base, adapter, out = inputs
    edit_adapter_tensors(
        adapter,
        lambda tensors: tensors.update({"base_model.model.lm_head.weight": torch.ones(128, 32, dtype=torch.int64)}),
    )
    edit_adapter_config(adapter, modules_to_save=["lm_head"])
    assert_refused(capsys, base, adapter, out, "lm_head.weight is I64", "floating-point lm_head.weight (F32)")
