"""Bring your own model: a published GGUF file (or ONNX model folder) recorded as a variant, by its
hash and its quantization (the GGUF header's; the ONNX graph's blocks), without requantizing, so
`plan`, `profile`, `eval`, `tune` and `bundle` take it as they take what `quantize` built.

The record goes into variants.json beside the file or folder (as `quantize -o` writes it), so
results.json lands there too and later runs find both. Each model is load-checked in a child
process first: one that crashes its engine is refused with its name, never recorded.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgecds.atomic import folder_lock
from edgecds.errors import InvalidInputError, UsageError
from edgecds.formats.onnx_model import MODEL_FILE
from edgecds.variants import VARIANTS_FILE, SourceRecord, VariantRecord, VariantsFile, load_variants

GGUF_MAGIC = b"GGUF"


def is_gguf_file(path: Path) -> bool:
    """A regular file that starts as a GGUF does (its name may say anything)."""
    try:
        with path.open("rb") as fh:
            return path.is_file() and fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def ggufs_in(folder: Path) -> list[Path]:
    """The GGUF files directly in `folder`, by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".gguf" and is_gguf_file(p))


def type_of_header(ftype: int | None, tensor_types: dict[str, int]) -> str:
    """The quant type llama.cpp wrote in general.file_type (LLAMA_FTYPE_*), by edgecds's names;
    without one, the most common tensor type."""
    import llama_cpp

    from edgecds.formats.types import QUANT_TYPES

    names = {int(getattr(llama_cpp, n)): n.removeprefix("LLAMA_FTYPE_") for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_")}
    engine = names.get(ftype) if ftype is not None else None
    if engine is not None:
        float_names = {"ALL_F32": "F32", "MOSTLY_F16": "F16", "MOSTLY_BF16": "BF16"}
        known = next((q.name for q in QUANT_TYPES if q.format == "gguf" and q.engine_name == engine), None)
        return float_names.get(engine) or known or engine.removeprefix("MOSTLY_")
    return max(tensor_types, key=lambda t: tensor_types[t]) if tensor_types else "unknown"


def adopt_files(files: list[Path]) -> tuple[Path, VariantsFile, list[VariantRecord]]:
    """Record `files` (GGUF files, or ONNX variant folders, in one folder) in that folder's
    variants.json, each checked to load and generate; the folder, its record, and the records of
    `files` in their order."""
    folders = {f.resolve().parent for f in files}
    if len(folders) != 1:
        raise UsageError("give model files from one folder (their record, variants.json, goes beside them)")
    folder = folders.pop()
    if not os.access(folder, os.W_OK):
        raise InvalidInputError(f"{folder} is not writable: edgecds records the model's hash and type in {VARIANTS_FILE} beside it; "
                                "copy it into a folder you can write, and give that path")
    with folder_lock(folder):
        record = load_variants(folder)
        chosen: list[VariantRecord] = []
        for path in files:
            start = time.perf_counter()
            sha, onnx_info = _identify(path)
            known = next((v for v in record.variants if v.sha256 == sha), None) if record else None
            if known is not None:  # recorded by an earlier run: not checked again
                chosen.append(known)
                continue
            variant, source = _onnx_variant(path, sha, onnx_info, start) if onnx_info else _gguf_variant(path, sha, start)
            record = record or VariantsFile(source, [])
            clash = next((v for v in record.variants if v.type == variant.type), None)
            if clash is not None:
                raise UsageError(f"{folder} already records a {variant.type} variant ({clash.path}); variants are named by type, so "
                                 f"{path.name} needs a folder of its own: move it, then give its new path")
            record.variants.append(variant)
            chosen.append(variant)
            try:
                record.save(folder)
            except OSError as exc:
                raise InvalidInputError(f"cannot write {folder / VARIANTS_FILE} beside {path.name} ({exc.strerror}): copy it into "
                                        "a folder you can write, and give that path") from None
    assert record is not None
    return folder, record, chosen


def _identify(path: Path) -> tuple[str, Any]:
    """The model's sha256 as records name it; for an ONNX folder also what it holds (its external
    data checked: a reference outside the folder is refused here, with its reason)."""
    from edgecds.digest import digest_of_files, sha256_file
    from edgecds.formats.onnx_model import read_onnx_folder

    if path.is_dir():
        info = read_onnx_folder(path)
        return digest_of_files(info.files), info
    return sha256_file(path), None


def _adopted(path: Path, sha: str, start: float, quantized_by: str, **fields: Any) -> VariantRecord:
    """The record of a published model, load-checked in a child process (a crash refuses it)."""
    from edgecds import __version__
    from edgecds.hwbench.load_check import check_in_subprocess

    check = check_in_subprocess(path)
    return VariantRecord(
        name=path.stem if path.is_file() else path.name, path=path.name, sha256=sha, source_sha256=sha, parent_sha256=sha,
        tools={"edgecds": __version__, "quantized_by": quantized_by}, cache_key=f"adopted:{sha}", seconds={"verify": round(time.perf_counter() - start, 3)},
        load_check={"tokens_generated": len(check.tokens), "load_seconds": round(check.load_seconds, 3),
                    "generate_seconds": round(check.generate_seconds, 3)},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        warnings=[f"adopted as published: not built by edgecds, so no float reference of its own (eval pairs it only "
                  f"with a float variant in {VARIANTS_FILE})"], **fields)


def _gguf_variant(path: Path, sha: str, start: float) -> tuple[VariantRecord, SourceRecord]:
    from edgecds.formats.gguf_file import read_gguf
    from edgecds.formats.types import QUANT_TYPE_BY_NAME

    info = read_gguf(path)  # a hostile header is refused here, with its reason
    tensor_types = info.tensor_type_counts()
    qtype = type_of_header(info.file_type, tensor_types)
    nominal = QUANT_TYPE_BY_NAME[qtype].nominal_bits_per_weight if qtype in QUANT_TYPE_BY_NAME else info.bits_per_weight
    variant = _adopted(path, sha, start, format="gguf", type=qtype, file_size=info.file_size,
                       bits_per_weight=round(info.bits_per_weight, 4), nominal_bits_per_weight=round(nominal, 4),
                       n_parameters=info.n_parameters, tensor_types=tensor_types,
                       quantized_by=str(info.metadata.get("general.quantized_by") or "unknown"),
                       options={"adopted": True, "general_name": str(info.metadata.get("general.name") or "")})
    return variant, SourceRecord(str(path), "gguf", sha, info.architecture or "unknown", info.n_parameters, path.stem)


def type_of_onnx(tensor_types: dict[str, int]) -> str:
    """The ONNX type by what the graph holds: MatMulNBits blocks of 4 or 8 bits, else the float
    type most initializers have."""
    from edgecds.formats.types import QUANT_TYPE_BY_NAME

    for bits in (4, 8):
        if tensor_types.get(f"MatMulNBits/{bits}bit"):
            return f"ONNX_INT{bits}"
    floats = {"float16": "ONNX_FP16", "float32": "ONNX_FP32"}
    kind = max(floats, key=lambda t: tensor_types.get(t, 0))
    if not tensor_types.get(kind):
        raise InvalidInputError(f"cannot tell this ONNX model's type from its graph ({tensor_types}); edgecds runs "
                                f"{', '.join(q for q in QUANT_TYPE_BY_NAME if q.startswith('ONNX_'))}")
    return floats[kind]


def _onnx_variant(path: Path, sha: str, info: Any, start: float) -> tuple[VariantRecord, SourceRecord]:
    from edgecds.formats.types import QUANT_TYPE_BY_NAME

    qtype = type_of_onnx(info.tensor_types)
    config = _json_object(path / "config.json")
    variant = _adopted(path, sha, start, format="onnx", type=qtype, file_size=info.file_size,
                       bits_per_weight=round(info.weight_bytes * 8 / max(info.n_parameters, 1), 4),
                       nominal_bits_per_weight=QUANT_TYPE_BY_NAME[qtype].nominal_bits_per_weight, n_parameters=info.n_parameters,
                       tensor_types=info.tensor_types, files=info.files, quantized_by="unknown",
                       options={"adopted": True, "general_name": str(config.get("_name_or_path") or "")})
    arch = config.get("model_type")
    return variant, SourceRecord(str(path), "onnx", sha, arch if isinstance(arch, str) else "unknown", info.n_parameters, path.name)


def _json_object(path: Path) -> dict[str, Any]:
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def only(record: VariantsFile, chosen: list[VariantRecord]) -> VariantsFile:
    """The record narrowed to the files named: a command given one file works on it alone."""
    shas = {v.sha256 for v in chosen}
    return VariantsFile(record.source, [v for v in record.variants if v.sha256 in shas], record.schema_version)


def open_variants(path: Path) -> tuple[Path, VariantsFile]:
    """The variants folder and its record, given the folder or its variants.json; or a GGUF file
    (that file alone), a folder of GGUF files without a record, or an ONNX model folder (model.onnx
    and its tokenizer; recorded in the folder above it), adopted as published.
    An error saying what to run when there is none."""
    if path.is_file() and path.name != VARIANTS_FILE:
        if not is_gguf_file(path):
            raise InvalidInputError(f"{path}: neither a GGUF file nor a variants.json; give a model file (.gguf), the folder "
                                    "`edgecds quantize -o` wrote, or its variants.json")
        folder, record, chosen = adopt_files([path])
        return folder, only(record, chosen)
    folder = path.parent if path.name == VARIANTS_FILE else path
    record = load_variants(folder)
    if record is None and (folder / MODEL_FILE).is_file():  # an ONNX model folder as published: recorded beside it
        parent, record, chosen = adopt_files([folder])
        return parent, only(record, chosen)
    if record is None:
        published = ggufs_in(folder) if folder.is_dir() else []
        if published:
            folder, record, _ = adopt_files(published)
            return folder, record
        raise InvalidInputError(f"{folder / VARIANTS_FILE} does not exist; run `edgecds quantize -o {folder}` first, or give a GGUF file "
                                "or an ONNX model folder (model.onnx and its tokenizer)")
    return folder, record
