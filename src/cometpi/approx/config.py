"""Which approximation each layer type uses: ``ApproxConfig``, its choices as enums, and
``resolve_approx``, the one place where a checkpoint's stored approximations, the defaults of a stock
checkpoint and a user's overrides are merged (``cometpi serve``, ``cometpi eval``, the demo, the
benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum

import torch

from .functions import (
    crypten_softmax,
    gelu_erf,
    gelu_tanh,
    quad2_softmax,
    quad_gelu,
    relu2_softmax,
    relu_softmax,
    smu,
    softmax_exp,
)
from .segments import smu1_segments
from .sites import SMU_MU, SOFTMAX_EPS, site_spec
from .splines import activation as spline_activation

PER_CHANNEL = "per-channel"


class Gelu(StrEnum):
    """GeLU's replacement.  ``spline``: the model's own activation (erf or tanh GeLU, SiLU) by splines
    (``approx.splines``); ``erf`` and ``tanh`` are CrypTen's constructions (reproductions of its limits)."""

    SMU = "smu"
    QUAD = "quad"
    SPLINE = "spline"
    ERF = "erf"
    TANH = "tanh"
    EXACT = "exact"


class Softmax(StrEnum):
    """Softmax's replacement.  ``exp``: the original softmax (max, spline exp, reciprocal); ``crypten``:
    CrypTen's (a reproduction)."""

    RELU = "relu"
    RELU2 = "relu2"
    QUAD2 = "quad2"
    EXP = "exp"
    CRYPTEN = "crypten"
    EXACT = "exact"


class SmuForm(StrEnum):
    SEGMENTS = "segments"
    RSQRT = "rsqrt"


class Relu(StrEnum):
    """ReLU-softmax's ReLU (``approx.functions.RELUS``)."""

    NARROW = "narrow"
    SMOOTH = "smooth"
    FULL = "full"


GELUS = tuple(Gelu)
SOFTMAXES = tuple(Softmax)
SMU_FORMS = tuple(SmuForm)


