"""Speculative decoding: a cheap drafter guesses the next tokens, the target checks them all in one
batch, and every guess the target would have made itself is kept.

Two drafters, as llama.cpp ships them:
- a draft model: another variant of the same model (same vocabulary), decoding greedily ahead and
  stopping where its own top probability falls below `p_min` (llama.cpp's `--draft-p-min`);
- `ngram`: prompt lookup, no second model: the tokens that followed the last occurrence of the
  text's last few tokens earlier in the prompt or answer.

Why the output is the target's own: every emitted token is picked by the target's own picker
(argmax, or the seeded sampler) from the target's logits at that position; a drafted token is kept
only when it equals that pick, and the first pick that differs replaces it. For greedy decoding that
is the same token sequence; for sampling it is the standard acceptance rule for a draft that
proposes one token with certainty (accept it with the target's probability of it, otherwise draw
from the target without it), so each token still comes from the target's distribution, and the
sampler draws once per emitted token, as without a draft.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgecds.errors import UsageError

if TYPE_CHECKING:
    from edgecds.engine import EngineSettings, Runtime

NGRAM = "ngram"
NO_DRAFT = "none"
# Tokens drafted a step at most. llama.cpp's --draft-max defaults to 16, for GPUs, where a batch of
# 17 costs about what one token does; on a CPU the verifying batch costs more with its length, so
# drafts are cut shorter.
DEFAULT_DRAFT_MAX = 8
DEFAULT_P_MIN = 0.75  # llama.cpp's --draft-p-min default
NGRAM_SIZES = (4, 3, 2)  # the lookup's key, longest first: a 1-token key matches too often to pay
VOCAB_PROBE = "A 58-year-old man with chest pain, troponin 2.3 ng/mL; ECG: ST elevation in II, III, aVF."


@dataclass(frozen=True)
class DraftSettings:
    """How a target is drafted for: `source` is "ngram" or the draft variant's file."""

    source: str
    max_tokens: int = DEFAULT_DRAFT_MAX
    p_min: float = DEFAULT_P_MIN

    @property
    def is_ngram(self) -> bool:
        return self.source == NGRAM

    def __post_init__(self) -> None:
        if not 1 <= self.max_tokens <= 64:
            raise UsageError(f"--draft-max must be between 1 and 64, not {self.max_tokens}")
        if not 0.0 <= self.p_min <= 1.0:
            raise UsageError(f"--draft-p-min must be between 0 and 1, not {self.p_min}")


@dataclass
class DraftStats:
    """What the drafter did: each verifying batch of the target is a step."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def add(self, other: DraftStats) -> None:
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted

    def to_dict(self) -> dict[str, Any]:
        rate = self.acceptance_rate
        return {"steps": self.steps, "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
                "acceptance_rate": round(rate, 4) if rate is not None else None}


class Drafter(Protocol):
    def propose(self, tokens: list[int], limit: int) -> list[int]: ...  # at most `limit` guesses at what follows `tokens`
    def close(self) -> None: ...


class NgramDraft:
    """Prompt lookup: what followed the most recent earlier occurrence of the last n tokens."""

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        for n in NGRAM_SIZES:
            if len(tokens) <= n:
                continue
            key = tokens[-n:]
            first = key[0]
            for start in range(len(tokens) - n - 1, -1, -1):  # most recent first: a clinical answer repeats what it just said
                if tokens[start] == first and tokens[start : start + n] == key:
                    follow = tokens[start + n : start + n + limit]
                    if follow:
                        return follow
        return []

    def close(self) -> None:
        pass


class ModelDraft:
    """Another variant of the model decoding greedily ahead; its cache keeps what the target kept."""

    def __init__(self, runtime: Runtime, p_min: float) -> None:
        self.runtime, self.p_min = runtime, p_min
        self._seen: list[int] = []  # the tokens in the draft's cache, in order

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        import numpy as np

        common = 0
        for have, want in zip(self._seen, tokens, strict=False):
            if have != want:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # the last token is evaluated again: its logits are the first guess's
        self.runtime.truncate(common)
        self.runtime.eval(tokens[common:])
        self._seen = list(tokens)
        out: list[int] = []
        while len(out) < limit:
            logits = np.asarray(self.runtime.logits(), dtype=np.float64)
            token = int(np.argmax(logits))
            if self.p_min > 0.0 and 1.0 / np.exp(logits - logits[token]).sum() < self.p_min:
                break  # the draft is unsure: a guess it doubts costs the target more than it saves
            out.append(token)
            if len(out) < limit:
                self.runtime.eval([token])
                self._seen.append(token)
        return out

    def close(self) -> None:
        self.runtime.close()


def open_draft(settings: DraftSettings, engine: EngineSettings, target: Runtime) -> Drafter:
    """The drafter for `target`: n-gram lookup, or the draft variant at `settings.source` loaded
    with the target's engine settings, refused unless it tokenizes as the target does."""
    if settings.is_ngram:
        return NgramDraft()
    from edgecds.engine.factory import open_runtime

    file = Path(settings.source)
    runtime = open_runtime(file, engine)
    if runtime.n_vocab != target.n_vocab or runtime.tokenize(VOCAB_PROBE) != target.tokenize(VOCAB_PROBE):
        runtime.close()
        raise UsageError(f"{file.name}: not a draft for this model: its vocabulary differs from the target's "
                         f"({runtime.n_vocab} tokens against {target.n_vocab}, or other ids for the same text); "
                         "give another variant of the same model, or --draft ngram")
    return ModelDraft(runtime, settings.p_min)


