"""The main job: ``mxrun --recipe R [--model M]`` quantizes a causal LM online and reports quality and speed.

Stages, one module each: :mod:`~mxrun.job.loading` (skeleton, online quantized load, reference load),
:mod:`~mxrun.job.evaluate` (both models side by side), :mod:`~mxrun.job.run_folder` (report.json,
report.md, plots, the console summary), :mod:`~mxrun.job.memory` (peak host/device memory);
:mod:`~mxrun.job.runner` sequences them. Importing this package imports torch but not transformers.
"""

from mxrun.job.errors import JobError
from mxrun.job.runner import JobOptions, JobResult, run_job

__all__ = ["JobError", "JobOptions", "JobResult", "run_job"]
