"""A GGUF variant in llama.cpp, behind the engine's `Runtime` interface (edgecds.engine)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgecds.engine import EngineSettings, check_room, engine_threads, one_turn, plain_chat
from edgecds.errors import EngineError, UsageError


def ggml_type(name: str) -> int:
    """llama.cpp's number for a KV-cache type name (f16, q8_0, ...)."""
    import llama_cpp

    value = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
    if not isinstance(value, int):
        raise UsageError(f"llama-cpp-python does not know the KV-cache type {name!r}")
    return value


_DEFAULTS_LOCK = threading.Lock()


@contextlib.contextmanager
def model_params_with(extra_buffers: bool) -> Iterator[None]:
    """`Llama` loads with `use_extra_bufts` as given. llama-cpp-python 0.3.36 has no keyword for it:
    `Llama.__init__` starts from `llama_model_default_params()` and loads at once, so that function
    is wrapped for the length of one construction (under a lock: it is module state)."""
    import llama_cpp.llama as high_level

    low = high_level.llama_cpp
    original = low.llama_model_default_params

    def defaults() -> Any:
        params = original()
        params.use_extra_bufts = extra_buffers
        return params

    with _DEFAULTS_LOCK:
        low.llama_model_default_params = defaults
        try:
            yield
        finally:
            low.llama_model_default_params = original


class GgufRuntime:
    """A GGUF variant in llama.cpp: loaded through llama-cpp-python's `Llama`, evaluated through
    llama.cpp's C API (llama-cpp-python's own `eval` also copies every step's logits into a
    Python-side array, which costs decode speed and memory a clinic's runtime would not spend)."""

    format = "gguf"

    def __init__(self, path: Path, settings: EngineSettings) -> None:
        import llama_cpp

        from edgecds.engine.cpu_paths import resolve, weight_buffers
        from edgecds.engine.llama_log import captured_llama_log

        extra = settings.extra_buffers if settings.extra_buffers is not None else resolve().extra_buffers
        threads = engine_threads(settings.threads)
        with model_params_with(extra), captured_llama_log() as log:  # the lock first: one load's log is its own
            try:
                self._llm = llama_cpp.Llama(
                    model_path=str(path), n_ctx=settings.n_ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                    n_threads=threads, n_threads_batch=threads, n_gpu_layers=settings.n_gpu_layers,
                    type_k=ggml_type(settings.type_k), type_v=ggml_type(settings.type_v), flash_attn=settings.flash_attn,
                    verbose=False, seed=0,
                )
            except ValueError as exc:
                lines = [line.strip() for line in log if len(line.strip()) > 1]
                said = [line for line in lines if any(w in line.lower() for w in ("error", "require", "fail", "unable", "invalid"))]
                reason = "; ".join((said or lines)[-2:])  # llama.cpp's own words, which Python's exception lacks
                raise EngineError(f"{path.name}: llama.cpp could not load it ({exc}){': ' + reason if reason else ''}") from None
        self._log = list(log)
        self.extra_buffers = extra
        self.weight_buffers = weight_buffers(self._log)  # e.g. ("CPU_REPACK", "CPU_Mapped"): where llama.cpp put the weights
        self.n_vocab = self._llm.n_vocab()
        self._n_batch, self._n_ctx = settings.n_batch, settings.n_ctx
        self._n_past = 0

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def chat_prompt(self, user_message: str, system: str | None = None) -> str:
        return self.chat_messages(one_turn(user_message, system))

    def chat_messages(self, messages: list[dict[str, str]]) -> str:
        """The conversation in the model's own chat template (from the GGUF), ready for the reply,
        rendered in the sandbox every caller shares (engine/chat_template.py)."""
        from edgecds.engine.chat_template import render_chat

        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            return plain_chat(messages)
        llm = self._llm
        return render_chat(template, messages, bos_token=llm.detokenize([llm.token_bos()]).decode(errors="replace"),
                           eos_token=llm.detokenize([llm.token_eos()]).decode(errors="replace"))

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
        # special tokens rendered, as the ONNX runtime does: reasoning markers (gpt-oss's harmony
        # channels) are control tokens, and the evaluator must see them to set the reasoning aside
        return self._llm.detokenize(tokens, special=True).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(self._llm.model), token))

    def bos(self) -> int:
        return int(self._llm.token_bos())

    def engine_log(self) -> list[str]:
        return self._log

    def close(self) -> None:
        self._llm.close()
