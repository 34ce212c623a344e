"""Device profiles: what a target device offers, read from the TOML files in `profiles/`.

Each file describes one device a clinic may own. `PROFILE_FIELDS` below is the one table of the
fields a profile has; validation, docs and `devices show` read it. Every figure must cite where it
comes from in the file's `[sources]` table. Users add or override profiles with `--profiles-dir`
or the EDGECDS_PROFILES environment variable (folders separated by the OS path separator).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgecds.errors import InvalidInputError, UnknownNameError
from edgecds.formats.types import QUANT_TYPE_BY_NAME, is_fitted

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (JetPack 6 on Jetsons)
    import tomli as tomllib

PROFILES_ENV = "EDGECDS_PROFILES"
OTHER_FORMATS = (".yaml", ".yml", ".json", ".ini", ".cfg")
MAX_PROFILE_BYTES = 256 * 1024

DEVICE_CLASSES = ("gpu", "jetson", "cpu")
MEMORY_KINDS = ("discrete", "unified", "system")  # GPU VRAM; shared by CPU and GPU; plain RAM
BACKENDS = ("cuda", "cpu", "metal")
FORMATS = ("gguf", "onnx")  # formats a device can run, whether or not edgecds builds them yet
# CPU instruction-set levels that change how llama.cpp's CPU backend lays weights out (predict.py)
CPU_ISAS = ("x86-avx2", "x86-avx512", "arm-dotprod", "arm-i8mm")


@dataclass(frozen=True)
class FieldSpec:
    path: str  # dotted: "memory.total_gib"
    kind: type  # str, float, int, list
    summary: str
    required: bool = True
    choices: tuple[str, ...] = ()  # for str, or for every item of a list
    minimum: float | None = None
    figure: bool = False  # a measured or specified number: must cite a source


PROFILE_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("id", str, "identifier used on the command line"),
    FieldSpec("name", str, "what the device is"),
    FieldSpec("class", str, "kind of device", choices=DEVICE_CLASSES),
    FieldSpec("power_mode", str, "power mode the figures hold for (Jetsons and laptops change speed with it)"),
    FieldSpec("memory.kind", str, "where the model's memory comes from", choices=MEMORY_KINDS),
    FieldSpec("memory.total_gib", float, "memory the model can live in, GiB", minimum=0.5, figure=True),
    FieldSpec("memory.reserve_gib", float, "kept for the OS, driver and runtime, GiB", minimum=0.0, figure=True),
    FieldSpec("memory.bandwidth_gbs", float, "memory bandwidth, GB/s", minimum=1.0, figure=True),
    FieldSpec("memory.host_ram_gib", float, "system RAM beside a discrete GPU, for layers that do not fit, GiB", required=False, minimum=0.5, figure=True),
    FieldSpec("compute.cpu_cores", int, "CPU cores", minimum=1, figure=True),
    FieldSpec("compute.cpu_isa", str, "CPU instruction-set level", choices=CPU_ISAS),
    FieldSpec("compute.cpu_gflops_fp32", float, "CPU FP32 peak, GFLOPS (cores x clock x FLOPs a cycle)", minimum=1.0, figure=True),
    FieldSpec("compute.gpu_tflops_fp32", float, "GPU FP32 throughput, TFLOPS", required=False, minimum=0.01, figure=True),
    FieldSpec("runtime.backends", list, "engine backends that run here", choices=BACKENDS),
    FieldSpec("runtime.formats", list, "model formats that run here", choices=FORMATS),
    FieldSpec("runtime.quant_types", list, "quant types that run here (default: every type of those formats)", required=False, choices=tuple(QUANT_TYPE_BY_NAME)),
    FieldSpec("runtime.default_ctx", int, "context length used unless told otherwise", minimum=128),
    FieldSpec("runtime.max_ctx", int, "largest context length worth running here", minimum=128),
)
_TABLES = {"memory", "compute", "runtime", "sources"}


@dataclass(frozen=True)
class DeviceProfile:
    id: str
    name: str
    device_class: str
    power_mode: str
    memory_kind: str
    total_gib: float
    reserve_gib: float
    bandwidth_gbs: float
    host_ram_gib: float | None
    cpu_cores: int
    cpu_isa: str
    cpu_gflops_fp32: float
    gpu_tflops_fp32: float | None
    backends: tuple[str, ...]
    formats: tuple[str, ...]
    quant_types: tuple[str, ...]
    default_ctx: int
    max_ctx: int
    sources: dict[str, str] = field(repr=False)
    path: str = ""

    @property
    def budget_gib(self) -> float:
        """Memory a model may use: total less the reserve."""
        return round(self.total_gib - self.reserve_gib, 3)

    def runs_type(self, type_name: str, tensor_types: dict[str, int]) -> bool:
        """Whether a variant of `type_name` runs here. A fitted GGUF (FIT-x.xx) has no file type of
        the table: it runs where each of its quantized tensor types is the base of a type that does."""
        if type_name in self.quant_types:
            return True
        if not is_fitted(type_name):
            return False
        bases = {QUANT_TYPE_BY_NAME[q].base for q in self.quant_types if q in QUANT_TYPE_BY_NAME}
        return all(t in bases or t in ("F32", "F16", "BF16") for t in tensor_types)

    def field_values(self) -> dict[str, Any]:
        """The profile keyed by PROFILE_FIELDS paths, as in the file."""
        return {
            "id": self.id, "name": self.name, "class": self.device_class, "power_mode": self.power_mode,
            "memory.kind": self.memory_kind, "memory.total_gib": self.total_gib, "memory.reserve_gib": self.reserve_gib,
            "memory.bandwidth_gbs": self.bandwidth_gbs, "memory.host_ram_gib": self.host_ram_gib,
            "compute.cpu_cores": self.cpu_cores, "compute.cpu_isa": self.cpu_isa,
            "compute.cpu_gflops_fp32": self.cpu_gflops_fp32, "compute.gpu_tflops_fp32": self.gpu_tflops_fp32,
            "runtime.backends": list(self.backends), "runtime.formats": list(self.formats),
            "runtime.quant_types": list(self.quant_types), "runtime.default_ctx": self.default_ctx, "runtime.max_ctx": self.max_ctx,
        }

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "budget_gib": self.budget_gib, "path": self.path, "fields": self.field_values(), "sources": self.sources}


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _check_field(spec: FieldSpec, value: Any, where: str) -> Any:
    def fail(why: str) -> InvalidInputError:
        return InvalidInputError(f"{where}: field '{spec.path}' {why} ({spec.summary})")

    if spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail(f"must be a number, not {value!r}")
        value = float(value)
        if not math.isfinite(value):  # TOML allows nan and inf; no device has them
            raise fail(f"must be a finite number, not {value!r}")
    elif spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail(f"must be a whole number, not {value!r}")
    elif spec.kind is str:
        if not isinstance(value, str) or not value.strip():
            raise fail(f"must be a non-empty string, not {value!r}")
    elif spec.kind is list:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise fail(f"must be a non-empty list of strings, not {value!r}")
    if spec.minimum is not None and value < spec.minimum:
        raise fail(f"is {value}, below the minimum of {spec.minimum}")
    items = value if isinstance(value, list) else [value]
    if spec.choices:
        unknown = [v for v in items if v not in spec.choices]
        if unknown:
            raise fail(f"has unknown value(s) {', '.join(map(repr, unknown))}; known: {', '.join(spec.choices)}")
    return tuple(value) if isinstance(value, list) else value


def parse_profile(data: dict[str, Any], where: str) -> DeviceProfile:
    """Validate one profile's table; every error names `where` and the field."""
    unknown_top = sorted(k for k, v in data.items() if isinstance(v, dict) and k not in _TABLES)
    known_paths = {s.path for s in PROFILE_FIELDS}
    stray = sorted(
        f"{table}.{key}" for table in _TABLES - {"sources"} for key in (data.get(table) or {}) if f"{table}.{key}" not in known_paths
    ) + sorted(k for k, v in data.items() if not isinstance(v, dict) and k not in known_paths)
    if unknown_top or stray:
        raise InvalidInputError(f"{where}: unknown field(s) {', '.join(unknown_top + stray)}; known: {', '.join(sorted(known_paths))}")
    values: dict[str, Any] = {}
    for spec in PROFILE_FIELDS:
        raw = _lookup(data, spec.path)
        if raw is None:
            if spec.required:
                raise InvalidInputError(f"{where}: missing field '{spec.path}' ({spec.summary})")
            values[spec.path] = None
            continue
        values[spec.path] = _check_field(spec, raw, where)

    sources = data.get("sources")
    if not isinstance(sources, dict) or not all(isinstance(v, str) and v.strip() for v in sources.values()):
        raise InvalidInputError(f"{where}: field 'sources' must be a table of field = \"where the figure comes from\"")
    stray_sources = sorted(set(sources) - known_paths)
    if stray_sources:
        raise InvalidInputError(f"{where}: sources name unknown field(s) {', '.join(stray_sources)}")
    for spec in PROFILE_FIELDS:
        if spec.figure and values[spec.path] is not None and spec.path not in sources:
            raise InvalidInputError(f"{where}: field '{spec.path}' has no source; add sources.\"{spec.path}\" = \"<spec sheet or measurement>\"")
    if values["memory.reserve_gib"] >= values["memory.total_gib"]:
        raise InvalidInputError(f"{where}: field 'memory.reserve_gib' ({values['memory.reserve_gib']}) leaves no memory of memory.total_gib ({values['memory.total_gib']})")
    if values["runtime.default_ctx"] > values["runtime.max_ctx"]:
        raise InvalidInputError(f"{where}: field 'runtime.default_ctx' ({values['runtime.default_ctx']}) exceeds runtime.max_ctx ({values['runtime.max_ctx']})")
    if values["class"] in ("gpu", "jetson") and "cuda" not in values["runtime.backends"]:
        raise InvalidInputError(f"{where}: field 'runtime.backends' of an NVIDIA {values['class']} must include 'cuda'")
    formats = values["runtime.formats"]
    quant_types = values["runtime.quant_types"] or tuple(q for q, t in QUANT_TYPE_BY_NAME.items() if t.format in formats)
    wrong_format = [q for q in quant_types if QUANT_TYPE_BY_NAME[q].format not in formats]
    if wrong_format:
        raise InvalidInputError(f"{where}: field 'runtime.quant_types' lists {', '.join(wrong_format)}, whose format is not in runtime.formats")

    return DeviceProfile(
        id=values["id"], name=values["name"], device_class=values["class"], power_mode=values["power_mode"],
        memory_kind=values["memory.kind"], total_gib=values["memory.total_gib"], reserve_gib=values["memory.reserve_gib"],
        bandwidth_gbs=values["memory.bandwidth_gbs"], host_ram_gib=values["memory.host_ram_gib"],
        cpu_cores=values["compute.cpu_cores"], cpu_isa=values["compute.cpu_isa"],
        cpu_gflops_fp32=values["compute.cpu_gflops_fp32"], gpu_tflops_fp32=values["compute.gpu_tflops_fp32"],
        backends=values["runtime.backends"], formats=formats, quant_types=tuple(quant_types),
        default_ctx=values["runtime.default_ctx"], max_ctx=values["runtime.max_ctx"], sources=dict(sources), path=where,
    )


