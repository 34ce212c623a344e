"""Measure one variant in a fresh process: load time, peak memory, prompt and decode speed, TTFT.

A fresh process per variant, so one variant's memory cannot hide another's. Its peak resident
set is the kernel's own accounting, VmHWM, which the child reads last: it counts the interpreter,
the engine, the memory-mapped weights it touched, the KV cache and the compute buffers alike.
(Not the child's rusage: Linux folds the parent's resident set at fork into a child's
`ru_maxrss`, so a child of a large process, such as a test run with torch loaded, would read
the parent's size. `/usr/bin/time` is a small parent, so its figure is the child's own.) While it runs, the parent
samples GPU memory through NVML where an NVIDIA GPU is present, and on a Jetson the unified
memory in use (from /proc/meminfo). A crash, a kill or a timeout becomes an EngineError that
says which.

The timed work follows llama-bench: `pp` processes `prompt_tokens` tokens from an empty cache in
batches; `tg` generates `decode_tokens` tokens one at a time from an empty cache (each the
greedy pick of the last; sampling costs microseconds against milliseconds of decoding); after a
warm-up, each is repeated. Time to first token is a clinical prompt in the model's chat
template, from text to the first generated token.

Run directly: python -m edgecds.hwbench.measure MODEL.gguf --ctx 2048
"""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from edgecds.child import die_with_parent, emit_json, exit_cause, result_line, stderr_tail
from edgecds.engine import RunSettings, Runtime, greedy_token
from edgecds.engine.factory import open_runtime
from edgecds.errors import EdgecdsError, EngineError

# A clinical text repeated to the prompt length: token ids do not change speed or memory, and real
# prose is what a clinic runs.
FILL_TEXT = (
    "A 67-year-old woman presents with two hours of crushing central chest pain radiating to the jaw, "
    "with sweating and nausea. She has hypertension, type 2 diabetes and smokes. Blood pressure 150/92, "
    "pulse 104, oxygen saturation 95% on air. The ECG shows ST elevation in leads II, III and aVF. "
    "Troponin is raised. "
)
CLINICAL_PROMPT = (
    "A 58-year-old man has had sudden severe headache for one hour, the worst of his life, with vomiting "
    "and neck stiffness. Blood pressure 178/96, temperature 37.1 C, no focal deficit. What is the most "
    "likely diagnosis, and what is the next investigation?"
)
# Identical processes peak up to ~0.3 MiB apart (allocator and thread-stack placement: 316 KiB
# over 10 runs of Q4_K_M here), so peak memory is told apart to 1 MiB, not to the page. Why it
# holds on other Linux hosts: the model's pages are the same file mapped the same way each run, and
# what varies is glibc's arena and thread-stack placement, a few hundred KiB whatever the model size.
PEAK_RSS_RESOLUTION = 1 << 20
TIMEOUT_SECONDS = 600.0  # a variant's whole measurement; `profile --timeout`, `tune` and `fleet profile` default to it
SAMPLE_SECONDS = 0.05
# A run is disturbed when other processes used more than a quarter of a core on average while it
# was timed. llama.cpp runs a spinning thread a core and waits at every barrier for the slowest, so
# a neighbour taking part of one core slows decode far more than its share (30x measured here with
# one busy process on 2 cores); an idle machine here shows under 0.05 cores of others' work.
DISTURBED_CORES = 0.25
MAX_RERUNS = 2  # a disturbed run is measured again at most this many times; then it is kept, flagged

_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output) buffer size =\s+([\d.]+) MiB")


@dataclass(frozen=True)
class Workload:
    """How the timed work is repeated. The defaults are `edgecds profile`'s."""

    repeats: int = 3
    warmup: bool = True
    ttft: bool = True
    decode_after_prompt: bool = False  # decode at the prompt's depth (the predictor benchmark fills the context)
    fill_context: bool = False  # after the timed work, fill the context once: the peak the device needs at its n_ctx
    # `profile --draft`: last, the clinical prompt's answer decoded without and with this draft
    # (engine.speculative.DraftSettings as a dict, `source` a file or "ngram"), each `repeats` times
    draft: dict[str, Any] | None = None


ONE_PASS = Workload(repeats=1, warmup=False, ttft=False, decode_after_prompt=True)


