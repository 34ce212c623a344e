"""Loaded by every Python process the tests start (tests/conftest.py puts this folder on
PYTHONPATH): refuses and records any connection or name lookup beyond loopback, so a test whose
engine, converter or server tried to reach the network fails (conftest checks the record after
every test). pip is exempt: fetching the model package from the registry is the one network use
set-up makes, and it is not an engine run. C++ code that opens sockets itself is not seen here;
the strace tests in test_serve.py watch those."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

LOG_ENV = "EDGECDS_NETGUARD_LOG"
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", ""}


def _is_local(host: Any) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host).split("%")[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() in _LOCAL_NAMES


def _address_is_local(family: int, address: Any) -> bool:
    if family == getattr(socket, "AF_UNIX", None) or not isinstance(address, tuple):
        return True  # a Unix socket path or an abstract name: never the network
    return _is_local(address[0])


def _record(what: str) -> None:
    try:
        with open(os.environ[LOG_ENV], "a", encoding="utf-8") as log:
            log.write(f"pid {os.getpid()}: {what}\n")
    except OSError:
        pass


def _refuse(what: str) -> OSError:
    _record(what)
    return OSError(f"network access blocked by the test guard: {what}")


def install() -> None:
    cls = socket.socket
    if getattr(cls, "_edgecds_guarded", False):
        return
    connect, connect_ex, sendto = cls.connect, cls.connect_ex, cls.sendto
    getaddrinfo = socket.getaddrinfo

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        if not _address_is_local(self.family, address):
            raise _refuse(f"connect {address!r}")
        return connect(self, address)

    def guarded_connect_ex(self: socket.socket, address: Any) -> Any:
        if not _address_is_local(self.family, address):
            raise _refuse(f"connect {address!r}")
        return connect_ex(self, address)

    def guarded_sendto(self: socket.socket, data: Any, *rest: Any) -> Any:
        if rest and not _address_is_local(self.family, rest[-1]):
            raise _refuse(f"sendto {rest[-1]!r}")
        return sendto(self, data, *rest)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_local(host):
            raise _refuse(f"name lookup {host!r}")
        return getaddrinfo(host, *args, **kwargs)

    cls.connect, cls.connect_ex, cls.sendto = guarded_connect, guarded_connect_ex, guarded_sendto  # type: ignore[method-assign]
    socket.getaddrinfo = guarded_getaddrinfo  # type: ignore[assignment]
    cls._edgecds_guarded = True  # type: ignore[attr-defined]


def _is_pip() -> bool:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            return b"\0-m\0pip\0" in b"\0" + f.read()
    except OSError:
        return False


if os.environ.get(LOG_ENV) and not _is_pip():
    install()
