"""The engine: how a variant is run, whatever its format.

One home for what every measurement, evaluation, bundle and server asks of an engine:
- `EngineSettings` (how the engine is asked to run a variant) and `RunSettings` (those plus the
  size of the timed work), with `DEFAULT_CTX` and `settings_for`, the settings a device runs with;
- `Runtime`, the interface both engines implement (llama.cpp in `gguf_runtime`, onnxruntime in
  `onnx_runtime`); `edgecds.engine.factory.open_runtime` picks one by the variant's file;
- the greedy decoding every caller shares (`greedy_token`, `generate_greedy`), with or without a
  speculative draft (`speculative`);
- the chat template, rendered for both engines in one bounded sandbox (`chat_template.render_chat`).

Device side: no torch, no transformers; an engine is imported only when a runtime is opened.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from edgecds.errors import EngineError

if TYPE_CHECKING:
    from edgecds.devices import DeviceProfile

DEFAULT_CTX = 2048  # the context a command uses when neither the user nor a device profile names one
DEFAULT_BATCH = 512  # llama.cpp's default n_batch and n_ubatch
DEFAULT_DECODE = 32  # tokens decoded by a measurement unless told otherwise


@dataclass(frozen=True)
class EngineSettings:
    """How the engine is asked to run a variant; recorded with every measurement."""

    n_ctx: int = DEFAULT_CTX
    n_batch: int = DEFAULT_BATCH
    n_ubatch: int = DEFAULT_BATCH
    threads: int | None = None  # None: the engine's default
    n_gpu_layers: int = 0  # -1: every layer
    type_k: str = "f16"
    type_v: str = "f16"
    flash_attn: bool = False
    fuse_attention: bool = True  # ONNX on a CPU: run a compiled copy of the graph with fused attention (toolkit/engine/onnx_fuse.py)
    # GGUF: llama.cpp's repacked CPU weight layouts (AMX, CPU_REPACK); None: as tried on this host (engine/cpu_paths.py)
    extra_buffers: bool | None = None


@dataclass(frozen=True)
class RunSettings(EngineSettings):
    """Engine settings plus the size of the work: what hwbench/predict.py predicts and
    hwbench/measure.py runs."""

    prompt_tokens: int | None = None  # None: fill the context, leaving room for the decode
    decode_tokens: int = DEFAULT_DECODE

    @property
    def effective_prompt_tokens(self) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return max(1, self.n_ctx - self.decode_tokens)


def device_backend(device: DeviceProfile) -> str:
    """The engine backend edgecds runs GGUF on for this device: its first listed one."""
    return device.backends[0]


def engine_threads(requested: int | None) -> int | None:
    """The threads an engine is given: `requested` (None: the engine's default), but never more
    than the CPUs this process may run on. llama.cpp's threads wait for each other by spinning, so
    two processes that each run a thread a CPU on the same CPUs take 3.8x the time of one alone,
    where pinned to a CPU each they take 1.4x (hwbench/bench/bench_threads.py, 2 cores)."""
    from edgecds.host import usable_cpus

    usable = usable_cpus()
    if requested is None:
        return usable if usable < (os.cpu_count() or usable) else None
    return min(requested, usable)


def settings_for(device: DeviceProfile, n_ctx: int | None = None, **overrides: Any) -> RunSettings:
    """The settings a device runs with: its default context, one thread a core, every layer on its
    GPU if it has one; `overrides` that are not None replace them."""
    values: dict[str, Any] = {"n_ctx": n_ctx or device.default_ctx, "threads": device.cpu_cores,
                              "n_gpu_layers": 0 if device_backend(device) == "cpu" else -1}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RunSettings(**values)


def check_room(n_past: int, n: int, n_ctx: int) -> None:
    if n_past + n > n_ctx:
        raise EngineError(f"{n_past + n} tokens do not fit the context of {n_ctx}; use a longer --ctx")


class Runtime(Protocol):
    format: str
    n_vocab: int

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]: ...
    def chat_prompt(self, user_message: str, system: str | None = None) -> str: ...  # one turn, ready for the reply
    def chat_messages(self, messages: list[dict[str, str]]) -> str: ...  # a conversation (role, content), ready for the reply
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


CHAT_ROLES = ("system", "user", "assistant")


def one_turn(user_message: str, system: str | None = None) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user_message}]


def plain_chat(messages: list[dict[str, str]]) -> str:
    """A conversation for a model that ships no chat template: the turns' texts, a blank line apart."""
    return "\n\n".join(m["content"] for m in messages)


def argmax(logits: Any) -> int:
    """The most likely token of one row of logits (temperature 0)."""
    import numpy as np

    return int(np.argmax(logits))


def greedy_token(runtime: Runtime) -> int:
    """The most likely next token after what was evaluated."""
    return argmax(runtime.logits())


Picker = Callable[[Any], int]  # a row of next-token logits -> the token chosen


def sampler(seed: int, temperature: float, top_p: float) -> Picker:
    """A seeded next-token picker: softmax at `temperature`, then the smallest set of tokens whose
    probability reaches `top_p` (nucleus sampling), drawn from with numpy's PCG64. The same seed,
    settings and model give the same tokens, on either engine."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def pick(row: Any) -> int:
        logits = np.asarray(row, dtype=np.float64) / max(temperature, 1e-6)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        return int(rng.choice(keep, p=p[keep] / p[keep].sum()))

    return pick


class Drafting(Protocol):
    """A speculative draft with its tally (engine/speculative.py `Speculation`), as `generate_greedy` takes it."""

    def generate(self, runtime: Runtime, prompt: list[int], max_tokens: int, pick: Picker,
                 stop: Callable[[list[int]], bool] | None, reset: bool) -> list[int]: ...


def generate_greedy(runtime: Runtime, prompt: list[int], max_tokens: int, stop: Callable[[list[int]], bool] | None = None,
                    reset: bool = True, pick: Picker = argmax, draft: Drafting | None = None) -> list[int]:
    """Evaluate `prompt` (from an empty cache unless `reset` is False) and decode greedily (or with
    `pick`, e.g. a `sampler`) until an end token, `max_tokens`, or `stop(tokens so far)`; the
    generated tokens, the end token excluded. With a `draft`, the same tokens by speculative
    decoding (engine/speculative.py), its tally added to the draft's."""
    if draft is not None:
        return draft.generate(runtime, prompt, max_tokens, pick, stop, reset)
    if reset:
        runtime.reset()
    runtime.eval(prompt)
    out: list[int] = []
    while len(out) < max_tokens:
        token = pick(runtime.logits())
        if runtime.is_end(token):
            break
        out.append(token)
        if stop is not None and stop(out):
            break
        runtime.eval([token])
    return out
