"""Float GGUF -> quantized GGUF, with llama.cpp's quantizer (`llama_model_quantize`).

The quantizer is called in-process through llama-cpp-python, on a worker thread (ctypes releases
the GIL), while the main thread draws progress from the growing output file. llama.cpp writes its
output in place, so the caller hands it a temporary name and publishes the file only on success.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecds.atomic import write_limit_reached
from edgecds.engine.llama_log import captured_llama_log
from edgecds.errors import EngineError
from edgecds.formats.types import GGML_TYPE_BY_NAME, QuantType
from edgecds.progress import Reporter, watch_file_growth


@dataclass(frozen=True)
class QuantizerOptions:
    """The llama-quantize options edgecds exposes, with llama.cpp's defaults."""

    threads: int = 0  # 0: llama.cpp uses every hardware thread
    allow_requantize: bool = False
    pure: bool = False  # every tensor in the base type, no k-quant mixture
    leave_output_tensor: bool = False  # keep output.weight unquantized

    def as_key(self) -> dict[str, bool]:
        """What changes the output file; threads do not."""
        return {"allow_requantize": self.allow_requantize, "pure": self.pure, "leave_output_tensor": self.leave_output_tensor}


def llama_cpp_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def ftype_of(qtype: QuantType) -> int:
    """The llama.cpp file-type constant for a quantizer row of the type table."""
    import llama_cpp

    value = getattr(llama_cpp, f"LLAMA_FTYPE_{qtype.engine_name}", None)
    if value is None:
        raise EngineError(f"this llama.cpp build ({llama_cpp_version()}) has no file type {qtype.name}; upgrade llama-cpp-python")
    return int(value)


def default_params(qtype: QuantType, options: QuantizerOptions) -> Any:
    """llama.cpp's default quantize params with our type and options set: what a direct caller would pass."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_of(qtype)
    params.nthread = options.threads
    params.allow_requantize = options.allow_requantize
    params.pure = options.pure
    params.quantize_output_tensor = not options.leave_output_tensor
    return params


@dataclass(frozen=True)
class EngineRun:
    seconds: float
    notes: list[str] = field(default_factory=list)  # what llama.cpp warned about, condensed


_FALLBACK = re.compile(r"WARNING: (\d+) of (\d+) tensor\(s\) required fallback quantization")


def _joined(worker: threading.Thread, timeout: float) -> bool:
    worker.join(timeout)
    return not worker.is_alive()


def with_imatrix(params: Any, matrix: Any, file_name: str) -> list[Any]:
    """Hand the importance matrix to the quantizer and record it in the output's metadata, as
    llama-quantize does (quantize.imatrix.file/dataset/entries_count/chunks_count). Returns what
    must stay referenced until the quantizer returns."""
    import ctypes

    import llama_cpp

    names = sorted(matrix.values)
    arrays = [matrix.values[n] for n in names]
    entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for i, (name, values) in enumerate(zip(names, arrays, strict=True)):
        entries[i].name = name.encode()
        entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = values.size
    entries[len(names)].name = None  # the terminator llama.cpp looks for
    texts = [("quantize.imatrix.file", file_name)] + ([("quantize.imatrix.dataset", matrix.datasets[0])] if matrix.datasets else [])
    numbers = [("quantize.imatrix.entries_count", len(names))] + ([("quantize.imatrix.chunks_count", matrix.chunks)] if matrix.chunks else [])
    overrides = (llama_cpp.llama_model_kv_override * (len(texts) + len(numbers) + 1))()
    for i, (key, text) in enumerate(texts):
        overrides[i].key, overrides[i].tag = key.encode(), llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
        value: Any = overrides[i].value  # the union (llama-cpp-python types it as its members)
        value.val_str = text.encode()[:127].decode("utf-8", "ignore").encode()  # cut on a character, as GGUF needs UTF-8
    for i, (key, number) in enumerate(numbers, len(texts)):
        overrides[i].key, overrides[i].tag = key.encode(), llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
        value = overrides[i].value
        value.val_i64 = number
    params.imatrix = entries
    params.kv_overrides = overrides
    return [entries, overrides, arrays]


def with_tensor_types(params: Any, tensor_types: Sequence[tuple[str, str]]) -> list[Any]:
    """Per-tensor types, as llama-quantize --tensor-type PATTERN=TYPE hands them over: (pattern,
    ggml type name) pairs, the first pattern a tensor's name matches (std::regex_search) wins.
    Returns what must stay referenced until the quantizer returns."""
    import llama_cpp

    patterns = [pattern.encode() for pattern, _ in tensor_types]
    entries = (llama_cpp.llama_model_tensor_override * (len(patterns) + 1))()
    for i, (pattern, (_, name)) in enumerate(zip(patterns, tensor_types, strict=True)):
        entries[i].pattern = pattern
        entries[i].type = GGML_TYPE_BY_NAME[name].id
    entries[len(patterns)].pattern = None  # the terminator llama.cpp looks for
    entries[len(patterns)].type = llama_cpp.GGML_TYPE_COUNT  # as llama-quantize ends the list
    params.tt_overrides = entries
    return [entries, patterns]


def quantize(source: Path, outfile: Path, qtype: QuantType, options: QuantizerOptions, expected_bytes: int, reporter: Reporter | None = None,
             imatrix: Any = None, imatrix_file: str = "", tensor_types: Sequence[tuple[str, str]] = ()) -> EngineRun:
    """Quantize `source` into `outfile` (a temporary the caller publishes), with `imatrix` (an
    imatrix.Imatrix) when given, and `tensor_types` (see with_tensor_types) over the file type's choices."""
    import ctypes

    import llama_cpp

    params = default_params(qtype, options)
    keep = with_imatrix(params, imatrix, imatrix_file) if imatrix is not None else []
    keep += with_tensor_types(params, tensor_types) if tensor_types else []
    outcome: dict[str, object] = {}

    def work() -> None:
        try:
            outcome["rc"] = llama_cpp.llama_model_quantize(str(source).encode(), str(outfile).encode(), ctypes.byref(params))
        except BaseException as exc:  # surfaced on the main thread below
            outcome["error"] = exc

    with captured_llama_log() as log:
        start = time.perf_counter()
        worker = threading.Thread(target=work, name=f"quantize-{qtype.name}", daemon=True)
        worker.start()
        watch_file_growth(lambda timeout: _joined(worker, timeout), outfile, expected_bytes, reporter)
        worker.join()
        elapsed = time.perf_counter() - start
    del keep  # the quantizer has returned: the matrix may go
    if "error" in outcome:
        raise EngineError(f"llama.cpp's quantizer failed on {source.name} -> {qtype.name}: {outcome['error']}")
    if outcome.get("rc") != 0:
        limit = write_limit_reached(outfile)
        if limit:
            raise EngineError(f"{limit} while writing {qtype.name}; nothing was published for it; free space or raise the limit and re-run (finished variants are kept)")
        raise EngineError(
            f"llama.cpp's quantizer failed on {source.name} -> {qtype.name} (returned {outcome.get('rc')}):"
            + "".join(f"\n  {line.strip()}" for line in log[-5:] if line.strip())
        )
    notes = []
    for line in log:
        found = _FALLBACK.search(line)
        if found:
            notes.append(
                f"{found.group(1)} of {found.group(2)} tensors fell back to other types: their row width is not a multiple "
                f"of the block of the type llama.cpp chose for them, so the file is larger than {qtype.name}'s nominal "
                f"{qtype.nominal_bits_per_weight:.2f} bits per weight"
            )
    return EngineRun(elapsed, notes)
