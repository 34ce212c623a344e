"""A token read from a file: the one way the fleet's cluster token and serve's bearer token are read.

The file (a link to one is followed, as secret mounts use them) must be a regular file only its
owner can read (a FIFO would hang the reader, a device never end, a mode-644 file leaks the token
to every user of the machine), and its first line must
hold a token of the expected form; anything else is a UsageError that says what to do.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

from edgecds.errors import UsageError

READ_LIMIT = 1024


def read_secret(path: Path, what: str, hint: str, valid: Callable[[str], object], form: str) -> str:
    """The token on the first line of `path`, checked: `what` names it in errors ("the cluster
    token"), `hint` says how to put one there, `valid` judges the text, `form` describes a valid one."""
    try:  # opened first (a FIFO does not block with O_NONBLOCK), then judged by what was opened: no gap between check and read
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise UsageError(f"no {what.removeprefix('the ')} at {path}: {hint}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{what} {path} is not a file: {hint}")
        if info.st_mode & 0o077:
            raise UsageError(f"{what} {path} is open to other users of this machine: run `chmod 600 {path}`")
        try:
            head = os.read(fd, READ_LIMIT)
        except OSError as exc:
            raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        text = head.decode("ascii").split("\n")[0].strip()
    except UnicodeDecodeError:
        text = ""
    if not text or not valid(text):
        raise UsageError(f"{path} does not hold {what.replace('the ', 'a ', 1)} ({form}): {hint}")
    return text
