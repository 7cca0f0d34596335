"""The merge plan: which base tensor in which shard gets which update, computed once from headers and the adapter.

Planning reads only safetensors headers, the base's index and config, and the adapter's config and header. Every
adapter tensor must land on exactly one base tensor with the right shape, or planning fails before a byte is
written, listing every offending key.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .adapter import (
    TRAINING_ONLY_TENSORS,
    AdapterIndex,
    AdapterTensor,
    adapter_scale,
    load_adapter_index,
    rank_problems,
)
from .errors import (
    AdapterMismatchError,
    CheckpointFormatError,
    InconsistentAdapterError,
    LoraMergeError,
    UnsupportedAdapterError,
)
from .fingerprint import ALGORITHM_VERSION, merge_fingerprint
from .formats.block_fp8 import scale_grid_shape
from .quantized import QuantizedBase, QuantizedWeight, find_quantized
from .safetensors_format import FLOAT_DTYPES, ShardHeader, TensorEntry, layout, read_header, weight_map_problem
from .storage import POOLED_BYTES, READ_AHEAD_BYTES, WRITE_BEHIND_BYTES, Location, refuse_output_inside_inputs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")

# Names transformers uses in memory (what PEFT records) versus names in checkpoints on disk. Each rule rewrites a
# full tensor name; up to two rules are chained (a multimodal prefix plus an MoE rename, say).
KNOWN_REWRITES: tuple[tuple[str, str], ...] = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^model\.vision_tower\.", "vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"\.mlp\.gate\.", ".block_sparse_moe.gate."),
    (r"\.mlp\.experts\.", ".block_sparse_moe.experts."),
    (r"\.block_sparse_moe\.", ".mlp."),
    (r"^model\.", ""),
    (r"^", "model."),
)

# transformers v5 fuses per-expert Linear weights into one 3-D parameter in memory; checkpoints keep them apart.
# fused parameter name -> alternatives, each a tuple of per-expert module names concatenated along the output dim.
EXPERT_SPLITS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
EMBEDDING_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embeddings.weight")
# transformers models built on GPT-2's Conv1D (weights stored (in, out)), and the module names that are Conv1D.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_MODULES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})
# Architectures without any Conv1D: a square weight there is nn.Linear whatever fan_in_fan_out says.
LINEAR_ONLY_HINT = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3",
        "phi3",
        "deepseek_v2",
        "deepseek_v3",
        "kimi_k2",
        "llava",
        "olmoe",
    }
)
# transformers MoE blocks whose fused expert weights are stored (E, in, out) (`is_transposed = True`).
TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})
MANIFEST_FILE = "lora-merge-manifest.json"
REPORT_FILE = "lora-merge-report.json"  # the last validation's report, beside the manifest (not listed in it)
OWN_FILES = (MANIFEST_FILE, REPORT_FILE)  # this tool's files at the top of an output: never copied as side files


class Update(BaseModel):
    """One change to one base tensor, derived from adapter tensors (keys into the adapter index)."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["replace", "delta", "rows"]
    # delta forms: linear (B@A), linear_t (fan_in_fan_out), embedding ((B@A)^T), conv, experts (fused 3-D),
    # expert (one expert's slice of a fused delta, for per-expert tensors on disk), bias (lora_B.bias).
    form: Literal["linear", "linear_t", "embedding", "conv", "experts", "expert", "bias"] | None = None
    module: str
    adapter_tensors: tuple[str, ...]
    rank: int | None = None
    alpha: float | None = None
    scale: float = 1.0
    magnitude: str | None = None  # DoRA magnitude vector
    num_experts: int | None = None
    expert: int | None = None
    rows: tuple[int, int] | None = None
    experts_layout: Literal["eoi", "eio"] | None = None
    indices: tuple[int, ...] | None = None
    # BD-LoRA (`use_bdlora`): the factor stored block-diagonal, as its `nblocks` row blocks side by side; expanded to
    # the full factor before the product, as PEFT's merge does.
    block_diagonal: Literal["A", "B"] | None = None
    nblocks: int | None = None
    # The dtype ΔW is rounded to before it is added, and the sum after: PEFT's nn.MultiheadAttention merge adds
    # `ΔW.to(weight.dtype)` in the weight's own dtype (one rounding more than a Linear's merge, in bf16/fp16).
    rounded_to: Literal["F16", "BF16"] | None = None


class TensorRef(BaseModel):
    """Where a tensor's bytes are in the base, whichever shard holds it."""

    model_config = ConfigDict(frozen=True)

    file: str
    data_start: int  # offset of the shard's data section
    entry: TensorEntry

    @property
    def span(self) -> tuple[int, int]:
        return self.data_start + self.entry.begin, self.data_start + self.entry.end


class BlockFp8(BaseModel):
    """An FP8 block-quantized weight: its e4m3 codes and float32 scale grid (`weight_scale_inv`)."""

    model_config = ConfigDict(frozen=True)

    codes: TensorRef
    scales: TensorRef
    block: tuple[int, int]
    ue8m0: bool  # scales are powers of two (`scale_fmt: ue8m0`, DeepSeek-V3.1)


class Fp8Role(BaseModel):
    """What an FP8 weight or scale tensor becomes in the output.

    - `dequantized`: the weight in bf16 (merged when the adapter touches it);
    - `codes` / `scales`: the merged weight re-quantized with fresh block scales; each of the two tensors is
      computed where it is stored (they may sit in different shards), from the same inputs, deterministically;
    - `dropped`: a scale grid of a weight written in bf16: not in the output.
    """

    model_config = ConfigDict(frozen=True)

    write: Literal["dequantized", "codes", "scales", "dropped"]
    weight: BlockFp8
    # For `scales`: the weight's own updates, to re-quantize the same merged weight. They are applied and counted
    # on the weight; here they only shape the scale grid.
    weight_updates: tuple[Update, ...] = ()


class PlannedTensor(BaseModel):
    model_config = ConfigDict(frozen=True)

    base: TensorEntry
    shape: tuple[int, ...]  # output shape (differs from base only for a resized embedding)
    updates: tuple[Update, ...] = ()
    fp8: Fp8Role | None = None
    # Set for a tensor the base does not store (the lm_head of an untied output): `base` then describes the tensor
    # its value starts from, under the new name, and its bytes are read where the base stores them, through this
    # reference (as an FP8 weight's companion is). Such tensors come after the shard's own, in the output only.
    source: TensorRef | None = None

    @property
    def name(self) -> str:
        return self.base.name

    @property
    def dtype(self) -> str:
        """The dtype written to the output."""
        return "BF16" if self.fp8 is not None and self.fp8.write == "dequantized" else self.base.dtype

    @property
    def dropped(self) -> bool:
        return self.fp8 is not None and self.fp8.write == "dropped"

    @property
    def computed(self) -> bool:
        """Written from arithmetic (a merge, a dtype conversion, a re-quantization) rather than copied as bytes."""
        return bool(self.updates) or (self.fp8 is not None and not self.dropped)


class ShardPlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    file: str
    base_size: int
    base_header_bytes: int
    metadata: dict[str, str] | None
    tensors: tuple[PlannedTensor, ...]  # in the base's data order

    @property
    def base_data_start(self) -> int:
        """Offset of the base shard's data section (after the 8-byte length and the JSON header)."""
        return 8 + self.base_header_bytes

    @property
    def touched(self) -> list[PlannedTensor]:
        """Tensors the adapter changes."""
        return [t for t in self.tensors if t.updates]

    @property
    def written(self) -> list[PlannedTensor]:
        """Tensors that go to the output (all but the scale grids of weights written in bf16)."""
        return [t for t in self.tensors if not t.dropped]

    def output_entries(self) -> tuple[TensorEntry, ...]:
        return layout([(t.name, t.dtype, t.shape) for t in self.written])

    def base_ref(self, tensor: PlannedTensor) -> TensorRef:
        """Where the base stores the bytes `tensor` starts from: in this shard, or its `source`."""
        return tensor.source or TensorRef(file=self.file, data_start=self.base_data_start, entry=tensor.base)

    def copies_base_bytes(self) -> bool:
        """No tensor changes value, dtype or shape, none is dropped or added: the output shard is the base shard."""
        return all(
            not t.computed and not t.dropped and t.shape == t.base.shape and t.source is None for t in self.tensors
        )

    def layout_unchanged(self) -> bool:
        """Same tensors, dtypes, shapes, hence offsets: the base's header bytes can be kept."""
        return all(
            not t.dropped and t.shape == t.base.shape and t.dtype == t.base.dtype and t.source is None
            for t in self.tensors
        )

    def peak_bytes(self, adapter: AdapterIndex) -> int:
        """Working memory of this shard's merge: what the reader holds (its budget, or one larger tensor alone),
        what the writer holds (likewise), the free buffers kept for reuse, and the largest computed tensor's
        float32 temporaries with its adapter tensors: three full copies for a whole-tensor merge, four for a
        re-quantization, on top of the largest products B @ A of tiled merges, which the workspace keeps."""
        products = work = largest_read = largest_result = 0
        written = {e.name: e.nbytes for e in self.output_entries()}
        for t in self.tensors:
            if not t.computed:
                continue
            updates = t.updates or (t.fp8.weight_updates if t.fp8 else ())
            adapter_bytes = sum(math.prod(adapter.tensors[k].shape) * 4 for u in updates for k in update_keys(u))
            shape = t.fp8.weight.codes.entry.shape if t.fp8 else t.shape
            values = math.prod(shape) * 4
            tiled = merges_by_tiles(updates) and len(shape) == 2
            if tiled:
                products = max(products, len(updates) * values)  # the workspace keeps them for the whole shard
            if t.fp8 is not None:
                copies = 4 if t.fp8.write in ("codes", "scales") else 3
                companion = t.fp8.weight.codes if t.fp8.write == "scales" else t.fp8.weight.scales
                largest_read = max(largest_read, t.base.nbytes + companion.entry.nbytes)
            else:
                copies = 0 if tiled else 3
                largest_read = max(largest_read, t.base.nbytes)
            work = max(work, copies * values + adapter_bytes)
            largest_result = max(largest_result, written.get(t.name, 0))
        buffers = max(READ_AHEAD_BYTES, largest_read) + max(WRITE_BEHIND_BYTES, largest_result) + POOLED_BYTES
        return products + work + buffers


TILED_FORMS = ("linear", "expert")  # delta forms whose ΔW can be computed a tile at a time


def merges_by_tiles(updates: tuple[Update, ...]) -> bool:
    """Plain LoRA deltas on a linear weight or one expert's slice: merged a tile at a time (`lora_math.tile_merge`);
    DoRA's norms and the other forms span the whole tensor."""
    return bool(updates) and all(u.kind == "delta" and u.form in TILED_FORMS and not u.magnitude for u in updates)


def update_keys(update: Update) -> tuple[str, ...]:
    return update.adapter_tensors + ((update.magnitude,) if update.magnitude else ())


class MergeJob(BaseModel):
    """Everything a shard merge needs besides its own shard plan."""

    model_config = ConfigDict(frozen=True)

    base: Location
    base_versions: dict[str, dict[str, Any]]  # shard -> size and ETag/mtime: part of the fingerprint
    adapter: AdapterIndex
    output: Location
    device: str = "cpu"
    # --fp8-min-cosine: fail a shard whose re-quantized weight keeps less of its intended delta than this
    fp8_min_cosine: float | None = None
    fingerprint: str = ""


class MergePlan(BaseModel):
    model_config = ConfigDict(frozen=True)

    algorithm_version: str = ALGORITHM_VERSION
    job: MergeJob
    shards: tuple[ShardPlan, ...]
    base_has_index: bool
    index_metadata: dict[str, Any]
    extra_files: tuple[str, ...]
    config_updates: dict[str, int | bool]  # dotted keys of config.json set to new values (vocab_size, tie flags)
    config_removals: tuple[str, ...] = ()  # dotted keys dropped from config.json (a bf16 output's quantization_config)
    output_dtype: Literal["keep", "bf16", "fp8"] = "keep"
    decisions: tuple[str, ...]
    adapter_usage: dict[str, list[str]]  # adapter key -> base tensors it changes

    @property
    def fingerprint(self) -> str:
        return self.job.fingerprint

    @property
    def estimated_peak_bytes(self) -> int:
        return max(
            (s.peak_bytes(self.job.adapter) for s in self.shards),
            default=READ_AHEAD_BYTES + WRITE_BEHIND_BYTES + POOLED_BYTES,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "base": self.job.base.uri,
            "adapter": self.job.adapter.location.uri,
            "output": self.job.output.uri,
            "fingerprint": self.fingerprint,
            "output_dtype": self.output_dtype,
            "shards": len(self.shards),
            "shards_touched": sum(1 for s in self.shards if s.touched),
            "tensors": sum(len(s.tensors) for s in self.shards),
            "tensors_touched": sum(len(s.touched) for s in self.shards),
            "adapter_tensors": len(self.adapter_usage),
            "bytes": sum(s.base_size for s in self.shards),
            "estimated_peak_bytes": self.estimated_peak_bytes,
            "decisions": list(self.decisions),
        }


# -- planning -------------------------------------------------------------------------------------------------


def make_plan(
    base: str | Location,
    adapter: str | Location,
    output: str | Location,
    *,
    device: str = "cpu",
    storage_options: dict[str, Any] | None = None,
    output_dtype: OutputDtype = "auto",
    fp8_min_cosine: float | None = None,
) -> MergePlan:
    """Plan a merge. `output_dtype` matters only for an FP8 block-quantized base: `auto` (= `bf16` there) writes
    every FP8 weight dequantized to bf16; `fp8` keeps untouched FP8 weights as they are and re-quantizes touched
    ones."""
    base_loc = base if isinstance(base, Location) else Location.parse(base, storage_options, what="--base")
    adapter_loc = (
        adapter if isinstance(adapter, Location) else Location.parse(adapter, storage_options, what="--adapter")
    )
    output_loc = output if isinstance(output, Location) else Location.parse(output, storage_options, what="--output")
    refuse_output_inside_inputs(output_loc, base=base_loc, adapter=adapter_loc)

    files, weight_map, index_metadata, has_index = _base_layout(base_loc)
    headers, versions = _read_headers(base_loc, files)
    _check_index(base_loc, headers, weight_map)
    config_bytes = base_loc.read_bytes("config.json") if base_loc.exists("config.json") else None
    config = _parse_config(base_loc, config_bytes)
    adapter_index = load_adapter_index(adapter_loc)

    catalog = {t.name: t for h in headers for t in h.tensors}
    fp8 = _block_fp8_weights(base_loc, config, headers)
    mode = _output_mode(output_dtype, fp8, base_loc)
    resolver = _Resolver(catalog, config)
    fp8_tensors = set(fp8) | {w.scales.entry.name for w in fp8.values()}
    quantized = find_quantized(base_loc.uri, config, catalog, supported=fp8_tensors)
    updates, usage, config_updates = _plan_updates(adapter_index, resolver, config, set(fp8), quantized)
    roles = _fp8_roles(fp8, updates, mode)
    config_removals = _quantization_config_keys(config) if mode == "bf16" else ()
    if mode == "bf16":
        resolver.decisions.append(
            f"FP8 base written in bf16: {len(fp8)} block-quantized weight(s) dequantized (merged where the adapter "
            "touches them), their weight_scale_inv grids dropped, quantization_config removed from config.json"
        )
    elif mode == "fp8":
        touched = sum(1 for name in fp8 if name in updates)
        resolver.decisions.append(
            f"FP8 base written in FP8: {touched} touched weight(s) re-quantized with fresh block scales (see the "
            f"delta survival figures), {len(fp8) - touched} untouched FP8 weight(s) and their scales kept as they are"
        )

    shards = []
    for header in headers:
        planned = []
        for entry in header.tensors:
            tensor_updates = tuple(updates.get(entry.name, ()))
            shape = _replaced_shape(tensor_updates, adapter_index) or entry.shape
            planned.append(PlannedTensor(base=entry, shape=shape, updates=tensor_updates, fp8=roles.get(entry.name)))
        if resolver.untied is not None and resolver.untied[0] in header.by_name():
            planned.append(_untied_head(header, *resolver.untied, updates, adapter_index))
        shards.append(
            ShardPlan(
                file=header.file,
                base_size=header.file_size,
                base_header_bytes=header.header_bytes,
                metadata=header.metadata,
                tensors=tuple(planned),
            )
        )
    base_files = set(base_loc.list_files())
    extra = tuple(sorted(f for f in base_files if _is_extra_file(f)))
    job = MergeJob(
        base=base_loc,
        base_versions=versions,
        adapter=adapter_index,
        output=output_loc,
        device=device,
        fp8_min_cosine=fp8_min_cosine,
        fingerprint=merge_fingerprint(
            base_headers=headers,
            base_versions=versions,
            base_config=config_bytes,
            adapter=adapter_index,
            output_dtype=mode,
        ),
    )
    return MergePlan(
        job=job,
        shards=tuple(shards),
        base_has_index=has_index,
        index_metadata=index_metadata,
        extra_files=extra,
        config_updates=config_updates,
        config_removals=config_removals,
        output_dtype=mode,
        decisions=tuple(resolver.decisions),
        adapter_usage=usage,
    )


