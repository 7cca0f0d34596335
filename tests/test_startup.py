"""Start-up of `lora-merge run` without PREFECT_API_URL: Prefect's ephemeral server is launched before the CLI imports
torch and the flow, the flow uses that server (Prefect starts none of its own), and no server outlives the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _run_cli(prefect_home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PREFECT_LOGGING_LEVEL="INFO",  # Prefect logs each temporary server it starts itself
    )
    command = [sys.executable, "-m", "prefect_lora_merge.cli", "run", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _processes_with_home(prefect_home: Path) -> list[str]:
    """The command lines of live processes whose environment names this PREFECT_HOME."""
    entry = f"PREFECT_HOME={prefect_home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ = (proc / "environ").read_bytes()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry in environ.split(b"\0"):
            found.append(cmdline)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads other processes' environments in /proc")
def test_a_merge_runs_on_the_server_launched_ahead_and_stops_it(llama_case, tmp_path):
    home = tmp_path / "prefect-home"
    result = _run_cli(
        home,
        *("--verbose", "--device", "cpu", "--workers", "1"),
        *("--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir)),
        *("--output", str(tmp_path / "merged")),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "merged" / "lora-merge-manifest.json").is_file()
    assert "Beginning flow run" in result.stdout, result.stdout
    started = [line for line in result.stdout.splitlines() if "Starting temporary server" in line]
    assert started == [], started  # the flow's client found the server launched ahead running
    stopped = [line for line in result.stdout.splitlines() if "Stopping temporary server" in line]
    assert len(stopped) == 1, result.stdout  # and Prefect stopped it at exit, as its own
    assert _processes_with_home(home) == []


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads other processes' environments in /proc")
def test_a_run_refused_for_its_options_leaves_no_server_behind(llama_case, tmp_path):
    home = tmp_path / "prefect-home"
    result = _run_cli(
        home,
        *("--base", str(llama_case.base_dir), "--adapter", str(llama_case.adapter_dir)),
        *("--output", str(tmp_path / "merged"), "--storage-block", "no such block!"),
    )
    assert result.returncode != 0
    assert "--storage-block" in result.stderr and "not a block's name" in result.stderr, result.stderr
    assert not (tmp_path / "merged").exists()
    assert _processes_with_home(home) == []
