"""How many shards one machine merges at once, and with how many compute threads each, from the plan's memory
estimate, a memory budget and the CPU count."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from .errors import LoraMergeError

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# What --device accepts; whether this machine has that device is for `core.merge.resolve_device` to say.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def parse_size(text: str | int, option: str = "--max-memory") -> int:
    """Bytes from '24GiB', '500MB', '1.5TB' or a plain number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise LoraMergeError(f"{option} {text!r} is not a size: write it like 16GiB, 500MB or 2000000000")
    return int(float(match.group(1)) * _UNITS[unit])


def available_memory() -> int:
    """Memory this machine can give a merge now: MemAvailable on Linux (free plus reclaimable page cache), else
    half the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which containers and `taskset` narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def human(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


@dataclass(frozen=True)
class Parallelism:
    workers: int  # shards merged at once
    threads: int  # threads of each shard's elementwise tile passes (torch intra-op threads)
    reason: str  # one line for the log: how the numbers were chosen
    budget: int  # the memory budget the numbers were chosen within (bytes)


def choose_parallelism(
    peak_per_shard: int,
    shards_to_do: int,
    *,
    workers: int | None = None,
    max_memory: int | None = None,
    cpus: int | None = None,
    option: str = "--workers",
) -> Parallelism:
    """Shards at once: `workers` when given, else as many as the CPUs, the shards left and the memory budget allow.

    Each shard runs three threads (read, compute, write + hash); the compute thread gets the CPUs the other
    workers leave, less one for the I/O threads, and at least one: oversubscribed intra-op threads cost ~20% on
    2 cores (measured). The budget is `max_memory`, or 80% of the memory available now. A shard larger than an
    explicit `max_memory` is refused; larger than the default budget, it runs alone (the estimate is an upper bound,
    and the memory available now is not all the machine can give). `option` names `workers` in errors.
    """
    cpus = cpus or cpu_count()
    budget = max_memory if max_memory is not None else available_memory() * 4 // 5
    if budget < peak_per_shard and max_memory is not None:
        raise LoraMergeError(
            f"one shard's merge needs about {human(peak_per_shard)} (its largest touched tensor in float32 plus "
            f"read and write buffers), more than the memory budget of {human(budget)} (--max-memory); raise "
            "--max-memory, or merge on a larger machine"
        )
    if budget < peak_per_shard and workers is None:
        threads = max(1, cpus - 1)
        return Parallelism(
            1,
            threads,
            f"1 at once: one shard needs about {human(peak_per_shard)}, more than 80% of the memory available now "
            f"({human(budget)}); {threads} compute thread(s)",
            budget,
        )
    fits = max(1, budget // max(1, peak_per_shard))
    if workers is not None:
        if max_memory is not None and workers > fits:
            raise LoraMergeError(
                f"{option} {workers} needs about {human(workers * peak_per_shard)} ({human(peak_per_shard)} per "
                f"shard), more than --max-memory {human(max_memory)}; use {option} {fits} or fewer, or leave "
                f"{option} out to choose automatically"
            )
        chosen, reason = workers, f"{option} {workers}"
    else:
        bounds = [(cpus, f"{cpus} CPUs"), (max(1, shards_to_do), f"{shards_to_do} shard(s) to merge")]
        bounds.append((fits, f"memory: {fits} × {human(peak_per_shard)} fit in {human(budget)}"))
        chosen, limit = min(bounds, key=lambda bound: bound[0])
        reason = f"{chosen} at once, bounded by {limit}"
    threads = max(1, cpus // chosen - 1)
    return Parallelism(chosen, threads, f"{reason}; {threads} compute thread(s) each", budget)


# Memory a Dask worker process needs besides its shard merges: the interpreter, torch, Prefect and the engine's
# results (measured ~0.6 GiB RSS for an idle worker that has imported them; rounded up).
WORKER_RUNTIME_BYTES = 1 << 30


@dataclass(frozen=True)
class WorkerCapacity:
    """One worker of a cluster, as its scheduler describes it."""

    address: str
    threads: int
    memory_limit: int  # bytes; 0: no limit
    resources: dict[str, float]  # abstract resources the worker advertises, e.g. {"MEMORY": 16e9, "GPU": 1}


@dataclass(frozen=True)
class ClusterPlacement:
    """Where shard tasks may run on a cluster, and how many at once."""

    slots: int  # shard tasks the eligible workers can hold at once
    workers: tuple[str, ...] | None  # the only workers a shard may run on; None: any
    resources: dict[str, float]  # what each shard task claims of a worker's advertised resources
    reason: str


def place_on_cluster(
    workers: list[WorkerCapacity], peak_per_shard: int, *, gpu: bool, cluster: str
) -> ClusterPlacement:
    """Shard tasks on a Dask cluster within each worker's memory limit (and on GPU workers for a cuda merge).

    A worker holds min(its threads, its memory ÷ the plan's per-shard estimate) shards. Its memory is its
    advertised `MEMORY` resource when it has one (Dask then enforces it per worker: every shard task claims the
    estimate), else its memory limit less `WORKER_RUNTIME_BYTES`. Workers that cannot hold one shard are left
    out; with none left, the merge is refused before anything is written.
    """
    if not workers:
        raise LoraMergeError(f"the Dask cluster at {cluster} has no workers: start some, then re-run")
    if gpu:
        candidates = [w for w in workers if w.resources.get("GPU", 0) >= 1]
        if not candidates:
            raise LoraMergeError(
                f"device cuda on the Dask cluster at {cluster}: no worker advertises a GPU resource; start GPU "
                "workers with `dask worker --resources GPU=1` (one per GPU), or merge with --device cpu"
            )
    else:
        candidates = list(workers)
    slots: dict[str, int] = {}
    for worker in candidates:
        if "MEMORY" in worker.resources:
            fits = int(worker.resources["MEMORY"] // max(1, peak_per_shard))
        elif worker.memory_limit:
            fits = max(0, worker.memory_limit - WORKER_RUNTIME_BYTES) // max(1, peak_per_shard)
        else:
            fits = worker.threads
        if gpu:
            fits = min(fits, int(worker.resources["GPU"]))
        if min(worker.threads, fits) >= 1:
            slots[worker.address] = min(worker.threads, fits)
    if not slots:
        largest = max(candidates, key=lambda w: w.resources.get("MEMORY", w.memory_limit))
        raise LoraMergeError(
            f"no worker of the Dask cluster at {cluster} can hold one shard's merge (about {human(peak_per_shard)} "
            f"plus {human(WORKER_RUNTIME_BYTES)} for the worker itself); the largest has "
            f"{human(int(largest.resources.get('MEMORY', largest.memory_limit)))}: start workers with a larger "
            "--memory-limit (or --resources MEMORY=<bytes>)"
        )
    resources: dict[str, float] = {}
    if all("MEMORY" in w.resources for w in candidates if w.address in slots):
        resources["MEMORY"] = float(peak_per_shard)
    if gpu:
        resources["GPU"] = 1.0
    left_out = len(workers) - len(slots)
    # Workers without a GPU or without MEMORY never match the resources a task claims; only workers short of memory
    # without a MEMORY resource need the tasks held away from them by address.
    short = len(candidates) - len(slots)
    only = tuple(sorted(slots)) if short and "MEMORY" not in resources else None
    total = sum(slots.values())
    reason = f"{total} at once on {len(slots)} Dask worker(s) of {cluster}"
    if left_out:
        reason += f" ({left_out} left out: too little memory{' or no GPU' if gpu else ''})"
        if only is not None:
            # Dask restricts tasks to worker addresses; a worker restarted under a new address gets none of them.
            reason += (
                "; shards are held to the eligible workers by address (a worker that restarts under a new one takes "
                "no shards): start workers with --resources MEMORY=<bytes> so Dask places shards by memory instead"
            )
    if "MEMORY" not in resources:
        crowded = [a for a, n in slots.items() if n < next(w.threads for w in workers if w.address == a)]
        if crowded:
            reason += (
                f"; {len(crowded)} worker(s) have more threads than shards fit in their memory and advertise no "
                "MEMORY resource, so Dask may crowd them: start them with --nthreads 1 or --resources MEMORY=<bytes>"
            )
    return ClusterPlacement(total, only, resources, reason)
