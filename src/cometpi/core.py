"""Sessions, configuration, additive shares and explicit open/reveal.

A ``Session`` is one party's view of one two-party computation: its role, its channel to the peer,
its correlated-randomness provider, the agreed configuration and its meter.  There is no module-level
state, so two sessions in one process (the two parties of a test) just work.
"""

from __future__ import annotations

import enum
import hashlib
import json
import secrets
from dataclasses import asdict, dataclass

import torch

from .ring import DTYPE, AesCtrPrg, FixedPoint, new_seed
from .transport import PROTOCOL_VERSION, Channel, Meter


class Role(enum.IntEnum):
    """Party 0 is the client (owns the text), party 1 the server (owns the weights)."""

    CLIENT = 0
    SERVER = 1

    @property
    def other(self) -> Role:
        return Role(1 - self)


class TruncMode(enum.StrEnum):
    """How products are truncated back to f fractional bits.

    * ``exact``: wrap-corrected, dealer-assisted (1 round, 16 B/element); never fails for |x| < 2^62;
      error below 1 ulp.
    * ``local``: SecureML local shifts (0 rounds, 0 bytes); fails with probability about |x|/2^64 per
      element (x the value before truncation, as a ring integer), giving an error of 2^(64-f) ulp.
    """

    EXACT = "exact"
    LOCAL = "local"


class ConfigError(ValueError):
    """An invalid configuration, or two parties whose configurations differ."""


