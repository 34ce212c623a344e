"""The guard behind "nothing phones home" (tests/netguard): it must see this process and its children."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# 0.0.0.0 is not a loopback address, so the guard refuses it, yet Linux connects it to this machine:
# even with the guard broken (the mutation that checks this test), nothing leaves the machine.
NOT_LOOPBACK = ("0.0.0.0", 9)
TRY = f"import socket\ntry:\n    socket.create_connection({NOT_LOOPBACK!r}, timeout=1)\nexcept OSError as exc:\n    print(exc)"


def _take_log() -> str:
    log = Path(os.environ["EDGECDS_NETGUARD_LOG"])
    text = log.read_text(encoding="utf-8")
    log.write_text("")  # this test's own attempts are the point, not a failure
    return text


def test_a_child_process_reaching_past_loopback_is_refused_and_recorded() -> None:
    out = subprocess.run([sys.executable, "-c", TRY], capture_output=True, text=True, check=True).stdout
    assert "blocked by the test guard" in out
    assert "0.0.0.0" in _take_log()


def test_this_process_is_guarded_and_loopback_is_not() -> None:
    with pytest.raises(OSError, match="blocked by the test guard"):
        socket.create_connection(NOT_LOOPBACK, timeout=1)
    assert "0.0.0.0" in _take_log()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    assert _take_log() == ""
