"""`edgecds profile` on real variants of the default model, with llama.cpp, in fresh processes."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import llama_cpp
import pytest
from click.testing import CliRunner

from edgecds.atomic import TEMP_MARK
from edgecds.cli import cli
from edgecds.errors import InvalidInputError
from edgecds.host import detect_host
from edgecds.profile import ProfileConfig, run_profile
from edgecds.quant.quantize import QuantizeResult
from edgecds.results import RESULTS_FILE, load_results
from edgecds.target import resolve_target

HOSTS = Path(__file__).resolve().parent / "fixtures" / "hosts"
PROFILES = Path(__file__).resolve().parents[1] / "profiles"
# small work, so the real engine runs in seconds: 2 fresh processes, pp64, tg16, context 512
QUICK = ["--ctx", "512", "-p", "64", "-n", "16", "-r", "2", "--no-accuracy", "-q"]


@pytest.fixture
def variants(default_variants: QuantizeResult, tmp_path: Path) -> Path:
    """A private copy of the default variants: each test writes its own results.json."""
    folder = tmp_path / "variants"
    shutil.copytree(default_variants.output_dir, folder)
    return folder


def profile(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["profile", *args])
    return result.exit_code, result.output


def test_profiles_real_variants_and_records_everything(variants: Path) -> None:
    code, out = profile(str(variants), "--types", "Q4_K_M,Q8_0", *QUICK, "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["on_target"] and data["device"] == data["host"]["detected_profile"]
    records = {r["variant"]["type"]: r for r in data["records"]}
    assert set(records) == {"Q4_K_M", "Q8_0"}
    # every layer on the GPU when this machine's profile has one and this llama.cpp build can use it
    offload = resolve_target("host").device.backends[0] != "cpu" and bool(llama_cpp.llama_supports_gpu_offload())
    gpu_layers = -1 if offload else 0
    for r in records.values():
        assert r["status"] == "measured" and not r["reused"]
        s = r["settings"]
        assert (s["n_ctx"], s["prompt_tokens"], s["decode_tokens"], s["repeats"]) == (512, 64, 16, 2)
        assert s["threads"] == detect_host().cpu_cores and s["n_gpu_layers"] == gpu_layers and s["type_k"] == "f16"
        m = r["measured"]
        for figure in ("load_seconds", "peak_rss_bytes", "prompt_tps", "decode_tps"):
            assert len(m[figure]["samples"]) == 2 and m[figure]["low"] <= m[figure]["median"] <= m[figure]["high"]
        assert m["decode_tps"]["low"] > 0 and m["prompt_tps"]["low"] > 0
        # the whole file is mapped and read while decoding: the peak holds it, the runtime and the cache
        assert m["peak_rss_bytes"]["low"] > r["variant"]["file_size"]
        assert len(m["ttft_seconds"]["samples"]) == 2 and m["ttft_prompt_tokens"] > 40  # a chat-formatted clinical prompt
        assert m["engine_buffers_mib"]["CPU KV"] == pytest.approx(512 * 23040 / 2**20, abs=0.01)
        assert r["predicted"]["fits"] and r["predicted"]["n_ctx"] == 512
    assert records["Q8_0"]["measured"]["peak_rss_bytes"]["median"] > records["Q4_K_M"]["measured"]["peak_rss_bytes"]["median"]

    stored = load_results(variants / RESULTS_FILE)
    assert stored is not None and len(stored.records) == 2
    host = stored.hosts[stored.records[0].host]
    assert host.cpu_cores == detect_host().cpu_cores and host.versions["llama_cpp_python"] == importlib.metadata.version("llama_cpp_python")


def test_rerun_reuses_force_remeasures_new_settings_add(variants: Path) -> None:
    code, _ = profile(str(variants), "--types", "Q4_K_M", *QUICK)
    assert code == 0
    first = load_results(variants / RESULTS_FILE)
    assert first is not None

    code, out = profile(str(variants), "--types", "Q4_K_M", *QUICK, "--json")
    assert code == 0 and json.loads(out)["records"][0]["reused"]
    again = load_results(variants / RESULTS_FILE)
    assert again is not None and again.records == first.records

    code, out = profile(str(variants), "--types", "Q4_K_M", *QUICK, "--force", "--json")
    assert code == 0 and not json.loads(out)["records"][0]["reused"]
    forced = load_results(variants / RESULTS_FILE)
    assert forced is not None and len(forced.records) == 1 and forced.records[0].created >= first.records[0].created
    assert forced.records[0].measured != first.records[0].measured  # timings of new processes
    # two runs' peak memory differ by no more than the spread they report (speed: the benchmark)
    a, b = first.records[0].measured, forced.records[0].measured
    assert a is not None and b is not None
    assert abs(a.peak_rss_bytes.median - b.peak_rss_bytes.median) <= max(a.peak_rss_bytes.spread, b.peak_rss_bytes.spread)

    code, out = profile(str(variants), "--types", "Q4_K_M", *QUICK, "--cache-type", "q8_0")
    assert code == 2 and "needs --flash-attn" in out  # llama.cpp would refuse it in the child
    code, _ = profile(str(variants), "--types", "Q4_K_M", *QUICK, "--cache-type", "q8_0", "-fa")
    assert code == 0
    both = load_results(variants / RESULTS_FILE)
    assert both is not None and sorted(r.settings["type_k"] for r in both.records) == ["f16", "q8_0"]


def _tiny_profile(tmp_path: Path) -> Path:
    """A CPU device with 0.3 GiB for the model: F16 cannot fit, the 4-bit variants can."""
    mine = tmp_path / "profiles"
    mine.mkdir()
    text = (PROFILES / "laptop-x86-8gb.toml").read_text()
    text = text.replace('id = "laptop-x86-8gb"', 'id = "tiny-box"').replace("total_gib = 7.6", "total_gib = 0.6").replace("reserve_gib = 3.0", "reserve_gib = 0.3")
    (mine / "tiny-box.toml").write_text(text)
    return mine


def _nearest_profile(tmp_path: Path, reserve_gib: float | None = None) -> Path:
    """A folder with `clinic-box`, a CPU profile with exactly this machine's RAM: nearer to it than any
    shipped one, so `--device auto` detects it. `reserve_gib` sets its budget (total less reserve)."""
    ram = detect_host().ram_gib
    text = (PROFILES / "laptop-x86-16gb.toml").read_text()
    text = text.replace('id = "laptop-x86-16gb"', 'id = "clinic-box"').replace("total_gib = 15.6", f"total_gib = {ram}")
    if reserve_gib is not None:
        text = text.replace("reserve_gib = 4.0", f"reserve_gib = {reserve_gib}")
    mine = tmp_path / "my-profiles"
    mine.mkdir(exist_ok=True)
    (mine / "clinic-box.toml").write_text(text)
    return mine


def test_profiles_dir_is_the_one_target_of_measurements_and_evaluations(variants: Path, tmp_path: Path) -> None:
    """A user profile nearer to this machine than any shipped one is the detected profile of the
    measurement records and of the evaluation records alike: the profile command resolves its
    target once and evaluates on it, instead of detecting the host again without the user's folder."""
    from edgecds.clinical import __file__ as clinical_init

    mine = _nearest_profile(tmp_path)
    cases = tmp_path / "three-cases.jsonl"
    cases.write_text("".join((Path(clinical_init).parent / "cases-v1.jsonl").read_text().splitlines(keepends=True)[:3]))
    code, out = profile(str(variants), "--types", "Q8_0", "--profiles-dir", str(mine), "--cases", str(cases),
                        *[a for a in QUICK if a != "--no-accuracy"], "-r", "1")
    assert code == 0, out
    stored = load_results(variants / RESULTS_FILE)
    assert stored is not None and stored.records and stored.evaluations
    hosts = {r.host for r in stored.records} | {e.host for e in stored.evaluations}
    assert len(hosts) == 1, hosts
    assert stored.hosts[hosts.pop()].detected_profile == "clinic-box"
    assert {r.device for r in stored.records} == {"clinic-box"}


