"""The identity of a merge: exactly the inputs and options that decide the bytes it writes, versioned.

Two runs with the same fingerprint write the same bytes, so a run may take over what another committed (resume,
`validate --base --adapter`). Nothing that leaves the bytes alone is in it: where the arithmetic runs (`--device`),
checks that only pass or fail a run (`--min-delta-cosine`), how many shards run at once, where the inputs are mounted
(their URIs), or how the plan words its decisions. What the tool derives from the inputs (which update lands on
which tensor) is not hashed either: the inputs are, and `ALGORITHM_VERSION` stands for the derivation. A release
that changes the bytes written for the same inputs bumps `ALGORITHM_VERSION`; one that changes what is hashed here
bumps `FINGERPRINT_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .adapter import AdapterIndex
from .adapters import AdapterSet
from .safetensors_format import ShardHeader

# Bump whenever the bytes a merge writes for the same inputs could change.
ALGORITHM_VERSION = "1"
# Bump whenever what goes into the fingerprint changes.
FINGERPRINT_VERSION = "2"

# adapter_config.json fields that never change what a merge writes: where the base came from, and PEFT's
# bookkeeping for loading the adapter for inference.
ADAPTER_FIELDS_WITHOUT_EFFECT = frozenset(
    {"base_model_name_or_path", "revision", "inference_mode", "task_type", "auto_mapping"}
)


def merge_fingerprint(
    *,
    base_headers: list[ShardHeader],
    base_versions: dict[str, dict[str, Any]],
    base_config: bytes | None,
    adapters: AdapterSet,
    output_dtype: str,
) -> str:
    """sha256 of what decides the output bytes: each base shard's layout and object version, the base's
    config.json, each adapter's weights file (version and layout) and merge-relevant config, and its weight, the
    output dtype mode. One adapter at weight 1 is hashed as it was before adapter sets, so its outputs resume."""
    identity: dict[str, Any] = {
        "fingerprint_version": FINGERPRINT_VERSION,
        "algorithm_version": ALGORITHM_VERSION,
        "output_dtype": output_dtype,
        "base": {
            "config_sha256": hashlib.sha256(base_config).hexdigest() if base_config is not None else None,
            "shards": {
                h.file: {
                    "version": base_versions.get(h.file),
                    "header_bytes": h.header_bytes,
                    "metadata": h.metadata,
                    "tensors": [[e.name, e.dtype, list(e.shape), e.begin, e.end] for e in h.tensors],
                }
                for h in base_headers
            },
        },
    }
    if adapters.plain:
        identity["adapter"] = _adapter_identity(adapters.first)
    else:  # the order is part of it: it numbers the adapter tensors in the output's records
        identity["adapters"] = [{**_adapter_identity(m.index), "weight": m.weight} for m in adapters.members]
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _adapter_identity(adapter: AdapterIndex) -> dict[str, Any]:
    return {
        "file": adapter.file,
        "version": adapter.version,
        "config": {k: v for k, v in adapter.raw_config.items() if k not in ADAPTER_FIELDS_WITHOUT_EFFECT},
        "tensors": {k: [t.name, t.dtype, list(t.shape), t.begin, t.end] for k, t in adapter.tensors.items()},
    }
