"""Merging into compressed-tensors INT4 pack-quantized checkpoints (Kimi-K2-Thinking, K2.5, K2.6), end to end.

The base is the tiny Kimi-K2-Thinking-shaped checkpoint `kimi_int4` builds: routed experts packed by
compressed-tensors itself, everything else bf16, layer 1's expert scales in another shard than their packed weights.
Its adapter was trained on the library's dequantization of the base (`dequantized_dir`), so the oracle for every
merged number is PEFT's own `merge_and_unload` on that model in float32, and the oracle for INT4 bytes is the
library's own `compress` / `decompress`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import pytest
import torch
from checkpoint_tools import (
    published_digest,
    read_raw_header,
    shards,
    stored_bytes,
    stored_tensors,
    touched_quantized_weights,
)
from kimi_int4 import ATTENTION, GROUP, build, library_compress, library_decompress
from peft import LoraConfig, PeftModel, get_peft_model
from s3_server import BUCKET
from safetensors.torch import load_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from prefect_lora_merge.cli import main
from prefect_lora_merge.core import tiling
from prefect_lora_merge.core.errors import CheckpointFormatError, LoraMergeError, UnsupportedBaseError
from prefect_lora_merge.core.formats.int4_packed import LABEL
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import REPORT_FILE, make_plan
from prefect_lora_merge.core.state import record_name
from prefect_lora_merge.core.validate import validate_output

PARTS = ("weight_packed", "weight_scale", "weight_shape")
MANIFEST = "lora-merge-manifest.json"
FUSED_EXPERTS = re.compile(r"^(?P<experts>.+\.mlp\.experts)\.(?P<param>gate_up_proj|down_proj)$")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return build(tmp_path_factory.mktemp("kimi-int4"))


@pytest.fixture(scope="module")
def bf16_out(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16") / "merged"
    result = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="auto")
    return out, result


@pytest.fixture(scope="module")
def keep_out(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("keep") / "merged"
    result = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="keep")
    return out, result


@pytest.fixture(scope="module")
def peft_merged(case):
    """PEFT's merge of the fixture's adapter into the library-dequantized model, in float32."""
    reference = DeepseekV3ForCausalLM.from_pretrained(case.dequantized_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(reference, case.adapter_dir).merge_and_unload().eval()


@pytest.fixture(scope="module")
def oracle(peft_merged):
    """PEFT's merged weights by checkpoint name (transformers' fused experts split back into per-expert Linears)."""
    return _per_expert(peft_merged.state_dict())


@pytest.fixture(scope="module")
def attention_adapter(case, tmp_path_factory):
    """A second adapter, on attention only, trained (here: perturbed) by PEFT on the dequantized model."""
    gen = torch.Generator().manual_seed(7)
    model = DeepseekV3ForCausalLM.from_pretrained(case.dequantized_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION))
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    adapter = tmp_path_factory.mktemp("attention-adapter") / "adapter"
    peft_model.save_pretrained(adapter)
    return adapter


@pytest.fixture(scope="module")
def attention_keep_out(case, attention_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("attention-keep") / "merged"
    result = merge_checkpoint(str(case.base_dir), str(attention_adapter), str(out), output_dtype="keep")
    return out, result


def _per_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict under checkpoint names: fused `experts.gate_up_proj` [E, 2I, H] and
    `experts.down_proj` [E, H, I] become `experts.<e>.{gate,up,down}_proj.weight`, as Kimi stores them."""
    found = {}
    for name, value in state.items():
        match = FUSED_EXPERTS.match(name)
        if match is None:
            found[name] = value
            continue
        for expert, weight in enumerate(value):
            prefix = f"{match['experts']}.{expert}"
            if match["param"] == "down_proj":
                found[f"{prefix}.down_proj.weight"] = weight
            else:
                gate, up = weight.chunk(2, dim=0)
                found[f"{prefix}.gate_proj.weight"], found[f"{prefix}.up_proj.weight"] = gate, up
    return found


def _module(weight: str) -> str:
    return weight.removesuffix(".weight")


def _parts(tensors: dict[str, torch.Tensor], weight: str) -> dict[str, torch.Tensor]:
    return {part: tensors[f"{_module(weight)}.{part}"] for part in PARTS}


# -- recognising the format --------------------------------------------------------------------------------------


