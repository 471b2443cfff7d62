"""Peak memory of one stage of the job: the host's resident set and the CUDA caching allocator.

Host: the kernel keeps the process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``) and
resets it to the current RSS when ``5`` is written to ``/proc/self/clear_refs`` (Linux >= 4.0). The stage's
peak is that mark minus the RSS at the stage's start, so memory the process held before (Python, torch,
transformers) is not counted. Where the reset is not possible (other systems, a locked-down /proc) the host
peak is reported as unknown rather than guessed.

Device: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated at the
start: the tensors' bytes, without the allocator's cached-but-free blocks.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_MEMINFO = Path("/proc/meminfo")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def host_rss_bytes() -> int | None:
    """The process's resident set now, in bytes (None where /proc is not available)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _reset_host_peak() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def host_available_bytes() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` (what can be allocated without swapping), or None if unknown."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class PeakReading:
    """Peak bytes a stage added over what the process held when it started (None: not measurable here)."""

    host_bytes: int | None
    device_bytes: int | None
    """CUDA only; None on CPU."""


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.reading``: the stage's peak host and device bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reading = PeakReading(None, None)
        self._host_start: int | None = None
        self._device_start = 0

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self._host_start = host_rss_bytes() if _reset_host_peak() else None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._device_start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc_info: object) -> None:
        host = None
        high_water = _status_kib("VmHWM")
        if self._host_start is not None and high_water is not None:
            host = max(0, high_water * 1024 - self._host_start)
        device = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            device = torch.cuda.max_memory_allocated(self.device) - self._device_start
        self.reading = PeakReading(host, device)


_M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number for the size from which an allocation gets its own mapping."""
UNMAPPED_FROM_BYTES = 1 << 16
_GLIBC_MAX_DYNAMIC_THRESHOLD = 32 << 20


@contextlib.contextmanager
def big_allocations_unmapped() -> Iterator[None]:
    """While active, allocations of 64 KiB or more get their own memory mapping (glibc only; elsewhere a
    no-op), so a freed temporary goes back to the system at once.

    glibc's default raises that threshold as large blocks are freed (up to 32 MiB), after which the
    quantizer's temporaries (several MB for one weight on the CPU path) come from the heap, stay resident
    after they are freed and add up with fragmentation. Measured on a Llama of 24 MiB quantized: the load
    peaked at 1.32-1.34x the final model with glibc's defaults, 1.20-1.23x with this. On exit the threshold
    is set to glibc's dynamic ceiling, where a long-running process's threshold ends up anyway, so later
    work (evaluation) reuses heap blocks for its activations. The setting is process-wide.
    """
    libc_name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(libc_name), "mallopt", None) if libc_name else None
    if mallopt is None or not mallopt(_M_MMAP_THRESHOLD, UNMAPPED_FROM_BYTES):
        yield
        return
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _GLIBC_MAX_DYNAMIC_THRESHOLD)
