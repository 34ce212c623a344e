"""The resolved target: which device a command works for, and what this machine is.

Every command that names a device (`plan`, `profile`, `eval`, `bundle`, `report`, `devices show`,
the benchmarks) calls `resolve_target` once, with the user's device argument, profile folders and
root, and passes the `Target` down: nothing below it detects the host or reads the profiles again.

The device argument is a profile id, `auto` (the shipped profile nearest to this machine), `host`
(this machine itself, as detected: its memory and cores, the nearest profile's figures for the
rest), or a device class (`jetson`, `gpu`, `cpu`): on the device, the detected profile of that
class, refused with the detected facts when this machine is not of it; for `plan`, which runs
anywhere, every profile of the class (`plan_devices`).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecds import __version__
from edgecds.devices import DEVICE_CLASSES, DeviceProfile, load_profiles
from edgecds.engine import RunSettings, settings_for
from edgecds.errors import UnknownNameError, WrongDeviceError
from edgecds.host import HostInfo, HostMatch, detect_host, host_profile, nearest_profile
from edgecds.results import HostFingerprint

AUTO = "auto"  # the shipped profile nearest to this machine
HOST = "host"  # this machine as detected
DEVICE_HELP = ("Device profile id (see `edgecds devices list`), 'auto' (the profile nearest to this machine), 'host' (this machine "
               "as detected), or a class: jetson, gpu, cpu (this machine, which must be of that class).")


@dataclass(frozen=True)
class Target:
    id: str  # the device results are recorded for and bundles are made for
    device: DeviceProfile  # that device's profile (`host`: this machine's, as detected)
    here: bool  # whether this machine is that device
    settings_profile: DeviceProfile  # where engine settings come from: on the device, its detected cores and memory
    match: HostMatch  # this machine, the profile nearest to it, and how they differ
    fingerprint: HostFingerprint  # this machine as results record it
    profiles: dict[str, DeviceProfile]  # every profile the command was given (shipped and the user's)

    @property
    def host(self) -> HostInfo:
        return self.match.host

    def engine_settings(self, n_ctx: int | None = None, **overrides: Any) -> RunSettings:
        """The settings this device runs with (its default context, a thread a core, its GPU layers);
        `overrides` that are not None replace them."""
        return settings_for(self.settings_profile, n_ctx, **overrides)

    def profile_of(self, device_id: str) -> DeviceProfile:
        """The profile of a device id a results file names: a known profile, or `host` (the
        machine that measured, read as this one: its detected figures)."""
        if device_id in self.profiles:
            return self.profiles[device_id]
        if device_id == HOST:
            return host_profile(self.match)
        raise UnknownNameError("device", device_id, [*sorted(self.profiles), HOST])

    def require_here(self, measure_anyway: bool) -> None:
        """Measuring needs the device itself; another machine only with `measure_anyway`."""
        if self.here or measure_anyway:
            return
        raise WrongDeviceError(
            f"this machine is not a {self.id}: detected {_describe(self.match)}. Run `edgecds profile` on the device itself, or add "
            f"--measure-anyway to measure here; such results are marked as measured on {self.match.profile.id} and never count for {self.id}"
        )


def _llama_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        return "not installed"


def fingerprint(match: HostMatch) -> HostFingerprint:
    """The machine that measures, and the software it runs; its id hashes the rest."""
    host = match.host
    gpus = [g.name + (f" {g.memory_gib:g} GiB" if g.memory_gib else "") for g in host.gpus]
    values: dict[str, Any] = {
        "detected_profile": match.profile.id, "cpu": host.cpu_model, "cpu_cores": host.cpu_cores, "cpu_isa": host.cpu_isa,
        "ram_gib": host.ram_gib, "machine": host.machine, "gpus": gpus, "gpu_driver": host.gpus[0].driver if host.gpus else None,
        "jetson": host.jetson_model, "l4t_release": host.l4t_release, "os": f"{platform.system()} {platform.release()}",
        "versions": {"edgecds": __version__, "llama_cpp_python": _llama_version(), "python": platform.python_version()},
        "cpu_features": list(host.cpu_features), "llama_extra_buffers": _extra_buffers(),
    }
    # the id is the machine and its software: the repacking verdict is recorded beside it (it is
    # known only once a GGUF has run here, and measurements key on the settings that carry it)
    identity = {k: v for k, v in values.items() if k != "llama_extra_buffers"}
    return HostFingerprint(id=HostFingerprint.make_id(identity), **values)


def _extra_buffers() -> bool | None:
    """This host's kept (or forced) verdict on llama.cpp's repacked weight buffers, never a new
    probe; None without llama.cpp, before the first GGUF ran here, or when it cannot be read."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from edgecds.engine.cpu_paths import remembered

    try:
        verdict = remembered()
    except Exception:  # a broken llama.cpp install or a wrong EDGECDS_CPU_REPACK is said where an engine is used, not here
        return None
    return None if verdict is None else verdict.extra_buffers


def _describe(match: HostMatch) -> str:
    host = match.host
    gpu = f", GPU {host.gpus[0].name}" if host.gpus else ", no NVIDIA GPU"
    jetson = f", {host.jetson_model}" if host.jetson_model else ""
    return f"{match.profile.id} (CPU {host.cpu_model}, {host.cpu_cores} cores, {host.ram_gib:g} GiB{gpu}{jetson})"


def resolve_target(device: str = AUTO, profiles_dirs: Iterable[Path] = (), root: Path = Path("/")) -> Target:
    """The device `device` names, this machine (read below `root`), and whether they are one."""
    profiles = load_profiles(profiles_dirs)
    match = nearest_profile(detect_host(root), profiles)
    detected = match.profile
    fp = fingerprint(match)
    if device in DEVICE_CLASSES and device not in profiles:
        if detected.device_class != device:
            raise WrongDeviceError(f"this machine is not a {device}: detected {_describe(match)}; run this on the {device} itself, "
                                   f"or name one of its profiles: {', '.join(sorted(p for p, v in profiles.items() if v.device_class == device))}")
        device = AUTO
    if device in (AUTO, HOST) and device not in profiles:
        # the settings follow this very machine (its cores, memory); `auto` records its profile's id
        here_profile = host_profile(match)
        named = here_profile if device == HOST else detected
        return Target(named.id, named, True, here_profile, match, fp, profiles)
    if device not in profiles:
        raise UnknownNameError("device", device, [*sorted(profiles), AUTO, HOST, *DEVICE_CLASSES])
    named = profiles[device]
    if named.id == detected.id:
        return Target(named.id, named, True, host_profile(match) if match.differences else named, match, fp, profiles)
    return Target(named.id, named, False, named, match, fp, profiles)


def plan_devices(device: str, profiles_dirs: Iterable[Path] = (), root: Path = Path("/")) -> list[DeviceProfile]:
    """The devices `plan` predicts for: every profile of a class (`jetson`, `gpu`, `cpu`) without
    detecting anything, else the one `resolve_target` names."""
    if device in DEVICE_CLASSES:
        profiles = load_profiles(profiles_dirs)
        if device not in profiles:
            return [p for p in profiles.values() if p.device_class == device]
    return [resolve_target(device, profiles_dirs, root).device]
