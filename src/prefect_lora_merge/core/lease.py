"""One writer per output: a lease object in the output, created only if absent, renewed while the merge runs."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from pydantic import BaseModel

from .errors import LoraMergeError, OutputLocationError
from .storage import Location

LEASE_FILE = ".lora-merge/lease.json"
DEFAULT_TTL_SECONDS = 120.0


class Lease(BaseModel):
    holder: str  # host:pid:nonce
    acquired: float
    expires: float

    @property
    def host(self) -> str:
        return self.holder.split(":")[0]

    @property
    def pid(self) -> int:
        try:
            return int(self.holder.split(":")[1])
        except (IndexError, ValueError):
            return -1

    def describe(self) -> str:
        until = datetime.fromtimestamp(self.expires, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.holder} (lease valid until {until})"


class OutputLocked(OutputLocationError):
    """Another run holds the output's lease."""


def _stale(lease: Lease, now: float) -> bool:
    """Expired, or held by a process of this host that no longer exists (a run killed a moment ago)."""
    if lease.expires < now:
        return True
    if lease.host == socket.gethostname() and lease.pid > 0:
        try:
            os.kill(lease.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return False


def _read(output: Location) -> Lease | None:
    try:
        return Lease.model_validate_json(output.read_bytes(LEASE_FILE))
    except (LoraMergeError, ValueError):
        return None


@contextmanager
def output_lease(output: Location, *, break_lock: bool = False, ttl: float = DEFAULT_TTL_SECONDS) -> Iterator[Lease]:
    """Hold the output's lease for the duration of the block; refuse, naming the holder, if a live run has it."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    now = time.time()
    lease = Lease(holder=holder, acquired=now, expires=now + ttl)
    if break_lock:
        output.remove(LEASE_FILE)
    for _ in range(2):
        if output.create_exclusive(LEASE_FILE, lease.model_dump_json().encode()):
            break
        current = _read(output)
        if current is not None and not _stale(current, time.time()):
            raise OutputLocked(
                f"{output.uri} is being written by another run: {current.describe()}; wait for it to finish, or "
                "pass --break-lock if that run is dead"
            )
        output.remove(LEASE_FILE)  # stale or unreadable: take it over (the create above decides any race)
    else:
        raise OutputLocked(f"{output.uri}: could not take the output's lease; another run is starting, retry")

    stop = threading.Event()
    lost: list[str] = []

    def renew() -> None:
        while not stop.wait(ttl / 3):
            current = _read(output)
            if current is None or current.holder != holder:
                lost.append(current.describe() if current else "nobody (the lease was removed)")
                return
            renewed = lease.model_copy(update={"expires": time.time() + ttl})
            try:
                output.write_bytes(LEASE_FILE, renewed.model_dump_json().encode())
            except LoraMergeError:
                continue  # try again next period; the lease is valid for three periods

    thread = threading.Thread(target=renew, name="lora-merge-lease", daemon=True)
    thread.start()
    try:
        yield lease
        if lost:
            raise OutputLocked(f"{output.uri}: this run lost its lease to {lost[0]} while merging; re-run the merge")
    finally:
        stop.set()
        thread.join(timeout=5)
        current = _read(output)
        if current is not None and current.holder == holder:
            output.remove(LEASE_FILE)
