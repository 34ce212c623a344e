"""llama.cpp's CPU weight paths: the probe that decides them per host, each path forced by the
environment, and a crash of the engine turned into a diagnosis (engine/cpu_paths.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from edgecds.cli import cli
from edgecds.engine import EngineSettings
from edgecds.engine import cpu_paths as paths
from edgecds.engine.gguf_runtime import GgufRuntime
from edgecds.engine.probe_model import PROBE_TYPES, write_probe_models
from edgecds.errors import EngineError, UsageError
from edgecds.host import detect_cpu_features, detect_host

HOSTS = Path(__file__).resolve().parent / "fixtures" / "hosts"


def repacks_here() -> bool:
    """Whether llama.cpp repacks Q4_K rows of 256 on this CPU: AVX2 on x86, the dot product on Arm."""
    return bool({"avx2", "asimddp"} & set(detect_cpu_features()))


@pytest.fixture
def fresh_home(isolated_state: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home with no remembered verdict, and no verdict remembered by this process either."""
    shutil.rmtree(isolated_state / "cpu-paths", ignore_errors=True)
    monkeypatch.setattr(paths, "_resolved", {})
    monkeypatch.delenv(paths.CPU_PATH_ENV, raising=False)
    return isolated_state


@pytest.fixture(scope="module")
def probe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("probe")
    return {p.stem.removeprefix("probe-"): p for p in write_probe_models(folder)}


def test_the_probe_model_is_made_here_and_runs_in_llama_cpp_on_both_paths() -> None:
    on, off = paths.run_probe(extra=True), paths.run_probe(extra=False)
    assert off.ok, off
    assert not set(off.buffers) & set(paths.EXTRA_BUFFERS), off.buffers  # off: every weight in plain CPU memory
    if "amx_int8" in detect_cpu_features():  # the crash this exists for: on such a host "on" may die, by a signal
        assert on.ok or (on.signal and "SIGSEGV" in (on.crash or "")), on
    else:
        assert on.ok, on
        if repacks_here():
            assert "CPU_REPACK" in on.buffers


def test_each_path_is_forced_by_the_environment(probe_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "_resolved", {})
    for mode, extra in (("off", False), ("on", True)):
        monkeypatch.setenv(paths.CPU_PATH_ENV, mode)
        verdict = paths.resolve()
        assert verdict.extra_buffers is extra and verdict.how == f"{paths.CPU_PATH_ENV}={mode}"
        if extra and "amx_int8" in detect_cpu_features():
            continue  # forced on, an AMX host would take this very process down (the crash the probe exists for)
        runtime = GgufRuntime(probe_models["Q4_K_M"], EngineSettings(n_ctx=64))
        try:
            assert runtime.extra_buffers is extra
            assert bool(set(runtime.weight_buffers) & set(paths.EXTRA_BUFFERS)) == (extra and repacks_here())
            runtime.eval(list(range(3, 19)))
        finally:
            runtime.close()
    monkeypatch.setenv(paths.CPU_PATH_ENV, "sometimes")
    with pytest.raises(UsageError, match="not a mode; known: auto, on, off"):
        paths.resolve()


