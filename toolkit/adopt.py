"""Bring your own GGUF: a published file recorded as a variant, by its hash and its header's
quantization, without requantizing, so `plan`, `profile`, `eval`, `tune` and `bundle` take it as
they take what `quantize` built.

The record goes into variants.json beside the file (as `quantize -o` writes it), so results.json
lands there too and later runs find both. Each file is load-checked in a child process first: a
file that crashes llama.cpp is refused with its name, never recorded.
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path

from edgecds.atomic import folder_lock
from edgecds.errors import InvalidInputError, UsageError
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
    """Record `files` (GGUFs in one folder) in that folder's variants.json, each checked to load and
    generate; the folder, its record, and the records of `files` in their order."""
    from edgecds import __version__
    from edgecds.digest import sha256_file
    from edgecds.formats.gguf_file import read_gguf
    from edgecds.formats.types import QUANT_TYPE_BY_NAME
    from edgecds.hwbench.load_check import check_in_subprocess

    folders = {f.resolve().parent for f in files}
    if len(folders) != 1:
        raise UsageError("give GGUF files from one folder (their record, variants.json, goes beside them)")
    folder = folders.pop()
    if not os.access(folder, os.W_OK):
        raise InvalidInputError(f"{folder} is not writable: edgecds records the file's hash and type in {VARIANTS_FILE} beside it; "
                                "copy the file into a folder you can write, and give that path")
    with folder_lock(folder):
        record = load_variants(folder)
        chosen: list[VariantRecord] = []
        for path in files:
            sha = sha256_file(path)
            known = next((v for v in record.variants if v.sha256 == sha), None) if record else None
            if known is not None:
                chosen.append(known)
                continue
            start = time.perf_counter()
            info = read_gguf(path)  # a hostile header is refused here, with its reason
            tensor_types = info.tensor_type_counts()
            qtype = type_of_header(info.file_type, tensor_types)
            check = check_in_subprocess(path)
            if record is None:
                arch = info.architecture or "unknown"
                record = VariantsFile(SourceRecord(str(path), "gguf", sha, arch, info.n_parameters, path.stem), [])
            clash = next((v for v in record.variants if v.type == qtype), None)
            if clash is not None:
                raise UsageError(f"{folder} already records a {qtype} variant ({clash.path}); variants are named by type, so "
                                 f"{path.name} needs a folder of its own: move it, then give its new path")
            nominal = QUANT_TYPE_BY_NAME[qtype].nominal_bits_per_weight if qtype in QUANT_TYPE_BY_NAME else info.bits_per_weight
            variant = VariantRecord(
                name=path.stem, path=path.name, format="gguf", type=qtype, file_size=info.file_size, sha256=sha,
                bits_per_weight=round(info.bits_per_weight, 4), nominal_bits_per_weight=round(nominal, 4), n_parameters=info.n_parameters,
                tensor_types=tensor_types, source_sha256=sha, parent_sha256=sha,
                tools={"edgecds": __version__, "quantized_by": str(info.metadata.get("general.quantized_by") or "unknown")},
                options={"adopted": True, "general_name": str(info.metadata.get("general.name") or "")},
                cache_key=f"adopted:{sha}", seconds={"verify": round(time.perf_counter() - start, 3)},
                load_check={"tokens_generated": len(check.tokens), "load_seconds": round(check.load_seconds, 3),
                            "generate_seconds": round(check.generate_seconds, 3)},
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                warnings=[f"adopted as published: not built by edgecds, so no float reference of its own (eval pairs it only "
                          f"with a float variant in {VARIANTS_FILE})"],
            )
            record.variants.append(variant)
            chosen.append(variant)
            try:
                record.save(folder)
            except OSError as exc:
                raise InvalidInputError(f"cannot write {folder / VARIANTS_FILE} beside {path.name} ({exc.strerror}): copy the file into "
                                        "a folder you can write, and give that path") from None
    assert record is not None
    return folder, record, chosen


def only(record: VariantsFile, chosen: list[VariantRecord]) -> VariantsFile:
    """The record narrowed to the files named: a command given one file works on it alone."""
    shas = {v.sha256 for v in chosen}
    return VariantsFile(record.source, [v for v in record.variants if v.sha256 in shas], record.schema_version)


def open_variants(path: Path) -> tuple[Path, VariantsFile]:
    """The variants folder and its record, given the folder or its variants.json; or a GGUF file
    (that file alone) or a folder of GGUF files without a record, adopted as published.
    An error saying what to run when there is none."""
    if path.is_file() and path.name != VARIANTS_FILE:
        if not is_gguf_file(path):
            raise InvalidInputError(f"{path}: neither a GGUF file nor a variants.json; give a model file (.gguf), the folder "
                                    "`edgecds quantize -o` wrote, or its variants.json")
        folder, record, chosen = adopt_files([path])
        return folder, only(record, chosen)
    folder = path.parent if path.name == VARIANTS_FILE else path
    record = load_variants(folder)
    if record is None:
        published = ggufs_in(folder) if folder.is_dir() else []
        if published:
            folder, record, _ = adopt_files(published)
            return folder, record
        raise InvalidInputError(f"{folder / VARIANTS_FILE} does not exist; run `edgecds quantize -o {folder}` first, or give a GGUF file")
    return folder, record
