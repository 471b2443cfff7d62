"""What the engine knows about a model's quantizable layers, independent of where it learned it.

A :class:`Layer` is produced either from a live ``nn.Module`` or from a checkpoint's safetensors headers
(:mod:`mxrun.engine.inventory`); the recipe is matched against these values only, so both sources give the
same plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class LayerKind(str, Enum):
    """The kinds a recipe rule can filter on (``kind:`` in a rule)."""

    LINEAR = "linear"
    """A dense ``nn.Linear`` (or a checkpoint ``*.weight`` of rank 2 that a Linear owns)."""
    MOE_EXPERTS = "moe_experts"
    """MoE expert weights: a fused ``[E, N, K]`` parameter, or one expert's ``[N, K]`` projection."""


@dataclass(frozen=True)
class Layer:
    """One quantizable weight as the recipe sees it.

    ``name`` is the canonical name rules match against: the module name a loaded model uses (a checkpoint's
    ``foo.weight`` becomes ``foo``; a fused expert parameter keeps its parameter name, e.g.
    ``model.layers.3.mlp.experts.gate_up_proj``). ``shape`` is the weight shape with K (the reduction
    dimension, ``in_features``) last: ``[N, K]`` for a Linear, ``[E, N, K]`` for fused experts.
    ``group`` names the fused group the layer belongs to (q/k/v, gate/up, all experts of one MoE layer), or
    is ``None``; every member of a group must get the same scheme.
    """

    name: str
    kind: LayerKind
    shape: tuple[int, ...]
    dtype: str
    group: str | None = None
    tensors: tuple[str, ...] = ()
    """Checkpoint tensor names that hold this layer's weight (empty for a module-only source). For experts
    fused from per-expert tensors they are in stacking order: ``gate_0, up_0, gate_1, up_1, ...`` for
    ``gate_up_proj`` and ``down_0, down_1, ...`` for ``down_proj``."""

    @property
    def in_features(self) -> int:
        """K, the dimension quantization blocks run along."""
        return self.shape[-1]

    @property
    def out_features(self) -> int:
        """N, the output dimension of one expert or Linear."""
        return self.shape[-2]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n
