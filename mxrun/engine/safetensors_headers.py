"""Read the JSON header of a ``.safetensors`` file, and nothing after it.

The format is: 8 bytes little-endian ``u64`` header length ``N``, ``N`` bytes of UTF-8 JSON (an object that
maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``, plus an optional
``"__metadata__"`` object), then the data region that the offsets index into. Planning a recipe needs only
names, dtypes and shapes, so this module reads exactly ``8 + N`` bytes per file: a 1.3 TB checkpoint
resolves from a few MB of headers, without torch, a device, or mmap.

The header is untrusted input (a truncated download, a hostile file). It is bounded before it is read
(``N`` must fit in the file and stay under :data:`MAX_HEADER_BYTES`) and every entry is checked against the
file size, so a checkpoint that would fail to load fails here first, with the file and tensor named.
We implement the parse instead of calling ``safetensors.safe_open`` because ``safe_open`` mmaps the whole
file and its laziness is an implementation detail we could not prove (or test) from outside.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import NamedTuple

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The Rust reference implementation refuses headers above 100 MB; a real 1T-parameter shard needs < 1 MB."""

HEADER_LENGTH_BYTES = 8

DTYPE_TORCH_NAMES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2": "float8_e5m2",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
}
"""safetensors dtype code -> the ``torch.dtype`` name without ``torch.`` (what :class:`Layer.dtype` holds).

Codes not listed (sub-byte ``F4``/``F6_*``, future codes) are kept as their code and treated as not
floating point, so an unknown dtype makes a tensor non-quantizable instead of failing the inventory.
"""

DTYPE_ITEM_BYTES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1, "F8_E8M0": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8,
}  # fmt: skip
"""Bytes per element, to check that ``data_offsets`` span exactly ``numel * itemsize`` bytes."""


class HeaderError(Exception):
    """A safetensors header that cannot be trusted; the message starts with the file path."""


class TensorHeader(NamedTuple):
    """One tensor's entry in a safetensors header (no data). A tuple: a 671B checkpoint has 45k of them."""

    dtype: str
    """The safetensors dtype code as stored, e.g. ``"BF16"``."""
    shape: tuple[int, ...]
    file: Path


def read_header_bytes(path: Path) -> bytes:
    """The raw JSON header of ``path``: reads ``8 + N`` bytes after checking ``N`` against the file size."""
    try:
        with open(path, "rb") as stream:
            file_size = os.fstat(stream.fileno()).st_size
            length_prefix = stream.read(HEADER_LENGTH_BYTES)
            if len(length_prefix) < HEADER_LENGTH_BYTES:
                raise HeaderError(
                    f"{path}: truncated safetensors file ({file_size} bytes; the format starts with an "
                    f"{HEADER_LENGTH_BYTES}-byte header length)"
                )
            (header_len,) = struct.unpack("<Q", length_prefix)
            if header_len > MAX_HEADER_BYTES:
                raise HeaderError(
                    f"{path}: header length {header_len} bytes exceeds the {MAX_HEADER_BYTES}-byte limit "
                    "(not a safetensors file, or a corrupt one)"
                )
            if header_len > file_size - HEADER_LENGTH_BYTES:
                raise HeaderError(
                    f"{path}: header length {header_len} bytes runs past the end of the file "
                    f"({file_size} bytes): truncated or corrupt"
                )
            return stream.read(header_len)
    except OSError as exc:
        raise HeaderError(f"{path}: cannot read safetensors header: {exc.strerror or exc}") from exc


def read_tensor_headers(path: str | os.PathLike[str]) -> dict[str, TensorHeader]:
    """The tensors of one ``.safetensors`` file by name, in header order, validated against the file size.

    Raises :class:`HeaderError` naming the file (and the tensor, where one entry is at fault).
    """
    path = Path(path)
    raw = read_header_bytes(path)
    data_region_bytes = path.stat().st_size - HEADER_LENGTH_BYTES - len(raw)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderError(f"{path}: corrupt safetensors header (not UTF-8 JSON: {exc})") from exc
    if not isinstance(header, dict):
        raise HeaderError(f"{path}: corrupt safetensors header (a JSON object was expected)")

    tensors: dict[str, TensorHeader] = {}
    item_bytes = DTYPE_ITEM_BYTES
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        # The checks are inlined (no helper call per tensor): this loop runs 45k times for a 671B checkpoint.
        try:
            dtype = entry["dtype"]
            shape = entry["shape"]
            begin, end = entry["data_offsets"]
            numel = 1
            for dim in shape:
                if type(dim) is not int or dim < 0:
                    raise ValueError(dim)
                numel *= dim
            if (
                type(dtype) is not str
                or type(shape) is not list
                or type(begin) is not int
                or type(end) is not int
            ):
                raise ValueError(entry)
        except (TypeError, KeyError, ValueError) as exc:
            raise HeaderError(
                f"{path}: tensor {name!r}: malformed header entry {entry!r} "
                "(needs dtype, shape [non-negative ints], data_offsets [begin, end])"
            ) from exc
        if not 0 <= begin <= end <= data_region_bytes:
            raise HeaderError(
                f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] lie outside the "
                f"{data_region_bytes}-byte data region (truncated file?)"
            )
        element_bytes = item_bytes.get(dtype)
        if element_bytes is not None and numel * element_bytes != end - begin:
            raise HeaderError(
                f"{path}: tensor {name!r}: {dtype}{shape} needs {numel * element_bytes} bytes but "
                f"data_offsets span {end - begin}"
            )
        tensors[name] = TensorHeader(dtype, tuple(shape), path)
    return tensors
