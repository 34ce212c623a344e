"""A tiny quantized GGUF, made here from nothing, for trying llama.cpp's CPU paths on a host.

The probe must not depend on a model being present (a device may hold only its bundle, `doctor`
none at all) nor on the build side's `gguf` writer, so this writes the few bytes of a one-layer
llama-architecture model with random weights itself (GGUF v3: header, key-values, tensor infos,
aligned data), then lets llama.cpp's own quantizer make the quantized types from it. The weights
mean nothing; what matters is that every matrix has a shape llama.cpp's repacking accepts (rows of
256, a multiple of every block and tile size), so the same code paths run as for a real model.

Run directly, it is the probe child of engine/cpu_paths.py: python -m edgecds.engine.probe_model --extra on|off
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from edgecds.errors import EngineError

# the types llama.cpp repacks into an extra buffer on some CPU (AMX: Q4_0, Q4_1, Q8_0, Q4_K..Q6_K;
# CPU_REPACK: Q4_0, Q4_K, Q8_0, IQ4_NL): Q4_K_M brings Q4_K and Q6_K
PROBE_TYPES = ("Q8_0", "Q4_K_M", "Q4_0")
N_EMBD, N_FF, N_HEAD, N_LAYER = 256, 512, 4, 2
ALIGNMENT = 32
_STRING, _ARRAY, _UINT32, _FLOAT32, _INT32 = 8, 9, 4, 6, 5
_GGML_F32 = 0


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _value(value: Any) -> bytes:
    """A key's type and value; ints are u32 (every count here), floats f32, lists typed by their first item."""
    if isinstance(value, str):
        return struct.pack("<I", _STRING) + _string(value)
    if isinstance(value, float):
        return struct.pack("<If", _FLOAT32, value)
    if isinstance(value, int):
        return struct.pack("<II", _UINT32, value)
    first = value[0]
    if isinstance(first, str):
        return struct.pack("<IIQ", _ARRAY, _STRING, len(value)) + b"".join(_string(v) for v in value)
    kind, fmt = (_FLOAT32, "f") if isinstance(first, float) else (_INT32, "i")
    return struct.pack("<IIQ", _ARRAY, kind, len(value)) + struct.pack(f"<{len(value)}{fmt}", *value)


def _vocabulary() -> dict[str, Any]:
    """A SentencePiece-style vocabulary: three specials and the 256 byte tokens (llama.cpp looks up
    the newline's byte token at load and aborts without it)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": [0.0] * len(tokens),
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256, "tokenizer.ggml.unknown_token_id": 0,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}


def _tensors(n_vocab: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(0)

    def matrix(rows: int, cols: int) -> Any:  # numpy (rows, cols) is GGUF's (cols, rows): ne0 first
        return (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)

    tensors = {"token_embd.weight": matrix(n_vocab, N_EMBD), "output_norm.weight": np.ones(N_EMBD, np.float32),
               "output.weight": matrix(n_vocab, N_EMBD)}
    for i in range(N_LAYER):
        tensors |= {f"blk.{i}.attn_norm.weight": np.ones(N_EMBD, np.float32), f"blk.{i}.ffn_norm.weight": np.ones(N_EMBD, np.float32),
                    **{f"blk.{i}.attn_{p}.weight": matrix(N_EMBD, N_EMBD) for p in ("q", "k", "v", "output")},
                    f"blk.{i}.ffn_gate.weight": matrix(N_FF, N_EMBD), f"blk.{i}.ffn_up.weight": matrix(N_FF, N_EMBD),
                    f"blk.{i}.ffn_down.weight": matrix(N_EMBD, N_FF)}
    return tensors


def write_float_probe(path: Path, extra_keys: dict[str, Any] | None = None) -> None:
    """The probe model in F32; `extra_keys`: more metadata (a test's chat template)."""
    vocab = _vocabulary()
    n_vocab = len(vocab["tokenizer.ggml.tokens"])
    keys: dict[str, Any] = {
        "general.architecture": "llama", "general.name": "edgecds CPU-path probe", "general.alignment": ALIGNMENT,
        "llama.context_length": 256, "llama.embedding_length": N_EMBD, "llama.block_count": N_LAYER,
        "llama.feed_forward_length": N_FF, "llama.attention.head_count": N_HEAD, "llama.attention.head_count_kv": N_HEAD,
        "llama.rope.dimension_count": N_EMBD // N_HEAD, "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": n_vocab,
        **vocab, **(extra_keys or {}),
    }
    tensors = _tensors(n_vocab)
    head = struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), len(keys))
    head += b"".join(_string(k) + _value(v) for k, v in keys.items())
    offset = 0
    for name, array in tensors.items():
        head += _string(name) + struct.pack("<I", array.ndim) + struct.pack(f"<{array.ndim}Q", *reversed(array.shape))
        head += struct.pack("<IQ", _GGML_F32, offset)
        offset += -(-array.nbytes // ALIGNMENT) * ALIGNMENT
    with open(path, "wb") as out:
        out.write(head + b"\0" * (-len(head) % ALIGNMENT))
        for array in tensors.values():
            out.write(array.tobytes() + b"\0" * (-array.nbytes % ALIGNMENT))


def write_probe_models(folder: Path) -> list[Path]:
    """The probe in each of PROBE_TYPES, quantized by llama.cpp, in `folder`."""
    import llama_cpp

    from edgecds.engine.llama_log import captured_llama_log

    source = folder / "probe-F32.gguf"
    write_float_probe(source)
    made = []
    for name in PROBE_TYPES:
        target = folder / f"probe-{name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        params.nthread = 1
        with captured_llama_log() as log:
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
        if status != 0:
            raise EngineError(f"llama.cpp could not quantize the CPU-path probe to {name}: {' '.join(log[-2:]).strip()}")
        made.append(target)
    return made


def probe_child(extra: bool) -> dict[str, Any]:
    """Child side: make the probe models, load each with the extra buffers on or off, decode."""
    from edgecds.engine import EngineSettings
    from edgecds.engine.gguf_runtime import GgufRuntime

    with tempfile.TemporaryDirectory(prefix="edgecds-cpu-probe-") as folder:
        models = write_probe_models(Path(folder))
        buffers: list[str] = []
        for model in models:
            kind = model.stem.removeprefix("probe-")
            print(f"probe: loading {kind}", file=sys.stderr, flush=True)
            runtime = GgufRuntime(model, EngineSettings(n_ctx=128, threads=min(os.cpu_count() or 1, 4), extra_buffers=extra))
            print("".join(runtime.engine_log()), file=sys.stderr, flush=True)  # the buffer lines, for the parent
            buffers += [b for b in runtime.weight_buffers if b not in buffers]
            print(f"probe: decoding {kind}", file=sys.stderr, flush=True)
            runtime.eval(list(range(3, 67)))  # a 64-token prompt (byte tokens), then single tokens
            for token in (10, 20, 30, 40):
                runtime.eval([token])
            runtime.close()
    return {"extra_buffers": extra, "buffers": buffers}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from edgecds.child import emit_json

    parser = argparse.ArgumentParser(description="Load a tiny quantized probe model in llama.cpp and decode (a child of edgecds).")
    parser.add_argument("--extra", choices=("on", "off"), default="on", help="llama.cpp's extra (repacked) weight buffers")
    args = parser.parse_args(argv)
    emit_json(probe_child(args.extra == "on"))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
