"""A party that deviates: forged dealer requests and malformed online messages.

The dealer is a service any admitted party can talk to directly, so it must be safe against requests
no honest party makes.  For every kind of material, a party sends forged requests (a wrong kind at a
real index, a real kind with other parameters, ``widx`` pointing at a weight mask or elsewhere, the
same index twice, indices far ahead).  Each is either refused with a named ``DealerError`` or answered
with a correction that is *independent of the other party's secret material*, tested as a view: the
correction is bit for bit the one the dealer would compute in a world where every keystream the other
party used honestly (its masks, shares, weight masks) came from another seed.  The honest party's
messages and masked weights are functions of those keystreams only, so the forged answers tell the
forger nothing about them.  The test fails on the dealer before requests were bound to their material
(every keystream was selected by the index alone).
"""

import threading

import pytest
import torch

from cometpi import protocols as P
from cometpi.core import Role
from cometpi.dealer import DealerCore, DealerError, DealerLimits, LocalDealer, ServedIndices, compute_correction
from cometpi.party import local_pair, run_pair
from cometpi.protocols import KINDS
from cometpi.ring import AesCtrPrg, new_seed, request_label, ring_matmul, wrap_bits

W_SHAPE = (8, 5)


class RecordingPrg:
    """A party's PRG that records every keystream it draws from."""

    def __init__(self, prg):
        self.prg, self.streams = prg, set()

    def ring(self, stream, *shapes, device=None):
        self.streams.add(stream)
        return self.prg.ring(stream, *shapes, device=device)

    def bytes(self, stream, n):
        self.streams.add(stream)
        return self.prg.bytes(stream, n)


class OtherWorld:
    """The same party where every keystream in ``used`` comes from another seed (the rest unchanged)."""

    def __init__(self, prg, used):
        self.prg, self.other, self.used = prg, AesCtrPrg(new_seed()), used

    def _pick(self, stream):
        return self.other if stream in self.used else self.prg

    def ring(self, stream, *shapes, device=None):
        return self._pick(stream).ring(stream, *shapes, device=device)

    def bytes(self, stream, n):
        return self._pick(stream).bytes(stream, n)


def honest_run(s):
    """Every kind of material once, on tiny shapes: private weights (64- and 32-bit, matrix and
    vector), the embedding (mulpriv in 32 bits + lift), Beaver products, truncation, comparisons."""
    server = s.role == Role.SERVER
    w = torch.linspace(-1, 1, 40, dtype=torch.float64).reshape(W_SHAPE) if server else None
    pw = P.prepare_weight(s, w, shape=None if server else W_SHAPE)
    pv = P.prepare_weight(s, torch.linspace(0.5, 1.5, 5, dtype=torch.float64) if server else None,
                          shape=None if server else (5,))
    table = P.prepare_weight(s, torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3) if server else None,
                             shape=None if server else (4, 3), bits=32)
    x = s.share(torch.linspace(-2, 2, 24, dtype=torch.float64).reshape(3, 8) if s.is_client else None,
                owner=Role.CLIENT, shape=(3, 8))
    y = P.matmul_private(x, pw)  # mulpriv, trunc
    y = P.matmul_private(y, pv)  # mulpriv (vec)
    e = P.embedding_lookup(torch.tensor([1, 3]) if s.is_client else None, table, n_tokens=2)  # mulpriv 32, lift
    z = P.mul(y, y)  # mul
    P.mul(y, y._wrap(y.data[:, :1].contiguous()))  # mulb
    t, kept = P.truncate_keep(y, 4)  # truncmul
    P.mul_kept(t, kept)
    c, kp = P.truncate_poly(y, 4)  # truncpoly
    P.poly_kept(kp, c, c, c, (0, 0, 0))
    tr, kt = P.truncate_for_mul(y, 4)  # truncout
    P.mul_truncated(tr, kt)
    _, ks = P.square_keep(y, (3, 1))  # squarek
    P.mul_kept(y._wrap(y.data[:, :1].contiguous()), ks)
    z = P.square(z)  # square
    z = P.matmul(y, y._wrap(y.data.T.contiguous()))  # matmul
    P.mul_private_pair(y.data[:1].clone(), s)  # pmul
    P.drelu(y)  # cmp, bandp, b2a
    P.drelu_narrow(e, 24)  # cmpn, bandp, b2a
    P.drelu_select(e, 24)  # cmpsel, bandp
    P.maximum(y, -1, k=24, arity=4)  # cmpn, bandp, bsel
    P.trunc_select(P.matmul_private(x, pw, truncate_result=False), 16, 24)  # trsel, bandp
    rows = P.MaskedRows(s, 4).append(y.reshape(1, 1, 3, 5))  # kvmask
    P.matmul_rows(y.reshape(1, 1, 3, 5), rows, transpose=True)  # kvmm
    s.test_weights = {pw.index: pw, pv.index: pv, table.index: table}
    return s.reveal_float(z, Role.CLIENT)


