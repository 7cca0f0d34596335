"""The safetensors format: a strict header reader and the layout/encoding of headers we write.

Layout: 8-byte little-endian u64 `N`, `N` bytes of JSON (`{name: {dtype, shape, data_offsets}}` plus an optional
`__metadata__` string map, space-padded), then the data buffer. Offsets are relative to the buffer and must tile
it exactly. The reader refuses anything else, naming the file and tensor, because a header that lies is how a
truncated upload or a hand-edited shard turns into silently wrong weights.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from .errors import CheckpointFormatError
from .storage import Location

# The official reader refuses headers above 100 MB; so do we, before allocating anything.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})  # floating-point dtypes a merge computes in
MAX_HEADER_BYTES = 100_000_000

# Tensors of these dtypes can be decoded (and so merged into, or used as adapter weights).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
# Every dtype the official format knows, in bits per element: tensors of any of them are copied byte for byte.
DTYPE_BITS: dict[str, int] = {
    **{name: size * 8 for name, (_, size) in DTYPES.items()},
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "F4": 4,
    "C64": 64,
}


def torch_dtype(dtype: str) -> torch.dtype:
    return DTYPES[dtype][0]


def dtype_name(dtype: torch.dtype) -> str:
    for name, (candidate, _) in DTYPES.items():
        if candidate == dtype:
            return name
    raise CheckpointFormatError(f"torch dtype {dtype} has no safetensors name")


class TensorEntry(BaseModel):
    """One tensor of a shard: where its bytes are, relative to the data buffer."""

    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    file: str
    header_bytes: int  # N, the JSON length (without the 8-byte prefix)
    tensors: tuple[TensorEntry, ...]  # in data order
    metadata: dict[str, str] | None
    file_size: int

    @property
    def data_start(self) -> int:
        return 8 + self.header_bytes

    def by_name(self) -> dict[str, TensorEntry]:
        return {t.name: t for t in self.tensors}


def expected_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise CheckpointFormatError(f"a {dtype} tensor of shape {list(shape)} does not fill whole bytes")
    return bits // 8


def read_header(location: Location, file: str, *, file_size: int | None = None) -> ShardHeader:
    """Read and check one safetensors header with two small ranged reads; the data is not touched."""
    where = location.describe(file)
    size = location.size(file) if file_size is None else file_size
    if size < 8:
        raise CheckpointFormatError(f"{where} is {size} bytes, too short for a safetensors file (truncated?)")
    (header_len,) = struct.unpack("<Q", location.read_bytes(file, 0, 8))
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointFormatError(
            f"{where} declares a {header_len:,}-byte header, above the {MAX_HEADER_BYTES:,}-byte limit: the file is "
            "corrupt or not safetensors; re-download or re-export it"
        )
    if 8 + header_len > size:
        raise CheckpointFormatError(
            f"{where} declares a {header_len:,}-byte header but the file has only {size:,} bytes (truncated?)"
        )
    raw = location.read_bytes(file, 8, 8 + header_len)
    try:
        # Strict UTF-8: json.loads(bytes) would also accept UTF-16 and a BOM, which the official reader refuses.
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointFormatError(f"{where}: the header is not valid JSON ({exc}); the file is corrupt") from None
    if not isinstance(parsed, dict):
        raise CheckpointFormatError(f"{where}: the header is not a JSON object; the file is corrupt")
    metadata = parsed.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointFormatError(f"{where}: __metadata__ must map strings to strings")
    entries = [_entry(where, name, spec) for name, spec in parsed.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    data_size = size - 8 - header_len
    position = 0
    for entry in entries:
        if entry.begin != position:
            problem = "overlaps the previous tensor" if entry.begin < position else "leaves a gap before it"
            raise CheckpointFormatError(
                f"{where}: tensor {entry.name!r} starts at data offset {entry.begin} but the previous tensor ends at "
                f"{position} ({problem}): the header's offsets lie; the file is corrupt"
            )
        position = entry.end
    if position != data_size:
        raise CheckpointFormatError(
            f"{where}: the header's tensors cover {position:,} data bytes but the file holds {data_size:,} "
            f"({'truncated' if data_size < position else 'trailing bytes'}); re-download or re-export it"
        )
    return ShardHeader(file=file, header_bytes=header_len, tensors=tuple(entries), metadata=metadata, file_size=size)


def _entry(where: str, name: str, spec: object) -> TensorEntry:
    if not isinstance(spec, dict):
        raise CheckpointFormatError(f"{where}: tensor {name!r} has no dtype/shape/data_offsets object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise CheckpointFormatError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise CheckpointFormatError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointFormatError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
    try:
        need = expected_nbytes(dtype, tuple(shape))
    except CheckpointFormatError as exc:
        raise CheckpointFormatError(f"{where}: tensor {name!r}: {exc}") from None
    if offsets[1] - offsets[0] != need:
        raise CheckpointFormatError(
            f"{where}: tensor {name!r} ({dtype} {shape}) needs {need} bytes but its data_offsets span "
            f"{offsets[1] - offsets[0]}: the header lies; the file is corrupt"
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def weight_map_problem(weight_map: dict[str, Any]) -> str | None:
    """What is wrong with a sharded checkpoint index's weight_map, if anything: each entry must map a tensor name to
    the file name of a .safetensors shard beside the index."""
    bad = [
        f"{name!r} -> {json.dumps(file)}"
        for name, file in weight_map.items()
        if not (isinstance(file, str) and file.endswith(".safetensors") and not re.search(r"[/\\]", file))
    ]
    if not bad:
        return None
    more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
    return (
        "weight_map must map each tensor name to the file name of a .safetensors shard in the same directory, not "
        f"{'; '.join(bad[:3])}{more}"
    )


def layout(specs: list[tuple[str, str, tuple[int, ...]]]) -> tuple[TensorEntry, ...]:
    """Offsets for tensors written back to back in the given order."""
    entries, position = [], 0
    for name, dtype, shape in specs:
        size = expected_nbytes(dtype, shape)
        entries.append(TensorEntry(name=name, dtype=dtype, shape=shape, begin=position, end=position + size))
        position += size
    return tuple(entries)


def encode_header(entries: tuple[TensorEntry, ...], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length plus the JSON header, padded with spaces so the data starts 8-byte aligned."""
    body: dict[str, object] = {}
    if metadata is not None:
        body["__metadata__"] = metadata
    for e in entries:
        body[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    raw = json.dumps(body, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_from_bytes(data: bytes | bytearray, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    if len(data) == 0:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    buffer = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buffer, dtype=torch_dtype(dtype)).reshape(shape)
