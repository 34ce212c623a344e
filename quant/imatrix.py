"""An importance matrix, computed with llama.cpp's method through the engine's eval callback.

llama.cpp's `llama-imatrix` runs the float model over a calibration text in chunks of `n_ctx`
tokens and, for every matrix multiplication by a weight of a block (`blk.*`), adds the squares of
the activations entering it, column by column, and counts the rows: the quantizer then keeps more
precision where `sum / count` is large. This module does the same accumulation through the context's
`cb_eval` callback (llama-cpp-python ships the library, not the tool), writes llama.cpp's GGUF
imatrix format (`<tensor>.in_sum2`, `<tensor>.counts`, `imatrix.datasets`, `imatrix.chunk_count`,
`imatrix.chunk_size`), and reads it back for `llama_model_quantize`'s `imatrix` parameter.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgecds.engine import engine_threads
from edgecds.errors import EngineError, InvalidInputError

if TYPE_CHECKING:
    from edgecds.formats.gguf_file import GgufInfo

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32 = 0
MIN_ROWS = 16  # llama-imatrix ignores smaller batches (a generation step says little about a column)
DEFAULT_CHUNK = 512  # llama-imatrix's usual context: tokens per chunk


class GgmlTensor(ctypes.Structure):
    """ggml.h's `struct ggml_tensor`, as far as the callback reads it."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * GGML_MAX_DIMS), ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)), ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC), ("view_src", ctypes.POINTER(GgmlTensor)), ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p), ("name", ctypes.c_char * GGML_MAX_NAME), ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8),
]


def _ggml_ops() -> dict[str, int]:
    """ggml's numbers for the two matrix products, asked of the library (the enum grows between
    releases); both come early in it, so the names are read only until both are found."""
    from llama_cpp import _ggml

    name_of = _ggml.libggml.ggml_op_name
    name_of.argtypes, name_of.restype = [ctypes.c_int], ctypes.c_char_p
    ops: dict[str, int] = {}
    for number in range(128):
        name = (name_of(number) or b"").decode()
        if name in ("MUL_MAT", "MUL_MAT_ID"):
            ops[name] = number
        if len(ops) == 2:
            return ops
    raise EngineError("this llama.cpp build names no MUL_MAT operation; upgrade llama-cpp-python")


@dataclass
class Stats:
    """One weight's accumulation: squared activations per input column, and the rows seen."""

    sums: Any  # numpy float64 [n_mat, ne0]
    count: int = 0


@dataclass
class Collector:
    """The eval callback's state: llama-imatrix's `IMatrixCollector` for dense weights."""

    mul_mat: int
    stats: dict[str, Stats] = field(default_factory=dict)
    skipped_ops: set[str] = field(default_factory=set)  # MoE routing (MUL_MAT_ID) is refused, not silently dropped
    mul_mat_id: int = -1

    error: BaseException | None = None  # raised in the callback, where C cannot take it: re-raised after the chunk

    def __call__(self, pointer: Any, ask: bool, user_data: Any) -> bool:
        try:
            return self._handle(pointer, ask)
        except BaseException as exc:  # returning False would silently cut the rest of the graph
            self.error = self.error or exc
            return True

    def _handle(self, pointer: Any, ask: bool) -> bool:
        tensor = ctypes.cast(pointer, ctypes.POINTER(GgmlTensor)).contents
        if tensor.op == self.mul_mat_id:
            self.skipped_ops.add("MUL_MAT_ID")
            return False
        if tensor.op != self.mul_mat:
            return False
        weight, acts = tensor.src[0].contents, tensor.src[1].contents
        name = weight.name.decode(errors="replace")
        if ask:
            return bool(acts.ne[1] >= MIN_ROWS and acts.type == GGML_TYPE_F32 and name.startswith("blk."))
        self._collect(name, weight, acts)
        return True

    def _collect(self, name: str, weight: GgmlTensor, acts: GgmlTensor) -> None:
        import numpy as np

        if not acts.data:
            raise EngineError(f"the activations entering {name} are not in host memory")
        ne = [int(acts.ne[i]) for i in range(4)]
        nb = [int(acts.nb[i]) for i in range(4)]
        span = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + 4
        raw = memoryview((ctypes.c_char * span).from_address(acts.data)).cast("B")
        x = np.ndarray((ne[3], ne[2], ne[1], ne[0]), dtype=np.float32, buffer=raw, strides=(nb[3], nb[2], nb[1], nb[0]))
        n_mat = int(weight.ne[2]) * int(weight.ne[3])
        squares = np.square(x, dtype=np.float64).sum(axis=2)  # [ne3, ne2, ne0]
        entry = self.stats.get(name)
        if entry is None:
            entry = self.stats[name] = Stats(np.zeros((n_mat, ne[0]), dtype=np.float64))
        for i3 in range(ne[3]):
            for i2 in range(ne[2]):
                entry.sums[(i3 % int(weight.ne[3])) * int(weight.ne[2]) + (i2 % int(weight.ne[2]))] += squares[i3, i2]
        entry.count += ne[1] * ne[2] * ne[3] // n_mat
        if not np.isfinite(squares).all():
            raise EngineError(f"non-finite activations entering {name}: the float model is damaged or overflows in float16")


