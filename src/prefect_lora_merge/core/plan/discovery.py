"""Finding the base: its shards (from the index or the directory), their headers and versions, the index checked
against the headers, config.json, and the side files that go to the output unchanged. Headers only: no tensor
data is read here."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import CheckpointFormatError
from ..safetensors_format import ShardHeader, read_header, weight_map_problem
from ..storage import Location
from .model import OWN_FILES

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def parse_config(base: Location, data: bytes | None) -> dict[str, Any]:
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


def is_extra_file(name: str) -> bool:
    """Files of the base that go to the output unchanged: not weights, not hidden (the state directory among
    them), never this tool's own files (a base may itself be a merged output: its manifest and report describe
    that merge, not this one)."""
    if name.startswith(".") or name in OWN_FILES:
        return False
    return not (name.endswith(WEIGHT_SUFFIXES) or name.endswith(WEIGHT_INDEX_SUFFIXES))


def base_layout(base: Location) -> tuple[list[str], dict[str, str] | None, dict[str, Any], bool]:
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


def read_headers(base: Location, files: list[str]) -> tuple[list[ShardHeader], dict[str, dict[str, Any]]]:
    # Headers are small; on object storage the latency of one ranged read dominates, so read them concurrently.
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        headers = list(pool.map(lambda f: read_header(base, f), files))
        versions = dict(zip(files, pool.map(base.version, files), strict=True))
    return headers, versions


def check_index(base: Location, headers: list[ShardHeader], weight_map: dict[str, str] | None) -> None:
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
