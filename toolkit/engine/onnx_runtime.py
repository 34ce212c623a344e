"""An ONNX variant in onnxruntime, behind the same `Runtime` interface as llama.cpp.

Device side: onnxruntime, `tokenizers` and numpy; no torch, no transformers, no Optimum. The
graph is Optimum's `text-generation-with-past` layout (input_ids, attention_mask, position_ids,
past_key_values.N.key/value in; logits, present.N.key/value out). On a CPU the session runs a
copy of that graph with each layer's attention fused into one onnxruntime op, compiled once per
variant and verified against the original (`compiled_graph`, toolkit/engine/onnx_fuse.py): 1.7x the decode
speed of the graph as exported on the default int4 model. The KV cache stays in
onnxruntime's own buffers between steps: each step's presents are passed as the next
step's pasts as OrtValues, without a round trip through numpy (`run_with_ort_values`: 1-3% faster
decode here than an IO binding rebuilt every step).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgecds.engine import EngineSettings, check_room, engine_threads, one_turn, plain_chat
from edgecds.errors import EngineError, InvalidInputError, UsageError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _json(folder: Path, name: str) -> dict[str, Any]:
    from edgecds.jsonfile import read_json_object

    path = folder / name
    return read_json_object(path) if path.is_file() else {}


def _int(data: dict[str, Any], key: str, where: str) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"{where}: {key!r} must be a positive integer, not {value!r}")
    return value


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json names special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_template_of(folder: Path, tok_config: dict[str, Any] | None = None) -> tuple[str | None, str | None, str | None]:
    """An ONNX folder's chat template (tokenizer_config.json's, else chat_template.jinja) and its
    BOS and EOS texts: what the runtime renders with, and what `bundle` audits. `tok_config`:
    tokenizer_config.json when the caller has read it already."""
    tok_config = _json(folder, "tokenizer_config.json") if tok_config is None else tok_config
    template = tok_config.get("chat_template") if isinstance(tok_config.get("chat_template"), str) else None
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return template, _token_text(tok_config.get("bos_token")), _token_text(tok_config.get("eos_token"))


def execution_provider(settings: EngineSettings) -> str:
    """CUDA when layers are to be offloaded, else the CPU; an error when that provider is not installed."""
    import onnxruntime as ort

    wanted = PROVIDERS["cuda"] if settings.n_gpu_layers != 0 else PROVIDERS["cpu"]
    available = ort.get_available_providers()
    if wanted not in available:
        raise UsageError(
            f"onnxruntime {ort.__version__} here offers {', '.join(available)}, not {wanted}; install onnxruntime-gpu for CUDA, "
            "or run on the CPU with -ngl 0"
        )
    return wanted


def _cache_key(folder: Path) -> str:
    """Which compiled graph belongs to this variant: the content of its files (sha256: the bytes a
    bundle's manifest covers, not their names or dates), the rewrite's version and onnxruntime's."""
    import onnxruntime as ort

    from edgecds.digest import cache_key, sha256_file
    from edgecds.engine.onnx_fuse import FUSION_VERSION

    files = [[path.name, sha256_file(path)] for path in sorted(folder.iterdir()) if path.is_file() and not path.name.startswith(".")]
    return cache_key([files, FUSION_VERSION, ort.__version__], length=24)


def _compiled_files(cache: Path) -> dict[str, str]:
    """The compiled graph's files and their sha256 (everything but the record itself)."""
    from edgecds.digest import sha256_file

    return {p.name: sha256_file(p) for p in sorted(cache.iterdir()) if p.is_file() and p.name != "fusion.json"}


def _compile(folder: Path, cache: Path) -> None:
    """Run the fusion child into a temporary beside `cache` and publish its record (fused or declined)."""
    from edgecds.atomic import atomic_path, remove_stale_temporaries
    from edgecds.child import die_with_parent, exit_cause, result_line

    remove_stale_temporaries(cache.parent)  # a compile that was killed half-way (the lock says none is running)
    print(f"edgecds: compiling {folder.name} for fused attention (once; cached in {cache.parent})", file=sys.stderr, flush=True)
    with atomic_path(cache, directory=True) as tmp:
        proc = subprocess.run([sys.executable, "-m", "edgecds.engine.onnx_fuse", str(folder), str(tmp)], capture_output=True,
                              text=True, check=False, preexec_fn=die_with_parent())
        record = result_line(proc.stdout) if proc.returncode == 0 else None
        if record is None:
            last = " ".join(proc.stderr.strip().splitlines()[-1:])
            record = {"declined": f"the compile step failed ({exit_cause(proc.returncode)}): {last}"}
        tmp.mkdir(parents=True, exist_ok=True)  # a child that died early never made it
        # the compiled bytes' hashes: what a later load checks before onnxruntime reads them
        record = {**record, "files": _compiled_files(tmp)}
        (tmp / "fusion.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def compiled_graph(folder: Path, n_ctx: int) -> tuple[Path, str]:
    """The variant's graph with fused attention, compiled once into EDGECDS_HOME and verified there
    (edgecds.engine.onnx_fuse, in a child so its memory never counts in a measurement); the graph as
    exported, and why, when the rewrite declines this layout. The path to load and a log line."""
    from edgecds.atomic import waiting_lock
    from edgecds.formats.onnx_model import MODEL_FILE, check_onnx_folder
    from edgecds.home import edgecds_home

    cache = edgecds_home() / "compiled" / _cache_key(folder)
    record_path = cache / "fusion.json"
    exported = folder / MODEL_FILE
    how = "from the cache"
    if not record_path.is_file():
        with waiting_lock(cache.parent):  # two processes compiling at once: the second waits, then reads the cache
            if not record_path.is_file():
                _compile(folder, cache)
                how = "compiled now"
    record = _json(cache, "fusion.json")
    if "fused" not in record:
        return exported, f"graph as exported ({record.get('declined', 'no fusion record')}; delete {cache} to retry)"
    fused = record["fused"]
    if n_ctx > int(fused.get("max_positions", 0)):
        return exported, f"graph as exported (context {n_ctx} is past the fused graph's rotary table of {fused.get('max_positions')})"
    try:
        check_onnx_folder(cache)
        if _compiled_files(cache) != record.get("files"):
            raise InvalidInputError(f"{cache}: the compiled graph's files do not hash as when they were compiled")
    except InvalidInputError:
        if how == "compiled now":
            raise
        # damaged or altered: only bytes derived from the variant and checked by hash are loaded, so compile it again
        with waiting_lock(cache.parent):
            shutil.rmtree(cache, ignore_errors=True)
        if record_path.exists():  # it could not be removed (a read-only cache): run the graph as exported
            return exported, f"graph as exported (the compiled copy in {cache} does not match its hashes and cannot be removed)"
        return compiled_graph(folder, n_ctx)
    verify = fused.get("verify", {})
    return cache / MODEL_FILE, (f"graph compiled with fused attention ({how}): {fused.get('layers')} layers, {fused.get('nodes_before')} -> "
                                f"{fused.get('nodes_after')} nodes, verified top-1 {verify.get('top1_agreement')}, KL {verify.get('kl_mean')}")


class OnnxRuntime:
    format = "onnx"

    def __init__(self, folder: Path, settings: EngineSettings) -> None:
        from edgecds.formats.onnx_model import check_onnx_folder

        check_onnx_folder(folder)  # before onnxruntime follows any external-data name
        config = _json(folder, "config.json")
        where = str(folder / "config.json")
        self._n_layers = _int(config, "num_hidden_layers", where)
        n_heads = _int(config, "num_attention_heads", where)
        self._n_kv_heads = int(config.get("num_key_value_heads") or n_heads)
        self._head_dim = int(config.get("head_dim") or _int(config, "hidden_size", where) // n_heads)
        self._load_tokenizer(folder, config)
        self._open_session(folder, settings)
        self._n_ctx, self._n_batch = settings.n_ctx, settings.n_batch
        self._last: Any = None
        self.reset()

    def _load_tokenizer(self, folder: Path, config: dict[str, Any]) -> None:
        """The tokenizer, its special tokens, the end-of-generation ids and the chat template."""
        from tokenizers import Tokenizer

        if not (folder / "tokenizer.json").is_file():
            raise InvalidInputError(f"{folder}: no tokenizer.json (the ONNX variant's tokenizer)")
        try:
            self._tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a plain Exception on malformed files
            raise InvalidInputError(f"{folder / 'tokenizer.json'}: not a tokenizer ({exc})") from None
        tok_config = _json(folder, "tokenizer_config.json")
        self._template, self._bos_text, self._eos_text = chat_template_of(folder, tok_config)
        self._add_bos = bool(tok_config.get("add_bos_token", False))
        self._bos_id = self._tokenizer.token_to_id(self._bos_text) if self._bos_text else None
        eos = _json(folder, "generation_config.json").get("eos_token_id", config.get("eos_token_id"))
        ids = eos if isinstance(eos, list) else [eos]
        self._end_ids = {i for i in ids if isinstance(i, int)}
        if self._eos_text and self._tokenizer.token_to_id(self._eos_text) is not None:
            self._end_ids.add(self._tokenizer.token_to_id(self._eos_text))

    def _open_session(self, folder: Path, settings: EngineSettings) -> None:
        """The onnxruntime session (the compiled graph with fused attention where it applies), its
        input and output names, and the KV cache's type."""
        import numpy as np
        import onnxruntime as ort

        from edgecds.formats.onnx_model import MODEL_FILE

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = engine_threads(settings.threads) or 0
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only; onnxruntime's warnings about unused initializers are noise here
        provider = execution_provider(settings)
        graph, graph_note = folder / MODEL_FILE, "graph as exported (fused attention off)"
        if settings.fuse_attention and provider == PROVIDERS["cpu"]:
            graph, graph_note = compiled_graph(folder, settings.n_ctx)
        elif settings.fuse_attention:
            graph_note = "graph as exported (fused attention is compiled for the CPU provider only)"
        try:
            self._session = ort.InferenceSession(str(graph), options, providers=[provider])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... classes
            raise EngineError(f"{folder.name}: onnxruntime could not load it ({type(exc).__name__}: {exc})") from None
        self._provider = provider
        names = {i.name for i in self._session.get_inputs()}
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(self._n_layers) for kv in ("key", "value")]
        self._present_names = [f"present.{i}.{kv}" for i in range(self._n_layers) for kv in ("key", "value")]
        self._output_names = ["logits", *self._present_names]
        missing = [n for n in ["input_ids", "attention_mask", *self._past_names] if n not in names]
        if missing:
            raise InvalidInputError(f"{folder / MODEL_FILE}: not a text-generation-with-past graph (no input {missing[0]!r})")
        self._has_positions = "position_ids" in names
        past_type = next(i.type for i in self._session.get_inputs() if i.name == self._past_names[0])
        self._kv_dtype = np.float16 if past_type == "tensor(float16)" else np.float32
        logits_shape = next(o.shape for o in self._session.get_outputs() if o.name == "logits")
        vocab = logits_shape[-1] if isinstance(logits_shape[-1], int) else self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.n_vocab = int(vocab)
        self._log = [f"onnxruntime {ort.__version__}, {provider}, {options.intra_op_num_threads or 'default'} threads, graph optimization all",
                     graph_note]

    # --- tokens and text ----------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self._tokenizer.encode(text, add_special_tokens=False).ids)
        if add_bos and self._add_bos and self._bos_id is not None:
            ids.insert(0, self._bos_id)
        return ids

    def detokenize(self, tokens: list[int]) -> str:
        return str(self._tokenizer.decode(tokens, skip_special_tokens=False))

    def chat_prompt(self, user_message: str, system: str | None = None) -> str:
        return self.chat_messages(one_turn(user_message, system))

    def chat_messages(self, messages: list[dict[str, str]]) -> str:
        """The model's own chat template, rendered in the sandbox every caller shares (engine/chat_template.py)."""
        from edgecds.engine.chat_template import render_chat

        if not self._template:
            return plain_chat(messages)
        return render_chat(self._template, messages, bos_token=self._bos_text or "", eos_token=self._eos_text or "")

    def is_end(self, token: int) -> bool:
        return token in self._end_ids

    def bos(self) -> int:
        return int(self._bos_id if self._bos_id is not None else min(self._end_ids, default=0))

    # --- context --------------------------------------------------------------------------------

    def reset(self) -> None:
        import numpy as np
        import onnxruntime as ort

        empty = np.zeros((1, self._n_kv_heads, 0, self._head_dim), dtype=self._kv_dtype)
        self._past = [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self._past_names]
        self._n_past = 0

    def truncate(self, n_tokens: int) -> None:
        import numpy as np
        import onnxruntime as ort

        if n_tokens >= self._n_past:
            return
        self._past = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :n_tokens, :])) for v in self._past]
        self._n_past = n_tokens

    def _step(self, tokens: list[int]) -> Any:
        """Run one batch and keep its KV cache; the batch's logits (n x n_vocab, float32)."""
        import numpy as np
        import onnxruntime as ort

        n = len(tokens)
        feed = {"input_ids": ort.OrtValue.ortvalue_from_numpy(np.asarray([tokens], dtype=np.int64)),
                "attention_mask": ort.OrtValue.ortvalue_from_numpy(np.ones((1, self._n_past + n), dtype=np.int64))}
        if self._has_positions:
            feed["position_ids"] = ort.OrtValue.ortvalue_from_numpy(np.arange(self._n_past, self._n_past + n, dtype=np.int64)[None, :])
        feed.update(zip(self._past_names, self._past, strict=True))
        try:
            outputs = self._session.run_with_ort_values(self._output_names, feed)
        except Exception as exc:
            raise EngineError(f"onnxruntime failed on {n} tokens after {self._n_past}: {type(exc).__name__}: {exc}") from None
        self._past = list(outputs[1:])
        self._n_past += n
        return outputs[0].numpy()[0]

    def eval(self, tokens: list[int]) -> None:
        check_room(self._n_past, len(tokens), self._n_ctx)
        for start in range(0, len(tokens), self._n_batch):
            self._last = self._step(tokens[start : start + self._n_batch])[-1]

    def eval_logits(self, tokens: list[int]) -> Any:
        import numpy as np

        check_room(self._n_past, len(tokens), self._n_ctx)
        rows = [self._step(tokens[start : start + self._n_batch]) for start in range(0, len(tokens), self._n_batch)]
        self._last = rows[-1][-1]
        return np.concatenate(rows).astype(np.float32, copy=False)

    def logits(self) -> Any:
        import numpy as np

        if self._last is None:
            raise EngineError("no token evaluated yet")
        return np.asarray(self._last, dtype=np.float32)

    def engine_log(self) -> list[str]:
        return self._log

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
        self._past = []
