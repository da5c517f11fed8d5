"""The ``cometpi`` command line."""

# The parser and the small commands are here; the shared option groups in ``options``, the listening roles
# (dealer, serve, linear serve, bench-worker) in ``roles``, the client's commands (infer, generate, api,
# linear query) in ``queries``.  Every module imports its heavy dependencies inside the commands.

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .options import (
    _add_allow_insecure,
    _add_approx,
    _add_client,
    _add_config,
    _add_data,
    _add_dealer_limits,
    _add_server_limits,
    _add_tls,
    _approx_overrides,
    _reveal_arg,
)
from .queries import cmd_api, cmd_generate, cmd_infer, cmd_linear_query
from .roles import cmd_bench_worker, cmd_dealer, cmd_linear_serve, cmd_serve

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cmd_keygen(args) -> int:
    from ..tls import keygen

    out = keygen(args.name, args.out, days=args.days, overwrite=args.overwrite)
    print(f"key {out['key']}\ncertificate {out['cert']}\nfingerprint {out['fingerprint']}")
    return 0


def cmd_finetune(args) -> int:
    import torch

    from ..finetune import FinetuneConfig, check_teacher, finetune, load_dataset
    from ..service import resolve_model_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.teacher:
        check_teacher(args.teacher)  # before the data and the base model are loaded
    cfg = FinetuneConfig(variant=args.variant, kd=args.kd, teacher=args.teacher, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                         train_limit=args.train_limit, seed=args.seed)
    train, dev, _, labels, name = load_dataset(args.data, args.text_col, args.label_col)
    base = resolve_model_dir(args.base)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.tokenizer or base, local_files_only=True)
    print(f"finetune {args.variant}{' + KD' if args.kd else ''}: {name}, {len(train):,} train / {len(dev):,} dev "
          f"rows, labels {labels}, from {args.teacher or base}", flush=True)
    finetune(cfg, train, dev, args.out, base=base, labels=labels, tokenizer=tok, data_name=name)
    return 0


