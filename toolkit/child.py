"""Child processes that cannot outlive edgecds, and the one way a child reports back.

The converter, the load check, a measurement and the ONNX compile step run as children. If
edgecds is killed (out of memory, a signal), an orphaned converter would go on writing a
temporary file that the next run is about to remove, so on Linux each child asks the kernel to
kill it when its parent dies. A child that computes something prints it as one JSON object on
its last stdout line (`emit_json`); the parent reads it with `run_json_child` (or
`result_line` and `exit_cause` when it must watch the child while it runs), and a crash, a
kill, a timeout or a missing result becomes an EngineError that says which.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgecds.errors import EngineError

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess on Linux; None elsewhere."""
    return _die_with_parent if sys.platform.startswith("linux") else None


def run_offline_tool(cmd: list[str], watched: Path, expected_bytes: int, reporter: Any = None) -> tuple[int, str, float]:
    """Run a build tool (converter, exporter) as a child with the hubs switched off, reporting the
    growth of the file it writes; its exit code, the last lines it printed, and seconds taken."""
    from edgecds.progress import watch_file_growth

    def exited(proc: subprocess.Popen[bytes], timeout: float) -> bool:
        try:
            proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryFile(mode="w+", prefix="edgecds-tool-") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())
        try:
            watch_file_growth(lambda timeout: exited(proc, timeout), watched, expected_bytes, reporter)
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        elapsed = time.perf_counter() - start
        tail = ""
        if code != 0:
            log.seek(0)
            tail = "\n".join(log.read().strip().splitlines()[-12:])
    return code, tail, elapsed


def emit_json(result: Any) -> None:
    """Child side: the result, as the one JSON line the parent reads."""
    print(json.dumps(result), flush=True)


def exit_cause(code: int) -> str:
    """How a child ended, in words: the signal that killed it, or its exit code."""
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    return f"exit {code}"


def result_line(stdout: str) -> dict[str, Any] | None:
    """The child's result: the JSON object on its last stdout line; None when there is none."""
    lines = stdout.strip().splitlines()
    try:
        data = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def stderr_tail(stderr: str, lines: int = 6) -> str:
    """The child's last lines; when it died of one of edgecds's own errors, just that error's
    message (the traceback above it says nothing to a user)."""
    text = stderr.strip().splitlines()
    for index in range(len(text) - 1, -1, -1):
        own = re.match(r"edgecds\.errors\.\w+: ", text[index])
        if own:
            return "\n".join([text[index][own.end():], *text[index + 1:]])
    return "\n".join(text[-lines:])


def run_json_child(cmd: list[str], what: str, timeout: float, env: dict[str, str] | None = None,
                   advice: Callable[[int], str] | None = None) -> dict[str, Any]:
    """Run `cmd` as a child that dies with this process and return its JSON result. A timeout,
    a crash, a non-zero exit or no result raises an EngineError that starts with `what` and
    ends with the child's last lines on stderr; `advice` turns an exit code into the likely cause
    and what to do (engine/cpu_paths.py's for a crash in llama.cpp)."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env, preexec_fn=die_with_parent())
    except subprocess.TimeoutExpired:
        raise EngineError(f"{what}: not done within {timeout:g} s (timed out, killed)") from None
    if proc.returncode != 0:
        said = advice(proc.returncode) if advice else ""
        raise EngineError(f"{what}: failed ({exit_cause(proc.returncode)})\n{stderr_tail(proc.stderr)}".rstrip() + (f"\n{said}" if said else ""))
    data = result_line(proc.stdout)
    if data is None:
        raise EngineError(f"{what}: the child process printed no result")
    return data
