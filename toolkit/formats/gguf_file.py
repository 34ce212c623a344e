"""A bounded reader for GGUF headers: metadata and tensor table, never tensor data.

GGUF files come from elsewhere and are untrusted (shared/THREAT-MODEL.md). The `gguf`
package's reader trusts counts and lengths and can hang or allocate without bound on a hostile
header, and llama.cpp itself has had CVEs of this class. This reader checks every count, length
and offset against the bytes that remain in the file *before* it allocates or loops, so a hostile
file is rejected in milliseconds with bounded memory. It imports nothing from the build side, so
clinic devices use it too.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecds.errors import InvalidGgufError
from edgecds.formats.types import GGML_TYPES

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# Limits far above any real model, far below what would exhaust memory.
MAX_KV_COUNT = 1 << 16
MAX_TENSOR_COUNT = 1 << 20
MAX_STRING_BYTES = 16 << 20  # chat templates are kilobytes; 16 MiB is generous
MAX_KEY_BYTES = 1 << 16
MAX_ARRAY_ITEMS = 1 << 24  # vocabularies are ~10^5 entries
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value type ids -> (struct format, size) for fixed-size scalars.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # relative to the start of the data section
    n_elements: int
    n_bytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.type_id].name


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    version: int
    file_size: int
    alignment: int
    data_offset: int
    metadata: dict[str, Any] = field(repr=False)
    tensors: tuple[TensorInfo, ...] = field(repr=False)

    @property
    def architecture(self) -> str | None:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else None

    @property
    def file_type(self) -> int | None:
        ftype = self.metadata.get("general.file_type")
        return ftype if isinstance(ftype, int) else None

    @property
    def n_parameters(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Measured from the tensors themselves, not the nominal bits of the file type."""
        n = self.n_parameters
        return self.tensor_bytes * 8 / n if n else 0.0

    def tensor_type_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(t.type_name for t in self.tensors).items()))

    def is_float(self) -> bool:
        """True when every tensor is stored unquantized (F32/F16/BF16)."""
        return all(t.type_name in ("F32", "F16", "BF16") for t in self.tensors)


class _Cursor:
    """Reads little-endian values from a buffer, refusing to read past its end."""

    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> InvalidGgufError:
        return InvalidGgufError(f"{self.path}: not a usable GGUF file: {what} (at byte {self.pos})")

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.remaining():
            raise self.fail(f"{what} needs {n} bytes but only {self.remaining()} remain; the file is truncated or corrupt")

    def scalar(self, fmt: str, size: int, what: str) -> Any:
        self.need(size, what)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", 8, what))

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        n = self.u64(f"length of {what}")
        if n > limit:
            raise self.fail(f"{what} claims {n} bytes, over the limit of {limit}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def skip_string(self, what: str) -> None:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        self.pos += n

    def value(self, type_id: int, what: str) -> Any:
        if type_id in _SCALARS:
            fmt, size = _SCALARS[type_id]
            return self.scalar(fmt, size, what)
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY:
            item_type = self.u32(f"item type of {what}")
            count = self.u64(f"item count of {what}")
            if item_type == _ARRAY:
                raise self.fail(f"{what} is an array of arrays, which GGUF models do not use")
            min_item = _SCALARS[item_type][1] if item_type in _SCALARS else 8 if item_type == _STRING else None
            if min_item is None:
                raise self.fail(f"{what} has unknown item type {item_type}")
            if count > MAX_ARRAY_ITEMS or count * min_item > self.remaining():
                raise self.fail(f"{what} claims {count} items, more than the file can hold")
            if item_type in _SCALARS:
                fmt, size = _SCALARS[item_type]
                start = self.pos
                self.pos += count * size
                return list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, start))
            return [self.string(f"{what}[{i}]") for i in range(count)]
        raise self.fail(f"{what} has unknown value type {type_id}")


