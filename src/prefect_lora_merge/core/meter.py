"""What one shard merge measured: wall time, bytes read and written, time spent waiting for storage, and the peak
memory of the process (and of the GPU) while it ran, to put next to the plan's estimate.

The process's resident size is sampled by a thread every `SAMPLE_SECONDS` while the shard runs (several shards
merged at once in one process share that figure: it is the process's peak, as a Dask worker's is the worker's).
Linux reads `/proc/self/statm`; elsewhere the figure is the process's lifetime peak (`ru_maxrss`)."""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from pathlib import Path

import torch

SAMPLE_SECONDS = 0.02
_STATM = Path("/proc/self/statm")
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set size now (Linux), else its peak so far."""
    try:
        return int(_STATM.read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class ShardMeter:
    """Counts a shard merge's reads and waits, and samples its process's memory until `stop`."""

    def __init__(self, device: torch.device) -> None:
        self.started = time.perf_counter()
        self.device = device
        self.bytes_read = 0
        self.read_wait = 0.0  # the computing thread waiting for the reader (storage, or the read-ahead budget)
        self.write_wait = 0.0  # ... waiting for the writer (storage, hashing, or the write-behind budget)
        self._lock = threading.Lock()
        self.resident_at_start = self._peak = resident_bytes()
        self._done = threading.Event()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self._sampler = threading.Thread(target=self._sample, name="shard-meter", daemon=True)
        self._sampler.start()

    def read(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_read += nbytes

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self._peak = max(self._peak, resident_bytes())

    def stop(self) -> tuple[float, int, int | None]:
        """(wall seconds, peak resident bytes of the process, peak GPU bytes allocated on cuda, else None)."""
        self._done.set()
        self._sampler.join()
        self._peak = max(self._peak, resident_bytes())
        gpu = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return time.perf_counter() - self.started, self._peak, gpu
