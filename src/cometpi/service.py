"""Private inference as a service: a model server that owns a Hugging Face checkpoint (``ModelServer``),
and the protocol it speaks with a client that owns the text (``client.PrivateClient``).

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

import dataclasses
import logging
import resource
import threading
from pathlib import Path

import torch

from . import checkpoint, kernels
from .convert import Arch, params_hash
from .core import Config, Session
from .nn import (
    PER_CHANNEL,
    ApproxConfig,
    ShareModel,
    encode_params,
    prepare_params,
    resolve_approx,
    secure_forward,
    secure_generate,
)
from .party import prefetch_plan
from .policy import (  # noqa: F401 - re-exported
    ALLOW_INSECURE,
    MIN_SIGMA,
    REVEALS,
    STATS_REFUSED,
    InsecureConfigError,
    QueryBudgetExceeded,
    StatsRefused,
    budget_message,
    check_floor,
    flood_sigma,
    floor_violations,
    lm_infer_refused,
    parse_allow_insecure,
    reveal_note,
)

log = logging.getLogger("cometpi.service")
MAX_BATCH = 64
MAX_NEW_TOKENS = 1024
IDLE_TIMEOUT = 300.0  # how long a session may sit between queries (the protocol's own waits use --timeout)

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
            prefetch_plan(sess, plans.get(key))
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


# the client's side, re-exported: ``cometpi.service.PrivateClient`` is where users find it
from .client import (  # noqa: E402,F401
    PrivateClient,
    format_bytes,
    generation_costs,
    load_tokenizer,
    truncation_note,
)
