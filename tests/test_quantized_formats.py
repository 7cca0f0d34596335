"""What every quantized format does alike, specified once over the three of them: block-FP8 (DeepSeek-V3), INT4
pack-quantized (Kimi-K2-Thinking) and MXFP4 (GPT-OSS), each a tiny checkpoint with a PEFT adapter touching it."""

from __future__ import annotations

import pytest
import torch
from deepseek_fp8 import build as build_fp8
from gpt_oss_mxfp4 import build as build_mxfp4
from kimi_int4 import build as build_int4

from prefect_lora_merge.core import recompute
from prefect_lora_merge.core.errors import LoraMergeError
from prefect_lora_merge.core.formats import FORMATS
from prefect_lora_merge.core.options import MergeParameters
from prefect_lora_merge.core.pipeline import merge_checkpoint
from prefect_lora_merge.core.plan import make_plan
from prefect_lora_merge.core.validate import validate_output

BUILDERS = {"block-FP8": build_fp8, "compressed-tensors INT4 pack-quantized": build_int4, "MXFP4": build_mxfp4}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def case(request, tmp_path_factory):
    return request.param, BUILDERS[request.param](tmp_path_factory.mktemp("case"))


@pytest.fixture(scope="module")
def merged(case, tmp_path_factory):
    label, built = case
    outs = {}
    for mode in ("bf16", "keep"):
        out = tmp_path_factory.mktemp(mode) / "merged"
        outs[mode] = (out, merge_checkpoint(str(built.base_dir), str(built.adapter_dir), str(out), output_dtype=mode))
    return outs


def test_every_format_is_detected_by_its_config_and_headers_and_named_in_the_plan(case, tmp_path):
    label, built = case
    plan = make_plan(str(built.base_dir), str(built.adapter_dir), str(tmp_path / "out"))
    assert plan.quantized_format == label and plan.output_dtype == "bf16"
    assert any(d.startswith(f"{label} base written in bf16") for d in plan.decisions)
    assert label in {f.label for f in FORMATS}


def test_validation_recomputes_sampled_runs_of_rows_of_every_quantized_weight(case, merged, monkeypatch):
    """Rows are sampled, not all read, for any tensor larger than a few runs: here every tensor is, so runs that
    must start on the format's own boundaries (a block's rows, an MXFP4 expert's inputs) are checked."""
    label, built = case
    monkeypatch.setattr(recompute, "ALL_ROWS_UP_TO", 0)
    monkeypatch.setattr(recompute, "RUN_VALUES", 1024)  # runs of a few rows: enough values for the flip rate
    for mode, (_, result) in merged.items():
        report = validate_output(result.plan.job.output, result.plan)
        assert report.passed, (mode, report.failures)
        sampled = [n for n in report.numbers if n.rows_checked < n.rows]
        assert sampled, f"{label} {mode}: no tensor was sampled"


def test_both_outputs_validate_and_a_kept_one_reports_the_delta_survival_of_every_touched_weight(case, merged):
    label, built = case
    (_, bf16), (_, keep) = merged["bf16"], merged["keep"]
    assert bf16.report.passed and keep.report.passed
    survivals = [d for r in keep.receipts for d in r.delta_survivals]
    touched = {t.quantized.weight.name for s in keep.plan.shards for t in s.touched if t.quantized is not None}
    assert sorted(d.tensor for d in survivals) == sorted(touched)
    assert all(0.5 < d.cosine <= 1.0 and d.relative_error < 1.0 for d in survivals), survivals


def test_an_untouched_shard_is_the_same_file_in_a_kept_output(case, merged):
    label, built = case
    _, result = merged["keep"]
    out, _ = merged["keep"]
    for shard in result.plan.shards:
        if shard.copies_base_bytes():
            assert (out / shard.file).read_bytes() == (built.base_dir / shard.file).read_bytes()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_every_format_merges_whole_tensors_to_an_output_that_validates_like_the_cpu_one(case, merged, tmp_path):
    label, built = case
    for mode, (_, on_cpu) in merged.items():
        out = tmp_path / mode
        result = merge_checkpoint(
            str(built.base_dir), str(built.adapter_dir), str(out), output_dtype=mode, device="cuda"
        )
        assert result.report.passed, (label, mode, result.report.failures)
        assert all(r.device.startswith("cuda") for r in result.receipts if r.touched)
        cpu = {d.tensor: d.cosine for r in on_cpu.receipts for d in r.delta_survivals}
        gpu = {d.tensor: d.cosine for r in result.receipts for d in r.delta_survivals}
        assert gpu.keys() == cpu.keys() and all(abs(gpu[k] - cpu[k]) < 1e-3 for k in cpu), (label, mode)


