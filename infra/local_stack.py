"""A production-like merge stack on one machine, every server on 127.0.0.1: a Prefect server with its UI on a real
database (SQLite, or PostgreSQL from the distribution's packages), a process work pool with one worker, and
SeaweedFS as the S3 store. Run it with the project's Python (the one that has prefect-lora-merge installed):

    python infra/local_stack.py start [--database postgres] [--dir .lora-merge-stack]
    eval "$(python infra/local_stack.py env)"      # PREFECT_API_URL and the S3 endpoint/credentials
    python infra/local_stack.py stop

Every process is started in its own session and stopped by its own PID (its process group); `stack.json` in the
stack's directory records them. The tests start the same stack through `start_stack` / `stop_stack`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from seaweedfs import S3ServerError, free_port_pairs, remove_leftover_sockets, start_seaweedfs  # noqa: E402

DEFAULT_DIR = ".lora-merge-stack"
POOL = "lora-merge"  # the work pool deployments/prefect.yaml names
BUCKET = "lora-merge"
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


class StackError(RuntimeError):
    """A component of the stack could not be started or reached."""


@dataclass
class Stack:
    root: str
    api_url: str
    s3_endpoint: str
    bucket: str
    database: str  # sqlite or postgres
    env: dict[str, str]  # what a client (or a worker) needs: PREFECT_API_URL, AWS_*
    pids: dict[str, int] = field(default_factory=dict)  # component -> PID of its process group leader
    postgres_dir: str | None = None
    s3_ports: dict[str, int] = field(default_factory=dict)  # SeaweedFS's ports: its leftover sockets are named by them

    @property
    def ui_url(self) -> str:
        """The Prefect UI: the server's root (its API is under /api)."""
        return self.api_url.removesuffix("/api")

    def save(self) -> None:
        Path(self.root, "stack.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, root: str | Path) -> Stack:
        path = Path(root, "stack.json")
        if not path.exists():
            raise StackError(f"no stack is recorded in {path}: start one with `local_stack.py start`")
        return cls(**json.loads(path.read_text()))


def _prefect(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def _spawn(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped as a whole, by its PID
        )


def _wait_for(url: str, process: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            state = f"exited with {process.returncode}" if process.poll() is not None else "did not answer in time"
            raise StackError(f"{what} {state} ({url}); last lines of {log}:\n{tail}")
        time.sleep(0.5)


def _base_env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


def _server_env(env: dict[str, str], port: int, api_url: str) -> dict[str, str]:
    """The server's own settings. `prefect server start --port` does not tell the UI where the API is: the UI's
    settings (`/ui-settings`) would name the default port, 4200, and the UI would talk to whatever listens there."""
    return {
        **env,
        "PREFECT_SERVER_UI_ENABLED": "true",
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_SERVER_UI_API_URL": api_url,
    }


def _postgres_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    raise StackError(f"PostgreSQL's `{name}` was not found: install the distribution's postgresql package")


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user then."""
    if os.geteuid() != 0:
        return command
    if shutil.which("runuser") is None:
        raise StackError("PostgreSQL cannot run as root and `runuser` is missing: start the stack as another user")
    return ["runuser", "-u", "postgres", "--", *command]


def _start_postgres(data: Path, port: int) -> str:
    """initdb + pg_ctl start on 127.0.0.1:port (socket in the data dir) + createdb; returns the asyncpg URL."""
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        subprocess.run(
            _as_postgres_user(
                [_postgres_bin("initdb"), "-D", str(data), "-U", "prefect", "--auth=trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
    options = f"-h 127.0.0.1 -p {port} -k {data}"
    subprocess.run(
        _as_postgres_user(
            [_postgres_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(data / "log"), "-w", "start"]
        ),
        check=True,
        capture_output=True,
    )
    created = subprocess.run(
        [_postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"],
        capture_output=True,
        text=True,
    )
    if created.returncode != 0 and "already exists" not in created.stderr:
        raise StackError(f"createdb failed: {created.stderr.strip()}")
    return f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"


def start_stack(
    root: str | Path = DEFAULT_DIR, *, database: str = "sqlite", pool: str = POOL, worker_env: dict | None = None
) -> Stack:
    """Start SeaweedFS, (PostgreSQL,) a Prefect server, the process work pool and a worker; return the stack.

    `worker_env` is added to the worker's environment (and so to every flow run it starts)."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    _refuse_a_running_stack(root)
    prefect_port, postgres_port, health_port = free_port_pairs(3)
    env = _base_env(root)
    stack = Stack(str(root), f"http://127.0.0.1:{prefect_port}/api", "", BUCKET, database, {})
    try:
        s3 = start_seaweedfs(root / "s3", start_new_session=True)
        stack.pids["seaweedfs"] = s3.process.pid
        stack.s3_ports = s3.ports
        stack.s3_endpoint = s3.endpoint_url
        s3.make_bucket(BUCKET)
        server_env = _server_env(env, prefect_port, stack.api_url)
        if database == "postgres":
            data = root / "postgres"
            stack.postgres_dir = str(data)  # recorded first: a failed start is still stopped
            url = _start_postgres(data, postgres_port)
            server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = url
        elif database != "sqlite":
            raise StackError(f"--database {database!r}: choose sqlite or postgres")
        log = root / "prefect-server.log"
        server = _spawn(
            _prefect("server", "start", "--host", "127.0.0.1", "--port", str(prefect_port), "--ui"),
            log,
            server_env,
            root,
        )
        stack.pids["prefect-server"] = server.pid
        stack.save()
        _wait_for(f"{stack.api_url}/health", server, "the Prefect server", log)
        _wait_for(f"{stack.ui_url}/ui-settings", server, "the Prefect UI", log)

        stack.env = {"PREFECT_API_URL": stack.api_url, **s3.env()}
        client_env = {**env, **stack.env}
        subprocess.run(
            _prefect("work-pool", "create", pool, "--type", "process", "--overwrite"),
            env=client_env,
            cwd=root,
            check=True,
            capture_output=True,
        )
        worker_log = root / "worker.log"
        worker = _spawn(
            _prefect("worker", "start", "--pool", pool, "--name", f"{pool}-local", "--with-healthcheck"),
            worker_log,
            {
                **client_env,
                "PREFECT_WORKER_QUERY_SECONDS": "2",
                "PREFECT_WORKER_WEBSERVER_HOST": "127.0.0.1",
                "PREFECT_WORKER_WEBSERVER_PORT": str(health_port),
                **(worker_env or {}),
            },
            root,
        )
        stack.pids["worker"] = worker.pid
        stack.save()
        _wait_for(f"http://127.0.0.1:{health_port}/health", worker, "the worker", worker_log)
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def _refuse_a_running_stack(root: Path) -> None:
    try:
        running = Stack.load(root)
    except StackError:
        return
    alive = [name for name, pid in running.pids.items() if _group_alive(pid)]
    if alive:
        raise StackError(
            f"a stack is already running in {root} ({', '.join(alive)}; {running.api_url}): use it, or stop it "
            f"first with `local_stack.py stop --dir {root}`"
        )


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_group(pid: int) -> None:
    """SIGINT (what a Prefect worker and server shut down on), then SIGTERM, then SIGKILL, to the process group."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _group_alive(pid):
                return
            time.sleep(0.2)


def stop_stack(stack: Stack) -> None:
    """Stop every component by its PID, newest first; PostgreSQL through pg_ctl."""
    for name in ("worker", "prefect-server", "seaweedfs"):
        if name in stack.pids:
            _stop_group(stack.pids.pop(name))
    if stack.s3_ports:
        remove_leftover_sockets(Path(stack.root, "s3"), stack.s3_ports)
    if stack.postgres_dir and Path(stack.postgres_dir, "postmaster.pid").exists():
        subprocess.run(
            _as_postgres_user([_postgres_bin("pg_ctl"), "-D", stack.postgres_dir, "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )
    if Path(stack.root).exists():
        stack.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="local_stack.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "env", "stop"))
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"where the stack keeps its data (default: {DEFAULT_DIR})")
    parser.add_argument("--database", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--pool", default=POOL, help=f"the process work pool (default: {POOL})")
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            stack = start_stack(args.dir, database=args.database, pool=args.pool)
            print(
                f"Prefect server {stack.api_url} ({stack.database}), work pool {args.pool} with one worker, "
                f"S3 {stack.s3_endpoint} (bucket {stack.bucket}); data in {stack.root}"
            )
            print(f"Prefect UI: {stack.ui_url} (flow runs: their graph, logs and artifacts)")
            print(f'eval "$({sys.executable} {__file__} env --dir {args.dir})"  # to use it from this shell')
        elif args.command == "env":
            for key, value in Stack.load(args.dir).env.items():
                print(f"export {key}={value}")
        else:
            stop_stack(Stack.load(args.dir))
            print("stopped")
    except (StackError, S3ServerError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None)
        print(
            f"local_stack.py: error: {exc}{': ' + detail.decode(errors='replace') if detail else ''}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