def test_int4_is_recognised_by_config_and_headers_and_auto_means_bf16(case, tmp_path):
    plan = make_plan(str(case.base_dir), str(case.adapter_dir), str(tmp_path / "out"))
    assert plan.output_dtype == "bf16" and plan.quantized_format == LABEL
    roles = [(t, t.quantized) for s in plan.shards for t in s.tensors if t.quantized is not None]
    dequantized = {t.name: (t.base.name, role) for t, role in roles if role.write == "dequantized"}
    assert sorted(dequantized) == sorted(case.quantized), "each packed weight is written under <module>.weight"
    assert all(stored == f"{_module(name)}.weight_packed" for name, (stored, _) in dequantized.items())
    dropped = {t.base.name for t, role in roles if role.write == "dropped"}
    assert dropped == {f"{_module(n)}.{p}" for n in case.quantized for p in ("weight_scale", "weight_shape")}
    copied = [t.name for s in plan.shards for t in s.tensors if t.quantized is None]
    assert not [n for n in copied if re.search(r"\.experts\.\d+\.", n)], "no routed-expert part is copied as it is"
    for name in case.cross_shard:  # found through the index, in the shard that holds it
        weight = dequantized[name][1].weight
        assert weight.parts["scale"].file != weight.parts["packed"].file, name
    assert any("dropped" in d and "quantization_config removed" in d for d in plan.decisions)


def test_without_its_quantization_config_the_packed_experts_are_refused_naming_the_format(case, tmp_path):
    """The config says how the experts are quantized; headers alone are not read as INT4, and the fused-expert
    adapter that touches them is told the base is quantized, not that the base lacks the tensors."""
    bare = shutil.copytree(case.base_dir, tmp_path / "bare")
    config = json.loads((bare / "config.json").read_text())
    del config["quantization_config"]
    (bare / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedBaseError, match=r"compressed-tensors.*experts\.0\.down_proj\.weight_packed"):
        make_plan(str(bare), str(case.adapter_dir), str(tmp_path / "out"))


# -- bf16 output ---------------------------------------------------------------------------------------------------


def test_bf16_output_equals_the_librarys_dequantization_plus_peft_delta_rounded_once(case, bf16_out, oracle):
    out, result = bf16_out
    assert result.report.passed
    merged, dequantized = stored_tensors(out), load_file(str(case.dequantized_dir / "model.safetensors"))
    assert set(merged) == set(oracle)
    for name, value in merged.items():
        expected = oracle[name] if name.endswith("e_score_correction_bias") else oracle[name].to(torch.bfloat16)
        assert value.dtype == expected.dtype and torch.equal(value, expected), name
    changed = [n for n in case.quantized if not torch.equal(oracle[n], dequantized[n])]
    assert sorted(changed) == sorted(case.quantized), "the fixture's expert deltas reach every routed expert"
    assert not [n for n in merged if n.endswith(PARTS)]


def test_bf16_output_of_an_untouched_expert_is_the_librarys_decompress(case, attention_adapter, tmp_path):
    out = tmp_path / "merged"
    result = merge_checkpoint(str(case.base_dir), str(attention_adapter), str(out), output_dtype="bf16")
    assert result.report.passed
    base, merged = stored_tensors(case.base_dir), stored_tensors(out)
    for name in case.quantized:
        assert torch.equal(merged[name], library_decompress(_parts(base, name))), name


def test_bf16_output_drops_quantization_config_and_keeps_everything_else_exactly(case, bf16_out):
    out, _ = bf16_out
    base, merged = stored_bytes(case.base_dir), stored_bytes(out)
    kept = [n for n in base if not n.endswith(PARTS) and ".self_attn." not in n]
    assert any(n.endswith("e_score_correction_bias") for n in kept) and any("shared_experts" in n for n in kept)
    for name in kept:
        assert merged[name] == base[name], f"{name} changed"
    headers = {n: e for p in shards(out) for n, e in read_raw_header(p)[0].items() if n != "__metadata__"}
    shapes = stored_tensors(case.base_dir)
    for name in case.quantized:
        assert headers[name]["dtype"] == "BF16", name
        assert headers[name]["shape"] == shapes[f"{_module(name)}.weight_shape"].tolist(), name
    config = json.loads((out / "config.json").read_text())
    assert config == {
        k: v for k, v in json.loads((case.base_dir / "config.json").read_text()).items() if k != "quantization_config"
    }
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(headers)
    assert index["metadata"]["total_size"] == sum(e["data_offsets"][1] - e["data_offsets"][0] for e in headers.values())