def _honest_sessions():
    """A client and a server after an honest run, both still connected to the dealer, with the
    keystreams each used, and the dealer."""
    dealer = LocalDealer()
    client, server = local_pair(dealer=dealer)
    for sess in (client, server):
        sess.provider.prg = RecordingPrg(sess.provider.prg)
    run_pair(honest_run, honest_run, (client, server))
    return client, server, dealer


@pytest.fixture(scope="module")
def sessions():
    client, server, dealer = _honest_sessions()
    yield client, server, dealer.core
    for sess in (client, server):
        sess.close()


def _kinds_with_receiver():
    return sorted(k for k, v in KINDS.items() if v.receiver is not None)


def test_the_honest_run_covers_every_kind(sessions):
    client, _, _ = sessions
    assert {kind for _, kind, _ in client.provider.plan} == set(KINDS)


def _forgeries(plan, kind, top):
    """Forged (index, kind, params) requests of ``kind`` against an honest ``plan``."""
    honest = [(i, p) for i, k, p in plan if k == kind]
    i0, p0 = honest[0]
    others = [(i, k) for i, k, _ in plan if k != kind]
    masks = [(i, p) for i, k, p in plan if k == "wmask"]
    out = [("the same index twice", i0, p0)]
    out += [(f"{kind} at the index of a {k}", i, p0) for i, k in others[:6]]
    out += [(f"{kind} at a weight mask's index", i, p0) for i, _ in masks]
    changed = {**p0, **{key: [*v, 1] for key, v in p0.items() if isinstance(v, list) and key != "w"}}
    out.append(("other parameters at a real index", i0, changed))
    if "f" in p0:
        out.append(("another shift", i0, {**p0, "f": p0["f"] + 1}))
    if "k" in p0:
        out.append(("another width", i0, {**p0, "k": p0["k"] - 1}))
    out += [("far ahead", top + 17, p0), ("far ahead, other parameters", top + 4096, changed)]
    if kind == "kvmm":
        blocks = [(i, p) for i, k, p in plan if k == "kvmask"]
        for i, pb in blocks:
            rows = pb["shape"][0]
            out.append(("parts at the cache's mask block, a fresh index", top + 50, {**p0, "parts": [[i, rows]]}))
            out.append(("the block's rows beyond those used", top + 51, {**p0, "parts": [[i, rows]], "rows": rows}))
        for i, k in others[:4] + [(i, "wmask") for i, _ in masks]:
            out.append((f"parts at a {k}'s index", top + 60 + i, {**p0, "parts": [[i, 4]]}))
    if kind == "mulpriv":
        for i, pm in masks:
            n = pm["shape"][0] * (pm["shape"][1] if len(pm["shape"]) > 1 else 1)
            ring = {k: v for k, v in pm.items() if k == "bits"}
            vec = {"x": [n], "w": [n], "widx": i, "mode": "vec", **ring}
            out.append(("widx at a weight mask, the forged index = widx (the extraction attack)", i, vec))
            out.append(("widx at a weight mask, a fresh index", top + 100 + i, vec))
            real = {"x": [2, pm["shape"][0]], "w": pm["shape"], "widx": i, **ring}
            out.append(("widx at a weight mask, its real shape", top + 200 + i, real))
        for i, _ in others[:4]:
            out.append(("widx at another index", top + 300 + i, {**p0, "widx": i}))
    return out


