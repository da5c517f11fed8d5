"""TLS 1.3 with mutual authentication by pinned certificates, for all three links.

Each party has a key and a self-signed certificate (``cometpi keygen``); each trusts exactly the
certificates it was given (pinning, as SSH's known_hosts does: no certificate authority, no host
names).  A link is refused unless the peer presents one of its pinned certificates, unexpired; the
error names the peer and the reason.  After the handshake each side knows the peer's identity: the
certificate's common name and its SHA-256 fingerprint.

The channel (``TlsChannel``) runs TLS over memory BIOs: one lock guards the TLS state, the raw socket
is read by the receiving thread and written by the sending thread (and by the channel's writer thread
for what the socket did not take at once), so the two directions of an exchange stay concurrent (an
``ssl.SSLSocket`` must not be read and written from two threads).
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

from .insecure import warn_insecure_once
from .transport import DeadlineExceeded, PeerDisconnected, TcpChannel, TransportError


class TlsError(TransportError):
    """A TLS link was refused or failed: wrong, expired or missing certificate, or a plaintext peer."""


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, as AB:CD:... (what ``keygen`` prints and peers compare)."""
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


def keygen(name: str, out_dir: str | Path, days: int = 365, *, not_before: dt.datetime | None = None,
           overwrite: bool = False) -> dict:
    """Write ``NAME.key`` (EC P-256, mode 0600) and ``NAME.crt`` (self-signed, CN = NAME, valid ``days``)
    into ``out_dir``; returns the paths and the certificate's fingerprint.

    The key file is created exclusively (O_CREAT | O_EXCL | O_NOFOLLOW, mode 0600): an existing key or
    certificate is refused unless ``overwrite`` (then both are replaced by renaming a new private file over
    them), and a symbolic link in their place is refused either way."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid key name {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, crt_path = out / f"{name}.key", out / f"{name}.crt"
    for p in (key_path, crt_path):
        if p.is_symlink():
            raise TlsError(f"{p} is a symbolic link: refusing to write a key or certificate through it")
        if p.exists() and not overwrite:
            raise TlsError(f"{p} exists: refusing to overwrite it (delete it first, or pass --overwrite)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_private(key_path, pem, replace=overwrite)
    crt_tmp = crt_path.with_name(f".{crt_path.name}.{os.getpid()}.tmp")
    crt_tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(crt_tmp, crt_path)
    return {"key": str(key_path), "cert": str(crt_path),
            "fingerprint": fingerprint(cert.public_bytes(serialization.Encoding.DER))}


def _write_private(path: Path, data: bytes, replace: bool) -> None:
    """Create ``path`` exclusively with mode 0600 (``replace``: a new file renamed over the old one)."""
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if replace else path
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise TlsError(f"{target} exists: refusing to overwrite a private key (pass --overwrite)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # whatever the umask
            f.write(data)
        if replace:
            os.replace(target, path)  # renames over a file (a link at ``path`` would be replaced, not followed)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


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


def check_key_mode(path: Path) -> None:
    """Refuse a private key that its group or others may read or write (as ssh does)."""
    mode = os.stat(path).st_mode & 0o777
    if os.name == "posix" and mode & 0o077:
        raise TlsError(f"private key {path} is accessible by group/others (mode {mode:04o}): "
                       f"run `chmod 600 {path}`")


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
        check_key_mode(self.key)
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

    def channel(self, sock: socket.socket, *, server_side: bool, **kw) -> TlsChannel:
        """A TLS channel over ``sock`` with this identity and these pins (what ``TcpChannel.connect`` makes
        when given a ``tls``: the transport needs no import of this module)."""
        return TlsChannel(sock, self, server_side=server_side, **kw)


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
        self._pinned = tls.pinned
        self.wire = {"sent": 0, "recv": 0}
        self._raw = sock
        super().__init__(sock, **kw)  # the handshake runs in ``_setup``, before the writer thread starts

    def _setup(self) -> None:
        try:
            self._handshake()
        except DeadlineExceeded:
            self._raw.close()
            raise
        except (ssl.SSLError, OSError, TransportError) as e:
            try:  # send the alert that says why (the peer then names the reason too)
                self._flush_raw()
            except OSError:
                pass
            self._raw.close()
            raise TlsError(f"TLS with {self.peer_name} refused: {_reason(e)}") from None
        der = self._obj.getpeercert(binary_form=True)
        fp = fingerprint(der) if der else ""
        if fp not in self._pinned:  # load_verify_locations already checked; pinning is the contract
            self._raw.close()
            raise TlsError(f"TLS with {self.peer_name} refused: its certificate is not one of the pinned ones")
        cn = dict(x[0] for x in self._obj.getpeercert().get("subject", ())).get("commonName", "")
        self.peer = Peer(cn, fp)

    # -- raw socket --------------------------------------------------------------------------
    def _flush_raw(self) -> None:
        data = self._out.read()
        if data:
            self._raw.sendall(data)
            self.wire["sent"] += len(data)

    def _recv_raw(self) -> bytes:
        """What the socket has (up to 64 KiB), waiting at most ``timeout`` or what is left of the deadline."""
        wait = self.timeout if self._deadline is None else self._arm()
        try:
            data = self._raw.recv(1 << 16)
        except TimeoutError:
            raise self._timed_out(wait) from None
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
    def _write_parts(self, parts: list) -> None:
        """Every byte a ``TcpChannel`` would write (frames and raw writes) goes through TLS first."""
        with self._lock:  # the records reach the socket (or the writer's queue) in the order TLS produced them
            for p in parts:
                if len(p):
                    self._obj.write(p)
            enc = self._out.read()
            if enc:
                super()._write_parts([enc])

    def _on_wire(self, n: int) -> None:
        self.wire["sent"] += n

    def _read_into(self, view: memoryview) -> None:
        """Decrypted bytes only: never ``TcpChannel``'s raw socket reads."""
        view[:] = self._read(len(view))

    def _read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            if self._werr is not None:
                raise self._werr
            with self._lock:
                try:
                    got += self._obj.read(n - got, view[got:])
                    continue
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLZeroReturnError:
                    raise PeerDisconnected(f"{self.peer_name} closed the TLS connection") from None
                except ssl.SSLError as e:
                    raise TlsError(f"TLS error on the link to {self.peer_name}: {_reason(e)}") from None
                pending = self._out.read()  # post-handshake records (key updates, tickets)
                if pending:
                    TcpChannel._write_parts(self, [pending])
            try:
                data = self._recv_raw()
            except OSError as e:
                raise PeerDisconnected(f"connection to {self.peer_name} lost: {e}") from None
            if not data:
                raise PeerDisconnected(f"{self.peer_name} closed the connection"
                                       + (f" in the middle of a frame ({got}/{n} bytes)" if got else ""))
            with self._lock:
                self._in.write(data)
        view.release()
        return buf


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address, without asking DNS: an IP literal (127.0.0.0/8, ::1) or
    ``localhost``.  Any other name counts as not loopback: what a name resolves to may change between this
    check and the connect (and the resolver itself may be on the network)."""
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_plaintext(host: str, insecure: bool, what: str) -> None:
    """Plaintext TCP is allowed on loopback only (``is_loopback``: an IP literal or ``localhost``, never a
    name looked up in DNS), unless ``--insecure-plaintext`` (which warns once)."""
    if is_loopback(host):
        return
    if not insecure:
        raise TlsError(f"{what} at {host} is not on loopback (an IP literal such as 127.0.0.1, or localhost): use "
                       "--tls (TLS with pinned certificates), or --insecure-plaintext to send seeds, shares and "
                       "model cards in the clear")
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
