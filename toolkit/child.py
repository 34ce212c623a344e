"""Child processes that cannot outlive edgecds.

The converter and the load check run as children. If edgecds is killed (out of memory, a
signal), an orphaned converter would go on writing a temporary file that the next run is about
to remove, so on Linux each child asks the kernel to kill it when its parent dies.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
