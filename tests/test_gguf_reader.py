"""The bounded GGUF reader against real files and the hostile headers of shared/THREAT-MODEL.md."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.errors import InvalidGgufError
from edgecds.formats.gguf_file import read_gguf


def _str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(raw)) + raw


def make_gguf(
    tensors: list[tuple[str, tuple[int, ...], int, int]] | None = None,
    kvs: bytes | None = None,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    data: bytes | None = None,
    alignment: int = 32,
) -> bytes:
    """A GGUF v3 file: given key-value bytes and (name, shape, ggml type, offset) tensors."""
    if tensors is None:
        tensors = [("w", (8,), 0, 0)]  # 8 F32 weights
    if kvs is None:
        kvs = _str("general.architecture") + struct.pack("<I", 8) + _str("llama")
        n_kv = 1 if n_kv is None else n_kv
    body = kvs
    for name, shape, type_id, offset in tensors:
        body += _str(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
        body += struct.pack("<I", type_id) + struct.pack("<Q", offset)
    header = b"GGUF" + struct.pack("<I", 3) + struct.pack("<Q", len(tensors) if n_tensors is None else n_tensors)
    header += struct.pack("<Q", n_kv if n_kv is not None else 0)
    out = header + body
    out += b"\0" * (-len(out) % alignment)
    return out + (data if data is not None else b"\0" * 32)


def test_reads_the_real_default_model(source_gguf: Path) -> None:
    info = read_gguf(source_gguf)
    assert info.architecture == "llama"
    assert len(info.tensors) == 272
    assert info.tensor_type_counts() == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert info.n_parameters == 134_515_008
    assert len(info.metadata["tokenizer.ggml.tokens"]) == 49152
    # the data section ends exactly at the end of the file: every tensor was sized right
    last = max(info.tensors, key=lambda t: t.offset)
    assert info.data_offset + last.offset + last.n_bytes == info.file_size


def test_agrees_with_gguf_py_on_a_real_file(source_gguf: Path) -> None:
    import gguf  # build side: the converter's copy of llama.cpp's gguf-py

    theirs = gguf.GGUFReader(source_gguf)
    mine = read_gguf(source_gguf)
    assert [(t.name, t.tensor_type.value, int(t.n_bytes)) for t in theirs.tensors] == [(t.name, t.type_id, t.n_bytes) for t in mine.tensors]
    assert theirs.fields["general.name"].contents() == mine.metadata["general.name"]


def test_a_minimal_valid_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "ok.gguf"
    path.write_bytes(make_gguf())
    info = read_gguf(path)
    assert info.n_parameters == 8 and info.bits_per_weight == 32.0


HOSTILE = {
    "not a gguf": b"PK\x03\x04" + b"\0" * 64,
    "empty": b"",
    "tensor count 2^63": make_gguf(n_tensors=1 << 63),
    "kv count 2^63": make_gguf(n_kv=1 << 63),
    "1 GiB string": make_gguf(kvs=_str("general.name")[:0] + struct.pack("<Q", 12) + b"general.name" + struct.pack("<I", 8) + struct.pack("<Q", 1 << 30) + b"x" * 16, n_kv=1),
    "array length past the file": make_gguf(kvs=_str("tokenizer.ggml.tokens") + struct.pack("<I", 9) + struct.pack("<I", 8) + struct.pack("<Q", 1 << 40), n_kv=1),
    "tensor offset outside the file": make_gguf(tensors=[("w", (8,), 0, 1 << 40)]),
    "tensor running past the end": make_gguf(tensors=[("w", (1 << 20,), 0, 0)]),
    "duplicate tensor names": make_gguf(tensors=[("w", (8,), 0, 0), ("w", (8,), 0, 0)], data=b"\0" * 64),
    "misaligned tensor offset": make_gguf(tensors=[("w", (2,), 0, 4)]),
    "bad alignment value": make_gguf(kvs=_str("general.alignment") + struct.pack("<I", 4) + struct.pack("<I", 3), n_kv=1),
    "unknown tensor type": make_gguf(tensors=[("w", (8,), 99, 0)]),
    "overlapping tensors": make_gguf(tensors=[("a", (8,), 0, 0), ("b", (8,), 0, 0)], data=b"\0" * 64),
    "huge dimension count": make_gguf(tensors=[("w", (1, 1, 1, 1, 1, 1, 1), 0, 0)]),
    "shape product overflow": make_gguf(tensors=[("w", (1 << 32, 1 << 32, 1 << 32), 0, 0)]),
    "unknown value type": make_gguf(kvs=_str("k") + struct.pack("<I", 77) + b"\0" * 16, n_kv=1),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_rejected_fast(tmp_path: Path, case: str) -> None:
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE[case])
    start = time.perf_counter()
    with pytest.raises(InvalidGgufError) as err:
        read_gguf(path)
    assert time.perf_counter() - start < 1.0
    assert str(path) in str(err.value)


def test_hostile_headers_need_little_memory(tmp_path: Path) -> None:
    """Read every hostile file in a child whose address space is capped at 1 GiB.

    A reader that trusted a claimed count or length would hit MemoryError (not the clean
    InvalidGgufError) under the cap.
    """
    for i, case in enumerate(sorted(HOSTILE)):
        (tmp_path / f"{i}.gguf").write_bytes(HOSTILE[case])
    script = f"""
import resource, sys, json, pathlib
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from edgecds.formats.gguf_file import read_gguf
from edgecds.errors import InvalidGgufError
outcomes = []
for p in sorted(pathlib.Path({str(tmp_path)!r}).glob('*.gguf')):
    try:
        read_gguf(p); outcomes.append('accepted')
    except InvalidGgufError:
        outcomes.append('rejected')
print(json.dumps(outcomes))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["rejected"] * len(HOSTILE)


def test_every_truncation_of_a_real_file_is_rejected(source_gguf: Path, tmp_path: Path) -> None:
    whole = source_gguf.read_bytes()
    info = read_gguf(source_gguf)
    cut = tmp_path / "cut.gguf"
    # inside the magic, the counts, the vocabulary, the tensor table, and the tensor data
    for length in (3, 10, 20, 4096, 1_000_000, info.data_offset - 5, info.data_offset + 10, len(whole) - 1):
        cut.write_bytes(whole[:length])
        with pytest.raises(InvalidGgufError):
            read_gguf(cut)


def test_inspect_reports_bad_files_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(HOSTILE["tensor count 2^63"])
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 1
    assert "claims 9223372036854775808 tensors" in result.output
    assert "Traceback" not in result.output


def test_inspect_json_on_the_real_file(source_gguf: Path) -> None:
    result = CliRunner().invoke(cli, ["inspect", str(source_gguf), "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["architecture"] == "llama"
    assert data["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert 5.7 < data["bits_per_weight"] < 5.8