def test_the_probe_runs_once_per_host_and_engine_build_and_is_remembered(fresh_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    verdict = paths.resolve()
    assert verdict.how == "probed" and verdict.extra_buffers == (verdict.crash is None)
    kept = paths.remembered_at()
    record = json.loads(kept.read_text())
    assert record["features"] == list(detect_cpu_features()) and record["engine"] == paths.engine_build()

    def no_probe(extra: bool) -> paths.ProbeRun:
        raise AssertionError("the probe ran again")

    monkeypatch.setattr(paths, "run_probe", no_probe)
    monkeypatch.setattr(paths, "_resolved", {})  # as a new process would
    again = paths.resolve()
    assert again.extra_buffers == verdict.extra_buffers and again.how.startswith("probed on ") and again.crash == verdict.crash
    # a verdict made with another engine build is not trusted: the probe runs again
    kept.write_text(json.dumps({**record, "engine": "llama-cpp-python 0.0.1 [another build]"}))
    monkeypatch.setattr(paths, "_resolved", {})
    with pytest.raises(AssertionError, match="the probe ran again"):
        paths.resolve()


def test_a_probe_that_crashes_with_repacking_turns_repacking_off_and_says_why(fresh_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # AMX's crash cannot be produced on a CPU without AMX: the probe's two outcomes are given here
    def probe(extra: bool) -> paths.ProbeRun:
        if extra:
            return paths.ProbeRun(False, ("AMX", "CPU_Mapped"), "was killed by SIGSEGV while decoding Q8_0", 0.4, signal=True)
        return paths.ProbeRun(True, ("CPU_Mapped",), None, 0.4)

    monkeypatch.setattr(paths, "run_probe", probe)
    amx = detect_cpu_features(HOSTS / "xeon-amx")
    verdict = paths.probe_host(amx, paths.engine_build())
    assert not verdict.extra_buffers and verdict.buffers_seen == ("AMX",)
    said = verdict.describe()
    assert "OFF" in said and "SIGSEGV while decoding Q8_0" in said and "AMX" in said and paths.AMX_ISSUE in said


def test_a_crash_verdict_is_kept_but_a_probe_that_merely_failed_is_not(fresh_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[bool] = []

    def crashes_on(extra: bool) -> paths.ProbeRun:
        runs.append(extra)
        return paths.ProbeRun(not extra, (), None if not extra else "was killed by SIGSEGV while decoding Q8_0", 0.1, signal=extra)

    monkeypatch.setattr(paths, "run_probe", crashes_on)
    first = paths.resolve()
    assert not first.extra_buffers and first.crash and runs == [True, False]
    monkeypatch.setattr(paths, "_resolved", {})
    kept = paths.resolve()  # read back, not probed: the crash and its reason too
    assert runs == [True, False] and not kept.extra_buffers and kept.crash == first.crash and "SIGSEGV" in kept.describe()
    # a probe that timed out (a busy machine) or failed on its own says nothing of the CPU: off for now, not kept
    paths.remembered_at().unlink()
    monkeypatch.setattr(paths, "_resolved", {})
    monkeypatch.setattr(paths, "run_probe", lambda extra: paths.ProbeRun(
        not extra, (), None if not extra else f"did not finish the probe within {paths.PROBE_TIMEOUT} s", 120.0))
    slow = paths.resolve()
    assert not slow.extra_buffers and slow.how.startswith("repacked weights off for now") and not paths.remembered_at().exists()


def test_an_engine_that_crashes_either_way_is_an_error_that_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paths, "run_probe", lambda extra: paths.ProbeRun(False, (), "was killed by SIGILL while loading Q8_0", 0.1,
                                                                          signal=True))
    with pytest.raises(EngineError, match="cannot run a quantized model on this host.*compiled for another CPU"):
        paths.probe_host(detect_cpu_features(HOSTS / "cloud-vm"), "engine")


@pytest.mark.parametrize(("host", "cause", "extra", "expected"), [
    ("xeon-amx", "killed by SIGSEGV", True, ["AMX", paths.AMX_ISSUE, f"{paths.CPU_PATH_ENV}=off"]),
    ("epyc-avx512", "killed by SIGSEGV", True, ["repacked weight layouts", f"{paths.CPU_PATH_ENV}=off", "edgecds doctor"]),
    ("epyc-avx512", "killed by SIGSEGV", False, ["repacked weights off too", "reinstall"]),
    ("cloud-vm", "killed by SIGILL", True, ["instruction this CPU does not have", "portable"]),
    ("cloud-vm", "killed by SIGKILL (out of memory?)", False, ["ran out of memory"]),
    ("jetson-orin-nano", "killed by SIGABRT", True, ["metadata"]),
])
def test_each_known_crash_names_its_likely_cause_and_what_to_do(host: str, cause: str, extra: bool, expected: list[str]) -> None:
    advice = paths.crash_advice(cause, detect_cpu_features(HOSTS / host), extra)
    for words in expected:
        assert words in advice, advice
    if host != "xeon-amx":
        assert "AMX" not in advice


def test_a_load_check_killed_by_a_signal_is_a_diagnosis_not_a_traceback(probe_models: dict[str, Path]) -> None:
    from edgecds.hwbench.load_check import check_in_subprocess

    me = psutil.Process()
    stop = threading.Event()

    def kill_the_child() -> None:  # a real SIGSEGV, as a crash inside llama.cpp delivers it
        while not stop.is_set():
            for child in me.children(recursive=True):
                if "edgecds.hwbench.load_check" in " ".join(child.cmdline()):
                    os.kill(child.pid, signal.SIGSEGV)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_child)
    killer.start()
    try:
        with pytest.raises(EngineError) as caught:
            check_in_subprocess(probe_models["Q8_0"])
    finally:
        stop.set()
        killer.join()
    message = str(caught.value)
    assert "the load check" in message and "killed by SIGSEGV" in message
    assert "Traceback" not in message
    if paths.resolve().extra_buffers:  # this host repacks (the conftest probe said so): that is the path to try
        assert f"{paths.CPU_PATH_ENV}=off" in message
    else:  # repacking was already off here (an AMX host): the engine itself is suspect
        assert "reinstall" in message


def test_the_host_records_the_cpu_features_that_change_the_engine_path() -> None:
    amx = detect_host(HOSTS / "xeon-amx")
    assert {"amx_tile", "amx_int8", "amx_bf16", "avx512_vnni"} <= set(amx.cpu_features) and amx.cpu_isa == "x86-avx512"
    assert "amx_int8" not in detect_host(HOSTS / "epyc-avx512").cpu_features
    assert detect_host(HOSTS / "cloud-vm").cpu_features == ("avx", "avx2", "fma", "f16c")
    assert {"asimd", "asimddp"} <= set(detect_host(HOSTS / "jetson-orin-nano").cpu_features)


def test_doctor_runs_the_same_probe_and_says_which_path_works(fresh_home: Path) -> None:
    result = CliRunner().invoke(cli, ["doctor", "--json"], catch_exceptions=False)
    check = {c["name"]: c for c in json.loads(result.output)}["CPU paths"]
    assert check["ok"], check
    verdict = paths.resolve()
    assert f"repacked weights {'on' if verdict.extra_buffers else 'OFF'}" in check["detail"]
    assert str(paths.remembered_at()) in check["detail"] or verdict.crash
    assert all(f in check["detail"] for f in detect_cpu_features())


def test_the_probe_covers_every_type_llama_cpp_repacks(probe_models: dict[str, Path]) -> None:
    from edgecds.formats.gguf_file import read_gguf

    types = {t.type_name for path in probe_models.values() for t in read_gguf(path).tensors}
    assert {"Q8_0", "Q4_K", "Q6_K", "Q4_0"} <= types and set(PROBE_TYPES) == set(probe_models)


def test_images_compile_llama_cpp_for_a_portable_cpu_not_the_build_machines() -> None:
    import subprocess

    root = Path(__file__).resolve().parent.parent
    portable = subprocess.run(["make", "-s", "llama-cmake-args", "LLAMA_CPU=portable"], cwd=root, capture_output=True, text=True, check=True)
    native = subprocess.run(["make", "-s", "llama-cmake-args"], cwd=root, capture_output=True, text=True, check=True)
    assert "-DGGML_NATIVE=OFF" in portable.stdout.split() and "-DGGML_NATIVE=OFF" not in native.stdout.split()
    wrong = subprocess.run(["make", "-s", "llama-cmake-args", "LLAMA_CPU=skylake"], cwd=root, capture_output=True, text=True)
    assert wrong.returncode != 0 and "known: native, portable" in wrong.stderr
    dockerfile = "\n".join(line for line in (root / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#"))
    wheels, device, build = (dockerfile.split(" AS ")[i] for i in (1, 2, 3))
    assert 'CMAKE_ARGS="$(make -s llama-cmake-args LLAMA_CPU=portable)" pip wheel' in wheels  # both images share this wheel
    assert "make install LLAMA_CPU=portable" in build and "COPY --from=wheels /wheels" in device
    assert wheels.startswith("wheels") and device.startswith("device") and build.startswith("build")
    assert "[build" not in device and "make install" not in device  # the device image installs the base package only
