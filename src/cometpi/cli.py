"""The ``cometpi`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _config(args):
    from .core import Config

    return Config(frac_bits=args.frac_bits, trunc=args.trunc, lookahead=not args.no_lookahead)


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--frac-bits", type=int, default=16, help="fixed-point fractional bits f (default %(default)s)")
    p.add_argument("--trunc", choices=["exact", "local"], default="exact",
                   help="truncation after products: exact (wrap-corrected, 1 round) or local "
                        "(SecureML, 0 rounds, rare large errors); default %(default)s")
    p.add_argument("--no-lookahead", action="store_true",
                   help="fetch each dealer correction when it is needed instead of guessing the coming layers' "
                        "requests and fetching them ahead (both parties must agree)")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for any peer message (default %(default)g)")
    p.add_argument("--net", choices=["lan", "wan", "bolt-wan"], default=None,
                   help="emulate this network on the peer link (bandwidth and one-way delay, felt in wall time; "
                        "default: none)")


def _add_tls(p: argparse.ArgumentParser, role: str) -> None:
    g = p.add_argument_group("TLS (mutual authentication by pinned certificates; `cometpi keygen` makes them)")
    g.add_argument("--tls", default=None, metavar="PREFIX",
                   help="this party's key and certificate: PREFIX.key and PREFIX.crt")
    if role == "client":
        g.add_argument("--server-cert", default=None, help="the model server's certificate (pinned)")
    if role == "server":
        g.add_argument("--allow-clients", action="append", default=[], metavar="PATH",
                       help="certificate file or directory of the clients admitted (repeatable)")
    if role in ("client", "server"):
        g.add_argument("--dealer-cert", default=None, help="the dealer's certificate (pinned)")
    if role == "dealer":
        g.add_argument("--allow-servers", action="append", default=[], metavar="PATH",
                       help="certificate file or directory of the model servers admitted (repeatable)")
        g.add_argument("--allow-clients", action="append", default=[], metavar="PATH",
                       help="certificate file or directory of the clients admitted (repeatable)")
    g.add_argument("--insecure-plaintext", action="store_true",
                   help="allow plaintext TCP off loopback (seeds, shares and the model card in the clear; warns)")


def _party_tls(args, role: str):
    from .tls import PartyTls

    if role == "client":
        peers = [args.server_cert] if args.server_cert else []
    else:
        peers = args.allow_clients
    return PartyTls.from_args(args.tls, peers, args.dealer_cert, role)


def cmd_keygen(args) -> int:
    from .tls import keygen

    out = keygen(args.name, args.out, days=args.days, overwrite=args.overwrite)
    print(f"key {out['key']}\ncertificate {out['cert']}\nfingerprint {out['fingerprint']}")
    return 0


def _net(args):
    from .transport import NETWORKS

    return NETWORKS[args.net] if getattr(args, "net", None) else None


def _add_allow_insecure(p: argparse.ArgumentParser, role: str) -> None:
    who = ("accept a server whose model card or session config has these" if role == "client"
           else "serve with these")
    p.add_argument("--allow-insecure", default=None, metavar="WHAT[,WHAT]",
                   help=f"{who} (refused by default): flood (Comet's flooded rsqrt guess with sigma < 40), "
                        "insecure (any insecure_* construction, e.g. --guess insecure_comet_small_flood), "
                        "local-trunc (--trunc local: probabilistic SecureML truncation)")


def _reveal_arg(value: str):
    """--reveal logits|label|topk|topk:K"""
    name, _, k = value.partition(":")
    if name not in ("logits", "label", "topk") or (k and name != "topk"):
        raise argparse.ArgumentTypeError(f"choose logits, label, topk or topk:K (got {value!r})")
    try:
        return name, int(k) if k else None
    except ValueError:
        raise argparse.ArgumentTypeError(f"topk:K needs an integer K (got {value!r})") from None


def _add_server_limits(p: argparse.ArgumentParser) -> None:
    """A server's bounds against anyone who can connect (``serve.serve_forever``, docs/robustness.md)."""
    from .party import HANDSHAKE_TIMEOUT
    from .serve import MAX_PENDING_HANDSHAKES, MAX_SESSION_SECONDS

    g = p.add_argument_group("limits (what one connection can make the server spend)")
    g.add_argument("--handshake-timeout", type=float, default=HANDSHAKE_TIMEOUT,
                   help="seconds a new connection gets, in all, for the TLS handshake, the hello and the dealer "
                        "registration (default %(default)s)")
    g.add_argument("--max-pending-handshakes", type=int, default=MAX_PENDING_HANDSHAKES,
                   help="connections at most in their handshake or waiting for a session slot; more are closed "
                        "at once (default %(default)s)")
    g.add_argument("--max-session-seconds", type=float, default=MAX_SESSION_SECONDS,
                   help="the longest a session may last; then the server ends it with an error naming the limit "
                        "(default %(default)s)")


