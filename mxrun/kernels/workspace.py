"""Small zeroed device buffers that kernels keep zeroed themselves, so a call does not pay a memset launch.

Kernels that coordinate their programs through global counters (the split-K sum's arrival counters) need them
zero when they start; each such kernel leaves them as it found them. One buffer per (device, stream, purpose):
kernels on one stream run one after the other, so they never share a buffer while running. A buffer first
needed while a CUDA graph is being captured is allocated in the graph's pool and zeroed by the graph at every
replay (a memset node), and not kept; one captured from the cache stays the graph's for all its replays, so two
graphs captured on one stream must not be replayed at the same time on two streams.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[torch.device, int, str], torch.Tensor] = {}


def zeroed_int32(device: torch.device, purpose: str, count: int) -> torch.Tensor:
    """At least ``count`` int32 zeros for ``purpose`` on ``device`` and the current stream; allocated (and
    zeroed) on first use or when a larger one is needed. The caller's kernels must leave them zero."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, purpose)
    buffer = _BUFFERS.get(key)
    if buffer is None or buffer.numel() < count:
        buffer = torch.zeros(max(count, 1024), dtype=torch.int32, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return buffer  # allocated in a graph's pool: not kept beyond this capture
        _BUFFERS[key] = buffer
    return buffer


def live_buffers(device: torch.device, purpose: str) -> list[torch.Tensor]:
    """The buffers kept for ``purpose`` on ``device``, one per stream used (tests check what kernels left)."""
    return [buffer for (dev, _, name), buffer in _BUFFERS.items() if dev == device and name == purpose]


__all__ = ["live_buffers", "zeroed_int32"]
