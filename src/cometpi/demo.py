"""``cometpi demo`` (``make demo``): a real model classifies real sentences privately.

1. The demo model: MiniLM-L6 (real weights) fine-tuned on Rotten Tomatoes for Comet's approximations
   (SMU with trained mu, ReLU-softmax).  Fine-tuned on first use (a few minutes on 2 cores, with a
   progress bar) and cached in ``$COMETPI_CACHE`` (default ``~/.cache/cometpi``).
2. A dealer process and a model-server process (the server holds the weights).
3. This process is the client: it holds the sentences, classifies them in one private inference
   and prints label and confidence with the plaintext model's answer beside, then the bytes
   (online and offline), rounds and seconds.
4. The processes are stopped and reaped.

``cometpi demo --chat [MESSAGE]`` (``make demo-chat``) runs the generation job instead: SmolLM2-135M-
Instruct (real weights, from its registry package) answers one chat message privately, token by token
over a KV cache in shares, with the plaintext model's greedy answer beside it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

DEMO_MODEL = "minilm-rt-comet-demo"


def cache_dir() -> Path:
    return Path(os.environ.get("COMETPI_CACHE") or Path.home() / ".cache" / "cometpi")


def demo_model(train_rows: int, log=print) -> Path:
    """The cached demo checkpoint, fine-tuned first if missing (and written atomically)."""
    from .checkpoint import META_FILE
    from .data import minilm_path
    from .finetune import FinetuneConfig, finetune, load_dataset

    path = cache_dir() / DEMO_MODEL
    if (path / META_FILE).is_file():
        log(f"[demo] using the cached demo model {path}")
        return path
    from transformers import AutoTokenizer

    train, dev, _, labels, name = load_dataset("rt")
    log(f"[demo] no cached model: fine-tuning MiniLM-L6 for SMU + ReLU-softmax on {train_rows:,} Rotten Tomatoes "
        f"snippets (one pass; a few minutes on 2 cores) -> {path}")
    cfg = FinetuneConfig(variant="comet", epochs=1, train_limit=train_rows, lr=1e-4)
    tok = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    finetune(cfg, train, dev[:400], str(path), base=minilm_path(), labels=labels, tokenizer=tok, data_name=name,
             log=log)
    return path


def example_sentences(n: int) -> list[tuple[str, str]]:
    """``n`` short real snippets (text, true label) from the test split (never trained on)."""
    from .finetune import load_dataset

    _, _, test, labels, _ = load_dataset("rt")
    short = [(t, labels[y]) for t, y in test if 6 <= len(t.split()) <= 14]
    pos = [r for r in short if r[1] == "fresh"][: (n + 1) // 2]
    neg = [r for r in short if r[1] == "rotten"][: n // 2]
    return [r for pair in zip(pos, neg, strict=False) for r in pair] + pos[len(neg):]


@contextlib.contextmanager
def _child_logs(args):
    """Where the dealer's and the server's stderr (their JSON session log lines) go: this terminal with
    ``--verbose``, else a log file whose name the demo prints at the end.  Yields (file or None, note)."""
    if getattr(args, "verbose", False):
        yield None, ""
        return
    from .data import cache_dir

    path = cache_dir() / "logs" / f"demo-{'chat' if getattr(args, 'chat', None) else 'classify'}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yield f, f"; the dealer's and the server's logs: {path} (--verbose shows them here)"


def chat(args) -> int:
    """The generation job: dealer and SmolLM2 server processes, this process the client."""
    with _child_logs(args) as (logs, note):
        return _chat(args, logs, note)


def _chat(args, logs, note) -> int:
    from .client import PrivateClient, generation_costs
    from .convert import from_hf
    from .data import smollm2_path
    from .nn import first_divergence, plaintext_greedy
    from .serve import spawn_roles

    t_start = time.perf_counter()
    model = smollm2_path()
    with spawn_roles(model, "--once", "--timeout", "600", timeout=300, stderr=logs) as roles:
        print(f"[demo] dealer process pid {roles.dealer.pid} on {roles.daddr}")
        print(f"[demo] model server process pid {roles.server.pid} on {roles.saddr} holds SmolLM2-135M-Instruct's "
              f"weights; this process (the client, pid {os.getpid()}) holds the message and sees the answer")
        with PrivateClient(roles.saddr, roles.daddr, tokenizer=model, timeout=600) as client:
            ids = client.encode_prompt(args.chat, chat=True)
            print(f"[demo] weights masked in {client.setup_seconds:.1f} s; user: {args.chat!r} ({ids.shape[1]} "
                  f"tokens through the chat template)\n[demo] private answer, token by token: ", end="", flush=True)
            for piece in client.generate(ids[0].tolist(), max_new_tokens=args.max_new_tokens):
                print(piece["text"], end="", flush=True)
            g = client.last_generation
            print()
        roles.server.wait(60)
    arch, params = from_hf(model)
    plain, margins = plaintext_greedy(arch, params, ids, args.max_new_tokens, client.tokenizer.eos_token_id)
    print(f"[demo] plaintext model's answer: {client.tokenizer.decode(plain, skip_special_tokens=True)!r}")
    first = first_divergence(g["ids"], plain)
    if first is None:
        print("[demo] the private tokens equal the plaintext model's")
    else:
        margin = f"{margins[first]:.3g}" if first < len(margins) else "n/a"
        print(f"[demo] NOTE: the private answer departs from the plaintext model's at token {first} (the plaintext "
              f"model's top-2 logit margin there: {margin}; the original functions approximate GeLU/SiLU, exp and "
              "RMSNorm to about 1e-4)")
    print(f"[demo] cost: {generation_costs(g)}")
    print(f"[demo] done in {time.perf_counter() - t_start:.0f} s; dealer and server stopped{note}")
    return 0


def main(args) -> int:
    if getattr(args, "chat", None):
        return chat(args)
    with _child_logs(args) as (logs, note):
        return _classify(args, logs, note)


def _classify(args, logs, note) -> int:
    from . import checkpoint
    from .client import PrivateClient, format_bytes
    from .nn import plaintext_forward
    from .serve import spawn_roles

    t_start = time.perf_counter()
    model = Path(args.model) if args.model else demo_model(args.train_rows)
    arch, params, _ = checkpoint.load(model)
    rows = [(s, None) for s in args.sentences] if args.sentences else example_sentences(args.n)
    extra = ["--guess", args.guess] if args.guess else []
    with spawn_roles(model, "--once", "--timeout", "600", *extra, timeout=300, stderr=logs) as roles:
        print(f"[demo] dealer process pid {roles.dealer.pid} on {roles.daddr}")
        print(f"[demo] model server process pid {roles.server.pid} on {roles.saddr} holds the weights; this process "
              f"(the client, pid {os.getpid()}) holds the text")
        with PrivateClient(roles.saddr, roles.daddr, timeout=600) as client:
            ap = client.approx
            gelu = ap.gelu + (f" ({ap.smu_form})" if ap.gelu == "smu" else "")
            softmax = ap.softmax + (f" ({ap.relu} ReLU)" if ap.softmax == "relu" else "")
            print(f"[demo] connected: {arch.kind}, {arch.layers} layers, hidden {arch.hidden}; gelu={gelu} "
                  f"softmax={softmax} rsqrt guess={ap.guess} "
                  f"({f'sigma {ap.sigma:g}' if 'comet' in ap.guess else 'no flood, nothing leaks'}); weights masked in "
                  f"{client.setup_seconds:.1f} s\n")
            texts = [t for t, _ in rows]
            print(f"[demo] one private inference for {len(texts)} sentences (padded to the longest) ...", flush=True)
            results = client.classify(texts, max_length=64, progress=True)
            ids, mask = client.encode(texts, max_length=64)
            plain = torch.softmax(plaintext_forward(arch, params, ids, mask, client.approx), -1)
            for (text, truth), r, p in zip(rows, results, plain, strict=True):
                k = int(p.argmax())
                print(f"  \"{text}\"")
                print(f"    private: {r['label']:<7} {r['confidence']:.3f}   |  plaintext: {client.labels[k]:<7} "
                      f"{float(p[k]):.3f}" + (f"   |  true label: {truth}" if truth else ""))
            st = results[0]["batch_stats"]
            on, off = st["online"], st["offline"]
            n, online = len(texts), on["bytes_sent"] + on["bytes_recv"]
            print(f"\n[demo] cost of the private inference ({n} x {ids.shape[1]} tokens): online "
                  f"{format_bytes(online)} ({format_bytes(online / n)} per sentence) in {on['rounds']:,} rounds, "
                  f"client-dealer traffic {format_bytes(off['bytes_sent'] + off['bytes_recv'])}, {st['seconds']:.1f} s",
                  flush=True)
        roles.server.wait(60)
    print(f"[demo] done in {time.perf_counter() - t_start:.0f} s; dealer and server stopped{note}")
    return 0
