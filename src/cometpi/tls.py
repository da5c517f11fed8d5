"""TLS 1.3 with mutual authentication by pinned certificates, for all three links.

Each party has a key and a self-signed certificate (``cometpi keygen``); each trusts exactly the
certificates it was given (pinning, as SSH's known_hosts does: no certificate authority, no host
names).  A link is refused unless the peer presents one of its pinned certificates, unexpired; the
error names the peer and the reason.  After the handshake each side knows the peer's identity: the
certificate's common name and its SHA-256 fingerprint.

The channel (``TlsChannel``) runs TLS over memory BIOs: one lock guards the TLS state, the raw socket
is read by the receiving thread and written by the channel's writer thread, so the two directions of
an exchange stay concurrent (an ``ssl.SSLSocket`` must not be read and written from two threads).
``TlsChannel.wire`` counts the bytes on the wire, beside the protocol payload the meter counts.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

from .transport import PeerDisconnected, PeerTimeout, TcpChannel, TransportError


class TlsError(TransportError):
    """A TLS link was refused or failed: wrong, expired or missing certificate, or a plaintext peer."""


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, as AB:CD:... (what ``keygen`` prints and peers compare)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def keygen(name: str, out_dir: str | Path, days: int = 365, *, not_before: dt.datetime | None = None) -> dict:
    """Write ``NAME.key`` (EC P-256, mode 0600) and ``NAME.crt`` (self-signed, CN = NAME, valid ``days``)
    into ``out_dir``; returns the paths and the certificate's fingerprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid key name {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, crt_path = out / f"{name}.key", out / f"{name}.crt"
    tmp = key_path.with_suffix(".key.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.replace(tmp, key_path)
    crt_tmp = crt_path.with_suffix(".crt.tmp")
    crt_tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(crt_tmp, crt_path)
    return {"key": str(key_path), "cert": str(crt_path),
            "fingerprint": fingerprint(cert.public_bytes(serialization.Encoding.DER))}


def _pem_certs(paths) -> list[bytes]:
    """PEM certificates from files and directories (every ``*.crt`` / ``*.pem`` in a directory)."""
    out = []
    for p in paths or []:
        p = Path(p)
        files = sorted([*p.glob("*.crt"), *p.glob("*.pem")]) if p.is_dir() else [p]
        if not files:
            raise TlsError(f"no certificates (*.crt, *.pem) in {p}")
        for f in files:
            if not f.is_file():
                raise TlsError(f"certificate file {f} not found")
            out.append(f.read_bytes())
    return out


@dataclass(frozen=True)
class Peer:
    """An authenticated peer: its certificate's common name and fingerprint."""

    name: str
    fingerprint: str


@dataclass
class TlsConfig:
    """A party's own identity (``NAME.key`` + ``NAME.crt`` from a path prefix) and the peer certificates
    it trusts on one link (files or directories)."""

    identity: str  # path prefix: keys/server -> keys/server.key, keys/server.crt
    trusted: list

    def __post_init__(self):
        self.key, self.cert = Path(f"{self.identity}.key"), Path(f"{self.identity}.crt")
        for p in (self.key, self.cert):
            if not p.is_file():
                raise TlsError(f"{p} not found (create it with `cometpi keygen --name {Path(self.identity).name}`)")
        self._pins = _pem_certs(self.trusted)
        if not self._pins:
            raise TlsError("no trusted peer certificates given")
        self.pinned = {fingerprint(ssl.PEM_cert_to_DER_cert(p.decode())) for p in self._pins}

    def context(self, server_side: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False  # pinned certificates, not host names
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(cadata="".join(p.decode() for p in self._pins))
        return ctx


def _reason(e: Exception) -> str:
    msg = getattr(e, "verify_message", None) or getattr(e, "reason", None) or str(e)
    return {"certificate has expired": "its certificate has expired",
            "self-signed certificate": "its certificate is not one of the pinned ones",
            "self signed certificate": "its certificate is not one of the pinned ones",
            "PEER_DID_NOT_RETURN_A_CERTIFICATE": "it presented no certificate",
            "TLSV13_ALERT_CERTIFICATE_REQUIRED": "it requires a certificate (pass --tls)",
            "WRONG_VERSION_NUMBER": "it does not speak TLS (a plaintext peer?)",
            "TLSV1_ALERT_UNKNOWN_CA": "it does not trust our certificate",
            "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it says our certificate has expired",
            "SSLV3_ALERT_BAD_CERTIFICATE": "it refused our certificate"}.get(msg, msg)


class TlsChannel(TcpChannel):
    """A ``TcpChannel`` whose bytes travel inside TLS 1.3 (memory BIOs; see the module docstring)."""

    def __init__(self, sock: socket.socket, tls: TlsConfig, *, server_side: bool, **kw):
        self._lock = threading.Lock()
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._obj = tls.context(server_side).wrap_bio(self._in, self._out, server_side=server_side)
        self.wire = {"sent": 0, "recv": 0}
        self._raw = sock
        sock.settimeout(kw.get("timeout", 60.0))
        name = kw.get("peer_name", "peer")
        try:
            self._handshake()
        except (ssl.SSLError, OSError) as e:
            try:  # send the alert that says why (the peer then names the reason too)
                self._flush_raw()
            except OSError:
                pass
            sock.close()
            raise TlsError(f"TLS with {name} refused: {_reason(e)}") from None
        der = self._obj.getpeercert(binary_form=True)
        fp = fingerprint(der) if der else ""
        if fp not in tls.pinned:  # load_verify_locations already checked; pinning is the contract
            sock.close()
            raise TlsError(f"TLS with {name} refused: its certificate is not one of the pinned ones")
        cn = dict(x[0] for x in self._obj.getpeercert().get("subject", ())).get("commonName", "")
        self.peer = Peer(cn, fp)
        super().__init__(sock, **kw)

    # -- raw socket --------------------------------------------------------------------------
    def _flush_raw(self) -> None:
        data = self._out.read()
        if data:
            self._raw.sendall(data)
            self.wire["sent"] += len(data)

    def _recv_raw(self) -> bytes:
        data = self._raw.recv(1 << 16)
        self.wire["recv"] += len(data)
        return data

    def _handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                self._flush_raw()
                return
            except ssl.SSLWantReadError:
                self._flush_raw()
                data = self._recv_raw()
                if not data:
                    raise TlsError("the peer closed the connection during the TLS handshake") from None
                self._in.write(data)

    # -- TcpChannel hooks --------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        with self._lock:  # the records enter the writer's queue in the order TLS produced them
            self._obj.write(data)
            enc = self._out.read()
            super()._write(enc)

    def _on_wire(self, n: int) -> None:
        self.wire["sent"] += n

    def _read(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if self._werr is not None:
                raise self._werr
            with self._lock:
                try:
                    buf += self._obj.read(n - len(buf))
                    continue
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    raise PeerDisconnected(f"{self.peer_name} closed the TLS connection") from None
                except ssl.SSLError as e:
                    raise TlsError(f"TLS error on the link to {self.peer_name}: {_reason(e)}") from None
                pending = self._out.read()  # post-handshake records (key updates, tickets)
                if pending:
                    TcpChannel._write(self, pending)
            try:
                data = self._recv_raw()
            except TimeoutError:
                raise PeerTimeout(f"no data from {self.peer_name} within {self.timeout:g} s") from None
            except OSError as e:
                raise PeerDisconnected(f"connection to {self.peer_name} lost: {e}") from None
            if not data:
                raise PeerDisconnected(f"{self.peer_name} closed the connection"
                                       + (f" in the middle of a frame ({len(buf)}/{n} bytes)" if buf else ""))
            with self._lock:
                self._in.write(data)
        return bytes(buf)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def check_plaintext(host: str, insecure: bool, what: str) -> None:
    """Plaintext TCP is allowed on loopback only, unless ``--insecure-plaintext`` (which warns once)."""
    if is_loopback(host):
        return
    if not insecure:
        raise TlsError(f"{what} at {host} is not on loopback: use --tls (TLS with pinned certificates), or "
                       "--insecure-plaintext to send seeds, shares and model cards in the clear")
    from .approx.newton import warn_insecure_once

    warn_insecure_once(f"insecure_plaintext ({what})", f"{what} at {host} runs without TLS: anyone on the path "
                       "can read the dealer's seeds and with them the text and the weights")


@dataclass
class PartyTls:
    """A party's two TLS links: ``peer`` (client: the server's pinned certificate; server: the admitted
    clients' certificates) and ``dealer`` (the dealer's pinned certificate)."""

    peer: TlsConfig | None
    dealer: TlsConfig | None

    @classmethod
    def from_args(cls, identity: str | None, peer_certs, dealer_cert: str | None, who: str) -> PartyTls | None:
        """From the command line: ``--tls PREFIX`` with the peer and dealer certificates (all or none)."""
        if identity is None:
            if peer_certs or dealer_cert:
                raise TlsError(f"{who}: certificates to trust were given without --tls (this party's own key)")
            return None
        if not peer_certs or not dealer_cert:
            raise TlsError(f"{who}: --tls needs the peer's certificate(s) and --dealer-cert")
        return cls(TlsConfig(identity, list(peer_certs)), TlsConfig(identity, [dealer_cert]))


def dealer_tls(identity: str | None, servers, clients) -> tuple[TlsConfig | None, dict | None]:
    """The dealer's TLS config (trusting the admitted servers and clients) and its admission policy."""
    if identity is None:
        if servers or clients:
            raise TlsError("dealer: --allow-servers/--allow-clients need --tls (the dealer's own key)")
        return None, None
    if not servers or not clients:
        raise TlsError("dealer: --tls needs --allow-servers and --allow-clients (the certificates it admits)")

    def fps(paths):
        return {fingerprint(ssl.PEM_cert_to_DER_cert(p.decode())) for p in _pem_certs(paths)}

    return TlsConfig(identity, [*servers, *clients]), {1: fps(servers), 0: fps(clients)}