KV_BYTES_PER_TOKEN = 23040  # SmolLM2-135M: 30 layers x 3 KV heads x 64 x (K and V) x 2 bytes (f16)


def test_memory_is_measured_with_the_context_filled_and_the_budget_uses_it(variants: Path, tmp_path: Path) -> None:
    """The benchmark writes 64 of 2048 KV cells; the figure a budget is held against fills them all.
    The difference is at least the unwritten KV pages (plus the attention's work buffers, which grow
    with the cells attended). A device whose budget lies between the two figures is refused."""
    from edgecds.engine import RunSettings
    from edgecds.formats.gguf_file import read_gguf
    from edgecds.hwbench.predict import ModelShape, compute_touched_bytes

    code, out = profile(str(variants), "--types", "Q8_0", "--ctx", "2048", "-p", "64", "-n", "16", "-r", "1", "--no-accuracy", "-q", "--json")
    assert code == 0, out
    m = json.loads(out)["records"][0]["measured"]
    short, full = int(m["peak_rss_bytes"]["high"]), m["full_context_peak_bytes"]
    assert m["full_context_tokens"] == 2047
    unwritten_kv = (2047 - 64) * KV_BYTES_PER_TOKEN
    shape = ModelShape.from_gguf(read_gguf(variants / json.loads(out)["records"][0]["variant"]["path"]))
    more_compute = compute_touched_bytes(shape, RunSettings(n_ctx=2048, prompt_tokens=None, decode_tokens=1))
    assert unwritten_kv * 0.95 <= full - short <= unwritten_kv + more_compute + (16 << 20), (short, full, unwritten_kv, more_compute)

    # a device whose budget holds the short run's peak but not the full context's
    ram = detect_host().ram_gib
    budget_gib = (short + (full - short) / 2) / 2**30
    mine = _nearest_profile(tmp_path, reserve_gib=round(ram - budget_gib, 4))
    results = variants / RESULTS_FILE
    result = CliRunner().invoke(cli, ["bundle", str(results), "--device", "clinic-box", "--profiles-dir", str(mine), "-o", str(tmp_path / "b")])
    assert result.exit_code != 0
    assert "no variant was measured on clinic-box" in result.output  # measured for the profile detected without it
    code, out = profile(str(variants), "--types", "Q8_0", "--ctx", "2048", "-p", "64", "-n", "16", "-r", "1", "--no-accuracy",
                        "--profiles-dir", str(mine))
    assert code == 0, out
    result = CliRunner().invoke(cli, ["bundle", str(results), "--device", "clinic-box", "--profiles-dir", str(mine), "-o", str(tmp_path / "b")])
    assert result.exit_code != 0 and "Q8_0: too big by" in result.output, result.output


