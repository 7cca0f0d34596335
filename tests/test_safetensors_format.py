"""The strict header reader agrees with the official safetensors reader on what is a valid file."""

from __future__ import annotations

import json
import struct

import pytest
from safetensors import safe_open

from prefect_lora_merge.core.errors import CheckpointFormatError
from prefect_lora_merge.core.safetensors_format import encode_header, layout, read_header
from prefect_lora_merge.core.storage import Location

F32_PAIR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _file(tmp_path, name: str, header: bytes, data: bytes = b"\0" * 8) -> str:
    (tmp_path / name).write_bytes(struct.pack("<Q", len(header)) + header + data)
    return name


def _official_accepts(path) -> bool:
    try:
        with safe_open(str(path), framework="numpy") as handle:
            list(handle.keys())
        return True
    except Exception:
        return False


@pytest.mark.parametrize(
    ("name", "header", "data"),
    [
        ("plain", json.dumps({"a": F32_PAIR}).encode(), b"\0" * 8),
        ("utf8 BOM", b"\xef\xbb\xbf" + json.dumps({"a": F32_PAIR}).encode(), b"\0" * 8),
        ("utf16", json.dumps({"a": F32_PAIR}).encode("utf-16-le"), b"\0" * 8),
        (
            "zero-size tensor",
            json.dumps({"z": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]}, "a": F32_PAIR}).encode(),
            b"\0" * 8,
        ),
        ("empty", b"{}", b""),
        ("metadata not strings", json.dumps({"__metadata__": {"k": 1}, "a": F32_PAIR}).encode(), b"\0" * 8),
        ("float shape", json.dumps({"a": {**F32_PAIR, "shape": [2.0]}}).encode(), b"\0" * 8),
    ],
)
def test_accepts_exactly_what_the_official_reader_accepts(tmp_path, name, header, data):
    file = _file(tmp_path, "x.safetensors", header, data)
    location = Location.parse(str(tmp_path))
    try:
        read_header(location, file)
        ours = True
    except CheckpointFormatError:
        ours = False
    assert ours == _official_accepts(tmp_path / file), name


@pytest.mark.parametrize(("dtype", "shape"), [("F8_E8M0", [8]), ("F4", [16]), ("C64", [1])])
def test_dtypes_without_arithmetic_here_are_still_read_so_they_can_be_copied(tmp_path, dtype, shape):
    file = _file(
        tmp_path, "x.safetensors", json.dumps({"a": {"dtype": dtype, "shape": shape, "data_offsets": [0, 8]}}).encode()
    )
    header = read_header(Location.parse(str(tmp_path)), file)
    assert [(t.name, t.dtype, t.nbytes) for t in header.tensors] == [("a", dtype, 8)]


def test_written_headers_are_read_back_by_the_official_reader(tmp_path):
    entries = layout([("b", "BF16", (3, 5)), ("a", "F32", (7,)), ("empty", "F16", (0,))])
    blob = encode_header(entries, {"format": "pt"})
    assert len(blob) % 8 == 0, "data must start 8-byte aligned"
    (tmp_path / "w.safetensors").write_bytes(blob + b"\1" * entries[-1].end)
    with safe_open(str(tmp_path / "w.safetensors"), framework="numpy") as handle:
        assert sorted(handle.keys()) == ["a", "b", "empty"]
        assert handle.metadata() == {"format": "pt"}