def _server_limits(args) -> dict:
    return dict(handshake_timeout=args.handshake_timeout, max_pending_handshakes=args.max_pending_handshakes,
                max_session_seconds=args.max_session_seconds)


def _add_client(p: argparse.ArgumentParser, tokenizer_default: str) -> None:
    """The options of every client command (infer, generate, api): where the server and the dealer
    are, the tokenizer, a pinned model hash, the client's floor, the session config, TLS."""
    p.add_argument("--server", required=True, help="model server HOST:PORT")
    p.add_argument("--dealer", required=True, help="dealer HOST:PORT")
    p.add_argument("--tokenizer", default=None, help=f"tokenizer directory (default: {tokenizer_default})")
    p.add_argument("--model-hash", default=None, help="refuse a server whose model hash differs (the client "
                                                      "compares the card's itself)")
    _add_allow_insecure(p, "client")
    _add_config(p)
    _add_tls(p, "client")


def _add_dealer_limits(p: argparse.ArgumentParser) -> None:
    """The dealer's bounds against anyone who can connect (``dealer.DealerLimits``, docs/robustness.md)."""
    from .dealer import DealerLimits as L

    g = p.add_argument_group("limits (what one party can make the dealer spend)")
    g.add_argument("--max-connections", type=int, default=L.max_connections,
                   help="party links served at once; more are refused (default %(default)s)")
    g.add_argument("--handshake-timeout", type=float, default=L.handshake_timeout,
                   help="seconds for a link's TLS handshake and registration together (default %(default)s)")
    g.add_argument("--max-correction-mb", type=float, default=L.max_correction_bytes / 2**20,
                   help="MiB of one request's correction (default %(default)g)")
    g.add_argument("--max-request-work-gb", type=float, default=L.max_work_bytes / 2**30,
                   help="GiB the dealer computes with for one request (default %(default)g)")
    g.add_argument("--max-request-gmacs", type=float, default=L.max_request_macs / 1e9,
                   help="10^9 multiply-accumulates of one request's product (default %(default).1f)")
    g.add_argument("--max-session-requests", type=int, default=L.max_session_requests,
                   help="requests answered per session (default %(default)s)")
    g.add_argument("--max-session-gb", type=float, default=L.max_session_bytes / 2**30,
                   help="GiB of corrections sent per session (default %(default)g)")
    g.add_argument("--index-window", type=int, default=L.index_window,
                   help="how far a request index may lie from the highest one answered (default %(default)s)")
    g.add_argument("--kept-mask-gb", type=float, default=L.kept_mask_bytes / 2**30,
                   help="GiB of weight masks kept between requests, all sessions together, so that a token does "
                        "not expand them again (SmolLM2 1.2, BERT-base 0.9; 0 keeps none; default %(default)g)")


def _add_approx(p: argparse.ArgumentParser, insecure: bool = False) -> None:
    src = "default: the checkpoint's own (cometpi.json); a stock or exact checkpoint:"
    from .approx.config import GELU, SOFTMAX, Relu, SmuForm

    p.add_argument("--gelu", default=None, choices=[g for g in GELU if g != "exact"],
                   help=f"GeLU replacement ({src} spline, the model's own GeLU/SiLU by splines; smu: Comet's "
                        "replacement; erf/tanh: CrypTen's constructions, reproduced)")
    p.add_argument("--softmax", default=None, choices=[s for s in SOFTMAX if s != "exact"],
                   help=f"softmax replacement ({src} exp, the original softmax: max, spline exp, reciprocal; "
                        "relu: Comet's ReLU normalisation; crypten: CrypTen's, reproduced)")
    p.add_argument("--comet", action="store_true",
                   help="Comet's replacements (SMU, ReLU-softmax) on a stock checkpoint (not fine-tuned for them)")
    guesses = ["thermometer", "comet", "constant", "crypten"] + (["insecure_comet_small_flood"] if insecure else [])
    p.add_argument("--guess", default=None, choices=guesses,
                   help=f"rsqrt initial guess ({src} thermometer: the octave of x by one narrow secure "
                        "comparison, 3 Newton steps, no leakage; comet: Comet's flooded shares, sigma printed"
                        + ("; insecure_comet_small_flood: the prototype's small flood, a reproduction that leaks, "
                           "only with --allow-insecure insecure,flood" if insecure else "") + ")")
    p.add_argument("--sigma", type=float, default=None,
                   help=f"statistical security of Comet's flood in bits ({src} 40)")
    p.add_argument("--smu-form", dest="smu_form", default=None, choices=[f.value for f in SmuForm],
                   help="how SMU is computed (default segments: ReLU plus 24 public line segments of its "
                        "correction, mu folded into the server's weights, no rsqrt; rsqrt: Comet's "
                        "(x + sqrt(x^2 + mu^2))/2 by Newton)")
    p.add_argument("--relu", default=None, choices=[r.value for r in Relu],
                   help="ReLU-softmax's ReLU (default narrow: exact, by one narrow comparison; smooth: Comet's "
                        "SMU with mu 0.1, no comparison; full: the full-ring comparison)")