class Burner:
    """A process that keeps one CPU core busy: another program on the clinic's machine."""

    def __init__(self) -> None:
        import subprocess

        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_a_disturbed_run_is_measured_again(default_variants: QuantizeResult, monkeypatch: pytest.MonkeyPatch) -> None:
    """A neighbour busy during the first run: that run is measured again, once the neighbour is gone."""
    from edgecds.engine import RunSettings
    from edgecds.hwbench import measure

    path = Path(default_variants.output_dir) / "SmolLM2-135M-Instruct-Q8_0.gguf"
    settings = RunSettings(n_ctx=512, prompt_tokens=64, decode_tokens=16, threads=detect_host().cpu_cores)
    real = measure.measure_in_subprocess
    burner = Burner()
    seen: list[measure.Measurement] = []

    def first_one_disturbed(*args: object, **kwargs: object) -> measure.Measurement:
        result = real(*args, **kwargs)  # type: ignore[arg-type]
        seen.append(result)
        burner.stop()  # the neighbour leaves after the first run
        return result

    monkeypatch.setattr(measure, "measure_in_subprocess", first_one_disturbed)
    try:
        runs = measure.measure_repeated(path, settings, 1)
    finally:
        burner.stop()
    assert seen[0].disturbed and max(seen[0].others_cpu_cores or [0]) > measure.DISTURBED_CORES, seen[0].others_cpu_cores
    assert len(seen) == 2 and runs[0].reruns == 1 and not runs[0].disturbed, [m.others_cpu_cores for m in seen]