@pytest.mark.parametrize("kind", _kinds_with_receiver())
def test_forged_requests_are_refused_or_independent_of_the_other_party(sessions, kind):
    client, server, core = sessions
    forger_role = KINDS[kind].receiver
    forger, victim = (client, server) if forger_role == Role.CLIENT else (server, client)
    plan = forger.provider.plan
    top = max(i for i, _, _ in plan) + 10_000 * _kinds_with_receiver().index(kind)  # fresh indices per kind
    used = victim.provider.prg.streams
    mine, theirs = forger.provider.prg.prg, victim.provider.prg.prg
    answered = refused = 0
    for what, idx, params in _forgeries(plan, kind, top):
        prgs = (mine, theirs) if forger_role == Role.CLIENT else (theirs, mine)
        world_b = (mine, OtherWorld(theirs, used)) if forger_role == Role.CLIENT else (OtherWorld(theirs, used), mine)
        try:  # what the dealer answers this party's link (serve_connection passes each item to it)
            got = core.correction(forger.session_id, int(forger_role), [idx, kind, params])
        except DealerError as e:
            assert str(e), what
            refused += 1
        else:
            answered += 1
            _assert_independent(got, kind, idx, params, prgs, world_b, forger_role, used, what)
        # the binding holds even where the dealer refuses (defence in depth, not the index bookkeeping)
        try:
            unbound = compute_correction(kind, idx, params, *prgs)
        except DealerError:
            continue  # parameters no dealer can answer
        if [idx, kind, params] not in plan:
            _assert_independent(unbound, kind, idx, params, prgs, world_b, forger_role, used, what)
    assert answered and refused
    # the test can fail: an honest correction does depend on the other party's material
    i0, _, p0 = next(it for it in plan if it[1] == kind)
    prgs = (mine, theirs) if forger_role == Role.CLIENT else (theirs, mine)
    world_b = (mine, OtherWorld(theirs, used)) if forger_role == Role.CLIENT else (OtherWorld(theirs, used), mine)
    assert not torch.equal(compute_correction(kind, i0, p0, *prgs), compute_correction(kind, i0, p0, *world_b))


def _assert_independent(got, kind, idx, params, prgs, world_b, forger_role, used, what):
    """``got`` (the dealer's answer to a forged request) has the same distribution whatever the other
    party's honestly used keystreams are.  Either it is bit for bit the answer in the other world, or
    (a forged ``mulpriv`` whose ``widx`` names a real weight mask B) it differs from the other world's
    answer by exactly A * (B - B'), while it is padded by the receiver's C1 from the request's own
    keystream, which the other party never uses: shifting that uniform pad maps one world's answer
    onto the other's, so the two have the same distribution."""
    other = compute_correction(kind, idx, params, *world_b)
    if torch.equal(got, other):
        return
    if kind == "kvmm":  # parts naming a real cache's mask block M: C1 = A @ M - C0, padded by the fresh C0
        label = request_label(idx, kind, params)
        assert label not in used, what
        k = KINDS["kvmm"]
        a0, _, m0 = k.own(Role.CLIENT, prgs[0], label, params)
        _, m0b = k.own(Role.CLIENT, world_b[0], label, params)[1:]
        a1, _ = k.own(Role.SERVER, prgs[1], label, params)
        d = m0 - m0b
        assert torch.equal(got - other, ring_matmul(a0 + a1, d.transpose(-2, -1) if params["t"] else d)), what
        return
    assert kind == "mulpriv" and forger_role == Role.CLIENT, what
    label = request_label(idx, kind, params)
    assert label not in used, what  # the pad C1 is fresh
    victim_b = world_b[1]
    k = KINDS["mulpriv"]
    (a,) = k.own(Role.CLIENT, prgs[0], label, params)
    (_, b), (_, b2) = k.own(Role.SERVER, prgs[1], label, params), k.own(Role.SERVER, victim_b, label, params)
    assert k.mask_label(params, params["w"], params.get("bits", 64)) in used, what  # only a weight mask differs
    prod = (lambda u, v: u * v) if params.get("mode") == "vec" else (lambda u, v: ring_matmul(u, v))
    assert torch.equal(wrap_bits(got - other, params.get("bits", 64)),
                       wrap_bits(prod(a, b) - prod(a, b2), params.get("bits", 64))), what


def test_weight_extraction_by_a_forged_mulpriv_fails(sessions):
    """The attack found in review: the client asks for a mulpriv correction at the weight mask's own
    index with ``widx`` = that index, mode "vec" and the weight's size.  When both were drawn from the
    same keystream the correction was (A - 1) * B and F + B gave the weight back exactly."""
    client, server, _ = _honest_sessions()
    widx = next(it[0] for it in client.provider.plan if it[1] == "wmask" and it[2]["shape"] == list(W_SHAPE))
    n = W_SHAPE[0] * W_SHAPE[1]
    p = {"x": [n], "w": [n], "widx": widx, "mode": "vec"}
    corr = client.provider.link.fetch(widx, "mulpriv", p)  # answered: a weight mask's index is never used
    (a,) = KINDS["mulpriv"].own(Role.CLIENT, client.provider.prg.prg, request_label(widx, "mulpriv", p), p)
    am1 = a - 1
    odd = (am1 & 1) == 1
    inv = am1.clone()  # Newton's iteration for the inverse of an odd number modulo 2^64
    for _ in range(6):
        inv = inv * (2 - am1 * inv)
    b_guess = corr * inv
    f = client.test_weights[widx].f  # the client's masked weight F = W - B
    w_hat = client.fp.decode((f.reshape(-1) + b_guess)[odd])
    w = torch.linspace(-1, 1, 40, dtype=torch.float64)[odd]
    for sess in (client, server):
        sess.close()
    assert odd.sum() > 10
    assert int(((w_hat - w).abs() < 1e-3).sum()) == 0  # nothing of the weight comes back


