"""The one error boundary of edgecds.

Library code raises these; only the CLI turns them into exit codes. Every message
says what is wrong and what to do about it.
"""

from __future__ import annotations


class EdgecdsError(Exception):
    """Something the user can fix; the CLI prints the message and exits 1."""


class UsageError(EdgecdsError):
    """A bad option or argument; the CLI exits 2, as click does for usage errors."""


class UnknownNameError(UsageError):
    """A name (quant type, model, format) that no registry knows; lists the known ones."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]) -> None:
        self.kind, self.name, self.known = kind, name, list(known)
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(self.known)}")


class InvalidInputError(EdgecdsError):
    """An input file or folder that is malformed, hostile or unsupported."""


class InvalidGgufError(InvalidInputError):
    """A GGUF file that is truncated, not a GGUF, or claims impossible counts or offsets."""


class WrongDeviceError(EdgecdsError):
    """Asked to measure a device this machine is not; measuring here would mislabel the results."""


class EngineError(EdgecdsError):
    """llama.cpp, the converter or another engine failed on input we had accepted."""


class NotEnoughDiskError(EdgecdsError):
    """The planned outputs do not fit on the target disk."""


class ModelUnavailableError(EdgecdsError):
    """A model that has not been pulled into the cache and cannot be fetched."""


# Write failures a user can fix, and what to do about each. The CLI turns these OSErrors into
# messages at its one boundary; atomic writes have already removed their temporaries by then.
WRITE_FAILURES = {
    "ENOSPC": "the disk is full: free space, or choose another output folder",
    "EDQUOT": "the disk quota is used up: free space, or choose another output folder",
    "EFBIG": "the file-size limit (ulimit -f) was reached: raise it, or choose another output folder",
    "EROFS": "the file system is read-only: choose another output folder",
    "EACCES": "permission denied: choose a folder you can write to",
    "EPERM": "not permitted: choose a folder you can write to",
    "EISDIR": "a folder stands where a file was expected: choose another name",
    "ENOTDIR": "a file stands where a folder was expected: choose another name",
    "EEXIST": "something of that name already exists: choose another name",
    "ENAMETOOLONG": "the name is too long: choose a shorter path",
}


def write_failure_message(exc: OSError) -> str | None:
    """A message for an OSError the user can fix (full disk, read-only folder...), or None."""
    import errno

    name = errno.errorcode.get(exc.errno or 0, "")
    if name not in WRITE_FAILURES:
        return None
    where = exc.filename or "the output"
    return f"could not write {where}: {WRITE_FAILURES[name]} ({exc.strerror})"
