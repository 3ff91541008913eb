"""The offline guard of the tests: any non-loopback connection or name lookup raises
NetworkAccessInTests. tests/conftest.py installs it at import time; loopback stays open for the local
Ray, MLflow, PostgreSQL and S3 servers that tests start."""

import socket

_LOCAL_HOSTS = {"localhost", "::1", "0.0.0.0", ""}


class NetworkAccessInTests(RuntimeError):
    pass


def _is_local(host) -> bool:
    host = str(host)
    return host in _LOCAL_HOSTS or host.startswith("127.") or host.startswith("/")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def _guard(address):
    if isinstance(address, tuple) and not _is_local(address[0]):
        raise NetworkAccessInTests(f"a test tried to reach {address[0]}:{address[1]}; tests must run offline")


def _guarded_connect(self, address):
    _guard(address)
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    _guard(address)
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host is not None and not _is_local(host if isinstance(host, str) else host.decode()):
        raise NetworkAccessInTests(f"a test tried to resolve {host!r}; tests must run offline")
    return _getaddrinfo(host, *args, **kwargs)


def install_offline_guard() -> None:
    socket.socket.connect = _guarded_connect
    socket.socket.connect_ex = _guarded_connect_ex
    socket.getaddrinfo = _guarded_getaddrinfo
