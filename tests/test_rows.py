"""A KV cache masked once per row (``protocols.rows``): products with growing cached rows against
plaintext, each row's masked difference on the wire once, the Cost line against the counters, mask
blocks that grow, and what each party sends looking uniform."""

import pytest
import torch

from cometpi import protocols as P
from cometpi.core import Config, Role, TruncMode
from cometpi.party import run_local

from .conftest import uniform
from .test_protocols import MODES, ULP, measured, q, trunc_cost

B, H, D = 1, 2, 8


def _steps(rng, lengths, n):
    """Rows (B, H, T, D) appended in steps of ``lengths`` and a query (B, H, n, D) per step."""
    rows = [uniform(rng, (B, H, t, D)) for t in lengths]
    xs = [uniform(rng, (B, H, n, D)) for _ in lengths]
    return rows, xs


def _run(rows, xs, transpose, mode=TruncMode.EXACT, capacity=None):
    """Client-owned rows appended step by step; at each step x @ cache^T (or, with ``transpose`` off,
    probabilities (B, H, n, S) @ cache); returns the client's results and both parties' traffic."""

    def fn(s):
        cache, out, costs = None, [], []
        for r, x in zip(rows, xs, strict=True):
            rs = s.share(r if s.is_client else None, owner=Role.CLIENT, shape=r.shape)
            S = r.shape[2] + (0 if cache is None else cache.length)
            if not transpose:
                x = x[..., :1].expand(*x.shape[:-1], S).contiguous() / S
            xs_ = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape)
            if cache is None:
                cache = P.MaskedRows(s, capacity or r.shape[2])
            cache.append(rs)
            z, on, off = measured(s, lambda: P.matmul_rows(xs_, cache, transpose=transpose))  # noqa: B023
            out.append(s.reveal_float(z, Role.CLIENT))
            costs.append((on, off, x.numel(), r.numel(), z.data.numel()))
        return out, costs, cache

    return run_local(fn, Config(trunc=mode))


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_products_with_cached_rows_equal_plaintext_and_open_each_row_once(transpose, mode, rng):
    assert "Cost: 1 round, 16 B x (|x| + the new rows' elements)" in P.matmul_rows.__doc__
    rows, xs = _steps(rng, [5, 1, 1, 1], 3)
    (out, costs, cache), (_, scosts, _) = _run(rows, xs, transpose, mode, capacity=8)
    full = None
    for r, x, z, (on, off, nx, nr, nz), (_, soff, *_) in zip(rows, xs, out, costs, scosts, strict=True):
        full = q(r) if full is None else torch.cat([full, q(r)], 2)
        S = full.shape[2]
        want = q(x) @ full.transpose(-2, -1) if transpose else \
            q(x[..., :1].expand(*x.shape[:-1], S) / S) @ full
        assert float((z - want).abs().max()) < ULP
        tb, tr = trunc_cost(nz, mode)
        # only the query's masked difference and the new rows' travel: never the rows cached before
        assert (on.payload_bytes, on.rounds) == (16 * (nx + nr) + tb, 1 + tr)
        assert soff.bytes_recv == 8 * nz + (tb if mode == TruncMode.EXACT else 0) and off.bytes_recv == 0
    assert cache.blocks and len(cache.blocks) == 1 and cache.length == 8  # one block of capacity 8


def test_a_cache_outgrowing_its_block_takes_a_larger_one(rng):
    rows, xs = _steps(rng, [3, 1, 2, 4, 1], 2)
    (out, _, cache), _ = _run(rows, xs, True, capacity=3)
    full = torch.cat([q(r) for r in rows], 2)
    assert float((out[-1] - q(xs[-1]) @ full.transpose(-2, -1)).abs().max()) < ULP
    # blocks of 3, then 3 (all so far), then 6: each as large as all before it, or the new rows
    assert [n for _, n in cache.blocks] == [3, 3, 6] and cache.length == 11


