"""The one exception of the main job: bad input it refuses before writing anything."""

from __future__ import annotations


class JobError(Exception):
    """Input the main job cannot run on (a checkpoint file or tensor at fault, a recipe that quantizes nothing,
    too little memory). The message is one line that names the file, tensor or layer, with a hint; the CLI
    prints it as ``mxrun: error: <message>`` and exits 1."""
