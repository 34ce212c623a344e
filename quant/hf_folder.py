"""Checks on a Hugging Face model folder before any engine touches it.

A model folder is untrusted input. Pickle checkpoints run code when loaded, so they are refused
and never opened. Every safetensors header is parsed with its length checked against the file
before it is read, and every tensor's offsets against the data that follows, so a corrupt or
hostile file is named here rather than crashing the converter.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from edgecds.errors import InvalidInputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}


@dataclass(frozen=True)
class HfFolder:
    path: Path
    architecture: str
    n_parameters: int
    weight_files: tuple[Path, ...]


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """One safetensors file's header (tensor name -> dtype, shape, offsets), length-checked, and
    the number of data bytes after it."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise InvalidInputError(f"{path}: corrupt safetensors file: only {size} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_SAFETENSORS_HEADER or header_len > size - 8:
            raise InvalidInputError(
                f"{path}: corrupt safetensors header: it claims {header_len} bytes, "
                f"the file has {size - 8} after the length field (limit {MAX_SAFETENSORS_HEADER})"
            )
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"{path}: corrupt safetensors header: not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidInputError(f"{path}: corrupt safetensors header: not a JSON object")
    return header, size - 8 - header_len


def tensor_names(folder: Path) -> set[str]:
    return {name for weights in sorted(folder.glob("*.safetensors")) for name in read_header(weights)[0] if name != "__metadata__"}


def check_safetensors(path: Path) -> int:
    """Validate one safetensors file's header and offsets; return its number of weights."""
    header, data_size = read_header(path)
    spans = []
    n_weights = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            count = 1
            for dim in shape:
                count *= int(dim)
            width = _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise InvalidInputError(f"{path}: corrupt safetensors header: tensor {name!r} has a malformed entry") from None
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_size):
            raise InvalidInputError(f"{path}: tensor {name!r} has offsets {start}..{end} outside the file's {data_size} data bytes")
        if end - start != count * width:
            raise InvalidInputError(f"{path}: tensor {name!r} spans {end - start} bytes but its shape and dtype need {count * width}")
        spans.append((start, end, name))
        n_weights += count
    spans.sort()
    for (_s0, e0, n0), (s1, _e1, n1) in zip(spans, spans[1:]):  # noqa: B905 (pairs of neighbours)
        if e0 > s1:
            raise InvalidInputError(f"{path}: tensors {n0!r} and {n1!r} overlap")
    return n_weights


@cache
def converter_architectures() -> frozenset[str]:
    """The HF architectures llama.cpp's converter supports, read from its own table.

    The table is a literal in the converter's `conversion` package; reading it with `ast` avoids
    importing the converter (and torch) just to ask.
    """
    try:
        spec = importlib.util.find_spec("conversion")
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        raise InvalidInputError("llama.cpp's converter is not installed; install edgecds with the build extra: pip install 'edgecds[build]'")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "TEXT_MODEL_MAP" and node.value:
            return frozenset(ast.literal_eval(node.value))
    raise InvalidInputError(f"could not read the converter's architecture table in {spec.origin}")


def read_config(path: Path) -> dict[str, Any]:
    """A model folder's config.json as a dict, or a clear error."""
    from edgecds.jsonfile import read_json_object

    config_path = path / "config.json"
    if not config_path.is_file():
        raise InvalidInputError(f"{path}: no config.json; this does not look like a Hugging Face model folder")
    return read_json_object(config_path)


def read_architecture(path: Path) -> str:
    architectures = read_config(path).get("architectures") or []
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise InvalidInputError(f"{path / 'config.json'}: has no 'architectures' entry naming the model class")
    return architectures[0]


def inspect_hf_folder(path: Path) -> HfFolder:
    """Validate a model folder for conversion; raise InvalidInputError saying what to fix."""
    if not path.exists():
        raise InvalidInputError(f"{path}: no such folder")
    if not path.is_dir():
        raise InvalidInputError(f"{path}: not a folder; give a Hugging Face model folder or a .gguf file")
    weights = sorted(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights:
        if pickles:
            raise InvalidInputError(
                f"{path}: has only pickle checkpoints ({', '.join(pickles)}); pickle runs code when loaded, "
                "so edgecds refuses it and never opens it; convert the model to safetensors first "
                "(e.g. with a trusted copy of transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise InvalidInputError(f"{path}: no *.safetensors weights found")
    arch = read_architecture(path)
    supported = converter_architectures()
    if arch not in supported:
        near = sorted(a for a in supported if "CausalLM" in a)
        raise InvalidInputError(
            f"{path}: architecture {arch} is not supported by llama.cpp's converter; "
            f"it supports {len(supported)} architectures, for text generation: {', '.join(near)}"
        )
    _check_runs_as_configured(path, arch)
    n_params = sum(check_safetensors(w) for w in weights)
    return HfFolder(path, arch, n_params, tuple(weights))


# Layouts llama.cpp assumes rather than reads: the converter writes no per-layer pattern for them, so
# a config that differs converts without error and then computes something else (measured on a
# two-layer Gemma 3 with one sliding and one global layer: logits off by up to 2.3 from transformers).
ASSUMED_SLIDING_PATTERN = {"Gemma3ForCausalLM": 6, "Gemma3ForConditionalGeneration": 6}


def _check_runs_as_configured(path: Path, arch: str) -> None:
    period = ASSUMED_SLIDING_PATTERN.get(arch)
    if period is None:
        return
    config = read_config(path)
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    layer_types = text.get("layer_types")
    if not isinstance(layer_types, list) or not text.get("sliding_window"):
        return
    assumed = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(layer_types))]
    if layer_types != assumed:
        raise InvalidInputError(
            f"{path}: config.json's layer_types are not {arch}'s {period - 1} sliding-window layers to one global, which "
            "llama.cpp assumes for this architecture (the converter does not record the pattern); the converted model "
            "would compute different outputs than this checkpoint, so edgecds refuses it")
