"""The commands that run a listening role until stopped: the dealer, the model server, the private-linear
demo's server and the benchmarks' worker."""

from __future__ import annotations

import time

from .options import _approx_overrides, _config, _net, _party_tls, _server_limits


def cmd_dealer(args) -> int:
    from ..dealer import DealerLimits, DealerServer
    from ..tls import check_plaintext, dealer_tls

    tls, allow = dealer_tls(args.tls, args.allow_servers, args.allow_clients)
    if tls is None:
        check_plaintext(args.host, args.insecure_plaintext, "the dealer's port")
    import signal

    from ..serve import DRAIN_SECONDS

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
    from ..serve import linear_server_handler, load_tensor, serve_forever

    w = load_tensor(args.weight, args.key)
    if w.ndim != 2:
        raise SystemExit(f"error: the weight must be 2-D, {args.weight} holds shape {tuple(w.shape)}")
    serve_forever(linear_server_handler(w), host=args.host, port=args.port, dealer=args.dealer,
                  config=_config(args), timeout=args.timeout, once=args.once, banner="linear server",
                  net=_net(args), tls=_party_tls(args, "server"), insecure_plaintext=args.insecure_plaintext,
                  **_server_limits(args))
    return 0


def cmd_serve(args) -> int:
    from ..serve import serve_forever
    from ..service import ModelServer, reset_peak_rss, reveal_note

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


def cmd_bench_worker(args) -> int:
    from ..bench.ops import bench_handler
    from ..core import Config
    from ..serve import serve_forever

    serve_forever(bench_handler(args.reps), host="127.0.0.1", port=0, dealer=args.dealer,
                  config=Config(trunc=args.trunc), timeout=args.timeout, banner="bench worker")
    return 0