@dataclass(frozen=True)
class Measurement:
    model: str
    settings: RunSettings
    workload: Workload
    peak_rss_bytes: int  # VmHWM, read by the child after everything else
    stages: dict[str, dict[str, int]]  # VmHWM, RssAnon, RssFile after import, load, prompt, decode
    llama_buffers_mib: dict[str, float] = field(default_factory=dict)  # as the engine logged them
    load_seconds: float = 0.0
    prompt_tokens: int = 0
    prompt_seconds: list[float] = field(default_factory=list)  # one a repeat
    decode_tokens: int = 0
    decode_seconds: list[float] = field(default_factory=list)
    ttft_prompt_tokens: int = 0
    ttft_seconds: list[float] = field(default_factory=list)
    gpu_peak_bytes: int | None = None  # NVML: the child's GPU memory (or the device's growth), at its peak
    unified_peak_bytes: int | None = None  # Jetson: growth of memory in use (MemTotal - MemAvailable)
    notes: list[str] = field(default_factory=list)
    # CPU cores other processes used, on average, during each repeat's timed work (None: not readable here)
    others_cpu_cores: list[float] | None = None
    full_context_peak_bytes: int | None = None  # VmHWM after filling the context (Workload.fill_context)
    full_context_tokens: int = 0
    reruns: int = 0  # disturbed runs measured again before this one was kept (measure_repeated)
    speculative: dict[str, Any] | None = None  # Workload.draft's figures (_time_drafted)

    @property
    def disturbed(self) -> bool:
        return bool(self.others_cpu_cores) and max(self.others_cpu_cores or [0.0]) > DISTURBED_CORES

    @property
    def prompt_tps_samples(self) -> list[float]:
        return [self.prompt_tokens / s for s in self.prompt_seconds if s > 0]

    @property
    def decode_tps_samples(self) -> list[float]:
        return [self.decode_tokens / s for s in self.decode_seconds if s > 0]

    @property
    def prompt_tps(self) -> float:
        samples = self.prompt_tps_samples
        return statistics.median(samples) if samples else 0.0

    @property
    def decode_tps(self) -> float:
        samples = self.decode_tps_samples
        return statistics.median(samples) if samples else 0.0


def proc_status() -> dict[str, int]:
    wanted = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    found: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in wanted:
                found[key] = int(value.split()[0]) * 1024
    return found


