"""Tied embeddings with a trained copy: the output does what the trained (unmerged) PeftModel computes.

A checkpoint with `tie_word_embeddings` stores one tensor for the input embedding and the output head. An adapter
with `modules_to_save=["embed_tokens"]` (MiniCPM-V's LoRA recipe, and the usual way to train added tokens) trains a
copy of the embedding while the head keeps the base tensor; `modules_to_save=["lm_head"]` the other way round. The
merged output must then store the head apart and say `tie_word_embeddings: false`, and its logits, loaded by
transformers, must be the unmerged PeftModel's. Every merge goes through the CLI on a real Prefect server; the
oracle is PEFT's unmerged model on an fp32 base, so the comparison is tight.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import zoo
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from prefect_lora_merge.cli import main

pytestmark = pytest.mark.usefixtures("prefect_server")

VOCAB = 128  # the tiny llama's
RESIZED = 136  # 8 added tokens
ATTENTION = ["q_proj", "v_proj", "o_proj"]
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
PROMPT = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))[:48]  # base tokens, fixed


def _tied_base(root: Path, *, tied: bool = True) -> Path:
    base, _ = zoo._dirs(root, "base")
    torch.manual_seed(0)
    zoo._save_base(LlamaForCausalLM(zoo._tiny_llama_config(tie_word_embeddings=tied)), base, torch.float32)
    return base


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory) -> Path:
    return _tied_base(tmp_path_factory.mktemp("tied"))


def _base_model(base: Path, vocab: int = VOCAB) -> LlamaForCausalLM:
    """The base as a user loads it before training or inference: from its directory (so PEFT records it as
    `base_model_name_or_path`), with the vocabulary resized first when tokens were added."""
    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    if vocab != model.config.vocab_size:
        model.resize_token_embeddings(vocab)
    return model


def _adapter(root: Path, model: torch.nn.Module, config: LoraConfig, seed: int = 11) -> Path:
    adapter = root / "adapter"
    adapter.mkdir(parents=True)
    zoo._build_adapter(model, config, adapter, seed=seed, notes=[])
    return adapter


def _merge(capsys, base: Path, adapter: Path, out: Path) -> dict:
    """`lora-merge run`, then the README's `lora-merge validate --base --adapter`; the published manifest."""
    inputs = ["--base", str(base), "--adapter", str(adapter)]
    assert main(["run", *inputs, "--output", str(out), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["validate", "--output", str(out), *inputs]) == 0
    assert capsys.readouterr().out.startswith("passed")
    return json.loads((out / "lora-merge-manifest.json").read_text())


def _prompt(vocab: int) -> torch.Tensor:
    """A fixed random prompt of base tokens, then every added token."""
    return torch.cat([PROMPT, torch.arange(VOCAB, vocab)])[None]


def _logits(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=prompt).logits


def assert_gives_the_trained_models_logits(out: Path, base: Path, adapter: Path, vocab: int = VOCAB) -> None:
    prompt = _prompt(vocab)
    trained = _logits(PeftModel.from_pretrained(_base_model(base, vocab), adapter), prompt)
    merged = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32), prompt)
    before = _logits(_base_model(base), prompt[:, : len(PROMPT)])
    changed = trained[:, : len(PROMPT), :VOCAB] - before
    assert changed.abs().max() > 1e-2, "the adapter must change the logits, or the comparison proves nothing"
    torch.testing.assert_close(merged, trained, rtol=1e-5, atol=1e-5)


def _stored(directory: Path) -> dict[str, str]:
    return json.loads((directory / zoo.INDEX_NAME).read_text())["weight_map"]


def _tensor(directory: Path, name: str) -> torch.Tensor:
    with safe_open(directory / _stored(directory)[name], "pt") as f:
        return f.get_tensor(name)


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def _decision(manifest: dict, start: str) -> str:
    found = [d for d in manifest["decisions"] if d.startswith(start)]
    assert len(found) == 1, manifest["decisions"]
    return found[0]


