"""A GGUF file's metadata and tensor index, read in one pass over its header.

The ``gguf`` package's reader builds a numpy view for every part of every metadata item: about 3 s
for SmolLM2's 49,152-token vocabulary and 48,900 merges on a 2-core Zen 3, in every process that
opens the model (each worker, the router's tokenizer). This reads the same file in about 0.1 s and
gives the same values: ``fields`` holds what ``ReaderField.contents()`` returns (strings, numbers,
bools, lists), and each tensor's ``data`` is the same memory-mapped view the ``gguf`` reader gives
(its elements for F32/F16/F64/I8-I64, else its raw bytes shaped ``(rows..., bytes per row)``), so
``gguf.quants.dequantize`` reads it unchanged.

The format (GGUF v2 and v3, little-endian): ``b"GGUF"``, the version (u32), the tensor and metadata
counts (u64 each); the metadata as key (string), value type (u32), value; each tensor as name,
dimension count (u32), dimensions (u64, the fastest-moving first), type (u32), offset (u64) from the
data section, which starts at the next multiple of ``general.alignment`` (32 by default). A string is
a u64 byte count and UTF-8 bytes; an array is its element type (u32), count (u64) and elements.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from appliance.model.errors import ModelLoadError

__all__ = ["GGUFFile", "GGUFTensor", "open_gguf", "read_gguf"]

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# tensor types whose data is their elements; every other type is raw bytes (as the gguf reader does)
ELEMENTS = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the fastest-moving dimension first
    offset: int  # where its data begins in the file
    data: np.ndarray  # a read-only view of the file (see the module's note)


@dataclass(frozen=True)
class GGUFFile:
    version: int
    fields: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    """Little-endian reads from a buffer; every read checks that the bytes are there."""

    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise ValueError(f"truncated: {n} bytes wanted at offset {self.pos}, the file has {len(self.buf)}")
        out = self.buf[self.pos:end]
        self.pos = end
        return out

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.take(struct.calcsize(fmt)))
        return value

    def count(self, n: int, each: int, what: str) -> int:
        """``n`` items of at least ``each`` bytes: fail at once when the rest of the file cannot hold them."""
        if n * each > len(self.buf) - self.pos:
            raise ValueError(f"truncated: {n} {what} at offset {self.pos} need {n * each} bytes or more, "
                             f"{len(self.buf) - self.pos} are left")
        return n

    def string(self) -> str:
        return str(self.take(self.scalar("Q")), "utf-8")

    def value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if etype == STRING:
                return [self.string() for _ in range(self.count(count, 8, "strings"))]
            if etype == ARRAY:
                return [self.value(self.scalar("I")) for _ in range(self.count(count, 12, "arrays"))]
            fmt = _scalar_format(etype)
            return np.frombuffer(self.take(count * struct.calcsize(fmt)), dtype="<" + fmt).tolist()
        return self.scalar(_scalar_format(vtype))


def _scalar_format(vtype: int) -> str:
    fmt = SCALARS.get(vtype)
    if fmt is None:
        raise ValueError(f"unknown metadata value type {vtype}")
    return fmt


def read_gguf(path: str | Path) -> GGUFFile:
    """The file's metadata and tensors. Raises ``ValueError`` naming what is wrong with a file that is
    not GGUF, is of another version or byte order, is cut short, or has a tensor past its end."""
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(memoryview(mm))
    if bytes(cur.take(4)) != MAGIC:
        raise ValueError("not a GGUF file (no GGUF magic)")
    version = cur.scalar("I")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        why = "a big-endian file" if swapped in VERSIONS else f"version {version}"
        raise ValueError(f"{why}; pdbox reads little-endian GGUF v{' and v'.join(map(str, VERSIONS))}")
    n_tensors, n_fields = cur.scalar("Q"), cur.scalar("Q")
    cur.count(n_fields, 12, "metadata items")  # a key's length and a value's type at least
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cur.string()
        fields[key] = cur.value(cur.scalar("I"))
    index = []
    for _ in range(cur.count(n_tensors, 24, "tensor entries")):  # a name's length, a type and an offset at least
        name = cur.string()
        dims = tuple(cur.scalar("Q") for _ in range(cur.count(cur.scalar("I"), 8, "dimensions")))
        index.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    align = fields.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(align) is not int or align <= 0:
        raise ValueError(f"general.alignment must be an integer > 0, got {align!r}")
    start = -(-cur.pos // align) * align
    tensors, seen = [], set()
    for name, dims, raw_type, offset in index:
        if name in seen:
            raise ValueError(f"tensor {name!r} appears twice")
        seen.add(name)
        try:
            ttype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"tensor {name!r} has unknown type {raw_type}") from None
        rows = tuple(reversed(dims))  # row-major: the fastest-moving dimension last
        block, type_size = GGML_QUANT_SIZES[ttype]
        elements = math.prod(dims)  # Python ints: no overflow on a mangled dimension
        if ttype in ELEMENTS:
            dtype, count, shape = np.dtype(ELEMENTS[ttype]), elements, rows
        else:
            if rows and rows[-1] % block:
                raise ValueError(f"tensor {name!r}: rows of {rows[-1]} are not whole {ttype.name} blocks of {block}")
            dtype, count = np.dtype(np.uint8), elements // block * type_size
            shape = (*rows[:-1], rows[-1] // block * type_size) if rows else rows
        begin = start + offset
        if begin + count * dtype.itemsize > len(mm):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        data = np.ndarray(shape, dtype=dtype, buffer=mm, offset=begin) if count else np.empty(shape, dtype)
        tensors.append(GGUFTensor(name, ttype, dims, begin, data))
    return GGUFFile(version, fields, tensors)


def open_gguf(path: str | Path) -> GGUFFile:
    """:func:`read_gguf` for a model: what is wrong with the file as a :class:`ModelLoadError`."""
    try:
        return read_gguf(path)
    except (ValueError, OSError) as exc:  # not GGUF, cut short, another version, unreadable
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