@dataclass(frozen=True)
class ApproxConfig:
    """Which approximation each layer type uses, and how rsqrt is computed.  Comet's model by
    default: SMU for GeLU, ReLU normalisation for softmax, Newton LayerNorm.

    * ``smu_form``: ``segments`` (the default: SMU1 = ReLU + 24 public line segments of the correction
      after folding mu into the FFN weights, ``approx.segments``: no rsqrt) or ``rsqrt`` (SMU as
      (x + sqrt(x^2 + mu^2))/2 by Newton: Comet's own construction).
    * ``relu``: ReLU-softmax's ReLU, ``narrow`` (exact, by the narrow comparison: the default),
      ``smooth`` (SMU with mu = relu_mu: no comparison) or ``full`` (the full-ring comparison).
    * ``guess``: rsqrt's initial guess (LayerNorm, the row sums, and SMU's rsqrt form): the secure
      thermometer by default; ``comet`` is Comet's flooded guess at sigma = 40 (the faithful
      reproduction).
    ``exact`` is for plaintext references only."""

    gelu: str = "smu"
    softmax: str = "relu"
    guess: str = "thermometer"
    sigma: float = 40.0
    target: float = 1e-3
    smu_mu: float | str = SMU_MU  # or "per-channel": the model's trained layers.{i}.ffn.smu_mu (server-private)
    smu_lo: float | None = None  # lower end of SMU's rsqrt domain; default mu^2 (per-channel: set by finetune)
    relu_mu: float = 0.1
    softmax_eps: float = SOFTMAX_EPS
    pooler: str = "sigmoid"  # tanh(x) = 2 sigmoid(2x) - 1 (approx.sigmoid: CrypTen's with a (1, 2] reciprocal)
    smu_form: str = "segments"
    relu: str = "narrow"

    def __post_init__(self):
        for name, enum, table, what in (("gelu", Gelu, GELU, "GeLU approximation"),
                                        ("softmax", Softmax, SOFTMAX, "softmax approximation"),
                                        ("smu_form", SmuForm, None, "SMU form"),
                                        ("relu", Relu, None, "ReLU for ReLU-softmax")):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))  # a string from JSON or the command line
            except ValueError:
                if table is not None and value in table:  # a registered approximation (register_gelu, ...)
                    continue
                known = tuple(table) if table is not None else tuple(e.value for e in enum)
                raise ValueError(f"unknown {what} {value!r}; choose from {known}") from None
        if isinstance(self.smu_mu, str) and self.smu_mu != PER_CHANNEL:
            raise ValueError(f"smu_mu must be a number or {PER_CHANNEL!r}, got {self.smu_mu!r}")
        if self.smu_mu == PER_CHANNEL and self.gelu == "smu" and self.smu_form == "rsqrt" and self.smu_lo is None:
            raise ValueError("a per-channel SMU mu needs smu_lo (the smallest mu^2), which `cometpi finetune` sets")

    def spec(self, site: str):
        kw = {"guess": self.guess, "target": self.target}
        if self.guess.endswith("comet") or "flood" in self.guess:
            kw["sigma"] = self.sigma
        spec = site_spec(site, **kw)
        if site == "smu":
            lo = self.smu_lo if self.smu_lo is not None else float(self.smu_mu) ** 2 * 0.999
            spec = spec.with_(lo=lo)
        if site == "softmax_relu":
            spec = spec.with_(lo=min(spec.lo, self.relu_mu**2 / 2))
        return spec

    def to_dict(self) -> dict:
        """Plain JSON values (the enums as their strings)."""
        return {k: (v.value if isinstance(v, StrEnum) else v) for k, v in asdict(self).items()}

    @property
    def folds_mu(self) -> bool:
        """Whether SMU's mu is folded into the FFN weights (the segments form)."""
        return self.gelu == "smu" and self.smu_form == "segments"

    @property
    def gelu_tests_sign_first(self) -> bool:
        """Whether the activation's first step on shares is the narrow sign test of its input (SMU by
        segments, the splines, ReLU): the FFN's up-projection then hands it its product before truncation
        (``protocols.trunc_select``: one opening for both)."""
        return self.folds_mu or self.gelu == "spline"

    @property
    def softmax_tests_sign_first(self) -> bool:
        """Whether the softmax's first step is the narrow sign test of the scores (ReLU-softmax, narrow)."""
        return self.softmax == "relu" and self.relu == "narrow"

    @property
    def is_exact(self) -> bool:
        return self.gelu == "exact" and self.softmax == "exact"

    @classmethod
    def exact(cls) -> ApproxConfig:
        """The original model (plaintext floats only): exact GeLU, softmax, LayerNorm and tanh."""
        return cls(gelu="exact", softmax="exact", pooler="exact")

    @classmethod
    def original(cls, **kw) -> ApproxConfig:
        """The original functions, securely (a stock checkpoint, no fine-tuning): the model's own
        activation by splines, softmax by max + spline exp + reciprocal, LayerNorm/RMSNorm by rsqrt."""
        return cls(gelu="spline", softmax="exp", **kw)

    @property
    def is_original(self) -> bool:
        return self.gelu == "spline" and self.softmax == "exp"


def trained_smu_lo(params: dict, layers: int) -> float:
    """The lower end of SMU's rsqrt domain for a trained per-channel mu: just below the smallest mu^2
    (public with ``--smu-form rsqrt``; SMU by segments needs none)."""
    return min(float(params[f"layers.{i}.ffn.smu_mu"].min()) for i in range(layers)) ** 2 * 0.999


def resolve_approx(stored: ApproxConfig | None, params: dict, overrides: dict | None = None, *,
                   layers: int) -> ApproxConfig:
    """The approximations a model runs with: the checkpoint's own (``stored``, from its cometpi.json)
    unless it is exact or missing, else the original functions; then ``overrides`` (field names of
    ``ApproxConfig``, e.g. from the command line).  With SMU's rsqrt form and a trained per-channel
    mu, rsqrt's domain starts at the smallest mu^2 (``trained_smu_lo``, then public); the segments
    form folds mu into the weights and needs no such bound (it is dropped: the smallest mu stays the
    server's)."""
    base = stored if stored is not None and not stored.is_exact else ApproxConfig.original()
    fields = {**base.to_dict(), **(overrides or {})}
    if (fields["gelu"] == "smu" and fields["smu_mu"] == PER_CHANNEL and fields["smu_form"] == "rsqrt"
            and fields["smu_lo"] is None and "layers.0.ffn.smu_mu" in params):
        fields["smu_lo"] = trained_smu_lo(params, layers)
    cfg = ApproxConfig(**fields)
    if cfg.folds_mu and cfg.smu_lo is not None:
        cfg = ApproxConfig(**{**cfg.to_dict(), "smu_lo": None})
    return cfg


