"""Peak memory of a block of code: the CUDA allocator's peak on GPU, sampled resident memory on CPU."""

import ctypes
import os
import threading
import time

import torch

__all__ = ["PeakMemory"]


def _rss() -> int | None:
    """Resident bytes of this process (Linux /proc), or None where that is not available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_freed_heap() -> None:
    # glibc keeps freed heap pages; without returning them first, memory freed by an earlier run would
    # absorb this run's growth and hide it from the resident-size baseline.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """`with PeakMemory(device) as m: ...`, then `m.peak_bytes`: the largest growth over the memory in
    use at entry (None if it cannot be measured here). CPU figures sample the resident size every
    `interval` seconds, so a spike shorter than that can be missed."""

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.002):
        self.device = torch.device(device)
        self.interval = interval
        self.peak_bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        _release_freed_heap()
        self._start = _rss()
        self._peak = self._start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._start is not None:
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss() or 0)
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        if self._start is None:
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._peak, _rss() or 0) - self._start