def _fill_tokens(runtime: Runtime, n: int) -> list[int]:
    unit = runtime.tokenize(FILL_TEXT, add_bos=False)
    return (unit * (n // len(unit) + 1))[:n]


def _time_prompt(runtime: Runtime, tokens: list[int]) -> float:
    runtime.reset()
    start = time.perf_counter()
    runtime.eval(tokens)
    return time.perf_counter() - start


def _time_decode(runtime: Runtime, n: int, first: int, from_empty: bool = True) -> float:
    if from_empty:
        runtime.reset()
    token = first
    start = time.perf_counter()
    for _ in range(n):
        runtime.eval([token])
        token = greedy_token(runtime)
    return time.perf_counter() - start


def _time_first_token(runtime: Runtime, text: str) -> tuple[int, float]:
    runtime.reset()
    start = time.perf_counter()
    tokens = runtime.tokenize(text)
    runtime.eval(tokens)
    greedy_token(runtime)
    return len(tokens), time.perf_counter() - start


def measure_here(model_path: Path, settings: RunSettings, workload: Workload = Workload()) -> Measurement:
    """In this process: load, warm up, then the timed work; the caller must be a fresh process."""
    stages = {"start": proc_status()}
    # the engine imported here so the import's memory is its own stage
    importlib.import_module("onnxruntime" if model_path.is_dir() else "llama_cpp")

    stages["import"] = proc_status()
    start = time.perf_counter()
    runtime = open_runtime(model_path, settings)
    load_seconds = time.perf_counter() - start
    stages["load"] = proc_status()
    n_prompt, n_decode = settings.effective_prompt_tokens, settings.decode_tokens
    depth = n_prompt + n_decode if workload.decode_after_prompt else max(n_prompt, n_decode)
    if depth > settings.n_ctx:
        raise EngineError(f"{n_prompt} prompt + {n_decode} decode tokens do not fit a context of {settings.n_ctx}")
    prompt = _fill_tokens(runtime, n_prompt)
    chat = runtime.chat_prompt(CLINICAL_PROMPT)
    if workload.warmup:  # as llama-bench: one prompt pass and one decoded token, untimed
        _time_prompt(runtime, prompt)
        _time_decode(runtime, 1, runtime.bos())
    timed = _timed_repeats(runtime, prompt, chat, workload, n_decode, stages)
    stages["end"] = proc_status()
    full_peak = None
    if workload.fill_context:  # after the timed work, which it must not slow; its peak is its own figure
        runtime.reset()
        runtime.eval(_fill_tokens(runtime, settings.n_ctx - 1))
        full_peak = proc_status()["VmHWM"]
    speculative = _time_drafted(runtime, settings, workload, chat, n_decode) if workload.draft is not None else None
    log = runtime.engine_log()
    runtime.close()
    return Measurement(
        model=model_path.name, settings=settings, workload=workload, peak_rss_bytes=stages["end"]["VmHWM"], stages=stages,
        llama_buffers_mib=_engine_buffers(log), load_seconds=load_seconds, prompt_tokens=n_prompt, prompt_seconds=timed["prompt"],
        decode_tokens=n_decode, decode_seconds=timed["decode"], ttft_prompt_tokens=timed["ttft_tokens"], ttft_seconds=timed["ttft"],
        others_cpu_cores=timed["others"], full_context_peak_bytes=full_peak,
        full_context_tokens=settings.n_ctx - 1 if workload.fill_context else 0, speculative=speculative,
    )


def timed_answer(runtime: Runtime, prompt: list[int], n: int, draft: Any = None) -> tuple[list[int], float]:
    """The answer's tokens, and the seconds its tokens after the first took (the prompt excluded)."""
    from edgecds.engine import generate_greedy

    first = [0.0]

    def mark(out: list[int]) -> bool:
        if len(out) == 1:
            first[0] = time.perf_counter()
        return False

    out = generate_greedy(runtime, prompt, n, mark, draft=draft)
    return out, time.perf_counter() - first[0]


def _time_drafted(runtime: Runtime, settings: RunSettings, workload: Workload, chat: str, n: int) -> dict[str, Any]:
    """The clinical prompt's answer (`n` tokens at most) decoded without and with the draft, in
    turn, `workload.repeats` times: the two speeds in one process, so a neighbour or the clock
    slows both alike. After the rest, so the draft's memory stays out of the variant's own peak."""
    from edgecds.engine.speculative import DraftSettings, DraftStats, Speculation

    draft = DraftSettings(**(workload.draft or {}))
    spec = Speculation.open(draft, settings, runtime)
    try:
        prompt = runtime.tokenize(chat)
        if len(prompt) + n > settings.n_ctx:
            raise EngineError(f"the clinical prompt ({len(prompt)} tokens) and {n} decoded tokens do not fit a context of {settings.n_ctx}")
        timed_answer(runtime, prompt, 4, spec)  # warm-up: the draft's first load and pass, untimed
        spec.stats = DraftStats()
        plain, drafted, identical, tokens = [], [], True, 0
        for _ in range(workload.repeats):
            alone, seconds = timed_answer(runtime, prompt, n)
            plain.append(seconds)
            helped, seconds = timed_answer(runtime, prompt, n, spec)
            drafted.append(seconds)
            identical = identical and alone == helped
            tokens = len(alone)
        return {"tokens": tokens, "plain_seconds": plain, "draft_seconds": drafted, "identical": identical,
                "stats": spec.stats.to_dict(), "peak_rss_bytes": proc_status()["VmHWM"]}
    finally:
        spec.close()


def cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds every process has used on the CPUs this one may run on, this process's own),
    or None where /proc/stat cannot be read. Only those CPUs: work pinned elsewhere (taskset, another
    container's cpuset) does not slow this one. Time the hypervisor gave other machines (steal)
    counts as used."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            rows = [line.split() for line in fh if line.startswith("cpu")]
        mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        per_cpu = [row for row in rows[1:] if int(row[0][3:]) in mine]
        chosen = per_cpu or rows[:1]  # the machine's total where no CPU line matches
        values = [sum(int(row[i]) for row in chosen) for i in range(1, 9) if all(len(row) > i for row in chosen)]
    except (OSError, ValueError, IndexError):
        return None
    if len(values) < 5:
        return None
    busy = sum(values) - values[3] - values[4]  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _timed_repeats(runtime: Runtime, prompt: list[int], chat: str, workload: Workload, n_decode: int,
                   stages: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The timed work, `workload.repeats` times, and how much CPU other processes used meanwhile."""
    out: dict[str, Any] = {"prompt": [], "decode": [], "ttft": [], "ttft_tokens": 0, "others": []}
    for _ in range(workload.repeats):
        before, start = cpu_seconds(), time.perf_counter()
        out["prompt"].append(_time_prompt(runtime, prompt))
        stages["prompt"] = proc_status()
        if workload.decode_after_prompt:
            out["decode"].append(_time_decode(runtime, n_decode, greedy_token(runtime), from_empty=False))
        else:
            out["decode"].append(_time_decode(runtime, n_decode, runtime.bos()))
        stages["decode"] = proc_status()
        if workload.ttft:
            out["ttft_tokens"], seconds = _time_first_token(runtime, chat)
            out["ttft"].append(seconds)
        after, wall = cpu_seconds(), time.perf_counter() - start
        if before is None or after is None or out["others"] is None:
            out["others"] = None
        else:
            out["others"].append(round(max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / max(wall, 1e-6), 3))
    return out


def _engine_buffers(log: list[str]) -> dict[str, float]:
    """The buffer sizes llama.cpp logged while loading, MiB by buffer."""
    buffers: dict[str, float] = {}
    for line in log:
        match = _BUFFER_LINE.search(line)
        if match and "expectation" not in line:
            key = f"{match.group(1)} {match.group(2)}".replace("_Mapped", "").replace("_REPACK", " repack")
            buffers[key] = buffers.get(key, 0.0) + float(match.group(3))
    return buffers


class _MemorySampler(threading.Thread):
    """Samples, while a child runs, what its peak RSS cannot show: GPU memory through NVML, and on a
    Jetson (whose GPU shares system RAM) the growth of memory in use."""

    def __init__(self, pid: int, unified: bool, gpu: bool, meminfo: Path = Path("/proc/meminfo")) -> None:
        super().__init__(daemon=True)
        self.pid, self.unified, self.meminfo = pid, unified, meminfo
        self.gpu_peak: int | None = None
        self.unified_peak: int | None = None
        self.notes: list[str] = []
        self._done = threading.Event()
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._gpu_baseline = 0
        self._by_process = False
        self._meminfo_baseline = used_memory_bytes(meminfo) if unified else None
        if gpu:
            self._open_nvml()

    def _open_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no library, no driver, no GPU: NVML's errors are all "not here"
            self.notes.append(f"GPU memory not read: NVML unavailable ({type(exc).__name__})")
            return
        self._nvml = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self._gpu_baseline = sum(pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles)

    def _gpu_bytes(self) -> int | None:
        if self._nvml is None or not self._handles:
            return None
        mine = 0
        found = False
        for handle in self._handles:
            try:
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == self.pid and proc.usedGpuMemory is not None:
                        mine += proc.usedGpuMemory
                        found = True
            except self._nvml.NVMLError:
                pass
        if found:
            self._by_process = True
            return mine
        # a container may hide the child's pid from NVML: fall back to the devices' growth
        return max(0, sum(self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self._handles) - self._gpu_baseline)

    def sample(self) -> None:
        gpu = self._gpu_bytes()
        if gpu is not None:
            self.gpu_peak = max(self.gpu_peak or 0, gpu)
        if self._meminfo_baseline is not None:
            used = used_memory_bytes(self.meminfo)
            if used is not None:
                self.unified_peak = max(self.unified_peak or 0, used - self._meminfo_baseline)

    def run(self) -> None:
        while not self._done.wait(SAMPLE_SECONDS):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()
        if self._nvml is not None:
            if self.gpu_peak is not None and not self._by_process:
                self.notes.append("GPU memory is the devices' growth while measuring: NVML did not list the process")
            self._nvml.nvmlShutdown()


def used_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemTotal - MemAvailable: memory in use by everything, as a Jetson's CPU and GPU share it."""
    values: dict[str, int] = {}
    try:
        for line in meminfo.read_text(encoding="ascii", errors="replace").splitlines()[:64]:
            key, _, rest = line.partition(":")
            if key in ("MemTotal", "MemAvailable") and rest.split():
                values[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError):
        return None
    if len(values) < 2:
        return None
    return values["MemTotal"] - values["MemAvailable"]


def measure_in_subprocess(model_path: Path, settings: RunSettings, workload: Workload = Workload(),
                          timeout: float = TIMEOUT_SECONDS, unified_memory: bool = False, gpu: bool = False) -> Measurement:
    """`measure_here` in a fresh child; a crash, kill or timeout becomes an EngineError naming it."""
    if not model_path.is_dir() and settings.extra_buffers is None:  # GGUF: decided here, so the record says which path ran
        from edgecds.engine.cpu_paths import resolve

        settings = replace(settings, extra_buffers=resolve().extra_buffers)
    cmd = [sys.executable, "-m", "edgecds.hwbench.measure", str(model_path),
           "--settings", json.dumps(asdict(settings)), "--workload", json.dumps(asdict(workload))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent())
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda name=name, stream=stream: out.__setitem__(name, stream.read()), daemon=True)
               for name, stream in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for reader in readers:
        reader.start()
    sampler = _MemorySampler(proc.pid, unified_memory, gpu)
    sampler.start()
    timed_out = False
    try:
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code, timed_out = proc.wait(), True
    finally:
        sampler.stop()
        for reader in readers:
            reader.join()
    if timed_out:
        raise EngineError(f"{model_path.name}: not measured within {timeout:.0f} s (timed out, killed)")
    if code != 0:
        from edgecds.engine.cpu_paths import advice_for_exit

        said = "" if model_path.is_dir() else advice_for_exit(code)
        raise EngineError(f"measuring failed ({exit_cause(code)}): {stderr_tail(out.get('stderr', ''))}" + (f"\n{said}" if said else ""))
    data = result_line(out.get("stdout", ""))
    if data is None:
        raise EngineError(f"{model_path.name}: the measuring process printed no result")
    data["settings"] = RunSettings(**data["settings"])
    data["workload"] = Workload(**data["workload"])
    data["gpu_peak_bytes"] = sampler.gpu_peak
    data["unified_peak_bytes"] = sampler.unified_peak
    data["notes"] = sampler.notes
    return Measurement(**data)


def measure_repeated(model_path: Path, settings: RunSettings, repeats: int, timeout: float = TIMEOUT_SECONDS,
                     unified_memory: bool = False, gpu: bool = False, fill_context: bool = False,
                     on_repeat: Callable[[int], None] | None = None, draft: dict[str, Any] | None = None) -> list[Measurement]:
    """`repeats` fresh processes, each loading, warming up and timing the work once. Repeating
    whole processes, not passes inside one, makes the spread honest: it then includes what
    changes from one process to the next (where memory lands, clocks, neighbours), which two
    profile runs would otherwise disagree by. A run that other processes disturbed is measured
    again, up to MAX_RERUNS times; the least disturbed is kept, with how many reruns it took.
    `fill_context`: the first process also fills the context once after its timed work.
    `on_repeat(done)` is called after each kept process. `draft`: each process also decodes the
    clinical answer without and with it (Workload.draft)."""
    runs = []
    for i in range(repeats):
        workload = Workload(repeats=1, fill_context=fill_context and i == 0, draft=draft)
        tries = [measure_in_subprocess(model_path, settings, workload, timeout, unified_memory, gpu)]
        while tries[-1].disturbed and len(tries) <= MAX_RERUNS:
            tries.append(measure_in_subprocess(model_path, settings, workload, timeout, unified_memory, gpu))
        kept = min(tries, key=lambda m: max(m.others_cpu_cores or [0.0]))
        runs.append(replace(kept, reruns=len(tries) - 1))
        if on_repeat is not None:
            on_repeat(len(runs))
    return runs


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Measure one variant in this (fresh) process and print one JSON line.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--settings", default="{}", help="RunSettings as JSON")
    parser.add_argument("--workload", default="{}", help="Workload as JSON")
    parser.add_argument("--ctx", type=int, help="shorthand for the context length")
    args = parser.parse_args(argv)
    values = json.loads(args.settings)
    if args.ctx:
        values["n_ctx"] = args.ctx
    try:
        result = measure_here(args.model, RunSettings(**values), Workload(**json.loads(args.workload)))
    except EdgecdsError as exc:  # the parent reports this message as the cause
        print(exc, file=sys.stderr)
        return 1
    emit_json(asdict(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
