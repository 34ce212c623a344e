"""Child processes that cannot outlive edgecds.

The converter and the load check run as children. If edgecds is killed (out of memory, a
signal), an orphaned converter would go on writing a temporary file that the next run is about
to remove, so on Linux each child asks the kernel to kill it when its parent dies.
"""

from __future__ import annotations

import ctypes
import signal
import sys
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess on Linux; None elsewhere."""
    return _die_with_parent if sys.platform.startswith("linux") else None
