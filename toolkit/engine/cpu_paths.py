"""Which of llama.cpp's CPU weight paths work on this host: tried once, in a child, and remembered.

At load, llama.cpp can copy weights into "extra" buffer types laid out for the CPU's matrix
instructions: AMX tiles on Intel Xeons with AMX, interleaved blocks (CPU_REPACK) on AVX2, AVX-512
and Arm. They are faster, but the AMX path of the llama.cpp that llama-cpp-python 0.3.36 vendors
dies with SIGSEGV at the first decode (llama.cpp issue 20824, closed unfixed), and a crash takes
the whole process with it. So before the first GGUF runs on a host, a child process loads a tiny
quantized probe model (engine/probe_model.py) in each repacked type with the extra buffers on and
decodes; if it dies, GGUF weights are loaded with them off (llama.cpp's `--no-repack`), if not,
on. The verdict is kept per CPU feature set and engine build under EDGECDS_HOME, so the probe
costs a second or two once per host, not per load.

`EDGECDS_CPU_REPACK=on|off` forces a path (the default, `auto`, probes).
The probe child is engine/probe_model.py (python -m edgecds.engine.probe_model --extra on|off).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgecds.errors import EngineError, UsageError

CPU_PATH_ENV = "EDGECDS_CPU_REPACK"
MODES = ("auto", "on", "off")
PROBE_TIMEOUT = 120
SCHEMA_VERSION = 1
AMX_ISSUE = "llama.cpp issue 20824"

# the buffer names llama.cpp's CPU backend gives its extra (repacked) weight layouts
EXTRA_BUFFERS = ("AMX", "CPU_REPACK", "KLEIDIAI")


@dataclass(frozen=True)
class CpuPathVerdict:
    """How GGUF weights are loaded on this host, and why."""

    extra_buffers: bool  # llama_model_params.use_extra_bufts
    how: str  # "EDGECDS_CPU_REPACK=off", "probed", "probed on <date>"
    buffers_seen: tuple[str, ...] = ()  # the extra buffer types the probe's weights went to (extra on)
    crash: str | None = None  # how the probe died with the extra buffers on
    features: tuple[str, ...] = ()
    engine: str = ""

    def describe(self) -> str:
        if self.crash:
            return (f"repacked weights OFF: with them on, llama.cpp {self.crash} ({', '.join(self.buffers_seen) or 'extra buffers'}); "
                    f"{crash_advice(self.crash, self.features, True, repeat_probe=False)}")
        state = "on" if self.extra_buffers else "off"
        seen = f" (weights in {', '.join(self.buffers_seen)})" if self.extra_buffers and self.buffers_seen else ""
        return f"repacked weights {state}{seen}: {self.how}"


def requested_mode() -> str:
    mode = os.environ.get(CPU_PATH_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise UsageError(f"{CPU_PATH_ENV}={mode!r} is not a mode; known: {', '.join(MODES)}")
    return mode


def engine_build() -> str:
    """The llama.cpp build in use: llama-cpp-python's version and its library file (a rebuild with
    other flags, CUDA or a portable target, is another engine)."""
    import llama_cpp

    library = Path(llama_cpp.__file__).parent / "lib"
    files = sorted({f.resolve() for pattern in ("libllama*", "libggml-cpu*") for f in library.glob(pattern)})  # links to one file
    stamp = ",".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files)
    return f"llama-cpp-python {llama_cpp.__version__} [{stamp}]"


def _cache_file(features: tuple[str, ...], engine: str) -> Path:
    from edgecds.digest import cache_key
    from edgecds.home import edgecds_home

    return edgecds_home() / "cpu-paths" / f"{cache_key({'features': list(features), 'engine': engine})[:16]}.json"


_resolved: dict[tuple[str, str], CpuPathVerdict] = {}


def remembered_at() -> Path:
    """Where this host's verdict is kept (delete it to probe again)."""
    from edgecds.host import detect_cpu_features

    return _cache_file(detect_cpu_features(), engine_build())


def resolve(reporter: Any = None) -> CpuPathVerdict:
    """The verdict for this host: forced by the environment, remembered, or probed now."""
    from edgecds.host import detect_cpu_features

    mode = requested_mode()
    features = detect_cpu_features()
    if mode != "auto":
        return CpuPathVerdict(mode == "on", f"{CPU_PATH_ENV}={mode}", features=features)
    engine = engine_build()
    cache = _cache_file(features, engine)
    memo = _resolved.get((str(cache), engine))
    if memo is not None:
        return memo
    verdict = _read_verdict(cache, engine)
    if verdict is None:
        if reporter:
            reporter.note("trying llama.cpp's repacked CPU weight paths on this host (once per host and engine build)")
        verdict = probe_host(features, engine)
        if verdict.how == "probed":  # only a clean verdict is kept: a probe that timed out or failed is tried again next time
            _write_verdict(cache, verdict)
        elif reporter:
            reporter.note(verdict.how)
    _resolved[(str(cache), engine)] = verdict
    return verdict


def remembered() -> CpuPathVerdict | None:
    """The verdict forced or kept for this host, without probing; None when there is none yet."""
    from edgecds.host import detect_cpu_features

    mode = requested_mode()
    if mode != "auto":
        return CpuPathVerdict(mode == "on", f"{CPU_PATH_ENV}={mode}", features=detect_cpu_features())
    engine = engine_build()
    return _read_verdict(_cache_file(detect_cpu_features(), engine), engine)


def _read_verdict(cache: Path, engine: str) -> CpuPathVerdict | None:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
        if data.get("schema_version") != SCHEMA_VERSION or data.get("engine") != engine:
            return None
        return CpuPathVerdict(bool(data["extra_buffers"]), f"probed on {data['date']}", tuple(data["buffers_seen"]),
                              data.get("crash"), tuple(data["features"]), engine)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none yet, or unreadable: probe again


