"""What keeps every step practical on a multi-gigabyte model (issue 17), shown at a small size:
disk refused before a byte is written on a really size-limited target, verify's memory flat on a
file larger than its memory cap, and progress with the time left on a terminal, plain lines on a
pipe, nothing with --quiet."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgecds.bundle.pack import write_reproducible_tar
from edgecds.quant.quantize import QuantizeResult

VERIFY_RSS_CAP = 256 << 20  # issue 17: verify stays under 256 MiB whatever the model's size
BIG = 320 << 20  # a model file larger than that cap


def _can_mount_a_small_disk() -> bool:
    """A size-limited tmpfs needs a mount namespace (unprivileged user namespaces, or root)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


small_disk = pytest.mark.skipif(not _can_mount_a_small_disk(), reason="cannot mount a size-limited tmpfs here (no unshare -Urm)")


def on_small_disk(target: Path, megabytes: int, *edgecds_args: str) -> tuple[int, str, list[str]]:
    """Run `edgecds ARGS` with `target` a tmpfs of `megabytes` MiB (a disk that really is that
    small, for that process alone). Returns its exit code, its output, and what it left on that disk."""
    target.mkdir(parents=True, exist_ok=True)
    command = " ".join(["exec", sys.executable, "-m", "edgecds", *[f"'{a}'" for a in edgecds_args]])
    script = (f"mount -t tmpfs -o size={megabytes}m tmpfs '{target}' || exit 99\n"
              f"sh -c \"{command}\"; code=$?\n"
              f"echo \"LEFT:$(ls -A '{target}' | tr '\\n' ' ')\"; exit $code\n")
    run = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode != 99, run.stderr
    left = run.stdout.rsplit("LEFT:", 1)[1].split()
    return run.returncode, run.stdout + run.stderr, left


@small_disk
def test_quantize_onto_a_disk_too_small_is_refused_before_it_starts(use_store: Path, tmp_path: Path) -> None:
    code, out, left = on_small_disk(tmp_path / "disk", 16, "quantize", "--types", "Q8_0", "-o", str(tmp_path / "disk" / "out"))
    assert code == 1, out
    assert "MiB needed" in out and "MiB free" in out and "nothing was written" in out and "Traceback" not in out
    assert not any(name.endswith(".gguf") for name in left), left  # at most the (empty) output folder


def _big_bundle(folder: Path) -> Path:
    """A bundle whose model is a sparse BIG-byte file (all zeros: no disk used until copied)."""
    (folder / "model").mkdir(parents=True)
    model = folder / "model" / "m.gguf"
    with open(model, "wb") as fh:
        fh.truncate(BIG)
    zeros, h = bytes(8 << 20), hashlib.sha256()
    for _ in range(BIG // len(zeros)):
        h.update(zeros)
    runtime = json.dumps({"format": "gguf", "model": "model/m.gguf", "n_ctx": 512, "threads": 1}).encode()
    (folder / "runtime.json").write_bytes(runtime)
    files = {"model/m.gguf": {"sha256": h.hexdigest(), "size": BIG},
             "runtime.json": {"sha256": hashlib.sha256(runtime).hexdigest(), "size": len(runtime)}}
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": files}))
    return folder


def _peak_rss_of(args: list[str]) -> tuple[int, str, int]:
    """(exit code, output, peak RSS in bytes) of `python -m edgecds ARGS`, run by a fresh parent so
    that no earlier child's peak is counted."""
    probe = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); print(r.stdout + r.stderr)")
    run = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "edgecds", *args], capture_output=True, text=True, timeout=600)
    first, _, rest = run.stdout.partition("\n")
    code, kib = (int(x) for x in first.split())
    return code, rest, kib * 1024


@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = _big_bundle(tmp_path_factory.mktemp("big") / "b")
    archive = folder.with_name("b.tar")
    write_reproducible_tar(folder, archive)
    return folder, archive


def test_verify_memory_stays_flat_on_a_file_larger_than_its_cap(big_bundle: tuple[Path, Path]) -> None:
    for bundle in big_bundle:
        code, out, peak = _peak_rss_of(["verify", str(bundle), "-q"])
        assert code == 0 and "OK: 2 files match the manifest" in out, out
        assert peak < VERIFY_RSS_CAP < BIG, f"verify of {bundle.name}: peak RSS {peak / 2**20:.0f} MiB"


