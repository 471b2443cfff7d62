"""The online load's host peak on CPU, measured by the job itself on the bundled default model.

Before the CPU quantizers worked in slices the default model's load peaked at 1.28-1.63x the final model
(quantizer scratch of about 30 bytes per element of the weight in flight); sliced, 1.07-1.13x in repeated
runs of `mxrun --recipe mxfp8` on a 2-core CPU. The reading moves by a few hundredths from run to run: the
model is only 6 MiB and whether glibc serves an allocation from heap pages the process already holds (not
counted) or from fresh ones (counted) varies. So a run above the goal is repeated (at most three in all):
the goal must be met by one, and none may come near the unsliced range.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mxrun.cli import main
from mxrun.job.loading import MEMORY_HEADROOM

pytest.importorskip("transformers")
UNSLICED_LOWEST = 1.28
"""The lowest ratio measured before slicing: no run may get there."""


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resident-set high-water mark"
)
@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp8-tiles"])  # tiles: the alignment pass is sliced too
def test_default_model_cpu_peak_under_goal(tmp_path: Path, recipe: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("measures the CPU path (the job uses CUDA when it is available)")
    ratios = []
    for attempt in range(3):
        out = tmp_path / f"run{attempt}"
        result = CliRunner().invoke(main, ["--recipe", recipe, "--max-tokens", "64", "--out", str(out)])
        assert result.exit_code == 0, result.output
        load = json.loads((out / "report.json").read_text())["load"]
        if load["host_peak_ratio"] is None:
            pytest.skip("the host peak is not measurable here")
        ratios.append(load["host_peak_ratio"])
        if ratios[-1] < MEMORY_HEADROOM:
            break
    assert min(ratios) < MEMORY_HEADROOM, ratios
    assert max(ratios) < UNSLICED_LOWEST, ratios
