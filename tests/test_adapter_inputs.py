"""Adapters as training tools really leave them: un-gathered ZeRO-3 saves, empty files, a config that disagrees with
its tensors, integer weights, deltas that overflow the output dtype. Each is refused before anything is written, in
one line that names the file, tensor or config key and what to do; a NaN/Inf the merge writes is never published."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from checkpoint_tools import (
    copy_adapter,
    edit_adapter_config,
    edit_adapter_tensors,
    edit_checkpoint_tensor,
    tree_digest,
    write_adapter,
    write_checkpoint,
)
from safetensors.torch import load_file, save_file

from prefect_lora_merge.cli import main

MANIFEST = "lora-merge-manifest.json"
UP_1 = "base_model.model.model.layers.1.mlp.up_proj"


@pytest.fixture
def inputs(llama_case, tmp_path):
    """A private copy of the llama base (fp32) and its all-linear adapter (r 4, layer 0 q_proj r 8) to damage."""
    base = Path(shutil.copytree(llama_case.base_dir, tmp_path / "base"))
    adapter = copy_adapter(llama_case.adapter_dir, tmp_path / "adapter")
    return base, adapter, tmp_path / "out"


@pytest.fixture(scope="module")
def bf16_case(tmp_path_factory):
    """A bf16 llama base and a real PEFT rsLoRA adapter trained on it (fp32 factors)."""
    import zoo

    return zoo.build_llama_rslora_bf16(tmp_path_factory.mktemp("bf16"))


@pytest.fixture
def bf16_inputs(bf16_case, tmp_path):
    base = Path(shutil.copytree(bf16_case.base_dir, tmp_path / "base"))
    adapter = copy_adapter(bf16_case.adapter_dir, tmp_path / "adapter")
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
    from transformers import MixtralForCausalLM

    from prefect_lora_merge.core.errors import InconsistentAdapterError
    from prefect_lora_merge.core.plan import make_plan

    base, adapter = zoo._dirs(tmp_path, "mixtral")
    torch.manual_seed(0)
    model = MixtralForCausalLM(zoo.tiny_mixtral_config(num_hidden_layers=1))
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


# -- NaN/Inf: the merge refuses them, validation finds them anywhere ------------------------------------------------


def _overflowing_bf16(adapter: Path, module: str, scale: float) -> tuple[int, int]:
    """Scale the module's lora_B so that the largest |ΔW| is 3.40e38: finite in fp32, Inf once rounded to bf16
    (whose largest value is 3.39e38). Returns where that value is."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    A, B = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
    delta = (B @ A) * scale
    factor = (3.40e38 / float(delta.abs().max())) ** 0.5
    tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = A * factor, B * factor
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    scaled = (B * factor @ (A * factor)) * scale
    assert torch.isfinite(scaled).all() and not torch.isfinite(scaled.to(torch.bfloat16)).all()
    row, col = divmod(int(delta.abs().argmax()), delta.shape[1])
    return row, col


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.parametrize("path", ["lora delta, merged in tiles", "modules_to_save copy, merged whole"])
def test_nan_or_inf_the_adapter_brings_is_refused_even_where_the_base_holds_inf_elsewhere(capsys, bf16_inputs, path):
    """A base with an Inf of its own in the tensor must not switch the check off for the rest of it."""
    base, adapter, out = bf16_inputs
    if path.startswith("lora"):
        target, module = "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj"
        # rsLoRA: scale alpha/sqrt(r) = 8/2
        row, col = _overflowing_bf16(adapter, f"base_model.model.{module}", 4.0)
    else:
        target, module, row, col = "lm_head.weight", "lm_head", 0, 0
        edit_adapter_tensors(
            adapter,
            lambda t: t.update(
                {"base_model.model.lm_head.weight": torch.full((128, 32), float("nan"), dtype=torch.bfloat16)}
            ),
        )
        edit_adapter_config(adapter, modules_to_save=["lm_head"])

    def plant_inf(weight):
        weight[(row + 7) % weight.shape[0], (col + 3) % weight.shape[1]] = float("inf")

    edit_checkpoint_tensor(base, target, plant_inf)
    before = tree_digest(base), tree_digest(adapter)
    code, _, err = cli(capsys, "run", "--base", str(base), "--adapter", str(adapter), "--output", str(out))
    assert_one_error_line(code, err, f"merging into {target} produced NaN/Inf", module, "beyond BF16's range")
    assert not (out / MANIFEST).exists(), "a failed merge is never published"
    index = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
    assert not (out / index[target]).exists(), "the shard that failed is not committed"
    assert (tree_digest(base), tree_digest(adapter)) == before