def test_dealer_index_bookkeeping_is_bounded():
    """Far-ahead requests cannot grow the dealer's memory: the answered-index bitmap covers at most
    twice the window (here 2^16 indices a side: 16 KiB), whatever indices are asked for."""
    served = ServedIndices(window=1 << 16)
    for j in range(200):
        served.add(j * (1 << 16))  # each as far ahead as allowed
    assert served.nbytes <= 3 * (1 << 16) // 8
    with pytest.raises(DealerError, match="outside this session's range"):
        served.add(served.top + (1 << 16) + 1)
    with pytest.raises(DealerError, match="outside this session's range"):
        served.add(served.top - (1 << 16) - 1)  # too old: its bit may be forgotten


@pytest.mark.parametrize("request_, match", [
    ([0, "mulpriv", {"x": [1 << 14, 1 << 14], "w": [1 << 14, 1 << 10], "widx": 0}], "multiply-accumulates"),
    ([0, "matmul", {"a": [1 << 13, 1 << 13], "b": [1 << 13, 1 << 13]}], "multiply-accumulates"),
    ([0, "cmpn", {"shape": [1 << 26], "k": 61, "m": 4}], "bytes of correction"),
    ([0, "cmpn", {"shape": [1 << 20], "k": 24, "m": 12}], "bytes of correction"),
    ([0, "cmpsel", {"shape": [1 << 25], "k": 28, "m": 7}], "bytes of correction"),
    ([0, "cmpn", {"shape": [8], "k": 24, "m": 13}], "chunk width"),
    ([0, "cmpsel", {"shape": [8], "k": 24, "m": 2}], "chunk width"),
    ([0, "trsel", {"shape": [8], "k": 28, "m": 7, "f": 40}], "k \\+ 1 <= 64 - f"),
    ([0, "trsel", {"shape": [1 << 23], "k": 28, "m": 7, "f": 16}], "bytes of correction"),
    ([0, "mul", {"shape": [1 << 28]}], "bytes of correction"),
    ([0, "truncpoly", {"shape": [1 << 25], "f": 8}], "bytes of correction"),
    ([0, "truncout", {"shape": [1 << 26], "f": 16}], "bytes of correction"),
    ([0, "truncout", {"shape": [4, 8], "f": 16, "y": [8, 1]}], "does not broadcast"),
    ([0, "squarek", {"shape": [1 << 27], "y": [1]}], "bytes of correction"),
    ([0, "squarek", {"shape": [4, 8], "y": [8, 1]}], "does not broadcast"),
    ([0, "mulb", {"x": [1 << 14, 1 << 14], "y": [1 << 14, 1]}], "bytes of correction"),
    ([0, "mulb", {"x": [4, 8], "y": [8, 1]}], "does not broadcast"),
    ([0, "kvmm", {"a": [1, 2, 1, 8], "row": [1, 2, 8], "parts": [[0, 4]], "rows": 5, "t": 1}], "rows must be 1..4"),
    ([0, "kvmm", {"a": [1, 2, 1, 8], "row": [1, 2, 8], "parts": [[0, 0]], "rows": 1, "t": 1}], "parts must be"),
    ([0, "kvmm", {"a": [1, 2, 1, 8], "row": [1, 2, 8], "parts": [[0, 4]] * 65, "rows": 1, "t": 1}], "parts must be"),
    ([0, "kvmm", {"a": [1, 2, 1, 8], "row": [1, 2, 8], "parts": [[-1, 4]], "rows": 1, "t": 1}], "parts must be"),
    ([0, "kvmm", {"a": [1, 2, 1, 8], "row": [1, 2, 8], "parts": [[0, 4]], "rows": 1, "t": 2}], "t 0 or 1"),
    ([0, "kvmm", {"a": [1, 2, 1, 7], "row": [1, 2, 8], "parts": [[0, 4]], "rows": 1, "t": 1}], "do not match"),
    ([0, "kvmm", {"a": [1, 2, 1], "row": [1, 2, 8], "parts": [[0, 4]], "rows": 1, "t": 1}], "needs a \\(B, h"),
    ([0, "kvmm", {"a": [1, 64, 2048, 64], "row": [1, 64, 64], "parts": [[0, 2048]], "rows": 2048, "t": 1}],
     "bytes of correction"),
    # a 2^31-element product output from inputs within the element bound
    ([0, "mulpriv", {"x": [1 << 16, 1 << 12], "w": [1 << 12, 1 << 15], "widx": 0}], "bytes of correction"),
])
def test_dealer_refuses_requests_beyond_its_limits_before_computing(request_, match):
    core = DealerCore(pairing_timeout=1)
    core.register("s", 0)
    core.register("s", 1)
    role = int(KINDS[request_[1]].receiver)
    with pytest.raises(DealerError, match=match):
        core.correction("s", role, request_)


