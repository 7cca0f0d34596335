"""The tests' S3 server: infra/seaweedfs.py (SeaweedFS on 127.0.0.1), and the bucket the session fixture creates."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "infra"))

from seaweedfs import (  # noqa: E402
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    S3Server,
    S3ServerError,
    free_port_pairs,
    seaweedfs,
    start_seaweedfs,
    stop_seaweedfs,
    weed_binary,
)

BUCKET = "lora-merge-tests"

__all__ = [
    "ACCESS_KEY",
    "BUCKET",
    "REGION",
    "SECRET_KEY",
    "S3Server",
    "S3ServerError",
    "free_port_pairs",
    "seaweedfs",
    "start_seaweedfs",
    "stop_seaweedfs",
    "weed_binary",
]