def cmd_eval(args) -> int:
    import torch

    from ..evaluate import evaluate, save_result

    if args.skip_plaintext and args.out:
        raise ValueError("--skip-plaintext writes no plaintext accuracies, which the results in --out need; drop "
                         "one of them (the plaintext run is reused from --plaintext-cache when it was done before)")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate(args.model, name=args.name, data=args.data, text_col=args.text_col, label_col=args.label_col,
                      private=args.private, batch=args.batch, seed=args.seed, approx_overrides=_approx_overrides(args),
                      records=args.records, max_length=args.max_length, timeout=args.timeout,
                      skip_plaintext=args.skip_plaintext, plaintext_cache=args.plaintext_cache or None)
    if args.out:
        save_result(result, Path(args.out))
        print(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    from ..demo import main as demo_main

    return demo_main(args)


def cmd_engine_demo(args) -> int:
    from ..engine_demo import main as demo_main

    return demo_main(args)


def cmd_bench(args) -> int:
    from importlib import import_module

    return import_module(f"cometpi.bench.{args.what}").main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cometpi", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="log protocol events")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("dealer", help="run the dealer (correlated randomness for both parties)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=7300, help="0 picks a free port (printed)")
    d.add_argument("--pairing-timeout", type=float, default=30.0,
                   help="seconds to wait for the second party of a session")
    _add_dealer_limits(d)
    _add_tls(d, "dealer")
    d.set_defaults(fn=cmd_dealer)

    kg = sub.add_parser("keygen", help="a key and a self-signed certificate for one party (prints its fingerprint)")
    kg.add_argument("--name", required=True, help="the party's name (the certificate's common name; file names)")
    kg.add_argument("--out", default="keys", help="directory (default %(default)s)")
    kg.add_argument("--days", type=int, default=365, help="validity (default %(default)s days)")
    kg.add_argument("--overwrite", action="store_true", help="replace an existing key and certificate of this name")
    kg.set_defaults(fn=cmd_keygen)

    lin = sub.add_parser("linear", help="private X @ W demo: client owns X, server owns W")
    lsub = lin.add_subparsers(dest="linear_cmd", required=True)
    ls = lsub.add_parser("serve", help="serve a server-private weight from a safetensors file")
    ls.add_argument("--weight", required=True)
    ls.add_argument("--key", default=None, help="tensor name inside the file (if several)")
    ls.add_argument("--host", default="127.0.0.1")
    ls.add_argument("--port", type=int, default=7301)
    ls.add_argument("--dealer", required=True, help="dealer HOST:PORT")
    ls.add_argument("--once", action="store_true", help="exit after one client")
    _add_config(ls)
    _add_server_limits(ls)
    _add_tls(ls, "server")
    ls.set_defaults(fn=cmd_linear_serve)
    lq = lsub.add_parser("query", help="multiply a client-private matrix by the server's weight")
    lq.add_argument("--server", required=True)
    lq.add_argument("--dealer", required=True)
    lq.add_argument("--input", required=True, help="safetensors file holding X")
    lq.add_argument("--key", default=None)
    lq.add_argument("--out", required=True, help="safetensors file for X @ W")
    lq.add_argument("--stats", default=None, help="JSON file for bytes, rounds and seconds")
    _add_config(lq)
    _add_tls(lq, "client")
    lq.set_defaults(fn=cmd_linear_query)

    sv = sub.add_parser("serve", help="serve a Hugging Face checkpoint for private inference")
    sv.add_argument("--model", required=True,
                    help="checkpoint directory, 'minilm' (the bundled MiniLM-L6) or 'smollm2' (SmolLM2-135M-Instruct)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=7301, help="0 picks a free port (printed)")
    sv.add_argument("--dealer", required=True, help="dealer HOST:PORT")
    sv.add_argument("--once", action="store_true", help="exit after one client")
    sv.add_argument("--layers", type=int, default=None, help="serve only the first N layers (benchmarks)")
    sv.add_argument("--max-sessions-per-client", type=int, default=None, metavar="N",
                    help="concurrent sessions one client (certificate, or address without TLS) may hold")
    sv.add_argument("--workers", type=int, default=1, help="sessions served at once (threads; default 1: clients "
                                                           "are served one after another)")
    sv.add_argument("--reveal", type=_reveal_arg, default=("logits", None), metavar="logits|label|topk[:K]",
                    help="what clients get back: logits (default: a classifier's logits, an LM's next-token logits "
                         "for infer and only the chosen tokens for generate, a bare encoder's hidden states); label "
                         "(a classifier's label by a secure argmax on shares, no logits; an LM: generation only, "
                         "infer refused); topk:K or topk with --reveal-k K (a classifier's K best labels in order, "
                         "no logits)")
    sv.add_argument("--reveal-k", type=int, default=None, metavar="K", help="K of --reveal topk")
    sv.add_argument("--idle-timeout", type=float, default=None,
                    help="seconds a session may sit between queries before the server ends it (at least --timeout; "
                         "default service.IDLE_TIMEOUT, 300)")
    sv.add_argument("--max-queries-per-session", type=int, default=None, metavar="N",
                    help="inferences and generations one session may ask for (default: no bound); beyond: "
                         "'query budget exceeded'")
    sv.add_argument("--allow-stats", action="store_true",
                    help="answer op stats (the server's process-wide peak memory and per-step timings, which reveal "
                         "other sessions' activity; benchmarks): refused by default")
    _add_allow_insecure(sv, "server")
    _add_config(sv)
    _add_server_limits(sv)
    _add_tls(sv, "server")
    _add_approx(sv, insecure=True)
    sv.set_defaults(fn=cmd_serve)

    inf = sub.add_parser("infer", help="classify text privately against a model server")
    inf.add_argument("texts", nargs="+", help="one or more sentences (one batch)")
    _add_client(inf, "MiniLM's for BERT vocab")
    inf.add_argument("--max-length", type=int, default=128,
                     help="tokens per text, at most the model's positions; longer texts are truncated and marked "
                          "'(truncated to K of N tokens)' (default %(default)s)")
    inf.add_argument("--pad-to", type=int, default=None, help="pad (or truncate) every text to this many tokens "
                                                              "(default: pad to the longest text)")
    inf.add_argument("--hide-length", action="store_true", help="share the padding mask: the server learns "
                     "only the padded length")
    inf.add_argument("--json", default=None, help="write results and costs to this JSON file")
    inf.set_defaults(fn=cmd_infer)

    gen = sub.add_parser("generate", help="generate text privately (greedy, KV cache in shares) from an LM server")
    gen.add_argument("prompt", nargs="?", default=None, help="prompt text (or --chat)")
    gen.add_argument("--chat", default=None, metavar="MESSAGE",
                     help="one user message through the tokenizer's chat template")
    _add_client(gen, "SmolLM2's for its vocabulary")
    gen.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate at most (default %(default)s)")
    gen.add_argument("--fixed-length", action="store_true",
                     help="always run --max-new-tokens steps: the server does not learn where the text ended")
    gen.add_argument("--temperature", type=float, default=0.0,
                     help="0: greedy (default); t > 0: sample softmax(logits / t) with the client's own noise "
                          "(Gumbel-max; the server learns neither the noise nor t)")
    gen.add_argument("--top-k", type=int, default=None, metavar="K",
                     help="with --temperature: sample among the K largest logits only (the server learns that "
                          "top-k is on, not K)")
    gen.add_argument("--json", default=None, help="write the text, token ids and costs to this JSON file")
    gen.set_defaults(fn=cmd_generate)

    api = sub.add_parser("api", help="the client as an OpenAI-compatible HTTP endpoint with a web chat page "
                                     "(docs/api.md)")
    _add_client(api, "SmolLM2's for its vocabulary")
    api.add_argument("--model-name", default=None,
                     help="the model's id in /v1/models and requests (default: the tokenizer folder's name)")
    api.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default %(default)s; another one needs --ssl-certfile/--ssl-keyfile or "
                          "--allow-remote: the endpoint hands out the plaintext)")
    api.add_argument("--port", type=int, default=8000, help="port (0: any free one; default %(default)s)")
    api.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate (PEM)")
    api.add_argument("--ssl-keyfile", default=None, help="... and this private key (PEM)")
    api.add_argument("--allow-remote", action="store_true",
                     help="serve plain HTTP on a non-loopback address (anyone who reaches it reads the text)")
    api.add_argument("--max-waiting", type=int, default=8,
                     help="requests that may wait while one is generated; more get HTTP 429 (default %(default)s)")
    api.set_defaults(fn=cmd_api)

    ft = sub.add_parser("finetune", help="fine-tune a BERT classifier for the secure approximations")
    ft.add_argument("--variant", default="comet", choices=["exact", "comet", "comet-rsqrt", "mpcformer"],
                    help="exact (GeLU/softmax), comet (SMU with trained mu + ReLU-softmax, as the private path "
                         "computes them: SMU by segments, the exact ReLU; default), comet-rsqrt (Comet's own "
                         "constructions: SMU by rsqrt, the smooth ReLU), mpcformer (Quad + 2Quad)")
    ft.add_argument("--kd", action="store_true", help="distil from --teacher (the exact fine-tuned model)")
    ft.add_argument("--teacher", default=None, help="exact fine-tuned checkpoint (finetune --variant exact): KD "
                                                    "teacher and starting point; one trained for approximations "
                                                    "is refused")
    ft.add_argument("--base", default="minilm", help="pretrained checkpoint to start from (default: bundled MiniLM)")
    ft.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the base checkpoint's)")
    _add_data(ft)
    ft.add_argument("--epochs", type=float, default=1.0, help="passes over the train split (default %(default)g)")
    ft.add_argument("--batch-size", type=int, default=32, help="texts per step (default %(default)s)")
    ft.add_argument("--lr", type=float, default=5e-5, help="learning rate of the encoder (default %(default)g)")
    ft.add_argument("--max-length", type=int, default=64,
                    help="tokens per text, longer ones are truncated (default %(default)s)")
    ft.add_argument("--train-limit", type=int, default=None,
                    help="train on N seeded rows of the train split (default: all)")
    ft.add_argument("--seed", type=int, default=0, help="seed of the classifier init and data order "
                                                        "(default %(default)s)")
    ft.add_argument("--threads", type=int, default=0, help="torch threads (default %(default)s: torch's default)")
    ft.add_argument("--out", required=True, help="checkpoint directory to write (replaced atomically)")
    ft.set_defaults(fn=cmd_finetune)

    ev = sub.add_parser("eval", help="accuracy in plaintext (exact, approximate) and through the private path")
    ev.add_argument("--model", required=True, help="fine-tuned checkpoint directory")
    ev.add_argument("--name", default=None, help="row name in the results (default: the directory's name)")
    _add_data(ev)
    ev.add_argument("--private", type=int, default=0, metavar="N",
                    help="also classify N seeded test rows privately (dealer, server, client processes; "
                         "default %(default)s: plaintext only)")
    ev.add_argument("--batch", type=int, default=8,
                    help="texts per private query (similar lengths; default %(default)s)")
    ev.add_argument("--seed", type=int, default=0, help="seed of the private subset (default %(default)s)")
    ev.add_argument("--records", default=None, help="JSONL of per-example private results, resumed if present "
                                                    "(default: runs/eval-NAME-GUESS-HASH.jsonl)")
    ev.add_argument("--max-length", type=int, default=64,
                    help="tokens per text, longer ones are truncated (default %(default)s)")
    ev.add_argument("--skip-plaintext", action="store_true",
                    help="with --private N: skip the plaintext accuracies on the whole test split (unless cached) "
                         "and simulate only the N private rows, for the agreement; not with --out")
    ev.add_argument("--plaintext-cache", default="runs/eval-plaintext.json", metavar="FILE",
                    help="reuse the plaintext accuracies stored here for the same model hash, approximations, "
                         "test split and --max-length, else compute and store them ('' to disable; "
                         "default %(default)s)")
    ev.add_argument("--timeout", type=float, default=600.0,
                    help="seconds to wait for any peer message (default %(default)g)")
    ev.add_argument("--threads", type=int, default=0, help="torch threads (default %(default)s: torch's default)")
    ev.add_argument("--out", default=None, help="upsert the result into this JSON list "
                                                "(e.g. bench/results/accuracy.json)")
    _add_approx(ev)
    ev.set_defaults(fn=cmd_eval)

    dm = sub.add_parser("demo", help="the main job: a fine-tuned MiniLM classifies real sentences privately "
                                     "(dealer, server and client processes)")
    dm.add_argument("sentences", nargs="*", help="your own sentences (default: real test-split snippets)")
    dm.add_argument("--model", default=None, help="a fine-tuned checkpoint (default: the cached demo model, "
                                                  "fine-tuned on first use)")
    dm.add_argument("-n", type=int, default=4, help="how many test-split snippets to classify (default 4)")
    dm.add_argument("--train-rows", type=int, default=4000, help="training rows for the demo model (first use)")
    dm.add_argument("--guess", default="thermometer", choices=["thermometer", "comet", "constant"],
                    help="rsqrt initial guess (default: %(default)s, the secure informative guess; comet: "
                         "Comet's flooded guess at sigma 40, about 10x the bytes)")
    dm.add_argument("--chat", nargs="?", const="What is the capital of France?", default=None, metavar="MESSAGE",
                    help="instead: SmolLM2-135M-Instruct answers MESSAGE privately (greedy, KV cache in shares; "
                         "a few minutes on 2 cores; `make demo-chat`), beside the plaintext model's answer")
    dm.add_argument("--max-new-tokens", type=int, default=12, help="with --chat (default %(default)s)")
    dm.add_argument("--verbose", action="store_true",
                    help="show the dealer's and the server's session logs here (default: a log file, named at the end)")
    dm.set_defaults(fn=cmd_demo)

    ed = sub.add_parser("engine-demo", help="engine demo: a private X @ W over three processes")
    ed.add_argument("--rows", type=int, default=128)
    ed.add_argument("--cols", type=int, default=768)
    ed.add_argument("--out-cols", type=int, default=768)
    ed.set_defaults(fn=cmd_engine_demo)

    b = sub.add_parser("bench", help="benchmarks (write JSON lines under bench/results)")
    bsub = b.add_subparsers(dest="what", required=True)
    bo = bsub.add_parser("ops", help="engine protocols at Transformer shapes, in-process and 3 processes")
    bo.add_argument("--transport", choices=["inproc", "tcp", "both"], default="both")
    bo.add_argument("--reps", type=int, default=3)
    bo.add_argument("--ops", nargs="*", default=None, help="subset of ops")
    bo.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    bo.add_argument("--out", default="bench/results/ops.jsonl")
    bo.set_defaults(fn=cmd_bench)
    from importlib import import_module

    for what, help_ in (
        ("nonlinear", "nonlinear methods: error, bytes, rounds, seconds, sigma; plots"),
        ("model", "whole private models over TCP: bytes, rounds, time, memory by layer type"),
        ("load", "one model server, N clients at once: throughput, latency, peak memory"),
        ("accuracy", "fine-tune every variant, accuracy in plaintext and private; table, plot"),
        ("ranges", "rsqrt input ranges measured in MiniLM-L6 on real sentences"),
        ("sites", "rsqrt call sites at 128-512 tokens on adversarial texts: ranges, headroom, failure odds"),
        ("soak", "many private inferences of long and adversarial texts against the plaintext model"),
        ("llm", "SmolLM2-135M next-token predictions: plaintext, original functions and Comet's, private"),
        ("generate", "private generation with a KV cache: SmolLM2 continuations against plaintext, per-token cost"),
        ("tls", "a MiniLM private inference with and without TLS on loopback: seconds and bytes on the wire"),
        ("rtt", "a channel's round trip against a raw socket's, 8 B to 1 MB, TCP and TLS"),
        ("api", "SmolLM2 through the OpenAI-compatible endpoint next to PrivateClient.generate: overhead per token"),
    ):
        sp = bsub.add_parser(what, help=help_)
        import_module(f"cometpi.bench.{what}").add_arguments(sp)
        sp.set_defaults(fn=cmd_bench)

    bw = sub.add_parser("bench-worker", help=argparse.SUPPRESS)
    bw.add_argument("--dealer", required=True)
    bw.add_argument("--trunc", default="exact")
    bw.add_argument("--reps", type=int, default=3)
    bw.add_argument("--timeout", type=float, default=300.0)
    bw.set_defaults(fn=cmd_bench_worker)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ..core import ConfigError
    from ..dealer import DealerError
    from ..transport import TransportError

    t0 = time.time()
    try:
        return args.fn(args)
    except (TransportError, ConfigError, DealerError, ValueError, OSError) as e:
        print(f"cometpi {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cometpi {args.cmd}: interrupted after {time.time() - t0:.1f} s", file=sys.stderr)
        return 130