@dataclass(frozen=True)
class ImatrixResult:
    path: str
    dataset: str  # the calibration text's name, as llama.cpp records it
    sha256: str  # of the calibration text
    chunks: int
    chunk_size: int
    tokens: int
    entries: int
    seconds: float

    def provenance(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "text_sha256": self.sha256, "chunks": self.chunks, "chunk_size": self.chunk_size,
                "tokens": self.tokens, "entries": self.entries, "file": Path(self.path).name}


def _tokens(llama_cpp: Any, vocab: Any, text: str) -> list[int]:
    data = text.encode("utf-8")
    room = len(data) + 16
    buffer = (llama_cpp.llama_token * room)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, room, True, False)  # with BOS when the model adds one
    if n < 0:
        raise EngineError("the calibration text could not be tokenized")
    return list(buffer[:n])


def _decode_chunk(llama_cpp: Any, ctx: Any, batch: Any, tokens: list[int]) -> None:
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
    batch.n_tokens = len(tokens)
    for i, token in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = True  # every position, as llama-imatrix (else the last layer runs on the last row alone)
    if llama_cpp.llama_decode(ctx, batch) != 0:
        raise EngineError("llama.cpp failed to evaluate a calibration chunk")


def compute(model: Path, text: str, dataset: str, text_sha256: str, output: Path, chunk_size: int = DEFAULT_CHUNK,
            max_chunks: int | None = None, threads: int | None = None, on_chunk: Callable[[int, int], None] | None = None) -> ImatrixResult:
    """The importance matrix of the float GGUF `model` over `text`, written to `output`."""
    import llama_cpp

    from edgecds.formats.gguf_file import read_gguf

    info = read_gguf(model)  # read once: the expert check before, the completeness check after
    count = info.metadata.get(f"{info.architecture}.expert_count")
    if isinstance(count, int) and count > 0:  # refused before a minute of calibration (the run would see MUL_MAT_ID)
        raise EngineError(experts_refusal(model.name, count))
    start = time.perf_counter()
    ops = _ggml_ops()
    collector = Collector(ops["MUL_MAT"], mul_mat_id=ops.get("MUL_MAT_ID", -1))
    callback = llama_cpp.ggml_backend_sched_eval_callback(collector)  # kept referenced until the context is freed
    from edgecds.engine.llama_log import captured_llama_log

    with captured_llama_log() as log:  # llama.cpp's load chatter stays off the terminal; its last lines explain a failure
        n_chunks = _compute_locked(llama_cpp, model, text, dataset, collector, callback, chunk_size, max_chunks, threads, on_chunk, log)
    if collector.skipped_ops:
        raise EngineError("this model routes tokens to experts (MUL_MAT_ID): edgecds computes importance matrices for dense models only")
    _check_complete(info, collector.stats)
    write(output, collector.stats, [dataset], n_chunks, chunk_size)
    return ImatrixResult(str(output), dataset, text_sha256, n_chunks, chunk_size, n_chunks * chunk_size, len(collector.stats),
                         round(time.perf_counter() - start, 3))


def experts_refusal(name: str, count: int) -> str:
    return (f"{name} routes tokens to {count} experts: edgecds computes importance matrices for dense models only; quantize it "
            "without --imatrix, or bring one from llama-imatrix (--imatrix FILE.gguf)")


def _check_complete(info: GgufInfo, stats: dict[str, Stats]) -> None:
    """Every matrix weight of every block got activations (a partial matrix would quietly leave
    the rest to the quantizer's defaults)."""
    expected = {t.name for t in info.tensors if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) >= 2}
    missing = sorted(expected - set(stats))
    if missing:
        raise EngineError(f"no activations reached {len(missing)} weight(s) ({', '.join(missing[:3])}...): "
                          "this build of llama.cpp does not run them where edgecds can read them")


