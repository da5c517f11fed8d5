"""The one place where links are dialled and accepted, plaintext or TLS, for all five links (client to
server, client and server to the dealer, and their accepting ends): ``dial`` and ``accept`` return a
``transport.TcpChannel`` or, given a ``tls.TlsConfig``, a ``tls.TlsChannel`` (TLS 1.3, pinned
certificates).  Whether plaintext is allowed off loopback is decided before, by ``tls.check_plaintext``."""

from __future__ import annotations

import socket

from .tls import TlsConfig
from .transport import TcpChannel


def dial(host: str, port: int, *, tls: TlsConfig | None = None, **kw) -> TcpChannel:
    """Connect to ``host:port`` (``TcpChannel.connect``'s options: retries, timeouts, meter, ...)."""
    return TcpChannel.connect(host, port, tls=tls, **kw)


def accept(conn: socket.socket, *, tls: TlsConfig | None = None, **kw) -> TcpChannel:
    """The channel of an accepted connection; with ``tls`` the handshake runs here (in the caller's
    thread, under ``kw['timeout']``)."""
    return tls.channel(conn, server_side=True, **kw) if tls is not None else TcpChannel(conn, **kw)


__all__ = ["dial", "accept"]
