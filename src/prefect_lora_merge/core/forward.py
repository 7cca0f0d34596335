"""`validate --forward`, for models that fit in memory: the merged output, loaded with transformers, must give the
logits PEFT's own in-memory merge of base + adapter gives, on a fixed random prompt.

This is the end-to-end check the per-tensor numbers cannot make: that a model class reads the output as the merged
model (names, shapes, tied weights, config). It needs transformers and PEFT, and local copies of the three
directories (fetched to a temporary directory when they are on object storage).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from .errors import LoraMergeError
from .plan import MergePlan
from .storage import Location

PROMPT_TOKENS = 32
SEED = 0


class ForwardCheck(BaseModel):
    architecture: str
    tokens: int
    # ‖merged − PEFT‖ / ‖PEFT‖ over the prompt's logits, and the most it may be for the output's dtype
    relative_diff: float
    allowed: float
    # ‖PEFT − base‖ / ‖PEFT‖: how much the adapter changes the logits (a missing delta shows up as a diff this size)
    adapter_effect: float
    passed: bool


def forward_check(plan: MergePlan, failures: list[str]) -> ForwardCheck:
    """Compare logits of the merged output with PEFT's merge; append a failure naming what differs."""
    try:
        import peft  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:
        raise LoraMergeError("--forward needs transformers and peft: pip install 'prefect-lora-merge[demo]'") from exc
    if plan.quantized_format is not None:
        raise LoraMergeError(
            f"--forward does not run on quantized checkpoints ({plan.quantized_format}: transformers' loaders for "
            "them need a GPU or their own kernels); the per-tensor numbers check them"
        )
    with tempfile.TemporaryDirectory(prefix="lora-merge-forward-") as tmp:
        base_dir = _local(plan.job.base, Path(tmp) / "base")
        adapters = plan.job.adapters
        adapter_dirs = [_local(m.index.location, Path(tmp) / f"adapter-{i}") for i, m in enumerate(adapters.members)]
        output_dir = _local(plan.job.output, Path(tmp) / "output")
        config = AutoConfig.from_pretrained(base_dir)
        architecture = (getattr(config, "architectures", None) or ["?"])[0]
        if not architecture.endswith("ForCausalLM"):
            raise LoraMergeError(
                f"--forward compares next-token logits and needs a causal language model; the base is {architecture} "
                "(config.json architectures): validate without --forward"
            )
        prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(SEED))
        base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        base_logits = _logits(base_model, prompt)
        reference = _peft_reference(base_model, adapter_dirs, [m.weight for m in adapters.members])
        expected = _logits(reference, prompt)
        del base_model, reference
        merged = AutoModelForCausalLM.from_pretrained(output_dir, dtype=torch.float32)
        got = _logits(merged, prompt)
    scale = float(expected.norm()) or 1.0
    diff = float((got - expected).norm()) / scale
    effect = float((expected - base_logits).norm()) / scale
    # The output is rounded to its dtype once per weight: logits move by a few of its steps at most.
    dtypes = {t.dtype for s in plan.shards for t in s.touched}
    allowed = 1e-4 if dtypes <= {"F32", "F64"} else 3e-2
    passed = diff <= allowed and (diff <= 0.5 * effect or effect <= 2 * allowed)
    if not passed:
        failures.append(
            f"{plan.job.output.uri}: logits of the merged model loaded with transformers differ from PEFT's merge by "
            f"{diff:.3g} (relative; allowed {allowed:g}, the adapter itself moves them by {effect:.3g}) on a fixed "
            f"{PROMPT_TOKENS}-token prompt"
        )
    return ForwardCheck(
        architecture=architecture,
        tokens=PROMPT_TOKENS,
        relative_diff=diff,
        allowed=allowed,
        adapter_effect=effect,
        passed=passed,
    )


def _logits(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=prompt).logits.float()


def _local(location: Location, target: Path) -> str:
    """A local directory holding the location's files: itself when local, else a copy of its top-level files."""
    if location.is_local:
        return location.root
    target.mkdir(parents=True)
    for name in location.list_files():
        location.fs.get(location.path(name), str(target / name))
    return str(target)


def _peft_reference(base_model: Any, adapter_dirs: list[Path], weights: list[float]) -> Any:
    """PEFT's merge of the adapters at their weights, one after another in fp32: each loaded onto the last one's
    merged model, each LoRA layer's scaling multiplied by the adapter's weight, merged by `merge_and_unload`. (The
    plan refuses the sets whose order would matter: a copy or token rows of a tensor another adapter changes.)"""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = base_model
    for where, weight in zip(adapter_dirs, weights, strict=True):
        peft_model = PeftModel.from_pretrained(model, where)
        if weight != 1:
            for module in peft_model.modules():
                if isinstance(module, LoraLayer):
                    module.scaling = {name: scale * weight for name, scale in module.scaling.items()}
        model = peft_model.merge_and_unload()
    return model
