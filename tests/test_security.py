"""Security checks (docs/SECURITY.md): what a party receives does not depend on the other party's
secret, the flood's leakage matches its sigma, protocol randomness comes only from the CSPRNG, and
nothing unpickles.

The statistical tests use fixed thresholds far in the tail (a correct implementation fails them
with probability below ~1e-6); a leak of plaintext onto the wire fails them by orders of magnitude.
"""

import ast
import math
import re
from pathlib import Path

import pytest
import torch

from cometpi import protocols as P
from cometpi.approx.backends import flood_share
from cometpi.approx.sites import site_spec
from cometpi.convert import from_hf
from cometpi.core import Role
from cometpi.nn import ApproxConfig, secure_forward
from cometpi.party import run_local
from cometpi.ring import FixedPoint

from .test_convert import _tiny

SRC = Path(__file__).parents[1] / "src" / "cometpi"
# Modules that produce or handle protocol randomness, shares or wire data.
PROTOCOL_MODULES = ["ring.py", "transport.py", "core.py", "dealer.py", "protocols/__init__.py", "protocols/arith.py",
                    "protocols/linear.py", "protocols/compare.py", "protocols/material.py", "party.py", "nn.py",
                    "service.py", "serve.py", "checkpoint.py", "approx/backends.py", "approx/newton.py",
                    "approx/guess.py", "approx/functions.py", "approx/sites.py", "approx/segments.py",
                    "approx/splines.py"]
RUNS = 4
# the constant guess keeps this fast; Comet's flood is the documented leak, measured by its own test below
CFG = ApproxConfig(guess="constant")


def _record(s, dtypes, got: list) -> None:
    """Append every tensor of ``dtypes`` that session ``s`` receives to ``got`` (as flat int64)."""
    recv = s.peer.recv

    def recording(*a, **kw):
        out = recv(*a, **kw)
        if isinstance(out, torch.Tensor) and out.dtype in dtypes:
            got.append(out.reshape(-1).to(torch.int64).clone())
        return out

    s.peer.recv = recording


def _received(role: Role, ids, params, arch, cfg=CFG, dtypes=(torch.int64,)) -> list[torch.Tensor]:
    """Every tensor of ``dtypes`` ``role`` receives from its peer during one private inference (as
    int64: the narrow comparison opens int32 values, bit openings travel as packed uint8)."""
    got: list[torch.Tensor] = []

    def job(s):
        if s.role == role:
            _record(s, dtypes, got)
        kw = dict(shape=tuple(ids.shape), attention_mask=torch.ones_like(ids))
        if s.is_client:
            return secure_forward(s, arch, cfg, input_ids=ids, **kw)
        return secure_forward(s, arch, cfg, params=params, **kw)

    run_local(job)
    return got