def _parse_config(base: Location, data: bytes | None) -> dict[str, Any]:
    if data is None:
        return {}
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(
            f"{base.describe('config.json')} is not valid JSON ({exc}); fix or replace it"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{base.describe('config.json')} is not a JSON object; fix or replace it")
    return config


# -- FP8 block-quantized bases -----------------------------------------------------------------------------------


def _quantization_config(config: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    for path, scope in (("", config), ("text_config.", config.get("text_config"))):
        if isinstance(scope, dict) and isinstance(scope.get("quantization_config"), dict):
            return f"{path}quantization_config", scope["quantization_config"]
    return None


def _quantization_config_keys(config: dict[str, Any]) -> tuple[str, ...]:
    found = _quantization_config(config)
    return (found[0],) if found else ()


def _block_fp8_weights(base: Location, config: dict[str, Any], headers: list[ShardHeader]) -> dict[str, BlockFp8]:
    """Every FP8 block-quantized weight of the base, recognised by its format (e4m3 codes with a float32
    `weight_scale_inv` companion, wherever the index stores it, and a `weight_block_size`), not by model type."""
    refs = {e.name: TensorRef(file=h.file, data_start=h.data_start, entry=e) for h in headers for e in h.tensors}
    codes = sorted(name for name, ref in refs.items() if ref.entry.dtype.startswith("F8_"))
    if not codes:
        return {}
    found = _quantization_config(config)
    quant = found[1] if found else {}
    block = quant.get("weight_block_size")
    where = base.describe("config.json")
    problems: list[str] = []
    valid_block = isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
    if not valid_block and not any(f"{name}_scale_inv" in refs for name in codes):
        return {}  # FP8 tensors of another scheme (or none): copied as bytes; an adapter update on them is refused
    if not valid_block:
        raise CheckpointFormatError(
            f"{codes[0]} and {len(codes) - 1} other tensor(s) are FP8, but {where} has no quantization_config with "
            "a weight_block_size [rows, cols]: only block-quantized FP8 checkpoints (DeepSeek-V3/R1, Kimi-K2) can "
            "be merged; dequantize other FP8 formats first"
        )
    scale_fmt = quant.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0", "float", "fp32"):
        raise CheckpointFormatError(f"{where}: quantization_config.scale_fmt {scale_fmt!r} is not supported")
    weights: dict[str, BlockFp8] = {}
    for name in codes:
        ref = refs[name]
        scale = refs.get(f"{name}_scale_inv")
        if ref.entry.dtype != "F8_E4M3":
            problems.append(f"{name} ({ref.file}) is {ref.entry.dtype}; block-quantized weights are F8_E4M3")
        elif not name.endswith(".weight") or scale is None:
            problems.append(f"{name} ({ref.file}) is F8_E4M3 without a {name}_scale_inv companion anywhere in the base")
        elif len(ref.entry.shape) != 2:
            problems.append(f"{name} ({ref.file}) is FP8 with shape {list(ref.entry.shape)}; block scales need 2-D")
        elif scale.entry.dtype != "F32" or scale.entry.shape != scale_grid_shape(ref.entry.shape, tuple(block)):
            expected = list(scale_grid_shape(ref.entry.shape, tuple(block)))
            problems.append(
                f"{scale.entry.name} ({scale.file}) is {scale.entry.dtype} {list(scale.entry.shape)}; a "
                f"{list(ref.entry.shape)} weight with {block} blocks needs F32 {expected}"
            )
        else:
            weights[name] = BlockFp8(codes=ref, scales=scale, block=tuple(block), ue8m0=scale_fmt == "ue8m0")
    if problems:
        raise CheckpointFormatError(
            f"{base.uri} is not a block-FP8 checkpoint this tool can read: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        )
    return weights


OutputDtype = Literal["auto", "bf16", "fp8"]


def _output_mode(output_dtype: str, fp8: dict[str, BlockFp8], base: Location) -> Literal["keep", "bf16", "fp8"]:
    if output_dtype not in ("auto", "bf16", "fp8"):
        raise LoraMergeError(f"--output-dtype must be auto, bf16 or fp8, not {output_dtype!r}")
    if not fp8:
        if output_dtype != "auto":
            raise LoraMergeError(
                f"--output-dtype {output_dtype} converts FP8 block-quantized checkpoints, and {base.uri} has no FP8 "
                "weights; leave --output-dtype at auto (every tensor keeps its dtype)"
            )
        return "keep"
    return "fp8" if output_dtype == "fp8" else "bf16"


def _fp8_roles(fp8: dict[str, BlockFp8], updates: dict[str, list[Update]], mode: str) -> dict[str, Fp8Role]:
    roles: dict[str, Fp8Role] = {}
    for name, weight in fp8.items():
        scale = weight.scales.entry.name
        if mode == "bf16":
            roles[name] = Fp8Role(write="dequantized", weight=weight)
            roles[scale] = Fp8Role(write="dropped", weight=weight)
        elif name in updates:
            roles[name] = Fp8Role(write="codes", weight=weight)
            roles[scale] = Fp8Role(write="scales", weight=weight, weight_updates=tuple(updates[name]))
    return roles


def _is_extra_file(name: str) -> bool:
    """Files of the base that go to the output unchanged: not weights, not hidden (the state directory among
    them), never this tool's own files (a base may itself be a merged output: its manifest and report describe
    that merge, not this one)."""
    if name.startswith(".") or name in OWN_FILES:
        return False
    return not (name.endswith(WEIGHT_SUFFIXES) or name.endswith(WEIGHT_INDEX_SUFFIXES))


def _base_layout(base: Location) -> tuple[list[str], dict[str, str] | None, dict[str, Any], bool]:
    if not base.is_dir() and not base.exists(INDEX_FILE):
        raise CheckpointFormatError(f"--base {base.uri} does not exist or is not a directory")
    if base.exists(INDEX_FILE):
        index = base.read_json(INDEX_FILE)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointFormatError(f"{base.describe(INDEX_FILE)} has no weight_map; the index is corrupt")
        problem = weight_map_problem(weight_map)
        if problem:
            raise CheckpointFormatError(f"{base.describe(INDEX_FILE)}: {problem}; the index is corrupt: regenerate it")
        files = sorted(set(weight_map.values()))
        present = set(base.list_files())
        missing = [f for f in files if f not in present]
        if missing:
            raise CheckpointFormatError(
                f"{base.describe(INDEX_FILE)} lists shard(s) not present in the base: {', '.join(missing[:5])}; "
                "the checkpoint is incomplete (finish the download/upload)"
            )
        metadata = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
        return files, weight_map, metadata, True
    files = sorted(f for f in base.list_files() if f.endswith(".safetensors"))
    if not files:
        raise CheckpointFormatError(
            f"--base {base.uri} holds no .safetensors files (and no {INDEX_FILE}); convert .bin checkpoints to "
            "safetensors first"
        )
    return files, None, {}, False


def _read_headers(base: Location, files: list[str]) -> tuple[list[ShardHeader], dict[str, dict[str, Any]]]:
    # Headers are small; on object storage the latency of one ranged read dominates, so read them concurrently.
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        headers = list(pool.map(lambda f: read_header(base, f), files))
        versions = dict(zip(files, pool.map(base.version, files), strict=True))
    return headers, versions


def _check_index(base: Location, headers: list[ShardHeader], weight_map: dict[str, str] | None) -> None:
    seen: dict[str, str] = {}
    for header in headers:
        for entry in header.tensors:
            if entry.name in seen:
                raise CheckpointFormatError(
                    f"tensor {entry.name!r} is stored in both {seen[entry.name]} and {header.file}; the checkpoint "
                    "is inconsistent"
                )
            seen[entry.name] = header.file
    if weight_map is None:
        return
    problems = [
        f"{name} -> {file} but the shard {'has no such tensor' if name not in seen else 'is ' + seen[name]}"
        for name, file in weight_map.items()
        if seen.get(name) != file
    ]
    problems += [f"{name} in {file} is missing from the index" for name, file in seen.items() if name not in weight_map]
    if problems:
        raise CheckpointFormatError(
            f"{base.describe(INDEX_FILE)} disagrees with the shard headers: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        )


# -- resolving names ------------------------------------------------------------------------------------------


class _Resolver:
    """Maps a tensor name as PEFT saw it (the in-memory module name) to the name stored in the checkpoint."""

    def __init__(self, catalog: dict[str, TensorEntry], config: dict[str, Any]) -> None:
        self.catalog = catalog
        self.config = config
        self.decisions: list[str] = []
        self.tied_redirects: set[str] = set()  # modules whose updates land on the tied embedding
        self.untied: tuple[str, str] | None = None  # (embedding, head) once the output gets a head of its own
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        self.model_type = str(config.get("model_type") or text.get("model_type") or "")

    def resolve(self, name: str) -> tuple[str | None, str | None]:
        """(checkpoint name, None) or (None, why not). Exact, then known rewrites, then a unique suffix, then the
        embedding a tied head shares."""
        found, why = self.stored(name)
        if found is not None or why is not None:
            return found, why
        tied = self._tied_embedding(name)
        if tied:
            self.tied_redirects.add(name.rpartition(".")[0])
            return tied, None
        return None, f"{name} has no matching tensor in the base checkpoint"

    def stored(self, name: str) -> tuple[str | None, str | None]:
        """The tensor the checkpoint stores under `name`, as `resolve` finds it, but never through a tied head."""
        if name in self.catalog:
            return name, None
        found = sorted({c for c in _rewrites(name) if c in self.catalog})
        if len(found) == 1:
            return found[0], None
        if len(found) > 1:
            return None, f"{name} is ambiguous: it could be any of {found}"
        matches = self._suffix_matches(name)
        if len(matches) == 1:
            return matches[0], None
        if len(matches) > 1:
            return None, f"{name} is ambiguous: it matches {matches[:4]} by suffix"
        return None, None

    def tied_embedding(self) -> str | None:
        """The one embedding the output head shares, when the config ties them and the checkpoint stores no head."""
        if not _ties_embeddings(self.config) or any(_HEAD_WEIGHT.search(n) for n in self.catalog):
            return None
        embeddings = sorted(n for n in self.catalog if n.endswith(EMBEDDING_NAMES) and "vision" not in n)
        return embeddings[0] if len(embeddings) == 1 else None

    def untie(self) -> tuple[str, str]:
        """Give the output a head of its own: (embedding, head). The head joins the catalog as the embedding's
        twin (its base value is the embedding's), so every name of the head resolves to it from now on."""
        embedding = self.tied_embedding()
        assert embedding is not None, "untie() needs a tied checkpoint"
        head = _head_name(embedding)
        self.catalog = {**self.catalog, head: self.catalog[embedding].model_copy(update={"name": head})}
        self.untied = (embedding, head)
        return self.untied

    def _suffix_matches(self, name: str) -> list[str]:
        parts = name.split(".")
        for start in range(len(parts) - 1):
            # Never strip a layer or expert number: those are identity, not prefix.
            if any(p.isdigit() for p in parts[:start]):
                break
            tail = ".".join(parts[start:])
            matches = sorted(n for n in self.catalog if n == tail or n.endswith("." + tail))
            if matches:
                return matches
        return []

    def _tied_embedding(self, name: str) -> str | None:
        if not _HEAD_WEIGHT.search(name):
            return None
        embedding = self.tied_embedding()
        if embedding is None:
            return None
        decision = (
            f"tied embeddings: the checkpoint stores only {embedding}, shared with lm_head; the adapter's "
            f"lm_head update is applied to {embedding} after the embedding's own, as PEFT's merge does to the "
            "shared tensor (the unmerged PEFT model applies each delta on its own path only; no tied tensor can "
            "reproduce both)"
        )
        if decision not in self.decisions:
            self.decisions.append(decision)
        return embedding


_HEAD_WEIGHT = re.compile(r"(^|\.)lm_head\.weight$")
# The output head's name beside a tied embedding, in the checkpoint's own layout: `<outer>lm_head.weight` for an
# embedding `<outer><text model body><embedding>.weight` (`model.`, `transformer.`, v5 multimodal
# `model.language_model.`; `language_model.model.` in older multimodal checkpoints keeps `language_model.`).
_EMBEDDING_LAYOUT = re.compile(
    r"^(?P<outer>.*?)(model\.language_model\.|model\.|transformer\.)?"
    r"(embed_tokens|wte|word_embeddings|embeddings)\.weight$"
)


def _head_name(embedding: str) -> str:
    match = _EMBEDDING_LAYOUT.match(embedding)
    return f"{match['outer'] if match else ''}lm_head.weight"


def _ties_embeddings(config: dict[str, Any]) -> bool:
    for scope in (config, config.get("text_config") or {}):
        if isinstance(scope, dict) and scope.get("tie_word_embeddings") is not None:
            return bool(scope["tie_word_embeddings"])
    # transformers' PretrainedConfig default is True for most architectures that do not say.
    return True


def _rewrites(name: str) -> list[str]:
    seen, frontier = {name}, [name]
    for _ in range(2):
        nxt = []
        for current in frontier:
            for pattern, repl in KNOWN_REWRITES:
                candidate = re.sub(pattern, repl, current, count=1)
                if candidate not in seen:
                    seen.add(candidate)
                    nxt.append(candidate)
        frontier = nxt
    seen.discard(name)
    return sorted(seen)


# -- turning adapter keys into updates ------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<role>lora_A|lora_B)\.(?P<param>weight|bias)$")
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<role>A|B)$")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(\.weight)?$")
_TOKENS_KEY = re.compile(r"^(?P<module>.+)\.token_adapter\.trainable_tokens_delta$")
# A module's tensor under a PEFT wrapper: the base copy beside an adapted layer (`base_layer`), or beside a
# modules_to_save copy when PEFT saves the embedding layers of a resized vocabulary (`original_module`, and
# `modules_to_save`, a duplicate of the copy `<module>.weight` that PEFT's loader ignores).
_BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.(base_layer|original_module|modules_to_save)\.(?P<param>weight|bias)$")
# The out_proj of an nn.MultiheadAttention, which PEFT wraps inside the attention's own LoRA layer.
_MHA_OUT_PROJ = re.compile(r"^(?P<attention>.+)\.base_layer\.out_proj$")


class _Group(BaseModel):
    module: str
    A: str | None = None
    B: str | None = None
    B_bias: str | None = None
    magnitude: str | None = None
    embedding: bool = False


class _Unsupported(str):
    """A planning problem that is not a mismatch with the base: an update PEFT cannot merge either."""


def _plan_updates(
    adapter: AdapterIndex,
    resolver: _Resolver,
    config: dict[str, Any],
    fp8_weights: set[str],
    quantized: QuantizedBase | None = None,
) -> tuple[dict[str, list[Update]], dict[str, list[str]], dict[str, int | bool]]:
    groups: dict[str, _Group] = {}
    replacements: list[tuple[str, str]] = []  # (adapter key, tensor name as PEFT saw it)
    token_keys: list[tuple[str, str]] = []
    training_only: list[tuple[str, str, str]] = []  # (adapter key, module, variant)
    problems: list[str] = []
    variants = [found for flag, found in TRAINING_ONLY_TENSORS.items() if adapter.raw_config.get(flag) is not None]

    for key in adapter.tensors:
        if m := _LORA_KEY.match(key):
            group = groups.setdefault(m["module"], _Group(module=m["module"]))
            if m["role"] == "lora_A":
                group.A = key
            elif m["param"] == "weight":
                group.B = key
            else:
                group.B_bias = key
        elif m := _EMBED_KEY.match(key):
            group = groups.setdefault(m["module"], _Group(module=m["module"]))
            group.embedding = True
            setattr(group, m["role"], key)
        elif m := _MAGNITUDE_KEY.match(key):
            groups.setdefault(m["module"], _Group(module=m["module"])).magnitude = key
        elif m := _TOKENS_KEY.match(key):
            token_keys.append((key, m["module"]))
        elif m := _BASE_LAYER_KEY.match(key):
            replacements.append((key, f"{m['module']}.{m['param']}"))
        elif found := _training_only(key, variants):
            training_only.append((key, *found))
        elif re.search(r"\.(lora_\w+|hada_\w+|lokr_\w+|ia3_\w+)(\.|$)", key):
            problems.append(f"{key} is not a LoRA tensor this tool knows how to merge")
        else:
            replacements.append((key, key))

    if quantized is not None:
        touched = _touched_quantized(quantized, resolver, adapter, groups, replacements, token_keys)
        if touched:
            raise quantized.refusal(touched)

    updates: dict[str, list[Update]] = defaultdict(list)
    usage: dict[str, list[str]] = {}
    config_updates: dict[str, int | bool] = {}
    replaced_shapes: dict[str, tuple[int, ...]] = {}

    # Tensors a LoRA variant saves for training only: applied nowhere (an empty usage), as in PEFT's merge; each
    # must belong to a module whose LoRA factors are in the adapter.
    for key, module, variant in training_only:
        group = groups.get(module)
        if group is None or group.A is None or group.B is None:
            problems.append(f"{key}: a {variant} tensor for {module}, which has no LoRA A and B in the adapter")
        else:
            usage[key] = []
    for variant in sorted({v for _, _, v in training_only}):
        names = sorted({k.rpartition(f"{m}.")[2] for k, m, v in training_only if v == variant})
        resolver.decisions.append(
            f"{variant}: its {sum(1 for *_, v in training_only if v == variant)} training-only tensor(s) "
            f"({', '.join(names)}) are not part of the merge; PEFT merges {variant} as the plain LoRA delta"
        )

    def shape_of(target: str) -> tuple[int, ...]:
        """A tensor's shape as later updates see it: after a full replacement (a resized embedding, say)."""
        return replaced_shapes.get(target, resolver.catalog[target].shape)

    def add(target: str, update: Update) -> None:
        updates[target].append(update)
        for k in update_keys(update):
            usage.setdefault(k, []).append(target)

    # A trained copy of a tied embedding or head makes the two paths differ in the trained model: the output gets a
    # head of its own, so every update of the head lands on it (and none on the embedding).
    copies = _trained_copies_of_tied(adapter, resolver, replacements)
    if copies:
        resolver.untie()
        config_updates.update(_untie_updates(config))

    # Full-tensor replacements come first: PEFT loads them into the base before any delta is merged on top.
    resized: dict[str, tuple[int, int]] = {}  # tensor -> rows in the base, rows in the adapter
    for key, name in replacements:
        target, why = resolver.resolve(name)
        if target is None:
            problems.append(f"{key}: {why}")
            continue
        module = name.rpartition(".")[0]
        base_shape, new_shape = resolver.catalog[target].shape, adapter.tensors[key].shape
        if target in replaced_shapes and replaced_shapes[target] != new_shape:
            problems.append(
                f"{key}: shape {list(new_shape)} differs from {list(replaced_shapes[target])}, which another adapter "
                f"tensor replacing {target} has; the adapter file is inconsistent"
            )
            continue
        if new_shape != base_shape:
            if len(new_shape) == 2 and len(base_shape) == 2 and new_shape[1] == base_shape[1]:
                config_updates.update(_vocab_update(config, base_shape[0], new_shape[0]))
                resized[target] = (base_shape[0], new_shape[0])
            else:
                problems.append(f"{key}: shape {list(new_shape)} does not fit {target} {list(base_shape)}")
                continue
        replaced_shapes[target] = tuple(new_shape)
        add(target, Update(kind="replace", module=module, adapter_tensors=(key,)))

    for group in groups.values():
        problems += _plan_group(group, adapter, resolver, add, shape_of, usage)

    for key, module in token_keys:
        problems += _plan_tokens(key, module, adapter, resolver, add, shape_of)

    # PEFT merges module by module in model order; on a tied tensor the embedding's own updates come before the
    # ones redirected from lm_head. Within that: full replacements, then deltas, then token rows.
    # A replacement from `base_layer.weight` is the base copy PEFT loads before merging anything, also on a tied
    # tensor, so it always comes first; among one module's replacements the base copies come before the trained one.
    kind_order = {"replace": 0, "delta": 1, "rows": 2}
    for tensor_updates in updates.values():
        tensor_updates.sort(
            key=lambda u: (
                u.kind != "replace",
                u.module in resolver.tied_redirects,
                kind_order[u.kind],
                _replacement_rank(u.adapter_tensors[0]) if u.kind == "replace" else 0,
            )
        )
    # Only the last full replacement of a tensor counts: those before it are not read (their keys change nothing).
    for target, tensor_updates in updates.items():
        last = max((i for i, u in enumerate(tensor_updates) if u.kind == "replace"), default=0)
        superseded = [k for u in tensor_updates[:last] for k in update_keys(u)]
        if superseded:
            for k in superseded:
                usage[k].remove(target)
            del tensor_updates[:last]
            resolver.decisions.append(
                f"superseded replacements: {', '.join(superseded)} would replace all of {target}, and "
                f"{tensor_updates[0].adapter_tensors[0]} replaces it after them (as PEFT loads them): only the last "
                "is merged"
            )
    for target, (old_rows, new_rows) in resized.items():
        key = next(u.adapter_tensors[0] for u in reversed(updates[target]) if u.kind == "replace")
        resolver.decisions.append(
            f"resized embedding: {target} goes from {old_rows} to {new_rows} rows (the adapter saved the resized "
            f"tensor as {key})"
        )
    if resolver.untied is not None:
        embedding, head = resolver.untied
        rows = {name: shape_of(name)[0] for name in resolver.untied}
        if rows[embedding] != rows[head]:
            short, long = sorted(resolver.untied, key=lambda n: rows[n])
            problems.append(
                f"{short}: the untied output needs it with {rows[long]} rows, as {long} has (a resized vocabulary), "
                f"but the adapter holds no {short} of that size, so the trained model's new rows are unknown; save "
                "the adapter again with save_embedding_layers=True (PEFT then stores both embedding layers)"
            )
        if embedding in fp8_weights:
            problems.append(f"{embedding} is FP8: this tool cannot untie a block-quantized embedding from its head")
        resolver.decisions.append(_untie_decision(embedding, head, copies, updates.get(head, [])))
    for target in updates:
        dtype = resolver.catalog[target].dtype
        if dtype not in FLOAT_DTYPES and target not in fp8_weights:
            problems.append(
                f"{target} is {dtype}: this tool merges into bf16/fp16/fp32/fp64 tensors only (a quantized base "
                "needs dequantizing first)"
            )

    contradictions = _contradictions(adapter, updates, resolver)
    if contradictions:
        raise InconsistentAdapterError(
            f"the adapter {adapter.location.uri} contradicts itself ({len(contradictions)} problem(s))",
            contradictions,
            "Fix adapter_config.json, or save the adapter again from training; nothing was written",
        )
    if problems and all(isinstance(p, _Unsupported) for p in problems):
        raise UnsupportedAdapterError(
            f"{len(problems)} adapter tensor(s) from {adapter.location.uri} are not a weight update PEFT can merge: "
            + "; ".join(problems[:8])
            + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
            + "; nothing was written"
        )
    if problems:
        hint = "Check that the adapter was trained on this base model"
        if adapter.config.base_model_name_or_path:
            hint += f" (the adapter says it was trained on {adapter.config.base_model_name_or_path!r})"
        raise AdapterMismatchError(
            f"{len(problems)} adapter tensor(s) from {adapter.location.uri} cannot be merged into the base",
            problems,
            hint + "; nothing was written",
        )
    return dict(updates), usage, config_updates


def _training_only(key: str, variants: list[tuple[str, re.Pattern[str]]]) -> tuple[str, str] | None:
    """(module, variant) of a tensor that one of the adapter's LoRA variants saves for training only."""
    for variant, pattern in variants:
        if m := pattern.match(key):
            return m["module"], variant
    return None


def _touched_quantized(
    quantized: QuantizedBase,
    resolver: _Resolver,
    adapter: AdapterIndex,
    groups: dict[str, _Group],
    replacements: list[tuple[str, str]],
    token_keys: list[tuple[str, str]],
) -> list[QuantizedWeight]:
    """The base's quantized weights that the adapter would change. A target is found by the usual name rules,
    among the stored tensors first (bitsandbytes keeps the codes under the weight's name), then among the names of
    the weights that packed tensors stand for (`q_proj.weight` for `q_proj.weight_packed`)."""
    names = [name for _, name in replacements] + [f"{module}.weight" for _, module in token_keys]
    for module in groups:
        plain = module
        while plain.endswith(".base_layer"):
            plain = plain[: -len(".base_layer")]
        names.append(f"{plain}.weight")
        names += [f"{plain}.{p}" for p in _targeted_parameters(plain, adapter.config.target_parameters or [])]
    packed = _Resolver({w.name: resolver.catalog[w.stored] for w in quantized.weights.values()}, resolver.config)
    touched: dict[str, QuantizedWeight] = {}
    for name in names:
        target, _ = resolver.resolve(name)
        if target is None:
            target, _ = packed.resolve(name)
        if target in quantized.weights:
            touched.setdefault(target, quantized.weights[target])
    return sorted(touched.values(), key=lambda w: w.name)


def _replacement_rank(key: str) -> int:
    """The order of one module's full replacements, as PEFT loads them: the base copies it saves beside an adapted
    or wrapped layer, then the duplicate of a trained copy, then the trained copy (`<module>.weight`)."""
    if ".base_layer." in key or ".original_module." in key:
        return 0
    return 1 if ".modules_to_save." in key else 2


def _trained_copies_of_tied(
    adapter: AdapterIndex, resolver: _Resolver, replacements: list[tuple[str, str]]
) -> list[str]:
    """The adapter's trained copies (modules_to_save) of an embedding or head that the checkpoint stores as one tied
    tensor: PEFT trains such a copy on its own path (the other keeps the base tensor), so the trained model's
    embedding and head differ. Not with ensure_weight_tying, where PEFT shares one copy between the two."""
    embedding = resolver.tied_embedding()
    if embedding is None or adapter.raw_config.get("ensure_weight_tying"):
        return []
    wrapped = adapter.config.modules_to_save or []
    copies = []
    for key, name in replacements:
        module = name.rpartition(".")[0]
        # PEFT wraps every module whose name ends with a modules_to_save entry.
        if _replacement_rank(key) < 2 or not any(module.endswith(entry) for entry in wrapped):
            continue
        stored, _ = resolver.stored(name)
        if stored == embedding or (stored is None and _HEAD_WEIGHT.search(name)):
            copies.append(key)
    return copies


def _untie_updates(config: dict[str, Any]) -> dict[str, bool]:
    """tie_word_embeddings: false at the top of config.json and in its text_config: transformers ties weights by the
    config of each model class it builds, and a config without the key gets its class's default (often true)."""
    updates = {"tie_word_embeddings": False}
    if isinstance(config.get("text_config"), dict):
        updates["text_config.tie_word_embeddings"] = False
    return updates


def _untie_decision(embedding: str, head: str, copies: list[str], updates: list[Update]) -> str:
    replaced = [u.adapter_tensors[0] for u in updates if u.kind == "replace"]
    value = f"the adapter's {replaced[-1]}" if replaced else f"the base's {embedding}"
    if any(u.kind == "delta" for u in updates):
        value += " plus its LoRA delta"
    modules = sorted({key.rpartition(".")[0] for key in copies})
    return (
        f"untied embeddings: the checkpoint stores only {embedding}, shared with the output head, but the adapter "
        f"trained its own copy of {' and '.join(modules)} (modules_to_save), so the trained model's embedding and head "
        f"are different tensors; the output stores {head} apart ({value}) and config.json gets tie_word_embeddings: "
        "false"
    )


def _contradictions(adapter: AdapterIndex, updates: dict[str, list[Update]], resolver: _Resolver) -> list[str]:
    """Where the planned updates show the adapter disagreeing with itself: a tensor that cannot be a LoRA weight
    (integers or booleans), a config r that is not its tensors' rank, LoRA tensors on modules that target_modules
    does not name. PEFT loads an adapter by its config: it would refuse such an adapter, or drop those tensors."""
    cfg = adapter.config
    found: dict[str, None] = {}  # ordered, without repeats (a fused update is planned once per expert)
    ranks: dict[str, int] = {}
    for target, tensor_updates in updates.items():
        base_dtype = resolver.catalog[target].dtype
        for update in tensor_updates:
            keys = update_keys(update)
            if update.kind == "replace":
                dtype = adapter.tensors[keys[0]].dtype
                if dtype not in FLOAT_DTYPES and base_dtype.startswith(("F", "BF")):
                    found[
                        f"{keys[0]} is {dtype} but replaces the floating-point {target} ({base_dtype}): a trained "
                        "copy of a float weight cannot be integers; save the module's real weights"
                    ] = None
                continue
            for key in keys:
                dtype = adapter.tensors[key].dtype
                if dtype not in FLOAT_DTYPES:
                    found[
                        f"{key} is {dtype}: LoRA weights are F16, BF16, F32 or F64 (integer, boolean or FP8 values "
                        "would be merged as numbers they do not stand for); save the adapter's trained weights, not a "
                        "quantized or converted copy"
                    ] = None
            if update.kind == "delta" and update.rank is not None:
                ranks.setdefault(update.module, update.rank)
    found.update(dict.fromkeys(rank_problems(adapter, ranks)))

    # target_parameters updates (fused experts) are matched by target_parameters when planned; every other LoRA
    # module must be one that target_modules gives a layer, or one PEFT ties to a targeted embedding.
    planned = [u for us in updates.values() for u in us]
    modules = sorted(
        {_lora_module(u.adapter_tensors[0]) for u in planned if u.kind == "delta" and u.form not in PARAMETER_FORMS}
    )
    untargeted = [
        m
        for m in modules
        if cfg.targets_module(m) is False and not (cfg.ensure_weight_tying and m in resolver.tied_redirects)
    ]
    described = f"target_modules {_abridged(cfg.target_modules)}"
    if cfg.layers_to_transform not in (None, []):
        described += f" with layers_to_transform {_abridged(cfg.layers_to_transform)}"
    if cfg.exclude_modules:
        described += f" and exclude_modules {_abridged(cfg.exclude_modules)}"
    if untargeted and len(untargeted) == len(modules):
        found[
            f"{described} match none of the adapter's {len(modules)} LoRA module(s) (such as {modules[0]}): PEFT "
            "would find no layer to load them into"
        ] = None
    elif untargeted:
        more = f" (and {len(untargeted) - 4} more)" if len(untargeted) > 4 else ""
        found[
            f"{described} do not match {len(untargeted)} of the adapter's {len(modules)} LoRA module(s): "
            f"{', '.join(untargeted[:4])}{more}; PEFT would not load their tensors"
        ] = None
    return list(found)


PARAMETER_FORMS = ("experts", "expert")  # updates of target_parameters, matched by that list when planned


def _lora_module(key: str) -> str:
    """The module a LoRA tensor belongs to, as target_modules names it: a LoRA PEFT puts on a layer inside a
    targeted one (the out_proj of an nn.MultiheadAttention, under its `base_layer`) belongs to the targeted one."""
    module = re.split(r"\.lora_(?:A|B|embedding_A|embedding_B|magnitude_vector)(?:\.|$)", key)[0]
    return module.split(".base_layer.")[0]


def _abridged(value: Any) -> str:
    """A config value for a message: long lists cut to their first entries."""
    if isinstance(value, list | tuple | set) and len(value) > 6:
        return repr(sorted(map(str, value))[:6])[:-1] + f", ... ({len(value)} in all)]"
    return repr(value)


def _vocab_update(config: dict[str, Any], old_rows: int, new_rows: int) -> dict[str, int]:
    if config.get("vocab_size") == old_rows:
        return {"vocab_size": new_rows}
    text = config.get("text_config")
    if isinstance(text, dict) and text.get("vocab_size") == old_rows:
        return {"text_config.vocab_size": new_rows}
    return {}


def _plan_group(
    group: _Group, adapter: AdapterIndex, resolver: _Resolver, add: Any, shape_of: Any, usage: dict[str, list[str]]
) -> list[str]:
    module = group.module
    if group.A is None or group.B is None:
        present = [k for k in (group.A, group.B, group.B_bias, group.magnitude) if k]
        return [f"{module}: has {present} but not both LoRA A and B; the adapter file is incomplete"]
    A, B = adapter.tensors[group.A], adapter.tensors[group.B]
    if len(A.shape) < 2 or len(B.shape) < 2:
        return [f"{group.A}: LoRA A {list(A.shape)} / B {list(B.shape)} are not matrices; the adapter file is damaged"]
    cfg = adapter.config
    attention = _MHA_OUT_PROJ.match(module)
    if attention and resolver.resolve(f"{attention['attention']}.in_proj_weight")[0] is not None:
        return _plan_attention(group, attention["attention"], "out_proj", adapter, resolver, add, shape_of, usage)

    # Parameters targeted with `target_parameters` are nested as module(.base_layer)*; PEFT strips the nesting
    # when it matches names.
    depth = 0
    plain = module
    while plain.endswith(".base_layer"):
        plain, depth = plain[: -len(".base_layer")], depth + 1
    weight_name = f"{plain}.weight"
    target, why = resolver.resolve(weight_name)
    parameters = _targeted_parameters(plain, cfg.target_parameters or [])
    # A bare target_parameters entry ("down_proj") also ends an ordinary Linear's name; a module whose weight
    # exists is a module target.
    if parameters and target is None:
        return _plan_parameter(group, plain, parameters, A, B, adapter, resolver, add)
    if target is None and resolver.resolve(f"{plain}.in_proj_weight")[0] is not None:
        return _plan_attention(group, plain, "in_proj", adapter, resolver, add, shape_of, usage)
    if target is None:
        return [f"{group.A}: {why}"]
    if cfg.use_dora != bool(group.magnitude):
        return [
            f"{group.A}: adapter_config.json says use_dora={cfg.use_dora} but {plain} "
            f"{'has no' if cfg.use_dora else 'has a'} DoRA magnitude vector; the adapter is inconsistent "
            "(merging it either way would silently change the result)"
        ]
    base_shape = shape_of(target)
    groups = _conv_groups(A.shape, B.shape, base_shape)
    if groups > 1:
        return [
            _Unsupported(
                f"{group.A}: {target} is a grouped convolution (groups = {groups}): PEFT cannot merge a LoRA on a "
                "conv layer with groups > 1 either (its merge raises NotImplementedError); use the adapter unmerged, "
                f"or train it without targeting {plain}"
            )
        ]
    rank = A.shape[0]
    alpha, scale = adapter_scale(adapter, plain, rank)
    keys = (group.A, group.B)
    problems = []
    expanded = _block_diagonal(group, plain, A, B, base_shape, cfg, target)
    if isinstance(expanded, str):
        return [expanded]
    a_shape, b_shape, block_diagonal = expanded
    form, expected = None, None
    if len(A.shape) < 2 or len(B.shape) < 2 or b_shape[1] != rank:
        pass
    elif group.embedding:
        form, expected = "embedding", (A.shape[1], B.shape[0])
    elif len(base_shape) >= 3:
        form = "conv"
        expected = (B.shape[0], A.shape[1], *A.shape[2:]) if len(A.shape) == len(base_shape) else None
        if B.shape[2:] and any(d != 1 for d in B.shape[2:]):
            expected = None
    else:
        form, problem = _linear_orientation(plain, (b_shape[0], a_shape[1]), tuple(base_shape), cfg, resolver)
        if problem:
            return [f"{group.A}: {problem}"]
        expected = tuple(base_shape) if form else None
    if form is None or expected != tuple(base_shape):
        problems.append(
            f"{group.A}: LoRA A {list(A.shape)} / B {list(B.shape)} give a delta that does not fit {target} "
            f"{list(base_shape)}"
        )
        return problems
    if group.magnitude:
        mag = adapter.tensors[group.magnitude].shape
        want = {"embedding": base_shape[1], "linear_t": base_shape[1]}.get(form, base_shape[0])
        if math.prod(mag) != want or max(mag, default=0) != want:  # conv DoRA stores (1, out, 1, 1)
            problems.append(f"{group.magnitude}: DoRA magnitude {list(mag)} does not fit {target} {list(base_shape)}")
            return problems
    add(
        target,
        Update(
            kind="delta",
            form=form,
            module=plain,
            adapter_tensors=keys,
            rank=rank,
            alpha=alpha,
            scale=scale,
            magnitude=group.magnitude,
            block_diagonal=block_diagonal,
            nblocks=cfg.use_bdlora.nblocks if block_diagonal and cfg.use_bdlora else None,
        ),
    )
    if group.B_bias:
        bias, why = resolver.resolve(f"{plain}.bias")
        if bias is None:
            problems.append(
                f"{group.B_bias}: lora_bias is set but the base has no bias for {plain} ({why}); PEFT cannot merge "
                "this either"
            )
        elif shape_of(bias) != adapter.tensors[group.B_bias].shape:
            problems.append(f"{group.B_bias}: shape does not fit {bias}")
        else:
            add(
                bias,
                Update(
                    kind="delta",
                    form="bias",
                    module=plain,
                    adapter_tensors=(group.B_bias,),
                    rank=rank,
                    alpha=alpha,
                    scale=scale,
                ),
            )
    return problems


def _conv_groups(a: tuple[int, ...], b: tuple[int, ...], base: tuple[int, ...]) -> int:
    """The `groups` of a conv layer that a LoRA's factors imply (1 for anything else): PEFT's lora_A sees every
    input channel (r, in, k..), its lora_B is grouped (out, r/groups, 1..), the base weight is (out, in/groups, k..)."""
    if len(base) < 3 or len(a) != len(base) or len(b) != len(base) or not base[1] or a[1] % base[1]:
        return 1
    groups = a[1] // base[1]
    return groups if b[0] == base[0] and b[1] * groups == a[0] else 1


def _block_diagonal(
    group: _Group,
    module: str,
    A: AdapterTensor,
    B: AdapterTensor,
    base_shape: tuple[int, ...],
    cfg: Any,
    target: str,
) -> tuple[tuple[int, ...], tuple[int, ...], Literal["A", "B"] | None] | str:
    """(A's shape, B's shape, the block-diagonal factor) as the merge multiplies them, or the problem, for BD-LoRA
    (`use_bdlora`): PEFT's BlockDiagonalLinear stores an (out, in) factor as its nblocks diagonal blocks side by
    side, (out, in / nblocks), and its merge expands it with `torch.block_diag(*weight.chunk(nblocks))`."""
    side = cfg.use_bdlora.side(module) if cfg.use_bdlora else None
    if side is None:
        return tuple(A.shape), tuple(B.shape), None
    if side == "both":
        return _Unsupported(
            f"{group.A}: use_bdlora: {module} matches both target_modules_bd_a and target_modules_bd_b (PEFT refuses "
            "to build such a layer)"
        )
    if group.embedding or len(base_shape) != 2 or len(A.shape) != 2 or len(B.shape) != 2:
        return _Unsupported(f"{group.A}: BD-LoRA (use_bdlora) is defined for Linear layers, not {target}")
    blocks = cfg.use_bdlora.nblocks
    factor = A if side == "A" else B
    if factor.shape[0] % blocks:
        return f"{group.A}: LoRA {side} {list(factor.shape)} does not split into use_bdlora's {blocks} diagonal blocks"
    if side == "A":
        return (A.shape[0], A.shape[1] * blocks), tuple(B.shape), "A"
    return tuple(A.shape), (B.shape[0], B.shape[1] * blocks), "B"


def _plan_attention(
    group: _Group,
    attention: str,
    part: Literal["in_proj", "out_proj"],
    adapter: AdapterIndex,
    resolver: _Resolver,
    add: Any,
    shape_of: Any,
    usage: dict[str, list[str]],
) -> list[str]:
    """A LoRA on an nn.MultiheadAttention, as PEFT 0.21's `lora.MultiheadAttention` merges it.

    PEFT wraps the module (its LoRA updates `in_proj_weight`) and its out_proj, a LoRA Linear saved under
    `<attention>.base_layer.out_proj`; both get the attention module's r and alpha. Its merge adds the in_proj delta
    to `in_proj_weight` and the out_proj delta to `out_proj.weight`, each rounded to the weight's dtype and added in
    it, then merges the out_proj's own LoRA layer, which adds the out_proj delta a second time, as a Linear does (and
    lora_bias's bias once). Its forward merges and unmerges the same way, so the trained model saw that weight. The
    in_proj's lora_B.bias is used by neither."""
    A, B = adapter.tensors[group.A], adapter.tensors[group.B]
    name = f"{attention}.in_proj_weight" if part == "in_proj" else f"{attention}.out_proj.weight"
    target, why = resolver.resolve(name)
    if target is None:
        return [f"{group.A}: {why}"]
    if group.magnitude or adapter.config.use_dora:
        return [_Unsupported(f"{group.A}: PEFT has no DoRA for nn.MultiheadAttention ({attention}), nor a merge of it")]
    if adapter.config.use_bdlora:
        return [_Unsupported(f"{group.A}: BD-LoRA (use_bdlora) is defined for Linear layers, not {attention}")]
    base_shape = tuple(shape_of(target))
    rank = A.shape[0]
    if len(A.shape) != 2 or len(B.shape) != 2 or B.shape[1] != rank or (B.shape[0], A.shape[1]) != base_shape:
        return [
            f"{group.A}: LoRA A {list(A.shape)} / B {list(B.shape)} give a delta that does not fit {target} "
            f"{list(base_shape)}"
        ]
    alpha, scale = adapter_scale(adapter, attention, rank)
    dtype = resolver.catalog[target].dtype
    common: dict[str, Any] = dict(
        kind="delta", form="linear", adapter_tensors=(group.A, group.B), rank=rank, alpha=alpha, scale=scale
    )
    rounded_to = dtype if dtype in ("F16", "BF16") else None
    add(target, Update(module=f"{attention}.{part}", rounded_to=rounded_to, **common))
    if part == "out_proj":
        add(target, Update(module=group.module, **common))
    decision = (
        f"nn.MultiheadAttention {attention}: merged as PEFT 0.21 merges it: the in_proj delta into in_proj_weight, "
        "the out_proj delta into out_proj.weight twice (by MultiheadAttention.merge, then by out_proj's own LoRA "
        "merge; PEFT's forward applies it twice as well)"
    )
    if decision not in resolver.decisions:
        resolver.decisions.append(decision)
    if not group.B_bias:
        return []
    if part == "in_proj":
        usage[group.B_bias] = []
        resolver.decisions.append(
            f"{group.B_bias}: not merged: PEFT's nn.MultiheadAttention adds no in_proj LoRA bias (neither its merge "
            "nor its forward uses it)"
        )
        return []
    bias, why = resolver.resolve(f"{attention}.out_proj.bias")
    if bias is None:
        return [f"{group.B_bias}: lora_bias is set but the base has no bias for {attention}.out_proj ({why})"]
    if shape_of(bias) != adapter.tensors[group.B_bias].shape:
        return [f"{group.B_bias}: shape does not fit {bias}"]
    add(bias, Update(**{**common, "form": "bias", "adapter_tensors": (group.B_bias,)}, module=group.module))
    return []


def _linear_orientation(
    module: str, delta_shape: tuple[int, int], base_shape: tuple[int, ...], cfg: Any, resolver: _Resolver
) -> tuple[str | None, str | None]:
    """("linear" | "linear_t" | None, problem): is the weight stored (out, in) like nn.Linear or (in, out) like
    GPT-2's Conv1D? PEFT decides per module type (it forces fan_in_fan_out on for Conv1D, off for Linear) and
    saves whichever value it set last, so the config's flag cannot be trusted for every module."""
    out_features, in_features = delta_shape
    as_linear = base_shape == (out_features, in_features)
    as_conv1d = base_shape == (in_features, out_features)
    if as_linear and as_conv1d:  # square: the shape cannot tell
        conv1d = resolver.model_type in CONV1D_MODEL_TYPES and module.rpartition(".")[2] in CONV1D_MODULES
        if cfg.fan_in_fan_out and not conv1d and resolver.model_type not in LINEAR_ONLY_HINT:
            return None, (
                f"cannot tell whether {module} is stored (in, out) like a Conv1D or (out, in) like nn.Linear: "
                f"fan_in_fan_out is set and model_type {resolver.model_type!r} is not one this tool knows"
            )
        return ("linear_t" if conv1d else "linear"), None
    if as_linear:
        return "linear", None
    if as_conv1d:
        return "linear_t", None
    return None, None


def _targeted_parameters(module: str, target_parameters: list[str]) -> list[str]:
    names = []
    for target in sorted(set(target_parameters)):
        param = target.rpartition(".")[2]
        full = f"{module}.{param}"
        if full == target or full.endswith("." + target):
            names.append(param)
    return names


def _plan_parameter(
    group: _Group,
    module: str,
    parameters: list[str],
    A: AdapterTensor,
    B: AdapterTensor,
    adapter: AdapterIndex,
    resolver: _Resolver,
    add: Any,
) -> list[str]:
    """A LoRA on a fused 3-D expert parameter, written either to the fused tensor or to per-expert tensors."""
    layouts = {p: _parameter_layout(module, p, resolver) for p in parameters}
    candidates = []
    for param, found in layouts.items():
        if found is None:
            continue
        num_experts, d1, d2, targets = found
        if A.shape[0] % num_experts or not {(B.shape[0], A.shape[1]), (A.shape[1], B.shape[0])} & {(d1, d2)}:
            continue
        if not isinstance(targets, str) and (d1, d2) != (B.shape[0], A.shape[1]):
            continue  # per-expert Linear weights are always (out, in)
        candidates.append(param)
    if len(candidates) != 1:
        missing = [p for p, f in layouts.items() if f is None]
        why = (
            f"no tensor for {[f'{module}.{p}' for p in missing]} in the base"
            if missing and not candidates
            else f"A {list(A.shape)} / B {list(B.shape)} fit {len(candidates)} of the targeted parameters {parameters}"
        )
        return [f"{group.A}: {why}"]
    param = candidates[0]
    num_experts, d1, d2, targets = layouts[param]
    rank = A.shape[0] // num_experts
    alpha, scale = adapter_scale(adapter, f"{module}.{param}", rank)
    keys = (group.A, group.B)
    common = dict(
        module=f"{module}.{param}", adapter_tensors=keys, rank=rank, alpha=alpha, scale=scale, num_experts=num_experts
    )
    if isinstance(targets, str):
        # (E, out, in) unless the architecture stores (E, in, out) (PEFT follows the module's `is_transposed`);
        # only a square expert weight leaves the shapes unable to tell.
        as_eoi = (d1, d2) == (B.shape[0], A.shape[1])
        as_eio = (d1, d2) == (A.shape[1], B.shape[0])
        transposed = resolver.model_type in TRANSPOSED_EXPERT_MODEL_TYPES
        layout_name = "eio" if as_eio and (transposed or not as_eoi) else "eoi"
        add(targets, Update(kind="delta", form="experts", experts_layout=layout_name, **common))
        return []
    for expert, parts in enumerate(targets):
        start = 0
        for name in parts:
            rows = resolver.catalog[name].shape[0]
            add(name, Update(kind="delta", form="expert", expert=expert, rows=(start, start + rows), **common))
            start += rows
    return []


def _parameter_layout(
    module: str, param: str, resolver: _Resolver
) -> tuple[int, int, int, str | list[list[str]]] | None:
    """(experts, out, in, fused tensor name or per-expert tensor names) for a fused expert parameter."""
    fused, _ = resolver.resolve(f"{module}.{param}")
    if fused is not None:
        shape = resolver.catalog[fused].shape
        if len(shape) != 3 or shape[0] == 0:
            return None
        # Both storage orders exist ((E, out, in) and (E, in, out)); report (out, in) as (E, d1, d2) and let the
        # adapter's shapes pick: the caller checks A's in-dim and B's out-dim against them.
        return shape[0], shape[1], shape[2], fused
    prefixes = [module] + [p.rstrip(".") for p in _rewrites(module + ".")]
    for prefix in prefixes:
        for parts in EXPERT_SPLITS.get(param, ((param,),)):
            if f"{prefix}.0.{parts[0]}.weight" not in resolver.catalog:
                continue
            experts: list[list[str]] = []
            while all(f"{prefix}.{len(experts)}.{p}.weight" in resolver.catalog for p in parts):
                experts.append([f"{prefix}.{len(experts)}.{p}.weight" for p in parts])
            shapes = [[resolver.catalog[n].shape for n in names] for names in experts]
            in_features = shapes[0][0][1]
            out_features = sum(s[0] for s in shapes[0])
            if any(len(s) != 2 or s[1] != in_features for row in shapes for s in row) or any(
                [s[0] for s in row] != [s[0] for s in shapes[0]] for row in shapes
            ):
                return None
            return len(experts), out_features, in_features, experts
    return None


def _plan_tokens(
    key: str, module: str, adapter: AdapterIndex, resolver: _Resolver, add: Any, shape_of: Any
) -> list[str]:
    indices_cfg = adapter.config.trainable_token_indices
    if isinstance(indices_cfg, dict):
        matching = [v for k, v in indices_cfg.items() if module == k or module.endswith("." + k)]
        indices = matching[0] if len(matching) == 1 else None
    else:
        indices = indices_cfg
    if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
        return [f"{key}: trainable_token_indices in the adapter config gives no index list for {module}"]
    target, why = resolver.resolve(f"{module}.weight")
    if target is None:
        return [f"{key}: {why}"]
    rows, cols = shape_of(target)[:2]
    delta = adapter.tensors[key].shape
    if tuple(delta) != (len(indices), cols) or any(i < 0 or i >= rows for i in indices):
        return [f"{key}: {list(delta)} is not {len(indices)} token rows that fit {target} [{rows}, {cols}]"]
    add(target, Update(kind="rows", module=module, adapter_tensors=(key,), indices=tuple(indices)))
    return []


def _untied_head(
    header: ShardHeader, embedding: str, head: str, updates: dict[str, list[Update]], adapter: AdapterIndex
) -> PlannedTensor:
    """The output head of an untied output: a tensor the base does not store, in the embedding's shard after the
    shard's own tensors, starting from the embedding's base bytes."""
    entry = header.by_name()[embedding]
    head_updates = tuple(updates.get(head, ()))
    return PlannedTensor(
        base=entry.model_copy(update={"name": head}),
        shape=_replaced_shape(head_updates, adapter) or entry.shape,
        updates=head_updates,
        source=TensorRef(file=header.file, data_start=header.data_start, entry=entry),
    )


def _replaced_shape(updates: tuple[Update, ...], adapter: AdapterIndex) -> tuple[int, ...] | None:
    for update in reversed(updates):
        if update.kind == "replace":
            return tuple(adapter.tensors[update.adapter_tensors[0]].shape)
    return None
