"""Small zeroed device buffers that kernels keep zeroed themselves, so a call does not pay a memset launch.

Kernels that coordinate their programs through global counters (the split-K sum's arrival counters) need them
zero when they start; each such kernel leaves them as it found them. One buffer per (device, stream, purpose):
kernels on one stream run one after the other, so they never share a buffer while running.

CUDA-graph capture runs on a stream of its own (``torch.cuda.graph``'s side stream), where nothing has run before,
and memory allocated while capturing comes from the graph's pool: a zeroed buffer made there puts a memset node
into the graph, one per call, replayed every time. So the first buffer made outside a capture on a device also
makes a zeroed arena of :data:`ARENA_INT32` words, and a stream that first needs a buffer while capturing gets a
slice of it (already zero, and kept zero by the kernels), kept for that stream as any other buffer: no node in the
graph. Only when the arena is used up, or a capture comes before any call outside one, is the buffer allocated
in the graph's pool and zeroed by the graph at every replay (a memset node), and not kept. A buffer kept for the
capture stream belongs to every graph captured on it, so two graphs captured on one stream must not be replayed
at the same time on two streams.
"""

from __future__ import annotations

import torch

_BUFFERS: dict[tuple[torch.device, int, str], torch.Tensor] = {}
_ARENAS: dict[torch.device, list] = {}  # device -> [zeroed int32 arena, words handed out]

ARENA_INT32 = 1 << 16
"""int32 words (256 KiB) of the arena per device that captures take their buffers from: the split-K counters of
a 57344-column layer take 1792 words, of every other Llama layer at most 1024."""

_MIN_WORDS = 1024


def zeroed_int32(device: torch.device, purpose: str, count: int) -> torch.Tensor:
    """At least ``count`` int32 zeros for ``purpose`` on ``device`` and the current stream; allocated (and
    zeroed) on first use or when a larger one is needed, taken from the device's arena when that first use is
    inside a CUDA-graph capture (see the module docstring). The caller's kernels must leave them zero."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, purpose)
    buffer = _BUFFERS.get(key)
    if buffer is not None and buffer.numel() >= count:
        return buffer
    words = max(count, _MIN_WORDS)
    if not capturing:
        if device.type == "cuda" and device not in _ARENAS:
            _ARENAS[device] = [torch.zeros(ARENA_INT32, dtype=torch.int32, device=device), 0]
        buffer = torch.zeros(words, dtype=torch.int32, device=device)
    else:
        arena = _ARENAS.get(device)
        if arena is None or arena[1] + words > arena[0].numel():
            return torch.zeros(words, dtype=torch.int32, device=device)  # the graph's pool: a memset node
        buffer = arena[0][arena[1] : arena[1] + words]
        arena[1] += words
    _BUFFERS[key] = buffer
    return buffer


def live_buffers(device: torch.device, purpose: str) -> list[torch.Tensor]:
    """The buffers kept for ``purpose`` on ``device``, one per stream used (tests check what kernels left)."""
    return [buffer for (dev, _, name), buffer in _BUFFERS.items() if dev == device and name == purpose]


__all__ = ["ARENA_INT32", "live_buffers", "zeroed_int32"]