def read_gguf(path: str | os.PathLike[str]) -> GgufInfo:
    """Read and validate a GGUF file's header; raise InvalidGgufError naming what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise InvalidGgufError(f"{path}: not a GGUF file: only {size} bytes")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, size)
    except FileNotFoundError:
        raise InvalidGgufError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InvalidGgufError(f"{path}: is a folder, not a GGUF file") from None
    except PermissionError:
        raise InvalidGgufError(f"{path}: permission denied") from None


def _parse(buf: mmap.mmap, path: Path, size: int) -> GgufInfo:
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != MAGIC:
        raise InvalidGgufError(f"{path}: not a GGUF file (starts with {bytes(buf[:4])!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"GGUF version {version} is not supported (supported: {SUPPORTED_VERSIONS})")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("key-value count")
    # Each key-value needs at least 8 (key length) + 4 (type) + 1 bytes; each tensor at least 8+4+8+4+8.
    if n_kv > MAX_KV_COUNT or n_kv * 13 > cur.remaining():
        raise cur.fail(f"claims {n_kv} metadata keys, more than the file can hold")
    if n_tensors > MAX_TENSOR_COUNT or n_tensors * 32 > cur.remaining():
        raise cur.fail(f"claims {n_tensors} tensors, more than the file can hold")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key #{i}", MAX_KEY_BYTES)
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        type_id = cur.u32(f"type of {key}")
        metadata[key] = cur.value(type_id, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")

    raw_tensors = _tensor_headers(cur, n_tensors)
    data_offset = -(-cur.pos // alignment) * alignment
    if data_offset > size:
        raise cur.fail("the header runs past the end of the file")
    tensors = [_checked_tensor(cur, raw, alignment, size - data_offset) for raw in raw_tensors]
    _reject_overlaps(tensors, cur)
    return GgufInfo(path, version, size, alignment, data_offset, metadata, tuple(tensors))


def _tensor_headers(cur: _Cursor, n_tensors: int) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Each tensor's (name, shape, type id, offset), names unique and dimension counts sane."""
    raw_tensors = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}", MAX_KEY_BYTES)
        if name in names:
            raise cur.fail(f"duplicate tensor name {name!r}")
        names.add(name)
        n_dims = cur.u32(f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape = tuple(cur.u64(f"dimension of {name}") for _ in range(n_dims))
        type_id = cur.u32(f"type of {name}")
        offset = cur.u64(f"offset of {name}")
        raw_tensors.append((name, shape, type_id, offset))
    return raw_tensors


def _checked_tensor(cur: _Cursor, raw: tuple[str, tuple[int, ...], int, int], alignment: int, data_size: int) -> TensorInfo:
    """A tensor whose type is known, whose shape is possible and whose bytes lie inside the file."""
    name, shape, type_id, offset = raw
    ggml_type = GGML_TYPES.get(type_id)
    if ggml_type is None:
        raise cur.fail(f"tensor {name} has unknown ggml type {type_id}")
    n_elements = 1
    for dim in shape:
        if dim == 0 or dim > data_size * 8:  # no real tensor packs more than 8 weights a byte... or has 0 rows
            raise cur.fail(f"tensor {name} has impossible shape {shape}")
        n_elements *= dim
        if n_elements > data_size * 8:
            raise cur.fail(f"tensor {name} has impossible shape {shape}")
    if shape[0] % ggml_type.block_size:
        raise cur.fail(f"tensor {name}: row length {shape[0]} is not a multiple of {ggml_type.name}'s block of {ggml_type.block_size}")
    n_bytes = n_elements // ggml_type.block_size * ggml_type.type_size
    if offset % alignment:
        raise cur.fail(f"tensor {name} offset {offset} is not aligned to {alignment}")
    if offset + n_bytes > data_size:
        raise cur.fail(f"tensor {name} (bytes {offset}..{offset + n_bytes}) lies outside the file's {data_size} data bytes")
    return TensorInfo(name, shape, type_id, offset, n_elements, n_bytes)


def _reject_overlaps(tensors: list[TensorInfo], cur: _Cursor) -> None:
    ordered = sorted(tensors, key=lambda t: t.offset)
    for before, after in zip(ordered, ordered[1:]):  # noqa: B905 (pairs of neighbours)
        if before.offset + before.n_bytes > after.offset:
            raise cur.fail(f"tensors {before.name} and {after.name} overlap")