def test_a_trained_embedding_copy_unties_the_head_which_keeps_the_base_embedding(tied_base, tmp_path, capsys):
    adapter = _adapter(
        tmp_path,
        _base_model(tied_base),
        LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, modules_to_save=["embed_tokens"]),
    )
    out = tmp_path / "merged"
    manifest = _merge(capsys, tied_base, adapter, out)

    assert_gives_the_trained_models_logits(out, tied_base, adapter)
    assert HEAD not in _stored(tied_base)
    assert _stored(out)[HEAD] == _stored(out)[EMBEDDING], "the head lives in the embedding's shard"
    assert torch.equal(_tensor(out, HEAD), _tensor(tied_base, EMBEDDING)), "the head is the base's embedding bytes"
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert torch.equal(_tensor(out, EMBEDDING), f.get_tensor(f"base_model.model.{EMBEDDING}"))
    assert _config(out)["tie_word_embeddings"] is False and _config(tied_base)["tie_word_embeddings"] is True
    decision = _decision(manifest, "untied embeddings")
    assert "model.embed_tokens (modules_to_save)" in decision and "tie_word_embeddings: false" in decision
    total_size = {d: json.loads((d / zoo.INDEX_NAME).read_text())["metadata"]["total_size"] for d in (tied_base, out)}
    assert total_size[out] == total_size[tied_base] + _tensor(tied_base, EMBEDDING).nbytes


def test_a_trained_embedding_copy_with_a_resized_vocabulary_unties_to_the_resized_head(tied_base, tmp_path, capsys):
    # Trained after resize_token_embeddings on the base loaded from its directory: PEFT saves both embedding layers
    # (the trained copy, the head it left as it was, and its own wrapper's tensors beside them).
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, modules_to_save=["embed_tokens"])
    adapter = _adapter(tmp_path, _base_model(tied_base, RESIZED), config)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert f"base_model.model.{HEAD}" in f.keys() and any(".original_module." in k for k in f.keys())
    out = tmp_path / "merged"
    manifest = _merge(capsys, tied_base, adapter, out)

    assert_gives_the_trained_models_logits(out, tied_base, adapter, RESIZED)
    assert _config(out)["vocab_size"] == RESIZED and _config(out)["tie_word_embeddings"] is False
    assert _tensor(out, HEAD).shape == _tensor(out, EMBEDDING).shape == (RESIZED, 32)
    assert "untied embeddings" in _decision(manifest, "untied embeddings")


def test_a_trained_head_copy_on_a_tied_checkpoint_is_merged_untied_with_the_base_embedding(tied_base, tmp_path, capsys):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, modules_to_save=["lm_head"])
    adapter = _adapter(tmp_path, _base_model(tied_base), config)
    out = tmp_path / "merged"
    manifest = _merge(capsys, tied_base, adapter, out)

    assert_gives_the_trained_models_logits(out, tied_base, adapter)
    assert torch.equal(_tensor(out, EMBEDDING), _tensor(tied_base, EMBEDDING))
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert torch.equal(_tensor(out, HEAD), f.get_tensor(f"base_model.model.{HEAD}"))
    assert _config(out)["tie_word_embeddings"] is False
    assert "copy of lm_head (modules_to_save)" in _decision(manifest, "untied embeddings")


@pytest.mark.parametrize(
    ("trained", "lora"),
    [("embed_tokens", "lm_head"), ("lm_head", "embed_tokens")],
    ids=["embedding-copy-with-head-lora", "head-copy-with-embedding-lora"],
)
def test_a_lora_beside_the_trained_copy_changes_only_its_own_path(tied_base, tmp_path, capsys, trained, lora):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=[*ATTENTION, lora], modules_to_save=[trained])
    adapter = _adapter(tmp_path, _base_model(tied_base), config)
    out = tmp_path / "merged"
    manifest = _merge(capsys, tied_base, adapter, out)

    assert_gives_the_trained_models_logits(out, tied_base, adapter)
    assert _config(out)["tie_word_embeddings"] is False
    with_lora = {"lm_head": HEAD, "embed_tokens": EMBEDDING}[lora]
    assert not torch.equal(_tensor(out, with_lora), _tensor(tied_base, EMBEDDING)), "its LoRA delta is merged"
    report = json.loads((out / "lora-merge-report.json").read_text())
    assert {n["tensor"] for n in report["numbers"]} >= {EMBEDDING, HEAD}, "validation recomputes both paths"
    assert _decision(manifest, "untied embeddings")