def test_a_lasting_disturbance_is_recorded_and_min_decode_does_not_trust_it(variants: Path, tmp_path: Path) -> None:
    burner = Burner()
    try:
        code, out = profile(str(variants), "--types", "Q8_0", *QUICK, "-r", "1", "--json")
    finally:
        burner.stop()
    assert code == 0, out
    m = json.loads(out)["records"][0]["measured"]
    d = m["disturbance"]
    assert d["disturbed"] and d["reruns"] == 2 and max(d["others_cpu_cores"]) > d["threshold_cores"], d
    assert any(note.startswith("disturbed: other processes used up to") for note in m["notes"])
    result = CliRunner().invoke(cli, ["bundle", str(variants / RESULTS_FILE), "--min-decode", "1", "-o", str(tmp_path / "b")])
    assert result.exit_code != 0 and "Q8_0: decode speed measured while other processes used the CPU" in result.output, result.output
    result = CliRunner().invoke(cli, ["bundle", str(variants / RESULTS_FILE), "--min-decode", "1", "--allow-disturbed", "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output


def test_a_results_folder_that_cannot_be_written_is_a_message(variants: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out = profile(str(variants), "--types", "Q8_0", *QUICK, "-o", str(blocker / "results.json"))
    assert code == 1 and f"could not write {blocker}" in out and "Traceback" not in out, out


def test_another_device_is_refused_naming_what_was_detected(variants: Path, tmp_path: Path) -> None:
    code, out = profile(str(variants), "--device", "jetson-orin-nano-8gb", *QUICK)
    assert code == 1
    assert "this machine is not a jetson-orin-nano-8gb: detected" in out and "--measure-anyway" in out
    assert not (variants / RESULTS_FILE).exists()


def test_measure_anyway_marks_the_results_and_skips_what_cannot_fit(variants: Path, tmp_path: Path) -> None:
    code, out = profile(str(variants), "--device", "tiny-box", "--profiles-dir", str(_tiny_profile(tmp_path)), "--types", "F16,Q4_K_M",
                        "--measure-anyway", *QUICK[:-1])
    assert code == 0, out
    assert "(measured on " in out and "not the device)" in out
    assert "F16: skipped: predicted not to fit: needs" in out
    stored = load_results(variants / RESULTS_FILE)
    assert stored is not None
    by_type = {r.variant.type: r for r in stored.records}
    assert by_type["F16"].status == "skipped" and by_type["F16"].measured is None
    assert by_type["F16"].predicted["peak_bytes"] > by_type["F16"].predicted["budget_bytes"]
    assert by_type["Q4_K_M"].status == "measured"
    assert all(r.device == "tiny-box" and not r.on_target for r in stored.records)
    assert stored.hosts[by_type["Q4_K_M"].host].detected_profile != "tiny-box"


def test_a_crash_or_timeout_is_recorded_and_the_run_goes_on(variants: Path) -> None:
    record = json.loads((variants / "variants.json").read_text())
    paths = {v["type"]: variants / v["path"] for v in record["variants"]}
    # Q2_K: the file changed after quantize (its hash no longer matches the record)
    data = bytearray(paths["Q2_K"].read_bytes())
    data[-1] ^= 0xFF
    paths["Q2_K"].write_bytes(bytes(data))
    # Q3_K_M: cut short, and recorded as if quantize had made it so: the bounded reader refuses it
    truncated = paths["Q3_K_M"].read_bytes()[: 4 << 20]
    paths["Q3_K_M"].write_bytes(truncated)
    import hashlib

    for v in record["variants"]:
        if v["type"] == "Q3_K_M":
            v["sha256"] = hashlib.sha256(truncated).hexdigest()
    (variants / "variants.json").write_text(json.dumps(record))

    code, out = profile(str(variants), "--types", "Q2_K,Q3_K_M,Q4_K_M", *QUICK[:-1])
    assert code == 0, out
    stored = load_results(variants / RESULTS_FILE)
    assert stored is not None
    by_type = {r.variant.type: r for r in stored.records}
    assert by_type["Q2_K"].status == "failed" and "changed since `edgecds quantize` recorded it" in by_type["Q2_K"].reason
    assert by_type["Q3_K_M"].status == "failed" and "not a usable GGUF file" in by_type["Q3_K_M"].reason
    assert by_type["Q4_K_M"].status == "measured"

    code, out = profile(str(variants), "--types", "Q4_K_M", *QUICK, "--timeout", "0.2", "--force", "--json")
    assert code == 0
    timed_out = json.loads(out)["records"][0]
    assert timed_out["status"] == "failed" and "timed out, killed" in timed_out["reason"]


def test_an_engine_failure_in_the_child_is_an_error_with_llama_cpp_s_reason(default_variants: QuantizeResult) -> None:
    from edgecds.engine import RunSettings
    from edgecds.errors import EngineError
    from edgecds.hwbench.measure import measure_in_subprocess

    path = Path(default_variants.output_dir) / next(o.record.path for o in default_variants.outcomes if o.record.type == "Q4_K_M")
    with pytest.raises(EngineError) as err:  # a quantized V cache without flash attention: llama.cpp refuses the context
        measure_in_subprocess(path, RunSettings(n_ctx=256, type_k="q4_0", type_v="q4_0", prompt_tokens=16, decode_tokens=4))
    assert "measuring failed (exit 1)" in str(err.value) and "requires flash_attn" in str(err.value)


def test_settings_follow_the_device_and_options(variants: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU offload settings computed right without a GPU: all layers on a GPU device with a GPU
    build, none on a CPU build (said so), what -ngl says when given."""
    from edgecds import profile as profile_module
    from edgecds.devices import find_profile
    from edgecds.host import host_profile, nearest_profile

    host = detect_host(HOSTS / "rtx-desktop")
    rtx = find_profile("rtx-3060-12gb")
    config = ProfileConfig(variants=variants, n_ctx=1024)
    notes: list[str] = []
    monkeypatch.setattr(profile_module, "engine_has_gpu", lambda: True)
    s = profile_module._settings(config, rtx, host, True, notes)
    assert (s.n_gpu_layers, s.threads, s.n_ctx) == (-1, 6, 1024) and notes == []
    s = profile_module._settings(replace(config, n_gpu_layers=12, threads=3), rtx, host, True, notes)
    assert (s.n_gpu_layers, s.threads) == (12, 3)
    monkeypatch.setattr(profile_module, "engine_has_gpu", lambda: False)
    s = profile_module._settings(config, rtx, host, True, notes)
    assert s.n_gpu_layers == 0 and "no GPU backend" in notes[0]
    laptop = host_profile(nearest_profile(detect_host(HOSTS / "x86-laptop"), {"laptop-x86-8gb": find_profile("laptop-x86-8gb")}))
    s = profile_module._settings(config, laptop, detect_host(HOSTS / "x86-laptop"), True, [])
    assert (s.n_gpu_layers, s.threads) == (0, 4)
    # a 6-core Jetson measured on a 4-core machine: capped to the cores there, and said so
    notes = []
    s = profile_module._settings(config, find_profile("jetson-orin-nano-8gb"), detect_host(HOSTS / "x86-laptop"), False, notes)
    assert s.threads == 4 and "measured with 4 threads" in notes[0]


def test_nvml_absent_is_handled(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgecds.hwbench.measure import _MemorySampler

    monkeypatch.setitem(sys.modules, "pynvml", None)  # as on a machine without the NVIDIA library
    sampler = _MemorySampler(pid=1, unified=False, gpu=True)
    sampler.sample()
    assert sampler.gpu_peak is None and "NVML unavailable" in sampler.notes[0]


def test_jetson_unified_memory_in_use_from_meminfo(tmp_path: Path) -> None:
    from edgecds.hwbench.measure import _MemorySampler, used_memory_bytes

    meminfo = HOSTS / "jetson-orin-nano" / "proc" / "meminfo"
    lines = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
    expected = (int(lines["MemTotal"].split()[0]) - int(lines["MemAvailable"].split()[0])) * 1024
    assert used_memory_bytes(meminfo) == expected
    # the sampler reports growth over what was in use before the child started
    live = tmp_path / "meminfo"
    live.write_text(meminfo.read_text())
    sampler = _MemorySampler(pid=1, unified=True, gpu=False, meminfo=live)
    available = int(lines["MemAvailable"].split()[0])
    live.write_text(meminfo.read_text().replace(f" {available} kB", f" {available - 500_000} kB"))
    sampler.sample()
    assert sampler.unified_peak == 500_000 * 1024
    assert used_memory_bytes(tmp_path / "missing") is None


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.update(schema_version=7), "schema_version 7 is not 1"),
    (lambda d: d["records"][0].update(status="great"), "status 'great' is not one of"),
    (lambda d: d["records"][0]["measured"]["decode_tps"].update(samples="fast"), "field 'samples' must be list"),
    (lambda d: d["records"][0].update(host="elsewhere"), "host(s) elsewhere that 'hosts' does not describe"),
    (lambda d: d["records"][0].pop("settings"), "missing field(s) settings"),
])
def test_a_damaged_results_file_is_named_and_nothing_is_measured(variants: Path, damage: object, message: str) -> None:
    code, _ = profile(str(variants), "--types", "Q4_K_M", *QUICK)
    assert code == 0
    path = variants / RESULTS_FILE
    data = json.loads(path.read_text())
    damage(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    with pytest.raises(InvalidInputError) as err:
        run_profile(ProfileConfig(variants=variants, types=("Q4_K_M",), n_ctx=512, prompt_tokens=64, decode_tokens=16, repeats=1, force=True,
                                accuracy=False))
    assert str(path) in str(err.value) and message in str(err.value)
    assert path.read_bytes() == before



def test_a_killed_profile_keeps_what_it_measured_and_the_next_run_measures_only_the_rest(variants: Path) -> None:
    """results.json is saved whole after every variant: a kill mid-run loses only the variant in hand."""
    cmd = [sys.executable, "-m", "edgecds", "profile", str(variants), "--types", "Q8_0,Q4_K_M,Q2_K", *QUICK]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = variants / RESULTS_FILE
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not results.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # as soon as the first variant is saved: the second is being measured
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be interrupted"
    kept = load_results(results)
    assert kept is not None and [r.variant.type for r in kept.records] == ["Q8_0"]

    code, out = profile(str(variants), "--types", "Q8_0,Q4_K_M,Q2_K", *QUICK, "--json")
    assert code == 0, out
    reused = {r["variant"]["type"]: r["reused"] for r in json.loads(out)["records"]}
    assert reused == {"Q8_0": True, "Q4_K_M": False, "Q2_K": False}
    done = load_results(results)
    assert done is not None and sorted(r.variant.type for r in done.records) == ["Q2_K", "Q4_K_M", "Q8_0"]
    assert next(r for r in done.records if r.variant.type == "Q8_0") == kept.records[0]  # kept as measured, not measured again
    assert not [p for p in variants.iterdir() if TEMP_MARK in p.name]  # the interrupted save left nothing behind


def test_open_ended_cases_are_refused_before_anything_is_measured(variants: Path) -> None:
    code, out = profile(str(variants), "--types", "Q4_K_M", *[a for a in QUICK if a != "--no-accuracy"], "--cases", str(PROFILES.parent / "toolkit" / "clinical" / "open-v1.jsonl"))
    assert code != 0 and "open-ended cases need a free-text mode" in out and "Traceback" not in out
    assert not (variants / RESULTS_FILE).exists()  # refused before the first measurement