def generate_speculative(runtime: Runtime, prompt: list[int], max_tokens: int, drafter: Drafter, draft_max: int,
                         pick: Callable[[Any], int], stop: Callable[[list[int]], bool] | None = None, reset: bool = True,
                         stats: DraftStats | None = None) -> list[int]:
    """`engine.generate_greedy` with a drafter: the same tokens, in fewer target steps. The cache
    must hold nothing but what this call evaluates (`reset`, or a fresh runtime)."""
    stats = stats if stats is not None else DraftStats()
    if reset:
        runtime.reset()
    runtime.eval(prompt)
    history = list(prompt)
    out: list[int] = []
    token = pick(runtime.logits())
    while not runtime.is_end(token):
        out.append(token)
        history.append(token)
        stats.emitted += 1
        if len(out) >= max_tokens or (stop is not None and stop(out)):
            break
        # at most what can still be emitted, less the target's own pick after them: the cache then
        # never holds more than decoding without a draft would
        room = min(draft_max, max_tokens - len(out) - 1)
        guesses = drafter.propose(history, room) if room > 0 else []
        rows = runtime.eval_logits([token, *guesses])  # the cache now holds history and the guesses
        stats.steps += 1
        stats.drafted += len(guesses)
        done = False
        for i, row in enumerate(rows):
            token = pick(row)
            if i == len(guesses) or token != guesses[i] or runtime.is_end(token):
                break
            out.append(token)
            history.append(token)
            stats.accepted += 1
            stats.emitted += 1
            if len(out) >= max_tokens or (stop is not None and stop(out)):
                done = True
                break
        runtime.truncate(len(history))  # the rejected guesses leave the cache
        if done:
            break
    return out


@dataclass
class Speculation:
    """A drafter with its settings and its running tally, as a caller holds it."""

    drafter: Drafter
    settings: DraftSettings
    stats: DraftStats = field(default_factory=DraftStats)

    @classmethod
    def open(cls, settings: DraftSettings, engine: EngineSettings, target: Runtime) -> Speculation:
        return cls(open_draft(settings, engine, target), settings)

    def generate(self, runtime: Runtime, prompt: list[int], max_tokens: int, pick: Callable[[Any], int],
                 stop: Callable[[list[int]], bool] | None, reset: bool) -> list[int]:
        return generate_speculative(runtime, prompt, max_tokens, self.drafter, self.settings.max_tokens, pick, stop, reset, self.stats)

    def close(self) -> None:
        self.drafter.close()
