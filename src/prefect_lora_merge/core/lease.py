"""One writer per output: a lease object in the output, created only if absent, renewed while the merge runs."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
        try:
            until = datetime.fromtimestamp(self.expires, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        except (OverflowError, OSError, ValueError):  # a lease file this tool did not write
            until = f"{self.expires!r}, not a time"
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
        except (PermissionError, OverflowError, OSError):  # someone else's process, or no pid this host can have
            return False
    return False


def _read(output: Location) -> Lease | None:
    try:
        return Lease.model_validate_json(output.read_bytes(LEASE_FILE))
    except (LoraMergeError, ValueError):
        return None


def _take(output: Location, lease: Lease) -> tuple[bool, Lease | None]:
    """Create the lease object for `lease`: (True, None) when taken, else (False, the live lease in the way, or None
    when another run took a stale lease over at the same moment)."""
    for _ in range(2):
        if output.create_exclusive(LEASE_FILE, lease.model_dump_json().encode()):
            return True, None
        current = _read(output)
        if current is not None and not _stale(current, time.time()):
            return False, current
        output.remove(LEASE_FILE)  # stale or unreadable: take it over (the create above decides any race)
    return False, _read(output)


# How often a waiting run looks at the lease again.
WAIT_POLL_SECONDS = 5.0


@contextmanager
def output_lease(
    output: Location,
    *,
    break_lock: bool = False,
    wait: bool = False,
    ttl: float = DEFAULT_TTL_SECONDS,
    on_wait: Callable[[Lease], None] | None = None,
) -> Iterator[Lease]:
    """Hold the output's lease for the duration of the block. If a live run has it: refuse, naming the holder, or
    with `wait` poll until that run lets it go (it finishes, or dies and its lease expires); `on_wait` hears of the
    holder once."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    if break_lock:
        output.remove(LEASE_FILE)
    waited_for: str | None = None
    while True:
        now = time.time()
        lease = Lease(holder=holder, acquired=now, expires=now + ttl)
        taken, current = _take(output, lease)
        if taken:
            break
        if not wait:
            if current is None:
                raise OutputLocked(f"{output.uri}: could not take the output's lease; another run is starting, retry")
            raise OutputLocked(
                f"{output.uri} is being written by another run: {current.describe()}; wait for it to finish "
                "(--wait-for-output), or pass --break-lock if that run is dead"
            )
        if current is not None and current.holder != waited_for:
            waited_for = current.holder
            if on_wait is not None:
                on_wait(current)
        time.sleep(WAIT_POLL_SECONDS)

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
            output.remove_empty_directory(LEASE_FILE.rpartition("/")[0])  # a refused run leaves nothing behind