def load_profile_file(path: Path) -> DeviceProfile:
    try:
        size = path.stat().st_size
        if size > MAX_PROFILE_BYTES:
            raise InvalidInputError(f"{path}: {size} bytes is too large for a device profile (limit {MAX_PROFILE_BYTES})")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"{path}: not valid TOML ({exc})") from None
    profile = parse_profile(data, str(path))
    if profile.id != path.stem:
        raise InvalidInputError(f"{path}: field 'id' is {profile.id!r} but the file is named {path.name}; name the file {profile.id}.toml")
    return profile


def _builtin_files() -> list[Path]:
    folder = resources.files("edgecds.profiles")
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml"))


def profile_dirs(extra: Iterable[Path] = ()) -> list[Path]:
    """User folders: those given on the command line, then EDGECDS_PROFILES."""
    env = [Path(p) for p in os.environ.get(PROFILES_ENV, "").split(os.pathsep) if p]
    folders = [*extra, *env]
    for folder in folders:
        if not folder.is_dir():
            raise InvalidInputError(f"profiles folder {folder} does not exist")
    return folders


def load_profiles(extra_dirs: Iterable[Path] = ()) -> dict[str, DeviceProfile]:
    """Every profile: the shipped ones, then the user's (which may replace a shipped one by id)."""
    profiles: dict[str, DeviceProfile] = {}
    for path in _builtin_files():
        profile = load_profile_file(path)
        profiles[profile.id] = profile
    for folder in profile_dirs(extra_dirs):
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in OTHER_FORMATS:  # a profile in another format would silently not count
                raise InvalidInputError(f"{path}: device profiles are TOML files (*.toml, fields in `edgecds devices show ID`); "
                                        "convert it, or move it out of the profiles folder")
            if path.suffix == ".toml":
                profile = load_profile_file(path)
                profiles[profile.id] = profile
    return profiles


def find_profile(device_id: str, extra_dirs: Iterable[Path] = ()) -> DeviceProfile:
    """A profile by id, shipped or the user's. `auto` and `host`, which need this machine
    detected, are resolved by edgecds.target.resolve_target."""
    profiles = load_profiles(extra_dirs)
    if device_id not in profiles:
        raise UnknownNameError("device", device_id, sorted(profiles))
    return profiles[device_id]