def _compute_locked(llama_cpp: Any, model: Path, text: str, dataset: str, collector: Collector, callback: Any, chunk_size: int,
                    max_chunks: int | None, threads: int | None, on_chunk: Callable[[int, int], None] | None, log: list[str]) -> int:
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = 0  # the callback reads activations in host memory, as the CPU backend leaves them
    handle = llama_cpp.llama_model_load_from_file(str(model).encode(), mparams)
    if not handle:
        raise EngineError(f"llama.cpp could not load {model}:" + "".join(f"\n  {line.strip()}" for line in log[-3:] if line.strip()))
    try:
        vocab = llama_cpp.llama_model_get_vocab(handle)
        # a few bytes a token at most: only what the chunks asked for is tokenized
        tokens = _tokens(llama_cpp, vocab, text if max_chunks is None else text[: (max_chunks + 1) * chunk_size * 16])
        n_chunks = len(tokens) // chunk_size if max_chunks is None else min(max_chunks, len(tokens) // chunk_size)
        if n_chunks < 1:
            raise InvalidInputError(f"the calibration text {dataset} has {len(tokens)} tokens: fewer than one chunk of {chunk_size}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = chunk_size
        cparams.cb_eval, cparams.cb_eval_user_data = callback, None
        cparams.op_offload = False  # a GPU build would otherwise run big products on copies of the weights
        threads = engine_threads(threads)
        if threads:
            cparams.n_threads = cparams.n_threads_batch = threads
        _run_chunks(llama_cpp, handle, vocab, cparams, tokens, n_chunks, chunk_size, on_chunk, collector)
    finally:
        llama_cpp.llama_model_free(handle)
    return n_chunks


def _run_chunks(llama_cpp: Any, handle: Any, vocab: Any, cparams: Any, tokens: list[int], n_chunks: int, chunk_size: int,
                on_chunk: Callable[[int, int], None] | None, collector: Collector) -> None:
    ctx = llama_cpp.llama_init_from_model(handle, cparams)
    if not ctx:
        raise EngineError("llama.cpp could not create a context for the importance matrix")
    batch = llama_cpp.llama_batch_init(chunk_size, 0, 1)
    add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
    bos = int(llama_cpp.llama_vocab_bos(vocab))
    try:
        for n in range(n_chunks):
            chunk = tokens[n * chunk_size:(n + 1) * chunk_size]
            if add_bos:  # as llama-imatrix does: every chunk starts as a document does
                chunk[0] = bos
            _decode_chunk(llama_cpp, ctx, batch, chunk)
            if collector.error is not None:
                raise collector.error
            if on_chunk:
                on_chunk(n + 1, n_chunks)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


def write(output: Path, stats: dict[str, Stats], datasets: list[str], chunks: int, chunk_size: int) -> None:
    """llama.cpp's GGUF imatrix file, written atomically."""
    import gguf
    import numpy as np

    from edgecds.atomic import atomic_path

    with atomic_path(output) as temp:
        writer = gguf.GGUFWriter(str(temp), arch="imatrix")
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", datasets)
        writer.add_uint32("imatrix.chunk_count", chunks)
        writer.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(stats):
            entry = stats[name]
            n_mat = entry.sums.shape[0]
            sums = entry.sums.astype(np.float32)
            # as llama-imatrix lays them out: one row per matrix, a dense weight's without the matrix axis
            writer.add_tensor(f"{name}.in_sum2", sums.reshape(-1) if n_mat == 1 else sums)
            writer.add_tensor(f"{name}.counts", np.full((n_mat,), entry.count, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


@dataclass(frozen=True)
class Imatrix:
    """A matrix read back for the quantizer: `sum / count` per weight, as llama-quantize derives it."""

    values: dict[str, Any]  # weight name -> float32 [n_mat * ne0]
    datasets: list[str]
    chunks: int
    chunk_size: int


def read(path: Path, shown: Path | None = None) -> Imatrix:
    """An imatrix GGUF file (ours or llama-imatrix's), checked as untrusted input; errors name
    `shown` (the user's file, when `path` is a copy of it) or `path`."""
    import gguf
    import numpy as np

    where = shown or path

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise InvalidInputError(f"{where}: not an importance-matrix GGUF ({exc})") from None
    fields = {f.name: f for f in reader.fields.values()}
    if "imatrix.chunk_count" not in fields:
        raise InvalidInputError(f"{where}: no imatrix.chunk_count: not llama.cpp's imatrix format (the legacy .dat format is not read)")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    values: dict[str, Any] = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        weight = name[: -len(".in_sum2")]
        counts = tensors.get(f"{weight}.counts")
        if counts is None or counts.size == 0 or sums.size % counts.size:  # llama.cpp drops the matrix axis of a dense weight
            raise InvalidInputError(f"{where}: {weight} has sums without matching counts")
        sums = sums.reshape(counts.size, -1)
        per = counts.reshape(-1, 1)
        values[weight] = np.where(per > 0, sums / np.where(per > 0, per, 1), 1.0).astype(np.float32).reshape(-1)
    if not values:
        raise InvalidInputError(f"{where}: holds no importance values")
    datasets = [bytes(fields["imatrix.datasets"].parts[i]).decode(errors="replace") for i in fields["imatrix.datasets"].data] \
        if "imatrix.datasets" in fields else []
    return Imatrix(values, datasets, int(fields["imatrix.chunk_count"].parts[-1][0]),
                   int(fields["imatrix.chunk_size"].parts[-1][0]) if "imatrix.chunk_size" in fields else 0)