def test_the_older_names_of_keep_still_work_where_they_meant_something(case, tmp_path):
    label, built = case
    inputs = (str(built.base_dir), str(built.adapter_dir), str(tmp_path / "out"))
    if label == "block-FP8":
        assert make_plan(*inputs, output_dtype="fp8").shards == make_plan(*inputs, output_dtype="keep").shards
    else:
        with pytest.raises(
            LoraMergeError, match=f"--output-dtype fp8 keeps a block-FP8 base's format.*is {label}.*keep"
        ):
            make_plan(*inputs, output_dtype="fp8")
    params = MergeParameters(base=inputs[0], adapter=inputs[1], output=inputs[2], fp8_min_cosine=0.5)
    assert params.min_delta_cosine == 0.5


def test_a_kept_shard_merge_reads_each_stored_part_once_and_its_estimate_counts_the_parts_computed_ahead(
    case, merged, monkeypatch, tmp_path
):
    """safetensors stores larger dtypes first (scales before FP8 codes, I64 shapes before I32 packed words): the
    first part of a weight met computes every part, and the later ones are written from that, not read again with
    the others. What waits meanwhile is in the plan's memory estimate."""
    from prefect_lora_merge.core import merge as merge_module
    from prefect_lora_merge.core.plan.memory import computing_parts
    from prefect_lora_merge.core.storage import Location

    label, built = case
    _, result = merged["keep"]
    reads: dict[str, int] = {}
    real = Location.read_into

    def counted(self, name, offset, buffer):
        reads[name] = reads.get(name, 0) + len(buffer)
        return real(self, name, offset, buffer)

    monkeypatch.setattr(Location, "read_into", counted)
    for shard in result.plan.shards:
        if shard.copies_base_bytes():
            continue
        reads.clear()
        merge_module.merge_shard(
            result.plan.job.model_copy(update={"output": Location.parse(str(tmp_path / shard.file.replace(".", "-")))}),
            shard,
        )
        wanted = {shard.file: sum(t.base.nbytes for t in shard.tensors if not t.dropped and t.source is None)}
        computing = computing_parts(shard)
        for t in shard.tensors:
            if t.name in computing:
                for ref in t.quantized.others:
                    wanted[ref.file] = wanted.get(ref.file, 0) + (ref.entry.nbytes if ref.file != shard.file else 0)
            if t.source is not None:
                wanted[t.source.file] = wanted.get(t.source.file, 0) + t.source.entry.nbytes
        assert reads == {f: n for f, n in wanted.items() if n}, (label, shard.file)
        ahead = sum(
            ref.entry.nbytes
            for t in shard.tensors
            if t.name in computing and t.quantized.write == "requantized"
            for ref in t.quantized.others
            if ref.file == shard.file
        )
        assert shard.peak_bytes(result.plan.job.adapters) >= ahead


def test_a_trained_copy_of_another_shape_for_a_quantized_weight_is_refused_before_anything_is_written(case, tmp_path):
    """modules_to_save of a quantized weight with more rows (a resized vocabulary, say) cannot be written in a format
    whose scales cover the base's shape: refused, naming the tensor."""
    from checkpoint_tools import copy_adapter, edit_adapter_tensors

    label, built = case
    plan = make_plan(str(built.base_dir), str(built.adapter_dir), str(tmp_path / "plan"))
    weight = next(t.quantized.weight for s in plan.shards for t in s.tensors if t.quantized is not None)
    adapter = copy_adapter(built.adapter_dir, tmp_path / "adapter")
    key = f"base_model.model.{weight.name}"
    edit_adapter_tensors(
        adapter, lambda tensors: tensors.update({key: torch.zeros(weight.shape[0] + 1, *weight.shape[1:])})
    )
    with pytest.raises(LoraMergeError, match=f"would replace the quantized weight {weight.name}"):
        make_plan(str(built.base_dir), str(adapter), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
