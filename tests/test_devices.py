"""Device profiles: every shipped file loads; each kind of mistake is named with file and field."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.devices import PROFILE_FIELDS, find_profile, load_profile_file, load_profiles
from edgecds.errors import InvalidInputError, UnknownNameError

PROFILES = Path(__file__).resolve().parent.parent / "profiles"
ISSUE_DEVICES = {
    "rtx-3060-12gb", "rtx-4060-laptop-8gb", "rtx-4090-24gb",
    "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb",
    "laptop-x86-8gb", "laptop-x86-16gb", "apple-m2-16gb",
}
VALID = (PROFILES / "rtx-3060-12gb.toml").read_text()


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_profile_loads_and_cites_its_figures(path: Path) -> None:
    profile = load_profile_file(path)
    assert 0 < profile.budget_gib < profile.total_gib
    for spec in PROFILE_FIELDS:
        if spec.figure and profile.field_values()[spec.path] is not None:
            assert len(profile.sources[spec.path]) > 10


def test_the_issue_devices_are_all_there() -> None:
    profiles = load_profiles()
    assert set(profiles) >= ISSUE_DEVICES
    assert {p.device_class for p in profiles.values()} == {"gpu", "jetson", "cpu"}
    for jetson in (p for p in profiles.values() if p.device_class == "jetson"):
        assert jetson.memory_kind == "unified" and "W" in jetson.power_mode and jetson.formats == ("gguf",)


def test_known_figures() -> None:
    nano = find_profile("jetson-orin-nano-8gb")
    assert nano.bandwidth_gbs == 102.0 and nano.cpu_cores == 6
    assert find_profile("rtx-4090-24gb").bandwidth_gbs == 1008.0
    assert find_profile("apple-m2-16gb").backends == ("metal", "cpu")


def edit(text: str, pattern: str, replacement: str) -> str:
    changed, n = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert n == 1, pattern
    return changed


MALFORMED = {
    "missing field": (r"^bandwidth_gbs = .*$", "", "missing field 'memory.bandwidth_gbs'"),
    "string for a number": (r"^total_gib = .*$", 'total_gib = "twelve"', "field 'memory.total_gib' must be a number"),
    "float for an integer": (r"^cpu_cores = .*$", "cpu_cores = 6.5", "field 'compute.cpu_cores' must be a whole number"),
    "negative memory": (r"^total_gib = .*$", "total_gib = -4.0", "field 'memory.total_gib' is -4.0, below the minimum"),
    "unknown backend": (r"^backends = .*$", 'backends = ["cuda", "rocm"]', "field 'runtime.backends' has unknown value(s) 'rocm'"),
    "unknown class": (r'^class = .*$', 'class = "tpu"', "field 'class' has unknown value(s) 'tpu'"),
    "unknown format": (r"^formats = .*$", 'formats = ["gguf", "tflite"]', "field 'runtime.formats' has unknown value(s) 'tflite'"),
    "unknown quant type": (r"^formats = .*$", 'formats = ["gguf"]\nquant_types = ["Q4_K_M", "Q4_Z"]', "field 'runtime.quant_types' has unknown value(s) 'Q4_Z'"),
    "empty list": (r"^backends = .*$", "backends = []", "field 'runtime.backends' must be a non-empty list"),
    "empty string": (r"^name = .*$", 'name = ""', "field 'name' must be a non-empty string"),
    "reserve above total": (r"^reserve_gib = .*$", "reserve_gib = 13.0", "field 'memory.reserve_gib' (13.0) leaves no memory"),
    "default context above max": (r"^default_ctx = .*$", "default_ctx = 32768", "field 'runtime.default_ctx' (32768) exceeds"),
    "figure without source": (r'^"memory.bandwidth_gbs" = .*$', "", "field 'memory.bandwidth_gbs' has no source"),
    "source for no field": (r'^\[sources\]$', '[sources]\n"memory.speed" = "vendor"', "sources name unknown field(s) memory.speed"),
    "unknown field": (r"^\[compute\]$", "[compute]\nturbo = true", "unknown field(s) compute.turbo"),
    "gpu without cuda": (r"^backends = .*$", 'backends = ["cpu"]', "field 'runtime.backends' of an NVIDIA gpu must include 'cuda'"),
    "unknown CPU instruction set": (r"^cpu_isa = .*$", 'cpu_isa = "x86-sse4"', "field 'compute.cpu_isa' has unknown value(s) 'x86-sse4'"),
    "peak FLOPS without source": (r'^"compute.cpu_gflops_fp32" = .*$', "", "field 'compute.cpu_gflops_fp32' has no source"),
    "bad TOML": (r"^\[memory\]$", "[memory", "not valid TOML"),
    "not a number (nan)": (r"^total_gib = .*$", "total_gib = nan", "field 'memory.total_gib' must be a finite number, not nan"),
    "infinite bandwidth": (r"^bandwidth_gbs = .*$", "bandwidth_gbs = inf", "field 'memory.bandwidth_gbs' must be a finite number, not inf"),
    "id differs from file name": (r'^id = .*$', 'id = "rtx-3070"', "field 'id' is 'rtx-3070' but the file is named"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_profiles_name_file_and_field(tmp_path: Path, case: str) -> None:
    pattern, replacement, message = MALFORMED[case]
    path = tmp_path / "rtx-3060-12gb.toml"
    path.write_text(edit(VALID, pattern, replacement))
    with pytest.raises(InvalidInputError) as err:
        load_profile_file(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_user_profiles_add_and_override_via_option_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "clinic-nuc-32gb.toml").write_text(
        VALID.replace("rtx-3060-12gb", "clinic-nuc-32gb").replace('class = "gpu"', 'class = "cpu"')
        .replace('kind = "discrete"', 'kind = "system"').replace('backends = ["cuda", "cpu"]', 'backends = ["cpu"]')
    )
    (mine / "rtx-3060-12gb.toml").write_text(edit(VALID, r"^reserve_gib = .*$", "reserve_gib = 2.0"))
    runner = CliRunner()
    listed = json.loads(runner.invoke(cli, ["devices", "--profiles-dir", str(mine), "list", "--json"], catch_exceptions=False).output)
    by_id = {p["id"]: p for p in listed}
    assert "clinic-nuc-32gb" in by_id and "jetson-orin-nano-8gb" in by_id
    assert by_id["rtx-3060-12gb"]["budget_gib"] == 10.0
    monkeypatch.setenv("EDGECDS_PROFILES", str(mine))
    assert find_profile("clinic-nuc-32gb").device_class == "cpu"


def test_a_broken_user_profile_stops_the_command_with_its_name(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text(edit(VALID, r'^id = .*$', 'id = "bad"').replace("total_gib = 12.0", "total_gib = -1.0"))
    result = CliRunner().invoke(cli, ["devices", "--profiles-dir", str(tmp_path), "list"])
    assert result.exit_code == 1
    assert "bad.toml: field 'memory.total_gib'" in result.output and "Traceback" not in result.output


def test_unknown_device_lists_the_known_ones() -> None:
    with pytest.raises(UnknownNameError):
        find_profile("jetson-thor")
    result = CliRunner().invoke(cli, ["devices", "show", "jetson-thor"])
    assert result.exit_code == 2
    assert all(d in result.output for d in ISSUE_DEVICES)


def test_show_prints_every_figure_with_its_source() -> None:
    result = CliRunner().invoke(cli, ["devices", "show", "jetson-orin-nano-8gb"], catch_exceptions=False)
    assert "budget_gib: 5.6" in result.output
    assert "memory.bandwidth_gbs: 102.0  [NVIDIA Jetson Orin Nano Super Developer Kit" in result.output


@pytest.mark.parametrize("name", ["clinic.yaml", "clinic.yml", "clinic.json"])
def test_a_profile_in_another_format_is_not_silently_ignored(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("id: clinic\n")
    result = CliRunner().invoke(cli, ["devices", "--profiles-dir", str(tmp_path), "list"])
    assert result.exit_code == 1 and f"{name}: device profiles are TOML files" in result.output
