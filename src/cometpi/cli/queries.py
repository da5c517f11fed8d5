"""The client's commands: ``infer``, ``generate``, ``api`` (a client session behind an HTTP endpoint) and
``linear query``."""

from __future__ import annotations

import sys

from .options import _config, _net, _party_tls


def _connect(args, out=None):
    """The client's session from the command line (infer, generate), announced on ``out``."""
    from ..client import PrivateClient
    from ..policy import reveal_note

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
    from ..client import format_bytes, truncation_note
    from ..costs import save_json
    from ..policy import reveal_note

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
    from ..client import generation_costs
    from ..costs import save_json

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
    from ..api import PrivateChat, serve

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
    from ..client import truncation_note

    note = truncation_note(row)
    return f"{note} {row['text']}" if note else row["text"]


def cmd_linear_query(args) -> int:
    from ..party import connect_client
    from ..serve import linear_client, load_tensor, save_json, save_result

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
