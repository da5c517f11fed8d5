"""What each party accepts and says: the security floor (``check_floor``: a flooded rsqrt guess below
sigma 40, ``insecure_*`` constructions and local truncation are refused unless ``allow_insecure`` names
them), the reveal policies a server may announce, and the messages of refused queries.  Shared by
the model server (``service``) and the client (``client``)."""

from __future__ import annotations

from .approx.sites import DOMAINS, site_spec
from .core import Config, ConfigError, TruncMode
from .nn import OUTPUTS

#: What a server may reveal to its clients (``--reveal``): see the module docstring.
REVEALS = OUTPUTS
#: The statistical security (bits) below which a flooded rsqrt guess is refused without ``flood``.
MIN_SIGMA = 40.0
#: What ``--allow-insecure`` / ``allow_insecure=`` may accept, and what each one is.
ALLOW_INSECURE = {
    "flood": f"Comet's flooded rsqrt guess with sigma < {MIN_SIGMA:g} bits (approx.guess, approx.sigma)",
    "insecure": "a construction whose name contains 'insecure' (paper reproductions; they leak)",
    "local-trunc": "local (SecureML, probabilistic) truncation (session config trunc = 'local')",
}


class InsecureConfigError(ConfigError):
    """A configuration below the floor of the party that refuses it (``check_floor``)."""


class QueryBudgetExceeded(ValueError):
    """A session asked for more queries than the server's ``--max-queries-per-session``."""


class StatsRefused(ValueError):
    """``op: stats`` to a server started without ``--allow-stats``."""


def parse_allow_insecure(value) -> frozenset[str]:
    """``--allow-insecure`` / ``allow_insecure=``: None, 'flood,local-trunc', or an iterable of names."""
    if value is None:
        return frozenset()
    names = value.split(",") if isinstance(value, str) else list(value)
    out = frozenset(n.strip() for n in names if n.strip())
    unknown = sorted(out - set(ALLOW_INSECURE))
    if unknown:
        raise ValueError(f"unknown --allow-insecure value(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(ALLOW_INSECURE)}")
    return out


def flood_sigma(approx: dict) -> float | None:
    """The smallest statistical security (bits) of the flooded rsqrt guess over the call sites, or None
    for a guess that floods nothing (thermometer, constant, crypten)."""
    guess = approx.get("guess")
    if not isinstance(guess, str) or not ("comet" in guess or "flood" in guess):
        return None
    try:
        sigma = float(approx.get("sigma", 40.0))
        return min(site_spec(site, guess=guess, sigma=sigma).security_bits() for site in DOMAINS)
    except (TypeError, ValueError):
        return float("-inf")  # a flood we cannot size: below any floor


def floor_violations(approx: dict | None, config: Config | dict | None) -> list[tuple[str, str]]:
    """(allow-insecure name, what) for each choice of ``approx`` (an ``ApproxConfig.to_dict()``, e.g. the
    card's) and the session ``config`` below the floor: a flooded guess with sigma < ``MIN_SIGMA``, any
    value naming an ``insecure`` construction, local truncation."""
    out = []
    approx = approx or {}
    for field, value in approx.items():
        if isinstance(value, str) and "insecure" in value.lower():
            out.append(("insecure", f"approx.{field} = {value!r} ({ALLOW_INSECURE['insecure']})"))
    sigma = flood_sigma(approx)
    if sigma is not None and sigma < MIN_SIGMA - 1e-9:  # (log2 of the flood's ratio: 40 may come out 39.999...)
        out.append(("flood", f"approx.guess = {approx.get('guess')!r} with approx.sigma = {approx.get('sigma')!r}: "
                             f"the flood gives {sigma:.1f} bits of statistical security, below {MIN_SIGMA:g}"))
    if config is not None:
        trunc = config.get("trunc") if isinstance(config, dict) else config.trunc
        if str(getattr(trunc, "value", trunc)) == TruncMode.LOCAL.value:
            out.append(("local-trunc", "config.trunc = 'local' (SecureML's probabilistic truncation: an element "
                                       "fails with probability |v|/2^64, about 1 MiniLM inference in 4)"))
    return out


def check_floor(approx: dict | None, config: Config | dict | None, allow=(), *, who: str) -> None:
    """Raise ``InsecureConfigError`` naming each field, its value and the ``--allow-insecure`` name that
    would accept it, for the violations (``floor_violations``) not in ``allow``.  ``who``: the
    sentence's subject, e.g. 'refusing the server at H:P' or 'refusing to serve'."""
    allow = parse_allow_insecure(allow)
    bad = [(name, what) for name, what in floor_violations(approx, config) if name not in allow]
    if bad:
        need = sorted({name for name, _ in bad})
        raise InsecureConfigError(
            f"{who}: " + "; ".join(what for _, what in bad)
            + f". Pass --allow-insecure {','.join(need)} (Python: allow_insecure={','.join(need)!r}) to accept it")


STATS_REFUSED = ("op stats refused: this server was started without --allow-stats (its process-wide peak memory "
                 "and per-step timings reveal other sessions' activity)")


def budget_message(n: int) -> str:
    return (f"query budget exceeded: this server answers at most {n} queries (inferences or generations) per "
            "session (--max-queries-per-session); open a new session")


def lm_infer_refused(reveal: str) -> str:
    return (f"this LM server reveals only generated tokens (--reveal {reveal}): op infer, which would reveal the "
            "raw next-token logits, is refused; use generate")


def reveal_note(card: dict) -> str:
    """What a server's card says its clients get back, in words."""
    reveal, k = card.get("reveal", "logits"), card.get("reveal_k")
    head = (card.get("arch") or {}).get("head")
    if reveal == "logits":
        return {"classifier": "logits", "lm": "next-token logits (infer), generated tokens (generate)"}.get(
            head, "hidden states")
    if head == "lm":
        return "only generated tokens (no logits: infer refused)"
    return "only the label (no logits, no confidence)" if reveal == "label" else \
        f"only the top {k} labels, in order (no logits, no confidence)"
