"""The importance matrix a `quantize --imatrix` run uses: which calibration text, computed once
per float model and text (or a llama-imatrix file the user brings), checked against the model,
and the provenance every variant built with it records.

The shipped text (`--imatrix clinical`) is clinical prose written for edgecds and dedicated CC0,
distinct from the drift text and from every case (a test checks that no 8 words in a row are
shared), so a variant is never calibrated on what it is then scored on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgecds.atomic import atomic_path
from edgecds.digest import cache_key, sha256_file
from edgecds.errors import InvalidInputError
from edgecds.progress import Reporter, lazy_step
from edgecds.quant.imatrix import DEFAULT_CHUNK

CLINICAL = "clinical"
CALIBRATION_TEXT = "calibration-text.txt"
MAX_TEXT_BYTES = 64 << 20
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ImatrixOptions:
    text: str = CLINICAL  # "clinical" (the shipped text), a text file, or an imatrix GGUF from llama-imatrix
    chunks: int | None = None  # at most this many chunks; None: the whole text
    chunk_size: int = DEFAULT_CHUNK  # tokens per chunk (llama-imatrix -c)


def calibration_text() -> str:
    return resources.files("edgecds.clinical").joinpath(CALIBRATION_TEXT).read_text(encoding="utf-8")


def _text_of(options: ImatrixOptions) -> tuple[str, str]:
    """(dataset name, text) of a calibration text; a file's bytes must be UTF-8 text."""
    if options.text == CLINICAL:
        return CALIBRATION_TEXT, calibration_text()
    path = Path(options.text)
    if path.is_dir():
        raise InvalidInputError(f"--imatrix {path} is a folder; pass a text file")
    if not path.is_file():
        raise InvalidInputError(f"--imatrix {options.text}: no such file; pass 'clinical', a UTF-8 text file or an imatrix GGUF")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise InvalidInputError(f"--imatrix {path}: larger than {MAX_TEXT_BYTES >> 20} MiB; a calibration text needs far less")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"--imatrix {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text.strip():
        raise InvalidInputError(f"--imatrix {path} is empty")
    return path.name, text


def brings_matrix(options: ImatrixOptions) -> bool:
    """Whether --imatrix names a matrix already computed (a llama-imatrix GGUF), not a text to compute one over."""
    path = Path(options.text)
    if options.text == CLINICAL or not path.is_file():
        return False
    with open(path, "rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def check_fits(matrix: Any, model: Path) -> None:
    """Every entry names a weight of the model and has one value per input column of it: a matrix
    computed for another model is refused here, not deep inside the quantizer."""
    from edgecds.formats.gguf_file import read_gguf

    shapes = {t.name: t.shape for t in read_gguf(model).tensors}
    for name, values in matrix.values.items():
        shape = shapes.get(name)
        if shape is None:
            raise InvalidInputError(f"the importance matrix has an entry for {name}, which {model.name} does not have: "
                                    "it was computed for another model")
        expected = shape[0] * (shape[2] if len(shape) > 2 else 1)
        if values.size != expected:
            raise InvalidInputError(f"the importance matrix has {values.size} values for {name}; {model.name} needs {expected}: "
                                    "it was computed for another model")


@dataclass(frozen=True)
class Prepared:
    matrix: Any  # quant.imatrix.Imatrix
    path: Path
    provenance: dict[str, Any]  # recorded in every variant built with it (variants.json: options.imatrix)


def prepare(options: ImatrixOptions, model: Path, model_sha: str, out: Path, name: str, recorded: list[dict[str, Any]],
            tools: dict[str, str], reporter: Reporter | None = None, threads: int | None = None) -> Prepared:
    """The matrix for `model` (the float GGUF): reused when a recorded variant names this very
    computation and the file still hashes the same, else computed (or copied in) and written."""
    from edgecds.quant import imatrix

    if brings_matrix(options):
        source = Path(options.text)
        key = cache_key({"file": sha256_file(source), "model": model_sha})
    else:
        dataset, text = _text_of(options)
        text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
        key = cache_key({"text": text_sha, "model": model_sha, "chunks": options.chunks, "chunk_size": options.chunk_size, "tools": tools})
    target = out / f"{name}-imatrix-{key[:12]}.gguf"  # one file per computation: earlier variants' provenance keeps naming theirs
    for earlier in recorded:
        if earlier.get("key") == key and target.is_file() and sha256_file(target) == earlier.get("sha256"):
            matrix = imatrix.read(target)
            return Prepared(matrix, target, earlier)
    if brings_matrix(options):
        if target.exists() and os.path.samefile(options.text, target):
            matrix = imatrix.read(target)
            check_fits(matrix, model)
        else:
            with atomic_path(target) as temp:  # the copy is what is checked and used; published only once it passed
                shutil.copyfile(options.text, temp)
                matrix = imatrix.read(temp, shown=Path(options.text))
                check_fits(matrix, model)
        provenance = {"dataset": matrix.datasets[0] if matrix.datasets else "", "text_sha256": None, "chunks": matrix.chunks,
                      "chunk_size": matrix.chunk_size, "tokens": matrix.chunks * matrix.chunk_size, "entries": len(matrix.values),
                      "computed_by": "llama-imatrix (brought by the user)"}
    else:
        steps: list[Any] = []

        def on_chunk(done: int, total: int) -> None:  # the chunk count is known once the text is tokenized
            if not steps:
                steps.append(lazy_step(reporter, "imatrix  calibrate", total, "chunks"))
            if steps[0]:
                steps[0](done)

        made = imatrix.compute(model, text, dataset, text_sha, target, options.chunk_size, options.chunks, threads or None, on_chunk)
        if reporter:
            reporter.finish()
        matrix = imatrix.read(target)
        provenance = {**made.provenance(), "computed_by": "edgecds (llama-imatrix's accumulation through llama.cpp's eval callback)",
                      "seconds": made.seconds}
    provenance = {**provenance, "file": target.name, "sha256": sha256_file(target), "key": key}
    return Prepared(matrix, target, provenance)