def test_bf16_output_loads_in_transformers_and_its_logits_match_peft_on_the_dequantized_model(
    case, bf16_out, peft_merged
):
    out, _ = bf16_out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "kimi_k2"
    # transformers fuses per-expert checkpoint tensors into its experts by model_type and has no mapping for
    # kimi_k2 (the release ships its own modeling code): the config is read as the deepseek_v3 it is.
    config = DeepseekV3Config.from_dict({**config, "model_type": "deepseek_v3"})
    loaded, info = DeepseekV3ForCausalLM.from_pretrained(
        out, config=config, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert getattr(loaded.config, "quantization_config", None) is None
    expected = {
        n: v if n.endswith("e_score_correction_bias") else v.to(torch.bfloat16).float()
        for n, v in peft_merged.state_dict().items()
    }
    state = loaded.state_dict()
    mismatched = [n for n in expected if not torch.equal(state[n], expected[n])]
    assert not mismatched, mismatched[:5]
    ids = torch.randint(0, loaded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = loaded.eval()(ids).logits, peft_merged(ids).logits
    # The weights differ from PEFT's float32 merge only by one rounding to bf16 (measured: 0.5% of the largest
    # logit at most, cosine 0.999993).
    worst = float((ours - theirs).abs().max())
    assert worst <= 0.02 * float(theirs.abs().max()), worst
    cosine = torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0)
    assert cosine > 0.99995, float(cosine)


# -- keep: INT4 output ---------------------------------------------------------------------------------------------


def test_keep_with_an_attention_only_adapter_leaves_every_expert_and_untouched_shard_byte_for_byte(
    case, attention_keep_out
):
    out, result = attention_keep_out
    assert result.report.passed
    assert touched_quantized_weights(result) == [], "no quantized weight is re-quantized"
    base, merged = stored_bytes(case.base_dir), stored_bytes(out)
    assert set(merged) == set(base)
    for name in case.quantized:
        for part in PARTS:
            stored = f"{_module(name)}.{part}"
            assert merged[stored] == base[stored], stored
    untouched = [r.file for r in result.receipts if not r.touched]
    assert untouched == ["model-00004-of-00004.safetensors"]
    for file in untouched:
        assert (out / file).read_bytes() == (case.base_dir / file).read_bytes(), file
    assert not [d for r in result.receipts for d in r.delta_survivals]
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((case.base_dir / "config.json").read_text())


def test_keep_requantizes_touched_experts_with_the_librarys_fresh_scales_within_int4_rounding(case, keep_out, oracle):
    out, result = keep_out
    assert result.report.passed
    assert touched_quantized_weights(result) == sorted(case.quantized)
    base, merged = stored_tensors(case.base_dir), stored_tensors(out)
    for name in case.quantized:
        parts = _parts(merged, name)
        intended = oracle[name]  # the library's dequantized base + PEFT's delta, float32
        library = library_compress(intended.to(torch.bfloat16))  # what compressed-tensors writes for it
        assert torch.equal(parts["weight_scale"], library["weight_scale"]), f"{name}: fresh scales"
        assert torch.equal(parts["weight_packed"], library["weight_packed"]), f"{name}: codes"
        assert not torch.equal(parts["weight_scale"], base[f"{_module(name)}.weight_scale"]), name
        scale = parts["weight_scale"].float().repeat_interleave(GROUP, dim=1)
        error = (library_decompress(parts).float() - intended).abs()
        # half a code, plus the library's roundings to bf16 (of the value, and of its quotient by the scale)
        assert bool((error <= 0.6 * scale + 2**-8 * intended.abs()).all()), name


def test_keep_leaves_untouched_tensors_weight_shapes_and_quantization_config_as_they_were(case, keep_out):
    out, result = keep_out
    base, merged = stored_bytes(case.base_dir), stored_bytes(out)
    assert set(merged) == set(base)
    for name in case.quantized:
        stored = f"{_module(name)}.weight_shape"
        assert merged[stored] == base[stored], stored
    touched = {t.name for s in result.plan.shards for t in s.touched}
    untouched = [n for n in base if n not in touched and not n.endswith(PARTS)]
    assert any("shared_experts" in n for n in untouched) and "lm_head.weight" in untouched
    for name in untouched:
        assert merged[name] == base[name], name
    assert json.loads((out / "config.json").read_text()) == json.loads((case.base_dir / "config.json").read_text())
    last = next(r for r in result.receipts if r.file == "model-00004-of-00004.safetensors")
    assert last.copied_server_side, "a shard with nothing touched is copied, not rewritten"
    assert json.loads((out / MANIFEST).read_text())["output_dtype"] == "keep"


def test_a_weight_whose_scale_lives_in_another_shard_is_requantized_consistently_in_both(case, keep_out, oracle):
    out, _ = keep_out
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    base_index = json.loads((case.base_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert case.cross_shard
    for name in case.cross_shard:
        packed, scale = f"{_module(name)}.weight_packed", f"{_module(name)}.weight_scale"
        assert index[packed] == base_index[packed] != index[scale] == base_index[scale], name
        parts = {
            part: load_file(str(out / index[f"{_module(name)}.{part}"]))[f"{_module(name)}.{part}"] for part in PARTS
        }
        library = library_compress(oracle[name].to(torch.bfloat16))
        assert torch.equal(parts["weight_packed"], library["weight_packed"]), f"{name} in {index[packed]}"
        assert torch.equal(parts["weight_scale"], library["weight_scale"]), f"{name} in {index[scale]}"
        assert torch.equal(library_decompress(parts), library_decompress(library)), name


def test_keep_reports_how_much_of_each_delta_survived(case, keep_out, oracle):
    out, result = keep_out
    figures = {d.tensor: d for r in result.receipts for d in r.delta_survivals}
    assert sorted(figures) == sorted(case.quantized)
    base, merged = stored_tensors(case.base_dir), stored_tensors(out)
    for name in case.quantized:
        before = library_decompress(_parts(base, name)).double()
        realised = library_decompress(_parts(merged, name)).double() - before
        intended = oracle[name].double() - before
        cosine = torch.nn.functional.cosine_similarity(realised.flatten(), intended.flatten(), dim=0).item()
        assert 0 < figures[name].cosine < 1
        assert figures[name].cosine == pytest.approx(cosine, abs=1e-6), name
        assert 0 < figures[name].relative_error < 1
    manifest = json.loads((out / MANIFEST).read_text())
    assert sorted(d["tensor"] for s in manifest["shards"] for d in s["delta_survivals"]) == sorted(case.quantized)


def test_a_delta_that_does_not_survive_int4_fails_the_shard_naming_bf16(case, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(LoraMergeError, match=r"keeps too little.*--min-delta-cosine 0.9999999.*--output-dtype bf16"):
        merge_checkpoint(
            str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="keep", min_delta_cosine=0.9999999
        )
    assert not (out / MANIFEST).exists()
    committed = {p.name for p in shards(out)}
    assert not committed & {"model-00002-of-00004.safetensors", "model-00003-of-00004.safetensors"}, committed


def test_tile_by_tile_gives_the_same_bytes_as_whole_tensors(case, bf16_out, keep_out, tmp_path, monkeypatch):
    """The fixture's weights fit in one tile; tiles of one row by one group of 32 cut every weight."""
    monkeypatch.setattr(tiling, "TILE_VALUES", GROUP)
    for mode, (reference, result) in (("bf16", bf16_out), ("keep", keep_out)):
        out = tmp_path / mode
        tiled = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype=mode)
        for path in shards(reference):
            assert (out / path.name).read_bytes() == path.read_bytes(), (mode, path.name)
        cosines = [d.cosine for r in tiled.receipts for d in r.delta_survivals]
        assert cosines == pytest.approx([d.cosine for r in result.receipts for d in r.delta_survivals], abs=1e-6)


# -- validation ----------------------------------------------------------------------------------------------------


def test_validation_recomputes_every_converted_and_requantized_weight(case, bf16_out, keep_out, attention_keep_out):
    converted = set(case.quantized)
    requantized = {f"{_module(n)}.weight_packed" for n in case.quantized}
    for (_, result), expected in ((bf16_out, converted), (keep_out, requantized)):
        numbers = {n.tensor: n for n in result.report.numbers}
        assert expected <= set(numbers), expected - set(numbers)
        assert result.report.checks["tensors recomputed"] == len(numbers) == len(expected) + 3 * len(ATTENTION)
        assert all(n.flips <= 0.01 for n in numbers.values())
    numbers = {n.tensor for n in attention_keep_out[1].report.numbers}
    assert not [n for n in numbers if ".experts." in n], "untouched experts are copied bytes, not recomputed"


def test_validation_catches_a_requantized_weight_that_lost_its_delta(case, keep_out, tmp_path):
    out = shutil.copytree(keep_out[0], tmp_path / "damaged")
    name = f"{_module(case.cross_shard[0])}.weight_packed"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    file = index["weight_map"][name]
    header, body = read_raw_header(out / file)
    begin, end = header[name]["data_offsets"]
    raw = bytearray((out / file).read_bytes())
    start = len(raw) - len(body) + begin
    raw[start : start + end - begin] = stored_bytes(case.base_dir)[name]
    (out / file).write_bytes(bytes(raw))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"][file] = {"bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
    (out / MANIFEST).write_text(json.dumps(manifest))
    plan = make_plan(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="keep")
    report = validate_output(plan.job.output, plan)
    assert not report.passed
    assert any(f.startswith(f"{file}: {name} rows") for f in report.failures), report.failures


# -- resume and S3 -------------------------------------------------------------------------------------------------


def test_a_rerun_of_a_kept_int4_merge_merges_only_the_uncommitted_shard_and_writes_the_same_bytes(
    case, keep_out, tmp_path
):
    out = tmp_path / "merged"
    first = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="keep")
    assert not any(r.resumed for r in first.receipts)
    lost = "model-00003-of-00004.safetensors"  # layer 2's experts and layer 1's scales
    (out / lost).unlink()  # as if the run died before this shard was committed
    (out / record_name(lost)).unlink()
    (out / MANIFEST).unlink()
    again = merge_checkpoint(str(case.base_dir), str(case.adapter_dir), str(out), output_dtype="keep")
    assert [r.file for r in again.receipts if not r.resumed] == [lost]
    assert again.report.passed
    assert published_digest(out) == published_digest(keep_out[0])


def test_a_kept_int4_merge_from_and_to_s3_is_byte_identical_to_the_local_one(s3, case, keep_out):
    fs = s3.fs()
    fs.put(str(case.base_dir), f"{BUCKET}/int4/base", recursive=True)
    fs.put(str(case.adapter_dir), f"{BUCKET}/int4/adapter", recursive=True)
    result = merge_checkpoint(
        f"s3://{BUCKET}/int4/base",
        f"s3://{BUCKET}/int4/adapter",
        f"s3://{BUCKET}/int4/out",
        output_dtype="keep",
        storage_options=s3.storage_options(),
    )
    assert result.report.passed
    local = keep_out[0]
    files = [p.name for p in sorted(local.iterdir()) if p.is_file() and p.name not in (REPORT_FILE, MANIFEST)]
    assert any(f.endswith(".safetensors") for f in files)
    for name in files:
        assert fs.cat_file(f"{BUCKET}/int4/out/{name}") == (local / name).read_bytes(), name
    remote = json.loads(fs.cat_file(f"{BUCKET}/int4/out/{MANIFEST}"))
    assert remote["files"] == json.loads((local / MANIFEST).read_text())["files"]


# -- bad inputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bf16", "keep"])
def test_a_nan_in_a_touched_base_weight_scale_is_blamed_on_the_base(case, tmp_path, mode):
    broken = shutil.copytree(case.base_dir, tmp_path / "broken")
    victim = case.cross_shard[0]
    scale = f"{_module(victim)}.weight_scale"
    file = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"][scale]
    header, body = read_raw_header(broken / file)
    begin = header[scale]["data_offsets"][0]
    raw = bytearray((broken / file).read_bytes())
    at = len(raw) - len(body) + begin + 2 * 5  # the sixth bf16 scale
    raw[at : at + 2] = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    (broken / file).write_bytes(bytes(raw))
    with pytest.raises(CheckpointFormatError, match=f"{victim} holds NaN/Inf after dequantizing.*{scale}.*damaged"):
        merge_checkpoint(str(broken), str(case.adapter_dir), str(tmp_path / "out"), output_dtype=mode)


# -- the CLI -------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("prefect_server")
def test_cli_merges_kept_in_int4_and_validates_against_base_and_adapter(case, tmp_path, capsys):
    out = tmp_path / "merged"
    inputs = ["--base", str(case.base_dir), "--adapter", str(case.adapter_dir)]
    assert main(["run", *inputs, "--output", str(out), "--output-dtype", "keep", "--device", "cpu"]) == 0
    run = capsys.readouterr().out
    assert f"{LABEL} base kept in {LABEL}" in run
    worst = re.search(r"worst delta survival after re-quantization: (\S+) cosine ([0-9.]+)", run)
    assert worst and worst[1] in case.quantized and 0 < float(worst[2]) < 1, run
    assert main(["validate", "--output", str(out), *inputs]) == 0
    checked = capsys.readouterr().out
    assert checked.startswith("passed") and f"{len(case.quantized) + 3 * len(ATTENTION)} tensors recomputed" in checked
