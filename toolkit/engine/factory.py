"""The one place a variant's file picks its engine."""

from __future__ import annotations

from pathlib import Path

from edgecds.engine import EngineSettings, Runtime
from edgecds.errors import UsageError


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def open_runtime(path: Path, settings: EngineSettings) -> Runtime:
    """The runtime for a variant's format, chosen by its file: llama.cpp for a GGUF, onnxruntime
    for an ONNX variant's folder (or its model.onnx)."""
    if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):  # by content too: load checks run on temporaries
        from edgecds.engine.gguf_runtime import GgufRuntime

        return GgufRuntime(path, settings)
    if path.is_dir() or path.suffix == ".onnx":
        from edgecds.engine.onnx_runtime import OnnxRuntime

        return OnnxRuntime(path if path.is_dir() else path.parent, settings)
    raise UsageError(f"{path.name}: not a variant edgecds can run (expected a .gguf file or an ONNX variant's folder)")
