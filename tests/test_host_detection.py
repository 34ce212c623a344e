"""`edgecds devices detect` on fixture trees of other machines, read through --root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.devices import find_profile, load_profiles
from edgecds.host import detect_host, host_profile, nearest_profile

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
    assert find_profile("host").id == "host"  # the live machine