# --------------------------------------------------------------------------------------------------
# The approximations by name: what ``nn`` dispatches on and the command line offers
# --------------------------------------------------------------------------------------------------

#: GeLU's replacements: name -> fn(ops, x, cfg, arch, layer index).  ``register_gelu`` adds one.
GELU: dict[str, Callable] = {}
#: Softmax's replacements: name -> fn(ops, scores, mask, cfg).  ``register_softmax`` adds one.
SOFTMAX: dict[str, Callable] = {}


def register_gelu(name: str, fn: Callable) -> Callable:
    """Add a GeLU replacement under ``name`` (``ApproxConfig(gelu=name)``, ``--gelu name``): ``fn(ops, x,
    cfg, arch, i)`` written once against the backend interface (``approx.interface.Ops``), so the float
    model, the ring simulation and the shares compute the same function."""
    GELU[str(name)] = fn
    return fn


def register_softmax(name: str, fn: Callable) -> Callable:
    """Add a softmax replacement: ``fn(ops, s, mask, cfg)`` with s (B, nh, T, T), mask 0/1."""
    SOFTMAX[str(name)] = fn
    return fn


def _gelu_exact(ops, x, cfg, arch, i):
    if arch.activation == "relu":
        return torch.relu(x)
    if arch.activation == "silu":
        return torch.nn.functional.silu(x)
    return torch.nn.functional.gelu(x, approximate="none" if arch.activation == "gelu" else "tanh")


def _gelu_spline(ops, x, cfg, arch, i):
    """The model's own activation: ReLU exactly, GeLU/SiLU by splines."""
    if arch.activation == "relu":
        return ops.sign_mask(x, 28 + ops.frac_bits - 16)[2]
    return spline_activation(ops, x, arch.activation)


def _gelu_smu(ops, x, cfg, arch, i):
    if cfg.folds_mu:  # mu is inside the FFN weights (prepare_params)
        return smu1_segments(ops, x)
    if cfg.smu_mu == PER_CHANNEL:
        return smu(ops, x, None, cfg.spec("smu"), add_mu2=lambda z: ops.add_param(z, f"layers.{i}.ffn.smu_mu2"))
    return smu(ops, x, cfg.smu_mu, cfg.spec("smu"))


def _softmax_exact(ops, s, mask, cfg):
    return torch.softmax(s.masked_fill(mask == 0, float("-inf")), -1).nan_to_num(0.0)


def _softmax_relu(ops, s, mask, cfg):
    return relu_softmax(ops, s, mask, cfg.spec("softmax_sum"), mu=cfg.relu_mu, eps=cfg.softmax_eps, relu=cfg.relu,
                        relu_spec=cfg.spec("softmax_relu") if cfg.relu == "smooth" else None)


for _name, _fn in ((Gelu.SMU, _gelu_smu), (Gelu.QUAD, lambda ops, x, cfg, arch, i: quad_gelu(ops, x)),
                   (Gelu.SPLINE, _gelu_spline), (Gelu.ERF, lambda ops, x, cfg, arch, i: gelu_erf(ops, x)),
                   (Gelu.TANH, lambda ops, x, cfg, arch, i: gelu_tanh(ops, x)), (Gelu.EXACT, _gelu_exact)):
    register_gelu(_name, _fn)
for _name, _fn in ((Softmax.RELU, _softmax_relu),
                   (Softmax.RELU2, lambda ops, s, mask, cfg: relu2_softmax(ops, s, mask, cfg.spec("softmax_sum"),
                                                                           eps=cfg.softmax_eps)),
                   (Softmax.QUAD2, lambda ops, s, mask, cfg: quad2_softmax(ops, s, mask)),
                   (Softmax.EXP, lambda ops, s, mask, cfg: softmax_exp(ops, s, mask, cfg.spec("softmax_exp_sum"))),
                   (Softmax.CRYPTEN, lambda ops, s, mask, cfg: crypten_softmax(ops, s, mask)),
                   (Softmax.EXACT, _softmax_exact)):
    register_softmax(_name, _fn)


__all__ = ["GELU", "SOFTMAX", "register_gelu", "register_softmax", "PER_CHANNEL", "Gelu", "Softmax", "SmuForm", "Relu",
           "GELUS", "SOFTMAXES", "SMU_FORMS", "ApproxConfig", "trained_smu_lo", "resolve_approx"]
