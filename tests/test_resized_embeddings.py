"""An adapter trained after `resize_token_embeddings`: the saved, larger embedding and head replace the base's."""

from __future__ import annotations

import json

import torch
import zoo
from peft import LoraConfig, PeftModel
from transformers import LlamaForCausalLM

from prefect_lora_merge.core.pipeline import merge_checkpoint

NEW_VOCAB = 136  # the base has 128 tokens; 8 added ones


def test_resized_embedding_and_head_replace_the_base_and_vocab_size_follows(tmp_path):
    base_dir, adapter_dir = zoo._dirs(tmp_path, "resized")
    torch.manual_seed(3)
    model = LlamaForCausalLM(zoo._tiny_llama_config())
    old_vocab = model.config.vocab_size
    zoo._save_base(model, base_dir, torch.float32)
    model.resize_token_embeddings(NEW_VOCAB)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    zoo._build_adapter(model, config, adapter_dir, seed=5, notes=[])

    out = tmp_path / "merged"
    result = merge_checkpoint(str(base_dir), str(adapter_dir), str(out), device="cpu")
    assert any("resized embedding" in d for d in result.plan.decisions)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == NEW_VOCAB
    assert json.loads((base_dir / "config.json").read_text())["vocab_size"] == old_vocab

    # PEFT's oracle needs the base resized first, as the user did before training.
    reference = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    reference.resize_token_embeddings(NEW_VOCAB)
    expected = PeftModel.from_pretrained(reference, adapter_dir).merge_and_unload().state_dict()
    ours = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    assert ours["model.embed_tokens.weight"].shape == (NEW_VOCAB, model.config.hidden_size)
    for key, tensor in expected.items():
        assert torch.equal(ours[key], tensor), key