def test_verify_of_an_archive_writes_nothing(big_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """Checked as it is read: no temporary copy of the model on the disk (TMPDIR here)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run = subprocess.run([sys.executable, "-m", "edgecds", "verify", str(big_bundle[1]), "-q"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "TMPDIR": str(scratch)})
    assert run.returncode == 0, run.stderr
    assert list(scratch.iterdir()) == []


def test_verify_into_unpacks_a_verified_archive_and_nothing_else(big_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    into = tmp_path / "bundles"
    code, out, peak = _peak_rss_of(["verify", str(big_bundle[1]), "--into", str(into), "-q"])
    assert code == 0 and f"Unpacked: {into / 'b'}" in out, out
    assert peak < VERIFY_RSS_CAP and (into / "b" / "model" / "m.gguf").stat().st_size == BIG
    assert sorted(p.name for p in into.iterdir()) == [".edgecds.lock", "b"]
    code, out, _ = _peak_rss_of(["verify", str(big_bundle[1]), "--into", str(into), "-q"])  # already there: refused, kept
    assert code == 1 and "already exists" in out and sorted(p.name for p in into.iterdir()) == [".edgecds.lock", "b"]
    code, out, _ = _peak_rss_of(["verify", str(big_bundle[0]), "--into", str(into)])
    assert code == 2 and "--into unpacks an archive" in out


def test_a_damaged_big_file_is_still_found(big_bundle: tuple[Path, Path], tmp_path: Path) -> None:
    """The streamed hash reads to the end: a change in the last byte fails."""
    folder = tmp_path / "b"
    shutil.copytree(big_bundle[0], folder)
    with open(folder / "model" / "m.gguf", "r+b") as fh:
        fh.seek(BIG - 1)
        fh.write(b"\1")
    code, out, _ = _peak_rss_of(["verify", str(folder), "-q"])
    assert code == 1 and "does not match the manifest" in out


def on_terminal(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `python -m edgecds ARGS` with its stdout and stderr on a pseudo-terminal, as a person
    at a console sees it."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "edgecds", *args], stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env={**os.environ, "COLUMNS": "160", "TERM": "xterm", **(env or {})})
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 600)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closes when the child exits
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def test_verify_shows_bars_with_the_time_left_on_a_terminal(big_bundle: tuple[Path, Path]) -> None:
    code, out = on_terminal(["verify", str(big_bundle[1])])
    assert code == 0, out
    assert "verify: sha256" in out and "verify: extract" not in out  # an archive is hashed as it is read, not unpacked
    assert "320.0 of 320.0 MiB" in out and "0:00:00 left" in out  # the amount done, and edgecds's time-left column at the end
    assert "\x1b[" in out  # drawn as a bar (terminal control codes), not as plain lines
    assert "OK: 2 files" in out


def test_verify_writes_plain_lines_on_a_pipe_and_nothing_with_quiet(big_bundle: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECDS_PROGRESS_EVERY", "0")  # a line at every update, not every 10 s
    run = subprocess.run([sys.executable, "-m", "edgecds", "verify", str(big_bundle[1])], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert "verify: sha256: started, 320.0 MiB" in lines
    progress = [line for line in lines if line.startswith("verify: sha256: ") and "% (" in line]
    assert progress and all("left" in line for line in progress), lines
    assert not any("\x1b[" in line for line in lines)
    quiet = subprocess.run([sys.executable, "-m", "edgecds", "verify", str(big_bundle[1]), "-q"], capture_output=True, text=True, timeout=600)
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.slow
def test_eval_reports_each_case_and_drift_chunk_on_a_pipe(default_variants: QuantizeResult, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The accuracy step of a large model is hours: it says where it is, case by case and chunk by chunk."""
    folder = tmp_path / "variants"
    shutil.copytree(default_variants.output_dir, folder)
    monkeypatch.setenv("EDGECDS_PROGRESS_EVERY", "0")
    run = subprocess.run([sys.executable, "-m", "edgecds", "eval", str(folder), "--types", "Q8_0", "--limit", "2"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert any(": 2 cases (loglik): started, 2 cases" in line for line in lines), lines
    assert any("% (1 of 2 cases)" in line and "left" in line for line in lines), lines
    assert any("drift on the clinical text: started" in line and "chunks" in line for line in lines), lines
    assert any("drift on the clinical text: " in line and " chunks)" in line and "left" in line for line in lines), lines


def test_progress_figures_and_a_step_that_never_begins() -> None:
    from edgecds.progress import amount, lazy_step, time_left

    assert amount(512, 2048, "bytes") == "0.5 of 2.0 KiB" and amount(3 << 30, 6 << 30, "bytes") == "3.0 of 6.0 GiB"
    assert amount(1, 4, "cases") == "1 of 4 cases"
    # time left at the pace since the step began (one update a minute still gives an estimate)
    assert time_left(1, 4, 60.0) == "0:03:00" and time_left(0, 4, 60.0) == "-:--:--"

    calls: list[tuple[str, object]] = []

    class Recorder:
        shows_bars = False

        def start(self, label: str, total: int, unit: str = "bytes") -> None:
            calls.append(("start", (label, total, unit)))

        def advance_to(self, done: int) -> None:
            calls.append(("advance", done))

        def finish(self) -> None:
            calls.append(("finish", None))

        def note(self, message: str) -> None:
            calls.append(("note", message))

    step = lazy_step(Recorder(), "profile", 3, "processes")
    assert step is not None and calls == []  # a skipped variant shows no step at all
    step(1)
    step(5)  # never past the total
    assert calls == [("finish", None), ("start", ("profile", 3, "processes")), ("advance", 1), ("advance", 3)]


def test_an_onnx_variant_ships_exactly_the_files_its_hash_covers(tmp_path: Path) -> None:
    from edgecds.bundle.pack import _model_files
    from edgecds.digest import folder_digest_of, sha256_file, sha256_folder

    folder = tmp_path / "ONNX_INT4"
    (folder / "sub").mkdir(parents=True)
    for name, data in {"model.onnx": b"graph", "model.onnx.data": b"weights", "sub/x.json": b"{}", ".stray": b"added later"}.items():
        (folder / name).write_bytes(data)
    files = _model_files(folder)
    assert [p.relative_to(folder).as_posix() for p in files] == ["model.onnx", "model.onnx.data", "sub/x.json"]
    assert folder_digest_of({p: sha256_file(p) for p in files}, folder) == sha256_folder(folder)

