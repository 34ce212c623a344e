"""Bad input to `quantize`: a clear message and a non-zero exit, never a traceback, nothing written."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.cli import cli


def quantize(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["quantize", "--quiet", *args])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


def write_safetensors(path: Path, header: dict[str, object] | bytes, data: bytes = b"") -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def model_dir(tmp_path: Path, arch: str = "LlamaForCausalLM") -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "llama"}))
    return folder


def test_missing_folder(tmp_path: Path) -> None:
    code, out = quantize(str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert code == 1 and "no such folder" in out


class _Payload:
    """Unpickling this creates a marker file: proof that a pickle was (or was not) loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (Path.touch, (str(self.marker),))  # type: ignore[return-value]


def test_pickle_checkpoints_are_refused_and_never_loaded(tmp_path: Path) -> None:
    folder = model_dir(tmp_path)
    marker = tmp_path / "pickle-was-loaded"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    code, out = quantize(str(folder), "-o", str(tmp_path / "out"))
    assert code == 1
    assert "pytorch_model.bin" in out and "pickle" in out and "safetensors" in out
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path) -> None:
    folder = model_dir(tmp_path, "MyClinicalNetForCausalLM")
    write_safetensors(folder / "model.safetensors", {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    code, out = quantize(str(folder), "-o", str(tmp_path / "out"))
    assert code == 1
    assert "MyClinicalNetForCausalLM is not supported" in out
    assert "LlamaForCausalLM" in out and "Qwen2ForCausalLM" in out


@pytest.mark.parametrize(
    "case, header, data, message",
    [
        ("header longer than the file", None, b"", "claims"),
        ("not JSON", b"{not json", b"", "not JSON"),
        ("offsets outside the file", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "outside the file"),
        ("size disagrees with shape", {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, "need 16"),
        ("overlapping tensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "overlap"),
        ("unknown dtype", {"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "malformed"),
    ],
)
def test_corrupt_safetensors_is_named(tmp_path: Path, case: str, header: object, data: bytes, message: str) -> None:
    folder = model_dir(tmp_path)
    weights = folder / "model.safetensors"
    if header is None:
        weights.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    else:
        write_safetensors(weights, header, data)  # type: ignore[arg-type]
    code, out = quantize(str(folder), "-o", str(tmp_path / "out"))
    assert code == 1
    assert "model.safetensors" in out and message in out


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a GGUF file"),
        (b"<html>not a model</html>" * 4, "not a GGUF file"),
        (b"GGUF" + struct.pack("<IQQ", 3, 1 << 62, 1), "claims"),
    ],
    ids=["empty", "not-gguf", "impossible-count"],
)
def test_bad_gguf_sources(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    code, out = quantize(str(path), "-o", str(tmp_path / "out"))
    assert code == 1 and message in out


def test_truncated_real_gguf(source_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes(source_gguf.read_bytes()[: 50_000_000])
    code, out = quantize(str(path), "--types", "Q4_0", "--allow-requantize", "-o", str(tmp_path / "out"))
    assert code == 1 and ("truncated or corrupt" in out or "outside the file" in out)


def test_too_little_disk_is_caught_before_starting(tmp_path: Path) -> None:
    """A (sparse) model of 500 billion weights: its F16 alone needs ~1 TB, more than this disk has."""
    folder = model_dir(tmp_path)
    n = 500_000_000_000
    weights = folder / "model.safetensors"
    write_safetensors(weights, {"w": {"dtype": "BF16", "shape": [n], "data_offsets": [0, 2 * n]}})
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size + 2 * n)  # sparse: no real space used
    code, out = quantize(str(folder), "-o", str(tmp_path / "out"))
    assert code == 1
    assert "MiB needed" in out and "MiB free" in out and "--types" in out
    assert not list((tmp_path / "out").glob("*.gguf"))


def test_float_types_need_a_hugging_face_source(source_gguf: Path, tmp_path: Path) -> None:
    code, out = quantize(str(source_gguf), "--types", "F16,Q4_0", "-o", str(tmp_path / "out"))
    assert code == 2 and "F16 come from llama.cpp's converter" in out


def test_an_output_folder_that_cannot_be_written_is_a_message(source_gguf: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(cli, ["quantize", str(source_gguf), "--types", "Q4_0", "--allow-requantize", "-o", str(blocker / "out")])
    assert result.exit_code == 1 and "could not write" in result.output and "Traceback" not in result.output, result.output