def test_each_party_sends_uniform_masked_differences(rng):
    """The same rows and query twice (fresh sessions): what either party sends differs completely,
    and each row's masked difference is sent once (the cache's later products send the query's only)."""
    sent = []

    def fn(s):
        r = torch.ones(B, H, 4, D)
        rs = s.share(r if s.is_client else None, owner=Role.CLIENT, shape=r.shape)
        cache = P.MaskedRows(s, 4).append(rs)
        x = s.share(torch.ones(B, H, 1, D) if s.is_client else None, owner=Role.CLIENT, shape=(B, H, 1, D))
        orig = s.peer.exchange
        log = []
        s.peer.exchange = lambda ts, what: (log.append([t.clone() for t in ts]), orig(ts, what))[1]
        P.matmul_rows(x, cache, transpose=True, truncate_result=False)
        P.matmul_rows(x, cache, transpose=True, truncate_result=False)
        s.peer.exchange = orig
        return log

    for _ in range(2):
        sent.append(run_local(fn))
    for role in (0, 1):
        a, b = sent[0][role], sent[1][role]
        assert [t.numel() for t in a[0]] == [B * H * D, B * H * 4 * D] and a[1][1].numel() == 0
        for u, v in zip(a[0], b[0], strict=True):
            assert float((u == v).double().mean()) < 0.05  # fresh masks: nothing repeats
        bits = torch.cat([t.reshape(-1) for t in a[0]])
        ones = sum(int(((bits >> j) & 1).sum()) for j in range(64))
        assert abs(ones / (64 * bits.numel()) - 0.5) < 0.05  # the bits of what is sent look fair


def test_rows_of_another_shape_or_session_are_refused(rng):
    def fn(s):
        r = s.share(torch.ones(B, H, 2, D) if s.is_client else None, owner=Role.CLIENT, shape=(B, H, 2, D))
        cache = P.MaskedRows(s, 2).append(r)
        with pytest.raises(ValueError, match="do not extend a cache of rows"):
            cache.append(r._wrap(r.data[:, :1].contiguous()))
        with pytest.raises(ValueError, match="capacity must be >= 1"):
            P.MaskedRows(s, 0)
        with pytest.raises(ValueError, match="at least one row"):
            P.matmul_rows(r, P.MaskedRows(s, 2))
        return True

    assert run_local(fn) == (True, True)


def test_private_decoding_step_re_sends_no_cached_row():
    """A decoding step of a tiny Llama over 12 cached positions: its attention products send the new
    position's query, key and value (and the probabilities) only, and the tokens still equal the
    simulation's (tests/test_generate.py checks that on two models)."""
    from cometpi.convert import from_hf
    from cometpi.nn import ApproxConfig, KVCache, RingModel, ShareModel, greedy_decode, prepare_params

    from .test_convert import _tiny

    arch, params = from_hf(_tiny("LlamaForCausalLM", seed=13))
    cfg = ApproxConfig.original()
    prepared = prepare_params(arch, params, cfg)
    ids = torch.arange(3, 15).reshape(1, 12)
    ring = list(greedy_decode(RingModel(prepared), arch, cfg, prompt_ids=ids, prompt_length=12, max_new=3))

    def job(s):
        model = ShareModel(s, arch, prepared if not s.is_client else None)
        cache = KVCache()
        steps = []
        gen = greedy_decode(model, arch, cfg, prompt_ids=ids if s.is_client else None, prompt_length=12,
                            max_new=3, cache=cache)
        toks = []
        while True:
            with s.span("step"):
                try:
                    toks.append(next(gen))
                except StopIteration:
                    break
            steps.append(s.meter.report()["spans"])
        return toks, cache, steps

    (toks, cache, steps), _ = run_local(job, timeout=600)
    assert toks == ring
    # the last step (S = 14 keys): per layer and party 8 B for each element of the query, the new key, the
    # probabilities and the new value, and the truncation's 8 B per element of the scores and the context
    path = "step/layer/attention/matmul"
    sent = steps[-1][path]["online"]["bytes_sent"] - steps[-2][path]["online"]["bytes_sent"]
    nh, nkv, hs, S = arch.heads, arch.n_kv, arch.head_dim, 14
    assert sent == 8 * arch.layers * (nh * hs + nkv * hs + nh * S + nkv * hs + nh * S + nh * hs)
    assert [n for _, n in cache.k[0].blocks] == [12 + 2]  # prompt and the new tokens fed back: one block
    assert cache.k[0].opened.shape[2] == 14

