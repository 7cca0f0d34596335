"""The quick-start demo: a tiny random-init llama and a LoRA adapter, merged through the flow, checked against PEFT.

Needs the `demo` extra (transformers, peft). Nothing is downloaded: the model is built from a config.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path


def build_demo_inputs(workdir: Path) -> tuple[Path, Path]:
    """A 3-shard bf16 llama checkpoint and an all-linear LoRA adapter with non-zero B (PEFT initialises B to 0)."""
    try:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as exc:
        raise SystemExit(
            f"the demo needs transformers and peft: pip install 'prefect-lora-merge[demo]' ({exc})"
        ) from None

    base_dir, adapter_dir = workdir / "base", workdir / "adapter"
    for path in (base_dir, adapter_dir):
        shutil.rmtree(path, ignore_errors=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(base_dir, max_shard_size="400KB")
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", rank_pattern={"layers.0.self_attn.q_proj": 4})
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    peft_model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def peft_max_difference(base_dir: Path, adapter_dir: Path, merged_dir: Path) -> float:
    """Largest |ours - PEFT| over all tensors, PEFT merging in fp32 and rounding once to bf16."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    reference = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir
    ).merge_and_unload()
    ours = LlamaForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).state_dict()
    return max(
        (ours[name].float() - tensor.to(torch.bfloat16).float()).abs().max().item()
        for name, tensor in reference.state_dict().items()
    )


def run_demo(
    workdir: str | Path, *, workers: int | None = None, before_merge: Callable[[], None] = lambda: None
) -> str:
    """Build the inputs, merge them through the flow (`before_merge` first: the CLI's ephemeral server hand-over),
    compare with PEFT; the lines to print."""
    import warnings

    import transformers

    from prefect_lora_merge.core.options import MergeParameters
    from prefect_lora_merge.flows import run_merge

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    workdir = Path(workdir).resolve()
    base_dir, adapter_dir = build_demo_inputs(workdir)
    merged_dir = workdir / "merged"
    params = MergeParameters(
        base=str(base_dir),
        adapter=str(adapter_dir),
        output=str(merged_dir),
        device="cpu",
        workers=workers,
        overwrite=True,
    )
    before_merge()
    summary = run_merge(params)
    difference = peft_max_difference(base_dir, adapter_dir, merged_dir)
    verdict = "identical to" if difference == 0 else f"max |difference| {difference:g} from"
    return (
        f"demo: merged {summary.shards} shards ({summary.tensors_touched} tensors changed) through the Prefect flow "
        f"into {merged_dir}\n"
        f"demo: validation passed ({', '.join(f'{v} {k}' for k, v in summary.validation_checks.items())})\n"
        f"demo: the merged checkpoint is {verdict} PEFT's merge_and_unload() (fp32, rounded once to bf16)"
    )