def test_dealer_session_budgets():
    core = DealerCore(pairing_timeout=1, limits=DealerLimits(max_session_requests=3, max_session_bytes=1000))
    core.register("s", 0)
    core.register("s", 1)
    for i in range(3):
        core.correction("s", 1, [i, "mul", {"shape": [2]}])
    with pytest.raises(DealerError, match="had its 3 requests"):
        core.correction("s", 1, [3, "mul", {"shape": [2]}])
    core2 = DealerCore(pairing_timeout=1, limits=DealerLimits(max_session_bytes=100))
    core2.register("t", 0)
    core2.register("t", 1)
    core2.correction("t", 1, [0, "mul", {"shape": [12]}])  # 96 bytes
    with pytest.raises(DealerError, match="budget of 100 bytes"):
        core2.correction("t", 1, [1, "mul", {"shape": [1]}])



@pytest.mark.parametrize("bits", [64, 32])
def test_kept_weight_masks_change_no_correction(bits):
    """The dealer keeps a weight's mask between requests (``KeptMasks``): every answer equals the one
    computed from the seeds without it, the store stays within its bound (first come first kept),
    and a server that registers again (a new seed) gets corrections for its new masks."""
    mask = 8 * 6 * 8
    core = DealerCore(pairing_timeout=1, limits=DealerLimits(kept_mask_bytes=mask + 1))
    s0, s1 = core.register("s", 0), core.register("s", 1)
    extra = {"bits": bits} if bits != 64 else {}

    def ask(idx, widx):
        p = {"x": [2, 8], "w": [8, 6], "widx": widx, **extra}
        got = core.correction("s", 0, [idx, "mulpriv", p])
        assert torch.equal(got, compute_correction("mulpriv", idx, p, AesCtrPrg(s0), AesCtrPrg(s1))), (idx, widx)
        return got

    for i in range(4):
        ask(10 + i, 0)  # the first one keeps widx 0's mask, the others meet it
    assert core.masks.used == mask
    ask(20, 1)  # no room for widx 1: expanded, answered the same, not kept
    assert core.masks.used == mask
    core.unregister("s", 1)
    s1 = core.register("s", 1)  # the server comes back with a new seed
    ask(30, 0)
    core.unregister("s", 0)
    core.unregister("s", 1)
    assert core.masks.used == 0 and not core.masks._masks


def test_declared_correction_sizes_are_exact(sessions):
    """Every kind's ``cost`` (checked against the limits before computing) states its correction's
    size exactly, for every request of the honest run."""
    client, server, _ = sessions
    c, s = client.provider.prg.prg, server.provider.prg.prg
    for idx, kind, params in client.provider.plan:
        if KINDS[kind].receiver is None:
            continue
        corr = compute_correction(kind, idx, params, c, s)
        assert KINDS[kind].cost(params).corr_bytes == corr.numel() * corr.element_size(), (kind, params)


def test_a_kind_is_answered_to_its_receiver_only():
    core = DealerCore(pairing_timeout=1)
    core.register("s", 0)
    core.register("s", 1)
    for kind, k in KINDS.items():
        for role in (0, 1):
            if k.receiver is None or int(k.receiver) != role:
                with pytest.raises(DealerError, match="may not ask"):
                    core.correction("s", role, [10, kind, {"shape": [2]}])