@pytest.mark.usefixtures("prefect_server")
def test_inf_the_base_holds_in_a_touched_weight_is_kept_and_the_output_validates(capsys, inputs):
    """Where the base is already Inf, W + ΔW is Inf too (PEFT's merge gives the same): not the merge's fault."""
    base, adapter, out = inputs
    target = "model.layers.1.mlp.up_proj.weight"

    def plant_inf(weight):
        weight[3, 5] = float("inf")

    edit_checkpoint_tensor(base, target, plant_inf)
    # --device cpu: the device `validate` plans with (until the fingerprint leaves the device out, issue 15)
    run = ["run", "--base", str(base), "--adapter", str(adapter), "--output", str(out), "--device", "cpu"]
    code, stdout, err = cli(capsys, *run)
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    merged = load_file(str(out / index[target]))[target]
    assert merged[3, 5] == float("inf") and int(torch.isfinite(merged).logical_not().sum()) == 1
    code, stdout, err = cli(capsys, "validate", "--output", str(out), "--base", str(base), "--adapter", str(adapter))
    assert code == 0 and stdout.startswith("passed"), (stdout, err)


def _reseal(out: Path, shard: str) -> None:
    """Record the shard's current bytes in the manifest, as if the merge had written them: only the values are
    wrong, never the checksums."""
    data = (out / shard).read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"][shard] = {"bytes": len(data), "sha256": sha}
    for record in manifest["shards"]:
        if record["file"] == shard:
            record["sha256"] = sha
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    record_path = out / ".lora-merge" / "shards" / f"{shard}.json"
    if record_path.exists():
        record = json.loads(record_path.read_text())
        record["sha256"] = sha
        record_path.write_text(json.dumps(record))


@pytest.mark.parametrize(("dtype", "value"), [(torch.float32, float("inf")), (torch.bfloat16, float("nan"))])
def test_validation_finds_nan_or_inf_the_merge_wrote_outside_the_rows_it_samples(capsys, tmp_path, dtype, value):
    from prefect_lora_merge.core.pipeline import merge_checkpoint
    from prefect_lora_merge.core.recompute import _sample_runs

    name, rows, cols = "model.layers.0.mlp.up_proj.weight", 8192, 64
    base = write_checkpoint(
        tmp_path / "base",
        {name: torch.randn(rows, cols).to(dtype), "model.norm.weight": torch.ones(cols).to(dtype)},
    )
    lora = {
        "model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(2, cols),
        "model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(rows, 2),
    }
    adapter = write_adapter(tmp_path / "adapter", lora)
    out = tmp_path / "out"
    merge_checkpoint(str(base), str(adapter), str(out), device="cpu")
    sampled = {r for run in _sample_runs(name, rows, cols, 1) for r in range(run.start, run.stop)}
    row = next(r for r in range(rows // 3, rows) if r not in sampled)
    shard = "model.safetensors"
    tensors = load_file(str(out / shard))
    tensors[name][row, 17] = value
    save_file(tensors, str(out / shard), metadata={"format": "pt"})
    _reseal(out, shard)

    code, stdout, err = cli(capsys, "validate", "--output", str(out), "--base", str(base), "--adapter", str(adapter))
    assert_one_error_line(code, err, f"{shard}: {name} holds 1 NaN/Inf value(s) where the base's values are finite")
    assert f"FAIL {shard}: {name} holds 1 NaN/Inf value(s)" in stdout
    assert f"(first at row {row}, column 17)" in stdout