def _byte_histograms(views: list[list[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Histograms (256 bins) of the low and the high byte of every received ring element."""
    flat = torch.cat([t for v in views for t in v])
    low = torch.bincount((flat & 0xFF).to(torch.int64), minlength=256)
    high = torch.bincount(((flat >> 56) & 0xFF).to(torch.int64), minlength=256)
    return low.double(), high.double()


def _chi2_two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, int]:
    """Chi-square statistic of homogeneity of two histograms and its degrees of freedom."""
    keep = (a + b) > 0
    a, b = a[keep], b[keep]
    na, nb = a.sum(), b.sum()
    ea, eb = (a + b) * na / (na + nb), (a + b) * nb / (na + nb)
    return float(((a - ea) ** 2 / ea + (b - eb) ** 2 / eb).sum()), int(keep.sum()) - 1


def _chi2_limit(dof: int) -> float:
    """About the 1 - 1e-6 quantile of chi-square(dof) (Wilson-Hilferty, z = 4.75)."""
    z = 4.75
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _assert_same_distribution(views_a, views_b):
    la, ha = _byte_histograms(views_a)
    lb, hb = _byte_histograms(views_b)
    for name, x, y in (("low byte", la, lb), ("high byte", ha, hb)):
        stat, dof = _chi2_two_sample(x, y)
        assert stat < _chi2_limit(dof), f"{name}: chi2 {stat:.0f} on {dof} dof"


@pytest.fixture(scope="module")
def model():
    return from_hf(_tiny("BertForSequenceClassification", seed=11, num_hidden_layers=1))


def test_server_view_is_independent_of_the_text(model):
    arch, params = model
    a = torch.full((1, 6), 5, dtype=torch.int64)  # one token repeated
    b = torch.tensor([[2, 97, 13, 61, 88, 40]])  # all different
    views_a = [_received(Role.SERVER, a, params, arch) for _ in range(RUNS)]
    views_b = [_received(Role.SERVER, b, params, arch) for _ in range(RUNS)]
    assert sum(t.numel() for t in views_a[0]) > 10_000
    _assert_same_distribution(views_a, views_b)
    # the check has power: one activation-sized tensor in the clear (the one-hot text repeated: 20k ring
    # elements) among everything the server receives fails it
    leak = FixedPoint(16).encode(torch.nn.functional.one_hot(b, arch.vocab).double()).reshape(-1).repeat(34)
    with pytest.raises(AssertionError):
        _assert_same_distribution(views_a, views_b + [[leak]])


def test_server_view_with_the_thermometer_guess_is_independent_of_the_text(model):
    """The default configuration (the thermometer guess, SMU by segments, the narrow ReLU) with its narrow
    comparisons (int32 openings modulo 2^(k+1), packed AND and b2a bits) included: the server's view for
    two different texts has the same distribution."""
    arch, params = model
    cfg = ApproxConfig(guess="thermometer")
    dtypes = (torch.int64, torch.int32, torch.uint8)
    a = torch.full((1, 6), 5, dtype=torch.int64)
    b = torch.tensor([[2, 97, 13, 61, 88, 40]])
    views_a = [_received(Role.SERVER, a, params, arch, cfg, dtypes) for _ in range(RUNS)]
    views_b = [_received(Role.SERVER, b, params, arch, cfg, dtypes) for _ in range(RUNS)]
    assert sum(t.numel() for v in views_a for t in v if t.numel()) > 10_000
    _assert_same_distribution(views_a, views_b)


def test_client_view_is_independent_of_the_weights(model):
    """Every message the client receives (ring values, the narrow comparisons' int32 openings, packed AND and
    b2a bits of SMU's segments and the narrow ReLU), for two different sets of weights."""
    arch, params = model
    other = {k: (-3 * v if v.dtype.is_floating_point else v) for k, v in params.items()}
    ids = torch.tensor([[2, 97, 13, 61, 88, 40]])
    dtypes = (torch.int64, torch.int32, torch.uint8)
    views_a = [_received(Role.CLIENT, ids, params, arch, CFG, dtypes) for _ in range(RUNS)]
    views_b = [_received(Role.CLIENT, ids, other, arch, CFG, dtypes) for _ in range(RUNS)]
    _assert_same_distribution(views_a, views_b)


def test_flood_leakage_matches_sigma():
    """The server's flooded share x - R, R ~ U[F, 2F): for x in [lo, hi] its distributions differ by a
    total-variation distance of (x_b - x_a)/F <= hi/F = 2^-sigma.  Measured from 40,000 samples each."""
    fp = FixedPoint(16)
    lo, hi, n = 1.0, 9.0, 40_000

    def server_shares(x: float, flood: float) -> torch.Tensor:
        def job(s):
            xs = s.share(torch.full((n,), x, dtype=torch.float64) if s.is_client else None, owner=Role.CLIENT,
                         shape=(n,))
            r = flood_share((n,), flood, fp) if s.is_client else None
            return P.reshare(xs, r).data

        return fp.decode(run_local(job)[1])

    for sigma in (3.0, 40.0):
        F = hi * 2**sigma
        a, b = server_shares(lo, F), server_shares(hi, F)
        edges = torch.linspace(float(torch.minimum(a.min(), b.min())), float(torch.maximum(a.max(), b.max())), 65,
                               dtype=torch.float64)
        pa = torch.histogram(a, edges).hist / n
        pb = torch.histogram(b, edges).hist / n
        tv = 0.5 * float((pa - pb).abs().sum())
        expected = (hi - lo) / F
        noise = 0.5 * math.sqrt(64 / n) * 2  # generous: sampling noise of a 64-bin TV estimate
        assert tv <= 2**-sigma + noise, (sigma, tv)
        assert abs(tv - expected) < noise, (sigma, tv, expected)
    # every flooded call site reports its sigma
    for site in ("smu", "softmax_sum", "layernorm_var"):
        assert site_spec(site, guess="comet", sigma=40).describe()["sigma"] == pytest.approx(40)
        assert site_spec(site, guess="constant").describe()["sigma"] is None


def _calls(tree: ast.AST) -> set[str]:
    """Dotted names used in the module (attributes and imports)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                names.add(".".join([cur.id, *reversed(parts)]))
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


FORBIDDEN = re.compile(r"^(random(\.|$)|numpy\.random|np\.random|torch\.(rand|randn|randint|randperm|manual_seed|"
                       r"Generator|normal|bernoulli|multinomial)\b|secrets\.(randbelow|choice))")


def test_protocol_randomness_is_csprng_only():
    bad = {}
    for rel in PROTOCOL_MODULES:
        names = _calls(ast.parse((SRC / rel).read_text()))
        hits = sorted(n for n in names if FORBIDDEN.search(n))
        if hits:
            bad[rel] = hits
    assert not bad, f"non-CSPRNG randomness in protocol modules: {bad}"
    ring = _calls(ast.parse((SRC / "ring.py").read_text()))
    assert "secrets.token_bytes" in ring and any("Cipher" in n or "algorithms.AES" in n for n in ring)


def test_no_pickle_anywhere():
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        names = _calls(ast.parse(text))
        if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "marshal") for n in names) or "torch.load" in names \
                or re.search(r"allow_pickle\s*=\s*True", text):
            offenders.append(str(path.relative_to(SRC)))
    assert not offenders, offenders


def _generation_view(arch, cfg, prepared, ids, **gen):
    """(what the server receives, the client's tokens) over one private fixed-length generation;
    ``gen``: ``secure_generate`` keywords, (client value, server value) pairs for those that differ."""
    from cometpi.nn import ShareModel, secure_generate

    got: list[torch.Tensor] = []

    def job(s):
        if s.role == Role.SERVER:
            _record(s, (torch.int64, torch.int32, torch.uint8), got)
        model = ShareModel(s, arch, prepared if not s.is_client else None)
        kw = {k: v[0] if s.is_client else v[1] for k, v in gen.items()}
        return list(secure_generate(s, arch, cfg, model=model, prompt_ids=ids if s.is_client else None,
                                    prompt_length=ids.shape[1], fixed_length=True, **kw))

    return got, run_local(job)[0]


def test_server_view_while_decoding_is_independent_of_the_text():
    """Private generation (issue 13) on a tiny Llama with the original functions: the prefill and every
    decoding step over the KV cache in shares, fixed length (no stop flags).  The server's view for two
    different prompts, hence two different generated texts, has the same distribution."""
    from cometpi.nn import prepare_params

    arch, params = from_hf(_tiny("LlamaForCausalLM", seed=16, num_hidden_layers=1))
    cfg = ApproxConfig.original()
    prepared = prepare_params(arch, params, cfg)
    a, b = torch.full((1, 4), 5, dtype=torch.int64), torch.tensor([[2, 97, 13, 61]])
    runs_a = [_generation_view(arch, cfg, prepared, a, max_new=(3, 3)) for _ in range(RUNS)]
    runs_b = [_generation_view(arch, cfg, prepared, b, max_new=(3, 3)) for _ in range(RUNS)]
    assert runs_a[0][1] != runs_b[0][1]  # the texts differ
    views_a, views_b = [v for v, _ in runs_a], [v for v, _ in runs_b]
    assert sum(t.numel() for v in views_a for t in v if t.numel()) > 10_000
    _assert_same_distribution(views_a, views_b)


def test_server_view_while_sampling_is_independent_of_k_and_t():
    """Top-k sampling (issue 13): k enters as a value the client adds to its own share and t scales the
    client's own noise, so the server's view for (k, t) = (1, 0.5) and (20, 2.0) has one distribution."""
    from cometpi.nn import prepare_params

    arch, params = from_hf(_tiny("LlamaForCausalLM", seed=16, num_hidden_layers=1))
    cfg = ApproxConfig.original()
    prepared = prepare_params(arch, params, cfg)
    ids = torch.tensor([[2, 97, 13, 61]])

    def view(k, t):
        return _generation_view(arch, cfg, prepared, ids, max_new=(2, 2), top_k=(k, True),
                                temperature=(t, 0.0))[0]

    views_a = [view(1, 0.5) for _ in range(RUNS)]
    views_b = [view(20, 2.0) for _ in range(RUNS)]
    assert sum(t.numel() for v in views_a for t in v if t.numel()) > 10_000
    _assert_same_distribution(views_a, views_b)
