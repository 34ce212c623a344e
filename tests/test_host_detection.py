"""`edgecds devices detect` on fixture trees of other machines, read through --root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.devices import find_profile, load_profiles
from edgecds.host import detect_host, host_profile, nearest_profile
from edgecds.target import resolve_target

HOSTS = Path(__file__).resolve().parent / "fixtures" / "hosts"


def detect(name: str) -> dict:  # type: ignore[type-arg]
    result = CliRunner().invoke(cli, ["devices", "detect", "--root", str(HOSTS / name), "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    return json.loads(result.output)


def test_jetson_orin_nano() -> None:
    data = detect("jetson-orin-nano")
    assert data["profile"] == "jetson-orin-nano-8gb"
    host = data["host"]
    assert host["jetson_model"] == "NVIDIA Jetson Orin Nano Developer Kit"
    assert host["l4t_release"].startswith("R36 (release), REVISION: 4.3")
    assert host["cpu_cores"] == 6 and host["machine"] == "aarch64"
    assert host["ram_gib"] == pytest.approx(7.27, abs=0.01)
    assert "Jetson device-tree model" in data["reason"]
    assert data["differences"] == []  # 7.27 GiB is within 5% of the profile's 7.4


def test_x86_laptop_counts_physical_cores() -> None:
    data = detect("x86-laptop")
    assert data["profile"] == "laptop-x86-8gb"
    assert data["host"]["cpu_model"].startswith("11th Gen Intel(R) Core(TM) i5-1135G7")
    assert data["host"]["cpu_cores"] == 4  # 8 threads on 4 cores
    assert data["host"]["gpus"] == []
    assert data["differences"] == []


def test_rtx_desktop_reads_the_nvidia_driver_files() -> None:
    data = detect("rtx-desktop")
    assert data["profile"] == "rtx-3060-12gb"
    assert data["host"]["gpus"] == [{"name": "NVIDIA GeForce RTX 3060", "memory_gib": None, "driver": "550.120"}]
    assert data["host"]["cpu_cores"] == 6 and data["host"]["ram_gib"] == pytest.approx(15.55, abs=0.01)


def test_cloud_vm_captured_here_maps_to_a_cpu_profile_and_says_how_it_differs() -> None:
    data = detect("cloud-vm")
    assert find_profile(data["profile"]).device_class == "cpu"
    assert any(d.startswith("CPU cores:") for d in data["differences"])


def test_text_output_names_the_nearest_profile() -> None:
    result = CliRunner().invoke(cli, ["devices", "detect", "--root", str(HOSTS / "jetson-orin-nano")], catch_exceptions=False)
    assert "Jetson:   NVIDIA Jetson Orin Nano Developer Kit, R36" in result.output
    assert "Nearest:  jetson-orin-nano-8gb" in result.output


def test_an_unprofiled_gpu_gets_the_gpu_profile_closest_in_memory(tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "root"
    shutil.copytree(HOSTS / "rtx-desktop", root)
    info = next((root / "proc/driver/nvidia/gpus").glob("*/information"))
    info.write_text(info.read_text().replace("RTX 3060", "RTX 3060 Ti"))
    match = nearest_profile(detect_host(root), load_profiles())
    assert match.profile.device_class == "gpu" and "has no profile" in match.reason


def test_host_profile_takes_detected_memory_and_cores() -> None:
    match = nearest_profile(detect_host(HOSTS / "x86-laptop"), load_profiles())
    profile = host_profile(match)
    assert profile.id == "host" and profile.cpu_cores == 4
    assert profile.total_gib == pytest.approx(7.6, abs=0.01)
    assert profile.sources["compute.cpu_cores"].startswith("detected")
    assert resolve_target("host").device.id == "host"  # the live machine


@pytest.mark.parametrize("name, isa, mhz, gflops", [
    ("jetson-orin-nano", "arm-dotprod", 1728.0, 165.9),  # asimddp; cpufreq max 1.728 GHz; 6 x 1.728 x 16
    ("x86-laptop", "x86-avx512", 2400.0, 307.2),  # avx512f; 4 x 2.4 x 32
    ("cloud-vm", "x86-avx2", 2445.406, 156.5),  # avx2, no avx512f; 2 x 2.445 x 32
    ("rtx-desktop", None, None, None),  # its cpuinfo carries no flags or clock
])
def test_instruction_set_and_peak_flops(name: str, isa: str | None, mhz: float | None, gflops: float | None) -> None:
    host = detect_host(HOSTS / name)
    assert (host.cpu_isa, host.cpu_mhz, host.cpu_gflops_fp32) == (isa, mhz, gflops)


def test_a_different_instruction_set_is_a_difference(tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "root"
    shutil.copytree(HOSTS / "cloud-vm", root)
    cpuinfo = root / "proc" / "cpuinfo"
    cpuinfo.write_text(cpuinfo.read_text().replace(" avx2 ", " avx2 avx512f "))
    match = nearest_profile(detect_host(root), load_profiles())
    assert match.profile.cpu_isa == "x86-avx2"
    assert "CPU instruction set: x86-avx512 here, x86-avx2 in the profile" in match.differences


def test_a_relative_root_reads_the_same_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(HOSTS)
    assert detect_host(Path("rtx-desktop")) == detect_host(HOSTS / "rtx-desktop")
    assert detect_host(Path("rtx-desktop")).gpus[0].name == "NVIDIA GeForce RTX 3060"


def test_gpu_memory_not_read_is_not_compared_with_ram() -> None:
    match = nearest_profile(detect_host(HOSTS / "rtx-desktop"), load_profiles())
    assert not any(d.startswith("memory:") for d in match.differences)


def test_device_classes_resolve_to_the_detected_profile_or_are_refused_with_the_facts() -> None:
    from edgecds.errors import WrongDeviceError
    from edgecds.target import plan_devices

    jetson = resolve_target("jetson", root=HOSTS / "jetson-orin-nano")
    assert jetson.id == "jetson-orin-nano-8gb" and jetson.here
    assert resolve_target("gpu", root=HOSTS / "rtx-desktop").id == "rtx-3060-12gb"
    assert resolve_target("cpu", root=HOSTS / "x86-laptop").id == "laptop-x86-8gb"
    with pytest.raises(WrongDeviceError, match=r"this machine is not a jetson: detected laptop-x86-8gb \(CPU .*4 cores.*no NVIDIA GPU\)"):
        resolve_target("jetson", root=HOSTS / "x86-laptop")
    assert {p.id for p in plan_devices("jetson")} == {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb"}
    assert all(p.device_class == "gpu" for p in plan_devices("gpu")) and len(plan_devices("gpu")) >= 3


def test_a_jetson_budget_comes_from_memavailable_not_memfree(tmp_path: Path) -> None:
    """CPU and GPU share a Jetson's memory; CUDA's free-memory call reports MemFree there, which
    leaves out the page cache a model can reclaim. The budget follows MemAvailable."""
    import shutil

    root = tmp_path / "jetson"
    shutil.copytree(HOSTS / "jetson-orin-nano", root)
    meminfo = root / "proc" / "meminfo"
    text = meminfo.read_text()
    text = text.replace("MemFree:         5012344 kB", "MemFree:         1048576 kB")  # 1 GiB free
    text = text.replace("MemAvailable:    6210344 kB", "MemAvailable:    3145728 kB")  # 3 GiB available
    meminfo.write_text(text)
    target = resolve_target("jetson", root=root)
    assert target.host.available_gib == 3.0
    assert target.settings_profile.budget_gib == pytest.approx(3.0, abs=0.01)
    assert "MemAvailable" in target.settings_profile.sources["memory.reserve_gib"]


PINNED = """
import json, os, sys
from pathlib import Path
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from edgecds.engine import EngineSettings, engine_threads
from edgecds.engine.gguf_runtime import GgufRuntime
from edgecds.engine.probe_model import write_probe_models
from edgecds.host import detect_host
from edgecds.hwbench.measure import cpu_seconds