@dataclass(frozen=True)
class Config:
    """Everything both parties must agree on; its hash is checked in the handshake."""

    frac_bits: int = 16
    trunc: TruncMode = TruncMode.EXACT
    #: guess the dealer requests of coming layers and fetch them ahead (``nn.DealerLookahead``); both
    #: parties must agree: a wrong guess makes them skip indices
    lookahead: bool = True

    def __post_init__(self) -> None:
        FixedPoint(self.frac_bits)  # validates f
        try:
            object.__setattr__(self, "trunc", TruncMode(self.trunc))
        except ValueError:
            raise ConfigError(f"unknown truncation mode {self.trunc!r}; choose from "
                              f"{[m.value for m in TruncMode]}") from None

    @property
    def fp(self) -> FixedPoint:
        return FixedPoint(self.frac_bits)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trunc"] = self.trunc.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Config:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown configuration fields {sorted(unknown)}")
        return cls(**d)

    def hash(self) -> str:
        """A short hash of the effective configuration and wire-protocol version."""
        blob = json.dumps({"v": PROTOCOL_VERSION, **self.to_dict()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def diff(self, other: dict) -> list[str]:
        mine = self.to_dict()
        return [f"{k}: this side {mine.get(k)!r}, peer {other.get(k)!r}"
                for k in sorted(set(mine) | set(other)) if mine.get(k) != other.get(k)]


class Session:
    """One party's state in one two-party computation (no globals).

    ``provider`` serves correlated randomness (see ``cometpi.dealer.Provider``); ``pair_seed`` is a
    seed both parties share, used for zero-communication input sharing.
    """

    def __init__(self, role: Role, peer: Channel, provider, config: Config, *, pair_seed: bytes,
                 session_id: str, meter: Meter | None = None, device=None):
        self.role = Role(role)
        self.peer = peer
        self.provider = provider
        self.config = config
        self.fp = config.fp
        self.meter = meter or peer.meter
        self.session_id = session_id
        self.device = device
        self._pair = AesCtrPrg(pair_seed)
        self._pair_index = 0
        self.card: dict = {}  # the server's public model card (set at the handshake)

    # -- accounting -----------------------------------------------------------------------------
    def span(self, name: str):
        """``with session.span("softmax"):`` attributes traffic and time to a named, nested span."""
        return self.meter.span(name)

    def offline(self):
        """Peer traffic inside this block depends only on the model: count it as offline."""
        return self.meter.offline()

    # -- randomness -----------------------------------------------------------------------------
    def pair_random(self, *shapes) -> list[torch.Tensor]:
        """Uniform ring tensors that both parties derive identically from their shared seed."""
        i, self._pair_index = self._pair_index, self._pair_index + 1
        return self._pair.ring(i, *shapes, device=self.device)

    # -- sharing --------------------------------------------------------------------------------
    @property
    def is_client(self) -> bool:
        return self.role == Role.CLIENT

    def share(self, value: torch.Tensor | None, *, owner: Role, shape=None, encoded: bool = False) -> AShare:
        """Secret-share ``value`` held by ``owner`` (the other party passes ``shape``). No traffic.

        Both parties derive the same uniform R from the pair seed; the owner keeps x - R and the
        other keeps R, which is independent of x.
        """
        if self.role == owner:
            if value is None:
                raise ValueError("the owner must pass the value to share")
            x = value.to(DTYPE) if encoded else self.fp.encode(value)
            shape = tuple(x.shape)
        elif shape is None:
            raise ValueError("the party that does not own the value must pass its shape")
        (r,) = self.pair_random(tuple(shape))
        return AShare(self, (x.to(self.device) - r) if self.role == owner else r)

    def zeros(self, shape) -> AShare:
        return AShare(self, torch.zeros(tuple(shape), dtype=DTYPE, device=self.device))

    def open(self, x: AShare, tag: str = "open") -> torch.Tensor:
        """Reveal ``x`` to both parties (ring values). Cost: 1 round, 16 B/element."""
        (other,) = self.peer.exchange([x.data], tag)
        return x.data + other.to(x.data.device)

    def reveal(self, x: AShare, to: Role, tag: str = "reveal") -> torch.Tensor | None:
        """Reveal ``x`` to party ``to`` only (ring values). Cost: 1 round, 8 B/element."""
        if self.role == to:
            return x.data + self.peer.recv(tag, shape=x.shape, dtype=DTYPE).to(x.data.device)
        self.peer.send(x.data, tag)
        return None

    def reveal_float(self, x: AShare, to: Role) -> torch.Tensor | None:
        r = self.reveal(x, to)
        return None if r is None else self.fp.decode(r)

    def close(self) -> None:
        self.peer.close()
        close = getattr(self.provider, "close", None)
        if close:
            close()


class AShare:
    """One party's additive share over Z_2^64 of a fixed-point tensor. Local ops only; see protocols."""

    __slots__ = ("session", "data")

    def __init__(self, session: Session, data: torch.Tensor):
        if data.dtype != DTYPE:
            raise TypeError(f"share data must be int64, got {data.dtype}")
        self.session = session
        self.data = data

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def _wrap(self, data: torch.Tensor) -> AShare:
        return AShare(self.session, data)

    def _public(self, c) -> torch.Tensor:
        """Encode a public constant as this party's share of it (party 0 holds it, party 1 zero)."""
        enc = self.session.fp.encode(c).to(self.data.device)
        return enc if self.session.role == Role.CLIENT else torch.zeros_like(enc)

    def __add__(self, o) -> AShare:
        if isinstance(o, AShare):
            return self._wrap(self.data + o.data)
        return self._wrap(self.data + self._public(o))

    __radd__ = __add__

    def __sub__(self, o) -> AShare:
        if isinstance(o, AShare):
            return self._wrap(self.data - o.data)
        return self._wrap(self.data - self._public(o))

    def __rsub__(self, o) -> AShare:
        return (-self) + o

    def __neg__(self) -> AShare:
        return self._wrap(-self.data)

    def mul_int(self, k) -> AShare:
        """Multiply by a public integer (or int64 tensor): local, exact, no truncation."""
        k = k.to(DTYPE) if isinstance(k, torch.Tensor) else int(k)
        return self._wrap(self.data * k)

    def reshape(self, *shape) -> AShare:
        return self._wrap(self.data.reshape(*shape))

    def transpose(self, a: int, b: int) -> AShare:
        return self._wrap(self.data.transpose(a, b))

    def sum(self, dim, keepdim: bool = False) -> AShare:
        return self._wrap(self.data.sum(dim, keepdim=keepdim))

    def __getitem__(self, idx) -> AShare:
        return self._wrap(self.data[idx])

    def __repr__(self) -> str:
        return f"AShare(role={self.session.role.name}, shape={self.shape})"


def new_session_id() -> str:
    return secrets.token_hex(8)


__all__ = ["AShare", "Config", "ConfigError", "Role", "Session", "TruncMode", "new_seed", "new_session_id"]
