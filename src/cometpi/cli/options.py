"""The option groups the ``cometpi`` commands share (the session config, TLS, limits, approximations, data,
a client's connection) and the objects each makes from the parsed arguments."""

from __future__ import annotations

import argparse


def _config(args):
    from ..core import Config

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
    from ..tls import PartyTls

    if role == "client":
        peers = [args.server_cert] if args.server_cert else []
    else:
        peers = args.allow_clients
    return PartyTls.from_args(args.tls, peers, args.dealer_cert, role)


def _net(args):
    from ..transport import NETWORKS

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
    from ..party import HANDSHAKE_TIMEOUT
    from ..serve import MAX_PENDING_HANDSHAKES, MAX_SESSION_SECONDS

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
    from ..dealer import DealerLimits as L

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
    from ..approx.config import GELU, SOFTMAX, Relu, SmuForm

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


def _approx_overrides(args) -> dict:
    """The approximation flags given on the command line (the rest come from the checkpoint)."""
    out = {"gelu": "smu", "softmax": "relu"} if getattr(args, "comet", False) else {}
    return {**out, **{k: getattr(args, k) for k in ("gelu", "softmax", "guess", "sigma", "smu_form", "relu")
                      if getattr(args, k, None) is not None}}


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="rt", help="rt (Rotten Tomatoes, bundled) or a CSV/TSV/JSONL file; split "
                                                "80/10/10 with a seeded hash (docs/finetune.md); default %(default)s")
    p.add_argument("--text-col", default="text", help="text column of --data FILE (default %(default)s)")
    p.add_argument("--label-col", default="label", help="label column of --data FILE (default %(default)s)")
