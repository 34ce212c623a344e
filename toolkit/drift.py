"""Drift: how far a variant's next-token distributions moved from its reference's.

One measure, named one way everywhere: `quantize` records it for each quantized ONNX variant
against fp32, `eval` records it for every variant against its format's float reference, and the
ONNX attention rewrite (toolkit/engine/onnx_fuse.py) checks its compiled graph with it. It is computed as
llama.cpp's perplexity tool computes KL divergence: the text in chunks of DRIFT_CTX tokens, each
starting with BOS, the second half of each chunk scored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from edgecds.errors import InvalidInputError

if TYPE_CHECKING:
    from edgecds.engine import Runtime

DRIFT_CTX = 512  # llama.cpp perplexity's default chunk; the second half of each chunk is scored
DRIFT_BLOCK = 64  # rows compared at a time


def log_softmax(row: Any) -> Any:
    """Log-probabilities from one row of logits, in float64."""
    import numpy as np

    shifted = row.astype(np.float64) - row.max()
    return shifted - math.log(float(np.exp(shifted).sum()))


def drift_logprobs(runtime: Runtime, text: str, on_chunk: Callable[[int, int], None] | None = None,
                   max_chunks: int | None = None) -> tuple[Any, Any]:
    """(log-probabilities at every scored position, the token that followed each), over the first
    `max_chunks` chunks (llama-perplexity --chunks; None: all). `on_chunk(done, total)` is called
    before the first chunk and after each (a large model takes a while per chunk)."""
    import numpy as np

    tokens = runtime.tokenize(text, add_bos=False)
    n_chunks = len(tokens) // DRIFT_CTX
    if n_chunks < 1:
        raise InvalidInputError(f"the drift text has {len(tokens)} tokens, fewer than one chunk of {DRIFT_CTX}")
    n_chunks = min(n_chunks, max_chunks or n_chunks)
    first = DRIFT_CTX // 2
    rows, targets = [], []
    for c in range(n_chunks):
        if on_chunk is not None:
            on_chunk(c, n_chunks)
        chunk = tokens[c * DRIFT_CTX : (c + 1) * DRIFT_CTX]
        chunk[0] = runtime.bos()
        runtime.reset()
        logits = runtime.eval_logits(chunk)
        for j in range(first, DRIFT_CTX - 1):
            rows.append(log_softmax(logits[j]).astype(np.float32))
            targets.append(chunk[j + 1])
    if on_chunk is not None:
        on_chunk(n_chunks, n_chunks)
    return np.stack(rows), np.array(targets)


def drift_against(reference: Any, variant: Any, targets: Any) -> dict[str, Any]:
    """KL divergence (mean, median, 99th and 99.9th percentiles, max), top-1 agreement, Δp of the
    token that came and both perplexities, from two arrays of log-probabilities over the same
    positions: what llama-perplexity --kl-divergence reports. The choice's fidelity band uses the
    mean; the tail says whether a few positions moved far."""
    import numpy as np

    n = len(targets)
    kl, same_top1 = np.empty(n), np.empty(n, dtype=bool)
    # in blocks of rows: the same float64 sums per row, without ~2 GB of whole-array temporaries
    # (1,020 rows of a 49k vocabulary), whose page faults were most of the time
    for start in range(0, n, DRIFT_BLOCK):
        ref = reference[start : start + DRIFT_BLOCK].astype(np.float64)
        var = variant[start : start + DRIFT_BLOCK].astype(np.float64)
        kl[start : start + len(ref)] = (np.exp(ref) * (ref - var)).sum(axis=1)
        same_top1[start : start + len(ref)] = ref.argmax(axis=1) == var.argmax(axis=1)
    picked, targets = np.arange(n), np.asarray(targets)
    ref_target, var_target = (logprobs[picked, targets].astype(np.float64) for logprobs in (reference, variant))
    # Δp: how much the probability of the token that came moved, as llama-perplexity --kl-divergence reports it
    delta_p = np.exp(var_target) - np.exp(ref_target)
    return {"tokens_scored": int(n), "kl_mean": round(float(kl.mean()), 6), "kl_median": round(float(np.median(kl)), 6),
            "kl_p99": round(float(np.percentile(kl, 99)), 6), "kl_p999": round(float(np.percentile(kl, 99.9)), 6),
            "kl_max": round(float(kl.max()), 6), "top1_agreement": round(float(same_top1.mean()), 4),
            "delta_p_mean": round(float(delta_p.mean()), 6), "delta_p_rms": round(float(np.sqrt((delta_p**2).mean())), 6),
            "perplexity": round(float(np.exp(-var_target.mean())), 4), "reference_perplexity": round(float(np.exp(-ref_target.mean())), 4)}


def drift_of_logits(reference_logits: Any, variant_logits: Any, targets: Any) -> dict[str, Any]:
    """`drift_against` from raw logits (rows of n_vocab) rather than log-probabilities."""
    import numpy as np

    return drift_against(np.stack([log_softmax(r) for r in reference_logits]), np.stack([log_softmax(r) for r in variant_logits]),
                         np.asarray(targets))