def cmd_dealer(args) -> int:
    from .dealer import DealerLimits, DealerServer
    from .tls import check_plaintext, dealer_tls

    tls, allow = dealer_tls(args.tls, args.allow_servers, args.allow_clients)
    if tls is None:
        check_plaintext(args.host, args.insecure_plaintext, "the dealer's port")
    import signal

    from .serve import DRAIN_SECONDS

    limits = DealerLimits(max_connections=args.max_connections, handshake_timeout=args.handshake_timeout,
                          max_correction_bytes=int(args.max_correction_mb * 2**20),
                          max_work_bytes=int(args.max_request_work_gb * 2**30),
                          max_request_macs=int(args.max_request_gmacs * 1e9),
                          max_session_requests=args.max_session_requests,
                          max_session_bytes=int(args.max_session_gb * 2**30), index_window=args.index_window,
                          kept_mask_bytes=int(args.kept_mask_gb * 2**30))
    srv = DealerServer(args.host, args.port, pairing_timeout=args.pairing_timeout, tls=tls, allow=allow,
                       limits=limits)
    signal.signal(signal.SIGTERM, lambda *_: srv._stop.set())  # stop accepting; running sessions finish
    print(f"cometpi dealer listening on {srv.address[0]}:{srv.address[1]}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.stop()
        srv.drain(DRAIN_SECONDS)
    return 0


def cmd_linear_serve(args) -> int:
    from .serve import linear_server_handler, load_tensor, serve_forever

    w = load_tensor(args.weight, args.key)
    if w.ndim != 2:
        raise SystemExit(f"error: the weight must be 2-D, {args.weight} holds shape {tuple(w.shape)}")
    serve_forever(linear_server_handler(w), host=args.host, port=args.port, dealer=args.dealer,
                  config=_config(args), timeout=args.timeout, once=args.once, banner="linear server",
                  net=_net(args), tls=_party_tls(args, "server"), insecure_plaintext=args.insecure_plaintext,
                  **_server_limits(args))
    return 0


def cmd_linear_query(args) -> int:
    from .party import connect_client
    from .serve import linear_client, load_tensor, save_json, save_result

    x = load_tensor(args.input, args.key)
    if x.ndim != 2:
        raise SystemExit(f"error: the input must be 2-D, {args.input} holds shape {tuple(x.shape)}")
    sess = connect_client(args.server, args.dealer, _config(args), timeout=args.timeout, net=_net(args),
                          tls=_party_tls(args, "client"), insecure_plaintext=args.insecure_plaintext)
    try:
        y, report = linear_client(sess, x)
    finally:
        sess.close()
    save_result(args.out, y)
    if args.stats:
        save_json(args.stats, report)
    on, off = report["online"], report["offline"]
    print(f"X{tuple(x.shape)} @ W -> {tuple(y.shape)} written to {args.out}; online "
          f"{on['bytes_sent'] + on['bytes_recv']:,} B in {on['msgs_sent'] + on['msgs_recv']} messages, "
          f"{on['rounds']} rounds; offline {off['bytes_sent'] + off['bytes_recv']:,} B; "
          f"{report['seconds']:.3f} s")
    return 0


def _approx_overrides(args) -> dict:
    """The approximation flags given on the command line (the rest come from the checkpoint)."""
    out = {"gelu": "smu", "softmax": "relu"} if getattr(args, "comet", False) else {}
    return {**out, **{k: getattr(args, k) for k in ("gelu", "softmax", "guess", "sigma", "smu_form", "relu")
                      if getattr(args, k, None) is not None}}


def cmd_serve(args) -> int:
    from .serve import serve_forever
    from .service import ModelServer, reset_peak_rss, reveal_note

    reset_peak_rss()  # count this server's own peak, not the parent's it was forked from
    t0 = time.time()
    reveal, k = args.reveal
    if args.reveal_k is not None:
        if k is not None and k != args.reveal_k:
            raise SystemExit(f"error: --reveal topk:{k} and --reveal-k {args.reveal_k} disagree")
        k = args.reveal_k
    server = ModelServer(args.model, _approx_overrides(args), _config(args), layers=args.layers, reveal=reveal,
                         reveal_k=k, max_queries_per_session=args.max_queries_per_session,
                         allow_stats=args.allow_stats, allow_insecure=args.allow_insecure,
                         **({} if args.idle_timeout is None else {"idle_timeout": args.idle_timeout}))
    a, ap = server.arch, server.approx
    mu = "trained per-channel mu" if ap.smu_mu == "per-channel" else f"mu {ap.smu_mu:g}"
    print(f"cometpi serve: {a.kind} ({a.layers} layers, hidden {a.hidden}, head {a.head}), model hash "
          f"{server.card['model_hash']}, gelu={ap.gelu}{f' ({mu}, {ap.smu_form})' if ap.gelu == 'smu' else ''} "
          f"softmax={ap.softmax}{f' ({ap.relu} ReLU)' if ap.softmax == 'relu' else ''} guess={ap.guess}"
          f"{f' sigma={ap.sigma:g}' if 'comet' in ap.guess else ''}; reveals {reveal_note(server.card)}"
          f"{f'; at most {server.max_queries} queries per session' if server.max_queries else ''}"
          f"{'; op stats allowed' if server.allow_stats else ''}; loaded in {time.time() - t0:.1f} s",
          flush=True)
    serve_forever(server.handle, host=args.host, port=args.port, dealer=args.dealer, config=_config(args),
                  timeout=args.timeout, extra=server.card, once=args.once, banner="model server", net=_net(args),
                  workers=args.workers, tls=_party_tls(args, "server"), insecure_plaintext=args.insecure_plaintext,
                  max_per_client=args.max_sessions_per_client, **_server_limits(args))
    return 0


def _connect(args, out=None):
    """The client's session from the command line (infer, generate), announced on ``out``."""
    from .client import PrivateClient
    from .policy import reveal_note

    client = PrivateClient(args.server, args.dealer, tokenizer=args.tokenizer, config=_config(args),
                           model_hash=args.model_hash, timeout=args.timeout, net=_net(args),
                           tls=_party_tls(args, "client"), insecure_plaintext=args.insecure_plaintext,
                           allow_insecure=args.allow_insecure)
    a, ap = client.arch, client.approx
    budget = client.card.get("max_queries_per_session")
    print(f"connected: {a.kind}, {a.layers} layers, hidden {a.hidden}, model hash {client.card['model_hash']}, "
          f"approximations {ap.gelu}/{ap.softmax}/{ap.guess} (sigma {ap.sigma:g}); the server reveals "
          f"{reveal_note(client.card)}{f'; at most {budget} queries per session' if budget else ''}; weights "
          f"masked in {client.setup_seconds:.1f} s", file=out or sys.stdout, flush=True)
    return client


def cmd_infer(args) -> int:
    from .client import format_bytes, truncation_note
    from .costs import save_json
    from .policy import reveal_note

    with _connect(args) as client:
        a = client.arch
        if a.head == "classifier":
            rows = client.classify(args.texts, max_length=args.max_length, pad_to=args.pad_to,
                                   hide_length=args.hide_length, progress=True)
            st = rows[0]["batch_stats"]
            if client.reveal != "logits":
                print(f"note: the server reveals {reveal_note(client.card)} (--reveal {client.reveal}"
                      f"{f' --reveal-k {client.reveal_k}' if client.reveal == 'topk' else ''})")
            for r in rows:
                if r["confidence"] is not None:
                    middle = f"{r['confidence']:.3f}"
                elif "top" in r:
                    middle = "top " + " > ".join(str(x) for x in r["top"])
                else:
                    middle = "label only"
                print(f"{r['label']}\t{middle}\t{_with_note(r)}")
        else:
            ids, mask = client.encode(args.texts, max_length=args.max_length, pad_to=args.pad_to)
            counts = client.token_counts(args.texts, mask)
            out, st = client.infer_ids(ids, mask, hide_length=args.hide_length, progress=True)
            rows = [{"text": t, "output": out[i].tolist(), **counts[i]} for i, t in enumerate(args.texts)]
            if a.head == "lm":
                for i, r in enumerate(rows):
                    print(f"next token id {int(out[i].argmax())}\t{_with_note(r)}")
            else:
                print(f"hidden states {tuple(out.shape)}")
                for i, r in enumerate(rows):
                    if r["truncated"]:
                        print(f"text {i + 1} {truncation_note(r)}")
        cut = sum(r["truncated"] for r in rows)
        if cut:
            limit = a.max_positions - a.position_offset
            flag, cap = ("--pad-to", args.pad_to) if args.pad_to else ("--max-length", args.max_length)
            more = (f"a larger {flag} (up to {limit}, the model's positions) keeps more" if cap < limit
                    else f"the model takes at most {limit} tokens")
            print(f"note: {cut} of {len(rows)} text(s) truncated to {min(cap, limit)} tokens, the model saw only "
                  f"their beginning; {more}")
        on, off = st["online"], st["offline"]
        print(f"online {format_bytes(on['bytes_sent'] + on['bytes_recv'])} in {on['rounds']} rounds, offline "
              f"{format_bytes(off['bytes_sent'] + off['bytes_recv'])}, {st['seconds']:.1f} s")
        if args.json:
            save_json(args.json, {"results": rows, "stats": st, "card": client.card})
    return 0


def cmd_generate(args) -> int:
    from .client import generation_costs
    from .costs import save_json

    if (args.prompt is None) == (args.chat is None):
        raise SystemExit("give a prompt or --chat MESSAGE (one of them)")
    with _connect(args, out=sys.stderr) as client:  # stdout carries the generated text only
        for piece in client.generate(args.chat or args.prompt, max_new_tokens=args.max_new_tokens,
                                     chat=args.chat is not None, fixed_length=args.fixed_length,
                                     temperature=args.temperature, top_k=args.top_k):
            print(piece["text"], end="", flush=True)
        print()
        g = client.last_generation
        print(generation_costs(g), file=sys.stderr)
        if args.json:
            save_json(args.json, {"generation": g, "card": client.card})
    return 0


def cmd_api(args) -> int:
    from .api import PrivateChat, serve

    def connect():
        return _connect(args, out=sys.stderr)

    if args.max_waiting < 0:
        raise SystemExit(f"--max-waiting must be >= 0, got {args.max_waiting}")
    chat = PrivateChat(connect, model_name=args.model_name, max_waiting=args.max_waiting)
    try:
        serve(chat, args.host, args.port, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
              allow_remote=args.allow_remote)
    finally:
        chat.close()
    return 0


def _with_note(row: dict) -> str:
    """The echoed text of an ``infer`` result, after '(truncated to K of N tokens)' if it was cut."""
    from .client import truncation_note

    note = truncation_note(row)
    return f"{note} {row['text']}" if note else row["text"]


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="rt", help="rt (Rotten Tomatoes, bundled) or a CSV/TSV/JSONL file; split "
                                                "80/10/10 with a seeded hash (docs/finetune.md); default %(default)s")
    p.add_argument("--text-col", default="text", help="text column of --data FILE (default %(default)s)")
    p.add_argument("--label-col", default="label", help="label column of --data FILE (default %(default)s)")


def cmd_finetune(args) -> int:
    import torch

    from .finetune import FinetuneConfig, check_teacher, finetune, load_dataset
    from .service import resolve_model_dir

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

    from .evaluate import evaluate, save_result

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
    from .demo import main as demo_main

    return demo_main(args)


def cmd_engine_demo(args) -> int:
    from .engine_demo import main as demo_main

    return demo_main(args)


def cmd_bench(args) -> int:
    from importlib import import_module

    return import_module(f"cometpi.bench.{args.what}").main(args)


def cmd_bench_worker(args) -> int:
    from .bench.ops import bench_handler
    from .core import Config
    from .serve import serve_forever

    serve_forever(bench_handler(args.reps), host="127.0.0.1", port=0, dealer=args.dealer,
                  config=Config(trunc=args.trunc), timeout=args.timeout, banner="bench worker")
    return 0


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
    from .core import ConfigError
    from .dealer import DealerError
    from .transport import TransportError

    t0 = time.time()
    try:
        return args.fn(args)
    except (TransportError, ConfigError, DealerError, ValueError, OSError) as e:
        print(f"cometpi {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cometpi {args.cmd}: interrupted after {time.time() - t0:.1f} s", file=sys.stderr)
        return 130