model = write_probe_models(Path(sys.argv[1]))[0]
runtime = GgufRuntime(model, EngineSettings(n_ctx=64, threads=4, extra_buffers=False))
params = runtime._llm.context_params
host = detect_host()
print(json.dumps({"cores": host.cpu_cores, "notes": host.notes, "requested_4": engine_threads(4), "default": engine_threads(None),
                  "n_threads": params.n_threads, "n_threads_batch": params.n_threads_batch, "cpu_seconds": cpu_seconds(),
                  "machine_stat": open("/proc/stat").readline().split()}))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs a machine of two CPUs or more, one to be pinned away from")
def test_a_process_pinned_to_one_cpu_counts_one_core_and_its_engine_runs_one_thread(tmp_path: Path) -> None:
    """taskset or a container's cpuset: more threads than the CPUs a process may use only spin
    against each other, so the host counts the usable cores and the engine is never given more."""
    done = subprocess.run([sys.executable, "-c", PINNED, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen["cores"] == 1 and any("CPU affinity" in note for note in seen["notes"])
    assert (seen["requested_4"], seen["default"], seen["n_threads"], seen["n_threads_batch"]) == (1, 1, 1, 1)
    # a measurement's "other processes" are those on its own CPU: less than the machine's busy time
    machine = [int(v) for v in seen["machine_stat"][1:9]]
    machine_busy = (sum(machine) - machine[3] - machine[4]) / os.sysconf("SC_CLK_TCK")
    assert seen["cpu_seconds"] is not None and 0 < seen["cpu_seconds"][0] < machine_busy
