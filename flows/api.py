"""The Prefect API a merge talks to: the server in PREFECT_API_URL, or else Prefect's ephemeral server, a subprocess
that Prefect starts at a run's first API call and stops when the process exits.

Starting that subprocess is most of a small merge's start-up (~5 s here: it imports and builds Prefect's whole
server), and nothing needs it while this process imports torch and the flow (~1.5 s). So `start_ephemeral_api`
launches it first, with the command and environment Prefect's `SubprocessASGIServer` uses, and `EarlyApi.ready`
hands the process to Prefect's one ephemeral server of this process: the flow's client finds it running, and
Prefect stops it at exit as its own. Where any of that does not hold (another Prefect, a port taken), the launched
process is stopped and Prefect starts its server itself, as without this module."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class EarlyApi:
    """Prefect's ephemeral server launched ahead of the flow: `ready()` waits for it and hands it to Prefect,
    `cancel()` stops it (the run was refused before it needed an API)."""

    def __init__(self, process: subprocess.Popen | None = None, port: int = 0) -> None:
        self.process, self.port = process, port

    def ready(self) -> None:
        if self.process is not None:
            _hand_to_prefect(self.process, self.port)
            self.process = None

    def cancel(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


def start_ephemeral_api() -> EarlyApi:
    """Without PREFECT_API_URL, launch Prefect's ephemeral server now (with a server configured: nothing to do)."""
    import prefect
    from prefect.settings import PREFECT_API_URL, get_current_settings

    if PREFECT_API_URL.value():
        return EarlyApi()
    port = _free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__module_path__).parent)),
            *("--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)),
            *("--log-level", "error", "--lifespan", "on"),
        ],
        env={
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        },
    )
    return EarlyApi(process, port)


@contextmanager
def ephemeral_api_ahead() -> Iterator[EarlyApi]:
    """`start_ephemeral_api` for a block that calls `ready()` before its flow: a server not handed to Prefect by the
    block's end (a refusal, an interrupt) is stopped."""
    api = start_ephemeral_api()
    try:
        yield api
    finally:
        api.cancel()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _hand_to_prefect(process: subprocess.Popen, port: int) -> None:
    import atexit

    import httpx
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    server = SubprocessASGIServer()
    expected = ("port", "server_process", "running", "stop", "api_url")
    if server.running or not all(hasattr(server, name) for name in expected):
        _stop(process)  # a Prefect this module does not know: let it start its own
        return
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    with httpx.Client() as client:
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if client.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            _stop(process)  # exited (its port taken) or too slow: Prefect starts its own, and reports its errors
            return
    server.port, server.server_process, server.running = port, process, True
    atexit.register(server.stop)


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
