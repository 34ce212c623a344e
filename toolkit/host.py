"""Detecting the machine edgecds runs on, and the shipped profile nearest to it.

Everything is read below a root path (normally `/`), so tests run on captured `/proc`, `/sys` and
`/etc` trees of other machines: a Jetson from its device-tree model and `/etc/nv_tegra_release`,
NVIDIA GPUs from `/proc/driver/nvidia` (and NVML for their memory, on the live machine), CPU model,
cores and RAM from `/proc/cpuinfo` and `/proc/meminfo` (psutil where there is no `/proc`).
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgecds.devices import DeviceProfile

GIB = 1024**3


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_gib: float | None  # from NVML on the live machine; None when only /proc was read
    driver: str | None


@dataclass(frozen=True)
class HostInfo:
    cpu_model: str
    cpu_cores: int
    ram_gib: float
    machine: str
    jetson_model: str | None = None
    l4t_release: str | None = None
    gpus: tuple[GpuInfo, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)
    cpu_isa: str | None = None  # one of devices.CPU_ISAS, from the CPU's flags
    cpu_mhz: float | None = None
    available_gib: float | None = None  # MemAvailable: what can be had without swapping (not MemFree)
    cpu_features: tuple[str, ...] = ()  # the flags that change the engine's path (ENGINE_CPU_FEATURES)

    @property
    def cpu_gflops_fp32(self) -> float | None:
        """Peak: cores x clock x FP32 FLOPs a cycle (two 256-bit FMA units on x86, two 128-bit on Arm)."""
        if not self.cpu_mhz or not self.cpu_isa:
            return None
        per_cycle = 32 if self.cpu_isa.startswith("x86") else 16
        return round(self.cpu_cores * self.cpu_mhz / 1000 * per_cycle, 1)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (taskset, a container's cpuset), not the
    machine's count. Threads beyond it only wait for each other."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity call (macOS)
        return os.cpu_count() or 1


def _read(root: Path, relative: str | Path) -> str | None:
    try:
        return (root / relative).read_bytes()[: 1 << 20].decode("utf-8", errors="replace")
    except OSError:
        return None


# CPU flags that change which code path llama.cpp (and onnxruntime) takes: SIMD width, dot-product
# instructions, AMX tiles on x86; NEON, dot product, i8mm and SVE on Arm (/proc/cpuinfo's names)
ENGINE_CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
                       "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve", "sve2")


def _features(flags: set[str]) -> tuple[str, ...]:
    return tuple(f for f in ENGINE_CPU_FEATURES if f in flags)


def detect_cpu_features(root: Path = Path("/")) -> tuple[str, ...]:
    """The engine-relevant flags of this CPU, in ENGINE_CPU_FEATURES order."""
    return _features(_cpu_flags(_read(root.resolve(), "proc/cpuinfo") or ""))


def _cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("flags", "Features"):
            return set(value.split())
    return set()


def _isa(flags: set[str]) -> str | None:
    for flag, isa in (("avx512f", "x86-avx512"), ("avx2", "x86-avx2"), ("i8mm", "arm-i8mm"), ("asimddp", "arm-dotprod")):
        if flag in flags:
            return isa
    return None


def _cpu(root: Path) -> tuple[str, int, str | None, float | None, tuple[str, ...]]:
    text = _read(root, "proc/cpuinfo")
    if text is None:
        import psutil

        cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
        return platform.processor() or platform.machine(), cores, None, None, ()
    model, processors, cores, physical = "", 0, set(), "0"
    flags = _cpu_flags(text)
    mhz: float | None = None
    for line in text.splitlines():
        key, _, value = (part.strip() for part in line.partition(":"))
        if key in ("model name", "Hardware") and not model:
            model = value
        elif key == "cpu MHz" and mhz is None:
            mhz = float(value) if value.replace(".", "", 1).isdigit() else None
        elif key == "processor":
            processors += 1
        elif key == "physical id":
            physical = value
        elif key == "core id":
            cores.add((physical, value))  # physical cores, not hyper-threads
    if not model:
        dt_model = (_read(root, "proc/device-tree/model") or "").strip("\0\n ")
        model = f"Arm ({dt_model})" if dt_model else "Arm"
    # cpufreq's maximum (kHz) is the peak clock; cpuinfo's MHz is the current one, and Arm kernels
    # give none, so it is only the fallback (VMs have no cpufreq).
    khz = (_read(root, "sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") or "").strip()
    if khz.isdigit():
        mhz = int(khz) / 1000
    return model, len(cores) or max(processors, 1), _isa(flags), mhz, _features(flags)


def _memory_gib(root: Path) -> tuple[float, float | None]:
    """(MemTotal, MemAvailable) in GiB. MemAvailable, not MemFree: the page cache a model can
    reclaim counts. (On a Jetson, CUDA's free-memory call reports MemFree, which under-states it.)"""
    text = _read(root, "proc/meminfo")
    if text is None:
        import psutil

        memory = psutil.virtual_memory()
        return round(memory.total / GIB, 2), round(memory.available / GIB, 2)
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable") and rest.split() and rest.split()[0].isdigit():
            values[key] = round(int(rest.split()[0]) * 1024 / GIB, 2)
    return values.get("MemTotal", 0.0), values.get("MemAvailable")


def _nvml_gpus() -> list[GpuInfo]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no NVML library or no driver: a machine without an NVIDIA GPU
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            total = pynvml.nvmlDeviceGetMemoryInfo(handle).total
            gpus.append(GpuInfo(str(name), round(total / GIB, 2), str(driver)))
        return gpus
    finally:
        pynvml.nvmlShutdown()


NVIDIA_PCI_VENDOR = "0x10de"


def nvidia_pci_gpus(root: Path = Path("/")) -> list[str]:
    """PCI addresses of NVIDIA display devices (class 0x03....), whether or not a driver is loaded."""
    found = []
    for device in sorted((root / "sys/bus/pci/devices").glob("*")):
        vendor, kind = _read(root, device / "vendor"), _read(root, device / "class")
        if vendor and kind and vendor.strip() == NVIDIA_PCI_VENDOR and kind.strip().startswith("0x03"):
            found.append(device.name)
    return found


def _proc_gpus(root: Path) -> list[GpuInfo]:
    version = _read(root, "proc/driver/nvidia/version") or ""
    driver = next((part for part in version.split() if part.count(".") >= 1 and part[0].isdigit()), None)
    gpus = []
    for info in sorted((root / "proc/driver/nvidia/gpus").glob("*/information")):
        text = _read(root, info) or ""  # an absolute path joins as itself
        for line in text.splitlines():
            if line.startswith("Model:"):
                gpus.append(GpuInfo(line.split(":", 1)[1].strip(), None, driver))
    return gpus


def detect_host(root: Path = Path("/")) -> HostInfo:
    root = root.resolve()  # globbed paths below come back joined to it
    cpu_model, cores, isa, mhz, features = _cpu(root)
    notes = []
    usable = usable_cpus() if root == Path("/") else cores
    if usable < cores:
        notes.append(f"this process may run on {usable} of the machine's {cores} cores (CPU affinity): it counts {usable}")
        cores = usable
    jetson_model = None
    dt_model = (_read(root, "proc/device-tree/model") or "").strip("\0\n ")
    tegra = _read(root, "etc/nv_tegra_release")
    if "Jetson" in dt_model or tegra is not None:
        jetson_model = dt_model or "NVIDIA Jetson (model unknown)"
    l4t = tegra.splitlines()[0].lstrip("# ").strip() if tegra else None
    gpus = _proc_gpus(root)
    if root == Path("/") and jetson_model is None:
        live = _nvml_gpus()
        if live:
            gpus = live
        elif gpus:
            notes.append("NVML is not available: GPU memory was not read")
    machine = platform.machine() if root == Path("/") else ("aarch64" if jetson_model or "Arm" in cpu_model else "x86_64")
    total, available = _memory_gib(root)
    return HostInfo(cpu_model, cores, total, machine, jetson_model, l4t, tuple(gpus), tuple(notes), isa, mhz, available, features)


@dataclass(frozen=True)
class HostMatch:
    host: HostInfo
    profile: DeviceProfile
    reason: str
    differences: tuple[str, ...]


def _jetson_profile_id(model: str) -> str | None:
    lowered = model.lower()
    if "agx orin" in lowered:
        return "jetson-agx-orin-64gb"
    if "orin nx" in lowered:
        return "jetson-orin-nx-16gb"
    if "orin nano" in lowered:
        return "jetson-orin-nano-8gb"
    return None


def _gpu_key(name: str) -> str:
    """'NVIDIA GeForce RTX 4060 Laptop GPU' and the profile's name both give 'rtx 4060 laptop'."""
    words = name.lower().replace("geforce", " ").replace("nvidia", " ").split()
    key: list[str] = []
    for word in words:
        if word in ("gpu", "in", "a", "desktop", "pc", "workstation") or word.endswith("gb") or word.isdigit() and len(key) >= 2:
            break
        key.append(word)
    return " ".join(key)


def nearest_profile(host: HostInfo, profiles: dict[str, DeviceProfile]) -> HostMatch:
    """The shipped profile closest to `host`, why, and where the two differ."""
    chosen: DeviceProfile | None = None
    reason = ""
    if host.jetson_model:
        pid = _jetson_profile_id(host.jetson_model)
        if pid in profiles:
            chosen, reason = profiles[pid], f"Jetson device-tree model {host.jetson_model!r}"
    gpu_profiles = [p for p in profiles.values() if p.device_class == "gpu"]
    if chosen is None and host.gpus and gpu_profiles:
        gpu = host.gpus[0]
        named = [p for p in gpu_profiles if _gpu_key(gpu.name) == _gpu_key(p.name)]
        if named:
            chosen, reason = named[0], f"NVIDIA GPU {gpu.name!r}"
        else:
            memory = gpu.memory_gib or 0.0
            chosen = min(gpu_profiles, key=lambda p: abs(p.total_gib - memory))
            reason = f"NVIDIA GPU {gpu.name!r} has no profile; the GPU profile closest in memory"
    if chosen is None:
        apple = "apple" in host.cpu_model.lower()
        candidates = [p for p in profiles.values() if p.device_class == "cpu" and (p.backends[0] == "metal") == apple]
        if candidates:
            chosen = min(candidates, key=lambda p: abs(p.total_gib - host.ram_gib))
            reason = f"CPU-only {'Apple' if apple else 'x86/Arm'} machine with {host.ram_gib:g} GiB RAM"
    if chosen is None:
        chosen = next(iter(profiles.values()))
        reason = "nothing matched; first profile"

    differences = []
    # a discrete profile's memory is the GPU's; compared only when the GPU's was read (NVML)
    discrete = chosen.memory_kind == "discrete"
    compared = (host.gpus[0].memory_gib if host.gpus else None) if discrete else host.ram_gib
    if compared is not None and abs(compared - chosen.total_gib) > 0.05 * chosen.total_gib:
        differences.append(f"memory: {compared:g} GiB here, {chosen.total_gib:g} GiB in the profile")
    if host.cpu_cores != chosen.cpu_cores:
        differences.append(f"CPU cores: {host.cpu_cores} here, {chosen.cpu_cores} in the profile")
    if host.cpu_isa and host.cpu_isa != chosen.cpu_isa:
        differences.append(f"CPU instruction set: {host.cpu_isa} here, {chosen.cpu_isa} in the profile")
    if chosen.device_class == "gpu" and not host.gpus:
        differences.append("no NVIDIA GPU found here")
    return HostMatch(host, chosen, reason, tuple(differences))


def host_profile(match: HostMatch) -> DeviceProfile:
    """The `host` profile: the nearest shipped profile with this machine's detected memory and cores."""
    host, base = match.host, match.profile
    discrete = base.memory_kind == "discrete" and host.gpus and host.gpus[0].memory_gib
    total = host.gpus[0].memory_gib if discrete else host.ram_gib
    detected = "detected on this machine by edgecds devices detect"
    reserve = min(base.reserve_gib, float(total or base.total_gib) * 0.5)
    sources: dict[str, str] = {}
    if base.memory_kind == "unified" and host.available_gib is not None and total:
        # CPU and GPU share this memory: what is available now bounds the model, if that is less
        reserve = max(reserve, round(float(total) - host.available_gib, 3))
        sources["memory.reserve_gib"] = (f"{detected}: MemTotal less MemAvailable ({host.available_gib:g} GiB available), or "
                                         f"{base.id}'s reserve if larger; MemAvailable, not MemFree")
    return replace(
        base,
        id="host",
        name=f"this machine: {host.gpus[0].name if host.gpus else host.jetson_model or host.cpu_model} (like {base.id})",
        total_gib=float(total or base.total_gib),
        reserve_gib=reserve,
        host_ram_gib=host.ram_gib if base.memory_kind == "discrete" else None,
        cpu_cores=host.cpu_cores,
        cpu_isa=host.cpu_isa or base.cpu_isa,
        cpu_gflops_fp32=host.cpu_gflops_fp32 or base.cpu_gflops_fp32,
        sources={**base.sources, "memory.total_gib": detected, "compute.cpu_cores": detected,
                 **({"compute.cpu_isa": detected} if host.cpu_isa else {}),
                 **({"compute.cpu_gflops_fp32": f"{detected}: cores x clock x FLOPs a cycle"} if host.cpu_gflops_fp32 else {}),
                 **({"memory.host_ram_gib": detected} if base.memory_kind == "discrete" else {}),
                 "memory.bandwidth_gbs": f"not detected: {base.id}'s figure ({base.sources.get('memory.bandwidth_gbs', '')})",
                 **sources},
        path="detected",
    )