def test_many_connections_are_refused_not_threaded():
    """The dealer serves at most ``max_connections`` links at once; more are told it is busy."""
    from cometpi.dealer import DealerClient, DealerServer
    from cometpi.transport import TcpChannel

    srv = DealerServer(limits=DealerLimits(max_connections=2, handshake_timeout=2.0)).start()
    try:
        held = [TcpChannel.connect(*srv.address, link="dealer", timeout=5) for _ in range(2)]
        threading.Event().wait(0.3)
        extra = DealerClient(TcpChannel.connect(*srv.address, link="dealer", timeout=5))
        with pytest.raises(DealerError, match="dealer busy"):
            extra.hello("x", Role.CLIENT, "h")
        # the silent links are cut at the handshake deadline, and the dealer serves again
        threading.Event().wait(2.5)
        ok = DealerClient(TcpChannel.connect(*srv.address, link="dealer", timeout=5))
        assert len(ok.hello("y", Role.CLIENT, "h")) == 16
        ok.close()
        for ch in held:
            ch.close()
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------------
# Malformed and out-of-order online messages
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server():
    """A tiny BERT classifier served by a thread (two workers) beside a dealer, and the plaintext
    logits of the approximations it serves on the test's tokens."""
    transformers = pytest.importorskip("transformers")
    from cometpi.convert import from_hf
    from cometpi.dealer import DealerServer
    from cometpi.nn import plaintext_forward
    from cometpi.serve import serve_forever
    from cometpi.service import ModelServer
    from cometpi.transport import listen

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=20, max_position_embeddings=16, num_labels=2)
    hf = transformers.BertForSequenceClassification._from_config(cfg, attn_implementation="eager").eval()
    arch, params = from_hf(hf)
    dealer = DealerServer().start()
    daddr = f"{dealer.address[0]}:{dealer.address[1]}"
    server = ModelServer((arch, params), {"guess": "constant"})
    sock = listen()
    port = sock.getsockname()[1]
    sock.close()
    stop = threading.Event()
    t = threading.Thread(target=serve_forever, args=(server.handle,), daemon=True,
                         kwargs=dict(host="127.0.0.1", port=port, dealer=daddr, config=server.config, timeout=10,
                                     extra=server.card, workers=2, stop_event=stop))
    t.start()
    ids = torch.tensor([[2, 7, 11, 3]])
    yield f"127.0.0.1:{port}", daddr, ids, plaintext_forward(arch, params, ids, torch.ones_like(ids), server.approx)
    stop.set()
    dealer.stop()


def _honest_logits(saddr, daddr, ids):
    from cometpi.service import PrivateClient

    with PrivateClient(saddr, daddr, timeout=30) as c:
        logits, _ = c.infer_ids(ids)
    return logits


@pytest.mark.parametrize("deviation", ["a frame of another protocol step", "a second query mid-inference",
                                       "a tensor of the wrong shape and type", "a truncated frame, then gone",
                                       "a query that is not JSON"])
def test_a_client_sending_malformed_online_messages_is_dropped_and_others_are_served(tiny_server, deviation):
    from cometpi.core import Config
    from cometpi.party import connect_client
    from cometpi.transport import TransportError

    saddr, daddr, ids, plain = tiny_server
    ulp = 2.0**-16
    assert float((_honest_logits(saddr, daddr, ids) - plain).abs().max()) < 64 * ulp
    sess = connect_client(saddr, daddr, Config(), timeout=10)
    query = {"op": "infer", "batch": 1, "length": 4, "hide_length": False, "mask": [[1, 1, 1, 1]]}
    try:
        if deviation == "a query that is not JSON":
            sess.peer.send(b"\xff{not json", "query")
        else:
            sess.peer.send_json(query, "query")
            if deviation == "a frame of another protocol step":
                sess.peer.send(torch.zeros(3, dtype=torch.int64), "bogus-step")
            elif deviation == "a second query mid-inference":
                sess.peer.send_json(query, "query")
            elif deviation == "a tensor of the wrong shape and type":
                sess.peer.send(torch.zeros(7, 5, dtype=torch.float64), "mulpriv-e")
            else:
                sess.peer._write(b"CP\x04\x01")  # the start of a header, then the link goes
        with pytest.raises(TransportError):  # the client gets a clean error (or the link closes), no hang
            for _ in range(10_000):
                sess.peer.recv(("weight-mask", "query", "stats"))
    finally:
        sess.close()
    # and the server serves the next client, right (each truncation rounds with the dealer's fresh masks,
    # so two private runs differ by a few ulp: compared with the plaintext model's logits instead)
    assert float((_honest_logits(saddr, daddr, ids) - plain).abs().max()) < 64 * ulp
