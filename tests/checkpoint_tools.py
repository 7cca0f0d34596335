"""Helpers that damage checkpoints and adapters on purpose, and read them back, for tests."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file


def read_raw_header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_raw_header(path: Path, header: dict, body: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def shards(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("*.safetensors"))


def tree_digest(directory: Path) -> dict[str, str]:
    """sha256 of every file under a directory: to prove inputs were never written."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(directory).rglob("*"))
        if p.is_file()
    }


def copy_adapter(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_adapter_tensors(adapter_dir: Path, edit) -> None:
    """Apply `edit(dict)` to the adapter's tensors and save them back."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def edit_adapter_config(adapter_dir: Path, **changes) -> None:
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def write_checkpoint(directory: Path, tensors: dict, *, config: dict | None = None) -> Path:
    """A one-shard safetensors checkpoint with exactly these tensor names (no model class needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config or {"model_type": "test", "tie_word_embeddings": False}))
    return directory


def write_adapter(directory: Path, tensors: dict, **config) -> Path:
    """A PEFT-format LoRA adapter: keys get the `base_model.model.` prefix PEFT writes; target_modules names the
    modules the LoRA tensors are on (their last name part), unless given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({f"base_model.model.{k}": v for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    lora_modules = {re.sub(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.\w+)?$", "", k) for k in tensors}
    targets = sorted({m.rpartition(".")[2] for m in lora_modules if m not in tensors}) or ["q_proj"]
    (directory / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": targets, **config})
    )
    return directory


def edit_checkpoint_tensor(directory: Path, name: str, edit) -> None:
    """Apply `edit(tensor)` in place to one tensor of a checkpoint, in whichever shard holds it (metadata kept)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(directory / shard, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(directory / shard))
    edit(tensors[name])
    save_file(tensors, str(directory / shard), metadata=metadata)


def save_sharded(directory: Path, tensors: dict, shard_of, shards: int) -> None:
    """`tensors` saved as `shards` safetensors files, tensor `name` in file number `shard_of(name)` (from 1), with
    their index, as `save_pretrained` shards a checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    content: dict[str, dict] = {}
    for name in sorted(tensors):
        content.setdefault(f"model-{shard_of(name):05d}-of-{shards:05d}.safetensors", {})[name] = tensors[name]
    weight_map = {}
    for file, held in sorted(content.items()):
        save_file(held, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in held})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_perturbed_adapter(model, lora, directory: Path, generator) -> None:
    """PEFT's `lora` adapter on `model`, every trainable weight moved by 0.1·N(0, 1): a delta large enough to move
    quantized codes, as a real fine-tune does to a few blocks."""
    import torch
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    peft_model.save_pretrained(directory)


def stored_tensors(directory: Path) -> dict:
    """Every tensor of a sharded checkpoint, by name."""
    found: dict = {}
    for path in shards(directory):
        found.update(load_file(str(path)))
    return found


def stored_bytes(directory: Path) -> dict[str, bytes]:
    """Every tensor's stored bytes, by name."""
    found = {}
    for path in shards(directory):
        header, body = read_raw_header(path)
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                found[name] = body[begin:end]
    return found


def published_digest(directory: Path) -> dict[str, str]:
    """sha256 of an output's published files (the state directory is bookkeeping, the report records timings)."""
    from prefect_lora_merge.core.plan import REPORT_FILE

    return {k: v for k, v in tree_digest(directory).items() if not k.startswith(".lora-merge/") and k != REPORT_FILE}


def touched_quantized_weights(result) -> list[str]:
    """Logical names of the quantized weights a merge changed."""
    return sorted({t.quantized.weight.name for s in result.plan.shards for t in s.touched if t.quantized is not None})