def _write_verdict(cache: Path, verdict: CpuPathVerdict) -> None:
    from edgecds.atomic import write_json

    record = {"schema_version": SCHEMA_VERSION, **asdict(verdict), "date": time.strftime("%Y-%m-%d")}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, record)
    except OSError:
        pass  # a read-only home: the probe is simply run again next time


@dataclass(frozen=True)
class ProbeRun:
    ok: bool
    buffers: tuple[str, ...]  # every weight buffer type llama.cpp reported
    crash: str | None  # "was killed by SIGSEGV while decoding Q8_0", when not ok
    seconds: float
    signal: bool = False  # it was killed by a signal (a crash in the engine), not a timeout or an error of its own
    said: str = ""  # the child's last lines, when it failed without a signal


def run_probe(extra: bool) -> ProbeRun:
    """The probe child with the extra buffers on or off."""
    from edgecds.child import die_with_parent, exit_cause

    cmd = [sys.executable, "-m", "edgecds.engine.probe_model", "--extra", "on" if extra else "off"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False, preexec_fn=die_with_parent())
    except subprocess.TimeoutExpired:
        return ProbeRun(False, (), f"did not finish the probe within {PROBE_TIMEOUT} s", PROBE_TIMEOUT)
    from edgecds.child import stderr_tail

    seconds = round(time.perf_counter() - start, 2)
    seen = _buffers_in(proc.stderr.splitlines())
    if proc.returncode == 0:
        return ProbeRun(True, seen, None, seconds)
    steps = [line.split(" ", 1)[1] for line in proc.stderr.splitlines() if line.startswith("probe: ")]
    where = f" while {steps[-1]}" if steps else ""
    return ProbeRun(False, seen, f"{exit_cause(proc.returncode).replace('killed by', 'was killed by')}{where}", seconds,
                    signal=proc.returncode < 0, said=stderr_tail(proc.stderr, 3))


def probe_host(features: tuple[str, ...], engine: str) -> CpuPathVerdict:
    on = run_probe(extra=True)
    seen = tuple(b for b in on.buffers if b in EXTRA_BUFFERS)
    if on.ok:
        return CpuPathVerdict(True, "probed", seen, None, features, engine)
    off = run_probe(extra=False)
    if not on.signal:  # a timeout or an error of the probe's own says nothing about the CPU: not kept, tried again next time
        why = f"the probe of repacked weights {on.crash} ({on.said})" if on.said else f"the probe of repacked weights {on.crash}"
        return CpuPathVerdict(False, f"repacked weights off for now: {why}", seen, None, features, engine)
    if not off.ok:
        raise EngineError(f"llama.cpp cannot run a quantized model on this host: with repacked weights it {on.crash}, "
                          f"without them it {off.crash}. {crash_advice(off.crash or '', features, False)} {off.said}".rstrip())
    return CpuPathVerdict(False, "probed", seen, on.crash, features, engine)


def _buffers_in(lines: list[str]) -> tuple[str, ...]:
    """The buffer types llama.cpp says it put weights in ("load_tensors: CPU_REPACK model buffer size = 3.4 MiB")."""
    found: list[str] = []
    for line in lines:
        if "model buffer size" in line:
            name = line.split(":", 1)[-1].split("model buffer size")[0].strip()
            if name and name not in found:
                found.append(name)
    return tuple(found)


def weight_buffers(log: list[str]) -> tuple[str, ...]:
    """The buffer types a load put the weights in, from llama.cpp's log."""
    return _buffers_in("".join(log).splitlines())


def crash_advice(cause: str, features: tuple[str, ...], extra_buffers: bool, repeat_probe: bool = True) -> str:
    """What a crash of llama.cpp most likely means on this host, and what to do: the known causes."""
    if "SIGILL" in cause:
        return ("SIGILL is an instruction this CPU does not have: this llama.cpp was compiled for another CPU (a -march=native build "
                "or an image made on another machine). Reinstall on this machine (make install) or build for a portable target "
                "(README: CPUs and images).")
    if "SIGKILL" in cause:
        return "SIGKILL usually means the system ran out of memory: close other programs, or use a smaller variant or context."
    if "SIGABRT" in cause:
        return ("SIGABRT is llama.cpp stopping on something it cannot handle, most often metadata in the file (a C++ exception); "
                "check the file with `edgecds verify`, or try another copy of it.")
    crashed = any(s in cause for s in ("SIGSEGV", "SIGBUS", "SIGFPE"))
    if crashed and extra_buffers and "amx_int8" in features:
        return (f"This CPU has AMX, and llama.cpp's AMX weight path is known to crash ({AMX_ISSUE}). "
                f"Run with {CPU_PATH_ENV}=off, or remove the remembered probe (`edgecds doctor` shows it) so edgecds tries again.")
    if crashed and extra_buffers:
        return (f"llama.cpp crashed with its repacked weight layouts on. Run with {CPU_PATH_ENV}=off; "
                "`edgecds doctor` tries both paths on this host." if repeat_probe else f"Set {CPU_PATH_ENV}=on to force them.")
    if crashed:
        return "llama.cpp crashed with repacked weights off too: reinstall llama-cpp-python on this machine (make install)."
    return ""


def advice_for_exit(code: int) -> str:
    """For a llama.cpp child that ended with `code`: the likely cause on this host when a signal
    killed it, and what to do; "" for an ordinary exit."""
    from edgecds.child import exit_cause
    from edgecds.host import detect_cpu_features

    if code >= 0:
        return ""
    verdict = remembered()  # no probe is run here
    return crash_advice(exit_cause(code), detect_cpu_features(), True if verdict is None else verdict.extra_buffers)
