"""Checks on an ONNX variant folder before onnxruntime opens it, and what it holds.

An ONNX model is untrusted input: an initializer stored as external data names a file and a
byte range, and onnxruntime follows that name. So the graph is parsed without its data, and every
external location must be a plain relative name of a regular file inside the variant's folder
(no `..`, no absolute path, no symlink or hardlink), with its range inside that file, before any
session is created (the path-traversal class of onnx CVE-2024-27318).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from edgecds.errors import InvalidInputError

MODEL_FILE = "model.onnx"
# What a variant folder carries besides the graph: the runtime reads these, so they are hashed too.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
MAX_GRAPH_BYTES = 2 << 30  # protobuf's own limit; larger weights must be external data
# onnx TensorProto data types: bytes per element (int4/uint4: half a byte).
_ELEMENT_BITS = {1: 32, 2: 8, 3: 8, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 16: 16, 21: 4, 22: 4}
_TYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64",
               16: "bfloat16", 21: "uint4", 22: "int4"}


@dataclass(frozen=True)
class OnnxInfo:
    folder: Path
    n_parameters: int  # weights of the model proper: embedding rows and weight matrices, counted once
    weight_bytes: int  # bytes of every initializer's data
    tensor_types: dict[str, int]  # initializer element type -> count, plus quantized op -> count
    files: dict[str, str]  # relative name -> sha256, every file of the variant

    @property
    def file_size(self) -> int:
        return sum((self.folder / name).stat().st_size for name in self.files)


def _check_location(folder: Path, location: str, offset: int, length: int | None, where: str) -> None:
    rel = Path(location)
    if not location or rel.is_absolute() or ".." in rel.parts or rel.name != location:
        raise InvalidInputError(f"{where}: external data location {location!r} is not a plain file name inside the variant's folder")
    path = folder / rel
    if path.is_symlink() or not path.is_file():
        raise InvalidInputError(f"{where}: external data file {location!r} is missing, a symlink or not a regular file")
    st = path.stat()
    if st.st_nlink > 1:
        raise InvalidInputError(f"{where}: external data file {location!r} has other hard links; refusing it")
    end = offset + (length or 0)
    if offset < 0 or (length is not None and length < 0) or end > st.st_size:
        raise InvalidInputError(f"{where}: external data range {offset}+{length} lies past the end of {location!r} ({st.st_size} bytes)")


def check_onnx_folder(folder: Path) -> object:
    """Parse the graph without its data and validate every external-data reference; the parsed
    graph (an `onnx.ModelProto` without weights) is returned for inspection."""
    import onnx

    path = folder / MODEL_FILE
    if path.is_symlink() or not path.is_file():
        raise InvalidInputError(f"{folder}: no {MODEL_FILE} (an ONNX variant is a folder holding {MODEL_FILE} and its tokenizer)")
    if path.stat().st_size > MAX_GRAPH_BYTES:
        raise InvalidInputError(f"{path}: {path.stat().st_size} bytes, over protobuf's 2 GiB limit for one graph file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # the protobuf parser raises its own DecodeError and others
        raise InvalidInputError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from None
    tensors = list(model.graph.initializer)
    for node in model.graph.node:  # Constant nodes can carry external data too
        tensors.extend(a.t for a in node.attribute if a.HasField("t"))
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        try:
            offset = int(entries.get("offset", "0"))
            length = int(entries["length"]) if "length" in entries else None
        except ValueError:
            raise InvalidInputError(f"{path}: tensor {tensor.name!r} has a non-numeric external data offset or length") from None
        _check_location(folder, entries.get("location", ""), offset, length, f"{path}: tensor {tensor.name!r}")
    return model


def _n_elements(dims: object) -> int:
    n = 1
    for d in dims:  # type: ignore[attr-defined]
        n *= int(d)
    return n


def read_onnx_folder(folder: Path, hash_files: bool = True) -> OnnxInfo:
    """Validate the folder and count what it holds: parameters, bytes per type, quantized ops."""
    from edgecds.digest import sha256_file

    model = check_onnx_folder(folder)
    graph = model.graph  # type: ignore[attr-defined]
    types: Counter[str] = Counter()
    weight_bytes = 0
    sizes: dict[str, int] = {}
    for t in graph.initializer:
        n = _n_elements(t.dims)
        sizes[t.name] = n
        weight_bytes += n * _ELEMENT_BITS.get(t.data_type, 32) // 8
        types[_TYPE_NAMES.get(t.data_type, str(t.data_type))] += 1
    n_parameters = 0
    packed = {node.input[1] for node in graph.node if node.op_type == "MatMulNBits"}  # a tied embedding reads these: count once
    for node in graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMulNBits":  # B is packed; K x N are the weights it stands for
            n_parameters += attrs["K"].i * attrs["N"].i
            types[f"MatMulNBits/{attrs['bits'].i if 'bits' in attrs else 4}bit"] += 1
        elif node.op_type in ("MatMul", "Gemm", "Gather") and len(node.input) > 1:
            weight = node.input[1] if node.op_type != "Gather" else node.input[0]
            if weight not in packed and sizes.get(weight, 0) > 1024:
                n_parameters += sizes[weight]
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    digests = {name: (sha256_file(folder / name) if hash_files else "") for name in files}
    return OnnxInfo(folder, n_parameters, weight_bytes, dict(sorted(types.items())), digests)