def test_a_resized_embedding_copy_without_the_head_it_needs_is_refused_before_writing(tmp_path, capsys):
    # Built from a config (no base_model_name_or_path): PEFT cannot tell that the vocabulary grew and saves only the
    # trained embedding; the trained model's head had 8 rows the base does not store and the adapter does not hold.
    base = _tied_base(tmp_path)
    model = LlamaForCausalLM(zoo._tiny_llama_config(tie_word_embeddings=True))
    model.resize_token_embeddings(RESIZED)
    adapter = _adapter(
        tmp_path, model, LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, modules_to_save=["embed_tokens"])
    )
    out = tmp_path / "merged"
    with pytest.raises(SystemExit) as exited:
        main(["run", "--base", str(base), "--adapter", str(adapter), "--output", str(out), "--device", "cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lora-merge: error:")]
    assert exited.value.code == 1 and len(errors) == 1, errors
    assert "lm_head.weight: the untied output needs it with 136 rows" in errors[0]
    assert "save_embedding_layers=True" in errors[0]
    assert not out.exists() or not any(out.iterdir())


def test_one_trained_copy_shared_by_embedding_and_head_keeps_them_tied(tied_base, tmp_path, capsys):
    # ensure_weight_tying: PEFT ties the head's copy to the embedding's (and saves it under both names).
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=ATTENTION, modules_to_save=["embed_tokens"], ensure_weight_tying=True
    )
    adapter = _adapter(tmp_path, _base_model(tied_base), config)
    out = tmp_path / "merged"
    manifest = _merge(capsys, tied_base, adapter, out)

    assert_gives_the_trained_models_logits(out, tied_base, adapter)
    assert HEAD not in _stored(out) and _config(out)["tie_word_embeddings"] is True
    assert not [d for d in manifest["decisions"] if d.startswith("untied embeddings")]


def test_resized_trained_copies_on_an_untied_checkpoint_merge_with_the_wrapper_tensors_peft_saves(tmp_path, capsys):
    # The most common added-tokens recipe (modules_to_save=["embed_tokens", "lm_head"] after resizing): PEFT saves
    # each copy twice and the wrapped module's base beside it (`modules_to_save`, `original_module`).
    base = _tied_base(tmp_path, tied=False)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, modules_to_save=["embed_tokens", "lm_head"])
    adapter = _adapter(tmp_path, _base_model(base, RESIZED), config)
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        wrapped = sorted(k for k in f.keys() if ".original_module." in k or ".modules_to_save." in k)
    assert len(wrapped) == 4, wrapped
    out = tmp_path / "merged"
    manifest = _merge(capsys, base, adapter, out)

    assert_gives_the_trained_models_logits(out, base, adapter, RESIZED)
    assert _config(out)["vocab_size"] == RESIZED
    superseded = [d for d in manifest["decisions"] if d.startswith("superseded replacements")]
    assert len(superseded) == 2 and all(k.removeprefix("base_model.model.") in " ".join(superseded) for k in wrapped)
    assert all(manifest["adapter"]["usage"][k.removeprefix("base_model.model.")] == [] for k in wrapped)


def test_an_output_without_its_untied_head_fails_validation_naming_it(tied_base, tmp_path, capsys):
    from checkpoint_tools import read_raw_header, write_raw_header

    config = LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION, modules_to_save=["embed_tokens"])
    adapter = _adapter(tmp_path, _base_model(tied_base), config)
    out = tmp_path / "merged"
    _merge(capsys, tied_base, adapter, out)
    shard = out / _stored(out)[HEAD]
    header, body = read_raw_header(shard)
    begin, end = header.pop(HEAD)["data_offsets"]
    assert end == len(body), "the head comes after the shard's own tensors"
    write_raw_header(shard, header, body[:begin])
    index = json.loads((out / zoo.INDEX_NAME).read_text())
    del index["weight_map"][HEAD]
    (out / zoo.INDEX_NAME).write_text(json.dumps(index))

    with pytest.raises(SystemExit) as exited:
        main(["validate", "--output", str(out), "--base", str(tied_base), "--adapter", str(adapter)])
    assert exited.value.code == 1
    assert f"tensor {HEAD!r} (untied from {EMBEDDING}) is missing from the output" in capsys.readouterr().out
