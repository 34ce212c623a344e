"""One interface to run a variant, whatever its format: load, tokenize, evaluate, next-token logits.

Profiling, evaluation, `run` and `serve` talk to a `Runtime`, never to an engine directly, so GGUF
(llama.cpp) and ONNX variants are measured and scored alike. Device side: no torch, no
transformers; the engine is imported when a runtime is opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgecds.errors import EngineError, UsageError


@dataclass(frozen=True)
class EngineSettings:
    """How the engine is asked to run a variant; recorded with every measurement."""

    n_ctx: int = 2048
    n_batch: int = 512
    n_ubatch: int = 512
    threads: int | None = None  # None: the engine's default
    n_gpu_layers: int = 0  # -1: every layer
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    fuse_attention: bool = True  # ONNX on a CPU: run a compiled copy of the graph with fused attention (onnx_fuse.py)


def check_room(n_past: int, n: int, n_ctx: int) -> None:
    if n_past + n > n_ctx:
        raise EngineError(f"{n_past + n} tokens do not fit the context of {n_ctx}; use a longer --ctx")


class Runtime(Protocol):
    format: str
    n_vocab: int

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]: ...
    def chat_prompt(self, user_message: str, system: str | None = None) -> str: ...
    def reset(self) -> None: ...  # empty the KV cache
    def truncate(self, n_tokens: int) -> None: ...  # keep the first n_tokens of the context, drop the rest
    def eval(self, tokens: list[int]) -> None: ...  # append to the context, in batches
    def eval_logits(self, tokens: list[int]) -> Any: ...  # append, returning every token's next-token logits (len x n_vocab)
    def logits(self) -> Any: ...  # numpy float32 array: the last evaluated token's next-token logits
    def detokenize(self, tokens: list[int]) -> str: ...
    def is_end(self, token: int) -> bool: ...  # end of generation (EOS, end of turn)
    def bos(self) -> int: ...
    def engine_log(self) -> list[str]: ...  # what the engine said while loading (buffer sizes)
    def close(self) -> None: ...


class GgufRuntime:
    """A GGUF variant in llama.cpp: loaded through llama-cpp-python's `Llama`, evaluated through
    llama.cpp's C API (llama-cpp-python's own `eval` also copies every step's logits into a
    Python-side array, which costs decode speed and memory a clinic's runtime would not spend)."""

    format = "gguf"

    def __init__(self, path: Path, settings: EngineSettings) -> None:
        import llama_cpp

        from edgecds.quant.gguf_quantize import captured_llama_log

        def ggml_type(name: str) -> int:
            value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
            if not isinstance(value, int):
                raise UsageError(f"llama-cpp-python does not know the KV-cache type {name!r}")
            return value

        with captured_llama_log() as log:
            try:
                self._llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                    n_threads=settings.threads, n_threads_batch=settings.threads, n_gpu_layers=settings.n_gpu_layers,
                    type_k=ggml_type(settings.type_k), type_v=ggml_type(settings.type_v), flash_attn=settings.flash_attn,
                    verbose=False, seed=0,
                )
            except ValueError as exc:
                lines = [line.strip() for line in log if len(line.strip()) > 1]
                said = [line for line in lines if any(w in line.lower() for w in ("error", "require", "fail", "unable", "invalid"))]
                reason = "; ".join((said or lines)[-2:])  # llama.cpp's own words, which Python's exception lacks
                raise EngineError(f"{path.name}: llama.cpp could not load it ({exc}){': ' + reason if reason else ''}") from None
        self._log = list(log)
        self.n_vocab = self._llm.n_vocab()
        self._n_batch, self._n_ctx = settings.n_batch, settings.n_ctx
        self._n_past = 0

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def chat_prompt(self, user_message: str, system: str | None = None) -> str:
        """The message (after a system message, if given) in the model's own chat template (from
        the GGUF), ready for the reply."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return f"{system}\n\n{user_message}" if system else user_message
        llm = self._llm
        formatter = Jinja2ChatFormatter(template=template, eos_token=llm.detokenize([llm.token_eos()]).decode(errors="replace"),
                                        bos_token=llm.detokenize([llm.token_bos()]).decode(errors="replace"))
        messages: list[Any] = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_message}]
        return str(formatter(messages=messages).prompt)

    def reset(self) -> None:
        import llama_cpp

        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._llm.ctx), True)
        self._n_past = 0

    def truncate(self, n_tokens: int) -> None:
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._llm.ctx), 0, n_tokens, -1)
        self._n_past = min(self._n_past, n_tokens)

    def eval(self, tokens: list[int]) -> None:
        import llama_cpp

        check_room(self._n_past, len(tokens), self._n_ctx)
        for start in range(0, len(tokens), self._n_batch):
            chunk = tokens[start : start + self._n_batch]
            ids = (llama_cpp.llama_token * len(chunk))(*chunk)
            status = llama_cpp.llama_decode(self._llm.ctx, llama_cpp.llama_batch_get_one(ids, len(chunk)))
            if status != 0:
                raise EngineError(f"llama_decode failed with status {status}")
            self._n_past += len(chunk)

    def eval_logits(self, tokens: list[int]) -> Any:
        import llama_cpp
        import numpy as np

        check_room(self._n_past, len(tokens), self._n_ctx)
        rows = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
        for start in range(0, len(tokens), self._n_batch):
            chunk = tokens[start : start + self._n_batch]
            batch = llama_cpp.llama_batch_init(len(chunk), 0, 1)
            try:
                for i, token in enumerate(chunk):
                    batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, self._n_past + i, 1, True
                    batch.seq_id[i][0] = 0
                batch.n_tokens = len(chunk)
                status = llama_cpp.llama_decode(self._llm.ctx, batch)
                if status != 0:
                    raise EngineError(f"llama_decode failed with status {status}")
                for i in range(len(chunk)):
                    rows[start + i] = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._llm.ctx, i), shape=(self.n_vocab,))
            finally:
                llama_cpp.llama_batch_free(batch)
            self._n_past += len(chunk)
        return rows

    def logits(self) -> Any:
        """A view of llama.cpp's logits for the last evaluated token: valid until the next eval."""
        import llama_cpp
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._llm.ctx, -1), shape=(self.n_vocab,))

    def detokenize(self, tokens: list[int]) -> str:
        return self._llm.detokenize(tokens).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(self._llm.model), token))

    def bos(self) -> int:
        return int(self._llm.token_bos())

    def engine_log(self) -> list[str]:
        return self._log

    def close(self) -> None:
        self._llm.close()


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(magic)) == magic
    except OSError:
        return False


def open_runtime(path: Path, settings: EngineSettings) -> Runtime:
    """The runtime for a variant's format, chosen by its file."""
    if path.suffix == ".gguf" or _starts_with(path, b"GGUF"):  # by content too: load checks run on temporaries
        return GgufRuntime(path, settings)
    if path.is_dir() or path.suffix == ".onnx":
        from edgecds.onnx_runtime import OnnxRuntime

        return OnnxRuntime(path if path.is_dir() else path.parent, settings)
    raise UsageError(f"{path.name}: not a variant edgecds can run (expected a .gguf file or an ONNX variant's folder)")
