"""``cometpi bench nonlinear``: accuracy, bytes, rounds, seconds and sigma of every nonlinear method.

For every method at BERT-base shapes (SMU/GeLU on 128x3072, softmax on 12x128x128, LayerNorm on
128x768, rsqrt at its three call sites) it measures, through the secure path on two in-process
parties (memory channels, in-process dealer): online bytes, rounds and seconds, and the max abs/rel
error over the method's domain (the domain swept by the inputs themselves, on shares).  A dense
sweep on the fixed-point simulation adds the error-against-iterations curves.  Writes
bench/results/nonlinear.jsonl, nonlinear.md and PNG plots.  It measures; it asserts nothing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..approx import (
    FloatOps,
    RingOps,
    RsqrtSpec,
    ShareOps,
    crypten_softmax,
    gelu_erf,
    gelu_tanh,
    layernorm,
    quad2_softmax,
    quad_gelu,
    relu2_softmax,
    relu_softmax,
    rsqrt,
    smu,
)
from ..approx.newton import initial_guess, newton_step
from ..approx.segments import smu1_segments
from ..approx.sites import DOMAINS, SMU_MU, SOFTMAX_EPS, site_spec
from ..core import Config, Role
from ..party import run_local
from ..transport import NETWORKS, Traffic
from .ops import git_sha, write_results

SITE_SHAPES = {"smu": (128, 3072), "softmax_sum": (12, 128, 1), "layernorm_var": (128, 1)}
GUESSES = [("thermometer", {}), ("comet", {"sigma": 40}), ("comet", {"sigma": 20}), ("comet", {"sigma": 10}),
           ("constant", {}),
           ("crypten", {}), ("insecure_comet_small_flood", {"flood": 50.0}),
           ("insecure_comet_small_flood", {"flood": "2*hi"})]
GELU_RANGE = (-17.3, 25.0)  # GeLU inputs measured in MiniLM-L6 (bench/results/ranges.json)


def _kw(kw: dict, hi: float) -> dict:
    return {k: (2 * hi if v == "2*hi" else v) for k, v in kw.items()}


def sweep(lo, hi, shape, log=True):
    """Inputs covering [lo, hi] (both ends included), reshaped to ``shape``."""
    n = math.prod(shape)
    x = np.geomspace(lo, hi, n) if log else np.linspace(lo, hi, n)
    return torch.from_numpy(x).reshape(shape)


def secure(fn, x, *args, config=None):
    """Run fn(ops, [x], *args) on shares; returns (revealed float, online Traffic, seconds)."""

    def job(s):
        xs = s.share(x if s.is_client else None, owner=Role.CLIENT, shape=x.shape)
        before, t0 = s.meter.snapshot(), time.perf_counter()
        y = fn(ShareOps(s), xs, *args)
        dt = time.perf_counter() - t0
        after = s.meter.snapshot()
        on = sum((after[k] - before[k] for k in after if k[1] == "online"), Traffic())
        return s.reveal_float(y, Role.CLIENT), on, dt

    return run_local(job, config)[0]


def errors(y, ref):
    """Max abs error, and max relative error where |ref| >= 0.01 (tiny outputs make it meaningless)."""
    err = (y - ref).abs()
    big = ref.abs() >= 0.01
    rel = (err[big] / ref.abs()[big]) if bool(big.any()) else torch.zeros(1)
    return {"max_abs_err": float(err.max()), "max_rel_err": float(rel.max()),
            "p99_abs_err": float(err.flatten().quantile(0.99)) if err.numel() < 1 << 24 else None}


def record(op, method, shape, on: Traffic, seconds, errs, params, sha, **extra):
    n = math.prod(shape)
    total = on.payload_bytes + on.header_bytes_sent + on.header_bytes_recv
    return {"op": op, "method": method, "shape": list(shape), "params": params, "bytes_online": on.payload_bytes,
            "bytes_per_element": on.payload_bytes / n, "rounds": on.rounds, "seconds": seconds,
            "projected_seconds": {k: v.project(seconds, total, on.rounds) for k, v in NETWORKS.items()},
            **errs, "git_sha": sha, **extra}


# --------------------------------------------------------------------------------------------------


#: The reproduction domain: SMU z up to its measured p99.9 (29.8), where the prototype's F = 50 flood
#: is valid (x < F).  Only for showing the insecure mode's convergence; not a default.
REPRO_SITE = ("smu_p99.9_reproduction", (SMU_MU**2 * 0.999, 40.0))


def bench_rsqrt_sites(sha, quick: bool) -> list[dict]:
    rows = []
    for site, (lo, hi) in [*DOMAINS.items(), REPRO_SITE]:
        shape = SITE_SHAPES.get(site, (128, 3072)) if not quick else (64,)
        x = sweep(lo, hi, shape)
        xq = RingOps().output(RingOps().input(x))  # the inputs as the parties hold them (f = 16)
        for guess, kw in tqdm(GUESSES, desc=f"rsqrt@{site}", leave=False):
            kw = _kw(kw, hi)
            spec = RsqrtSpec(lo, hi, guess=guess, **kw)
            try:
                desc = spec.describe()
                spec.guess_scale(16)
            except (ValueError, OverflowError) as e:
                rows.append({"op": "rsqrt", "site": site, "method": guess, "params": {**kw, "domain": [lo, hi]},
                             "unusable": str(e), "git_sha": sha})
                continue
            y, on, dt = secure(rsqrt, x, spec)
            exact = errors(y, x.rsqrt())
            rows.append(record("rsqrt", guess, shape, on, dt, errors(y, xq.rsqrt()), desc, sha, site=site,
                               sigma=spec.security_bits(), iterations=spec.n_iterations(),
                               max_rel_err_vs_unencoded=exact["max_rel_err"]))
    return rows


GELU_DOMAINS = {"gelu_erf(crypten)": (-2, 2), "gelu_tanh(crypten)": (-12, 12)}


def bench_gelu(sha, quick: bool) -> list[dict]:
    """Over the measured GeLU input range; methods with a narrower documented domain also report their
    error on it.  Error is against each method's own float definition; distance to GeLU apart."""
    shape = (128, 3072) if not quick else (8, 64)
    x = sweep(*GELU_RANGE, shape, log=False)
    gelu = torch.nn.functional.gelu(x)
    rows = []
    cases = [
        # the default: mu folded into the weights in the model; here two public products stand in for the fold
        ("smu(segments)", lambda o, v: o.mul_const(smu1_segments(o, o.mul_const(v, 1 / SMU_MU)), SMU_MU),
         {"mu": SMU_MU, "form": "segments",
          "note": "two public products for x/mu and mu y (+32 B, +2 rounds) stand in for the weight fold"}),
        ("smu(thermometer)", lambda o, v: smu(o, v, SMU_MU, site_spec("smu", guess="thermometer")),
         {"mu": SMU_MU, "guess": "thermometer"}),
        ("smu(comet,sigma=40)", lambda o, v: smu(o, v, SMU_MU, site_spec("smu", guess="comet", sigma=40)),
         {"mu": SMU_MU, "guess": "comet", "sigma": 40}),
        ("smu(constant)", lambda o, v: smu(o, v, SMU_MU, site_spec("smu", guess="constant")),
         {"mu": SMU_MU, "guess": "constant"}),
        ("quad_gelu(mpcformer)", quad_gelu, {}),
        ("gelu_erf(crypten)", gelu_erf, {"terms": 8}),
        ("gelu_tanh(crypten)", gelu_tanh, {}),
    ]
    for name, fn, params in tqdm(cases, desc="gelu family", leave=False):
        y, on, dt = secure(fn, x)
        own = fn(FloatOps(), x) if not name.startswith("gelu_") else (
            gelu if "erf" in name else torch.nn.functional.gelu(x, approximate="tanh"))
        extra = {"domain": list(GELU_RANGE), "max_abs_diff_to_gelu": float((y - gelu).abs().max())}
        if name in GELU_DOMAINS:
            lo, hi = GELU_DOMAINS[name]
            inside = (x >= lo) & (x <= hi)
            extra["documented_domain"] = [lo, hi]
            extra["max_abs_err_documented_domain"] = float((y - own)[inside].abs().max())
        rows.append(record("gelu", name, shape, on, dt, errors(y, own), params, sha, **extra))
    return rows


def bench_softmax(sha, quick: bool) -> list[dict]:
    shape = (12, 128, 128) if not quick else (2, 8, 8)
    g = torch.from_numpy(np.random.default_rng(0).normal(0, 4, shape))  # scores, measured scale ~ +-40
    mask = torch.ones(shape[-1], dtype=torch.int64)
    mask[-shape[-1] // 8 :] = 0  # some padded keys
    spec = site_spec("softmax_sum", guess="constant")
    therm = site_spec("softmax_sum", guess="thermometer")
    cases = [
        ("relu_softmax(narrow,thermometer)", lambda o, v: relu_softmax(o, v, mask, therm, eps=SOFTMAX_EPS,
                                                                       relu="narrow"), {"guess": "thermometer"}),
        ("relu_softmax(smooth,thermometer)", lambda o, v: relu_softmax(o, v, mask, therm, eps=SOFTMAX_EPS),
         {"guess": "thermometer"}),
        ("relu_softmax(smooth,comet,sigma=40)", lambda o, v: relu_softmax(o, v, mask, site_spec(
            "softmax_sum", guess="comet", sigma=40), eps=SOFTMAX_EPS), {"guess": "comet", "sigma": 40}),
        ("relu_softmax(smooth,constant)", lambda o, v: relu_softmax(o, v, mask, spec, eps=SOFTMAX_EPS),
         {"guess": "constant"}),
        ("relu2_softmax(exact relu)", lambda o, v: relu2_softmax(o, v, mask, spec, eps=SOFTMAX_EPS), {}),
        ("quad2_softmax(mpcformer)", lambda o, v: quad2_softmax(o, v, mask), {"c": 5}),
        ("softmax(crypten)", lambda o, v: crypten_softmax(o, v, mask), {}),
    ]
    rows = []
    for name, fn, params in tqdm(cases, desc="softmax family", leave=False):
        y, on, dt = secure(fn, g)
        rows.append(record("softmax", name, shape, on, dt, errors(y, fn(FloatOps(), g)), params, sha))
    return rows


def bench_layernorm(sha, quick: bool) -> list[dict]:
    shape = (128, 768) if not quick else (8, 64)
    rng = np.random.default_rng(1)
    scale = torch.from_numpy(np.geomspace(0.06, 11, shape[0]))[:, None]  # row variances across the domain
    x = torch.from_numpy(rng.normal(0, 1, shape)) * scale + 0.3
    ref = torch.nn.functional.layer_norm(x, (shape[-1],), eps=1e-12)
    rows = []
    for guess, kw in [("comet", {"sigma": 40}), ("constant", {})]:
        spec = site_spec("layernorm_var", guess=guess, **kw)
        y, on, dt = secure(layernorm, x, spec)
        rows.append(record("layernorm", guess, shape, on, dt, errors(y, ref), spec.describe(), sha))
    return rows


def error_vs_iterations(site: str = "smu", max_iter: int = 70, domain=None) -> dict:
    """Max relative error of rsqrt after k Newton steps, per guess strategy (ring simulation);
    strategies that diverge on the domain are left out (their rows say why)."""
    lo, hi = domain or DOMAINS[site]
    ops = RingOps()
    x = sweep(lo, hi, (4000,))
    xe, ref = ops.input(x), x.rsqrt()
    curves = {}
    for guess, kw in GUESSES:
        kw = _kw(kw, hi)
        spec = RsqrtSpec(lo, hi, guess=guess, **kw)
        try:
            m = spec.guess_scale(16)
            spec.n_iterations()
        except (ValueError, OverflowError):
            continue
        y, errs = initial_guess(ops, xe, spec, m), []
        for _ in range(max_iter + 1):
            yy = ops.output(ops.scale_pow2(y, m) if m else y)
            errs.append(float(((yy - ref) / ref).abs().max()))
            y = newton_step(ops, xe, y, spec.form, m)
        label = guess + (f" sigma={kw['sigma']}" if "sigma" in kw else "")
        label += f" F={kw['flood']:g}" if "flood" in kw else ""
        curves[label] = errs
    return {"site": site, "domain": [lo, hi], "curves": curves}


def plots(out_dir: Path, panels: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), sharey=True)
    for ax, curves in zip(np.atleast_1d(axes), panels, strict=True):
        for label, errs in curves["curves"].items():
            ax.semilogy(range(len(errs)), np.clip(errs, 1e-6, 10), label=label)
        ax.axhline(1e-3, color="k", ls=":", lw=1, label="target 1e-3")
        ax.set_xlabel("Newton iterations")
        ax.set_title(f"{curves['site']}: x in [{curves['domain'][0]:.3g}, {curves['domain'][1]:g}] (f = 16)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("max relative error of rsqrt over the domain")
    fig.tight_layout()
    p = out_dir / "nonlinear_error_vs_iterations.png"
    fig.savefig(p, dpi=110)
    files.append(str(p))
    plt.close(fig)

    x = torch.linspace(-5, 3, 801, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, torch.nn.functional.gelu(x), "k", lw=2.5, label="GeLU (exact)")
    for mu in (SMU_MU, 1 / math.sqrt(2)):
        ax.plot(x, (x + torch.sqrt(x * x + mu * mu)) / 2, label=f"SMU sqrt form, mu = {mu:.3f}")
    ax.plot(x, (x + x * torch.erf(x / math.sqrt(2))) / 2, "--", label="SMU erf form, alpha=0, mu=1/sqrt(2) (= GeLU)")
    ax.plot(x, 0.125 * x * x + 0.25 * x + 0.5, ":", label="MPCFormer Quad")
    ax.set_ylim(-1, 3)
    ax.set_xlabel("x")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("SMU against GeLU")
    fig.tight_layout()
    p = out_dir / "smu_vs_gelu.png"
    fig.savefig(p, dpi=120)
    files.append(str(p))
    plt.close(fig)
    return files


def markdown(rows: list[dict]) -> str:
    out = ["| op | method | site / shape | sigma | iters | B/element | rounds | seconds | WAN s | max abs err | "
           "max rel err |", "|" + "---|" * 11]
    for r in rows:
        if "unusable" in r:
            out.append(f"| {r['op']} | {r['method']} | {r.get('site', '')} | – | – | – | – | – | – | unusable: "
                       f"{r['unusable'][:80]} | |")
            continue
        sig = r.get("sigma", r["params"].get("sigma") if isinstance(r["params"], dict) else None)
        it = r.get("iterations", r["params"].get("iterations") if isinstance(r["params"], dict) else None)
        shape = "×".join(map(str, r["shape"]))
        where = f"{r['site']} ({shape})" if "site" in r else shape
        out.append(f"| {r['op']} | {r['method']} | {where} | {'–' if sig is None else f'{sig:.0f}'} | "
                   f"{'–' if it is None else it} | {r['bytes_per_element']:,.1f} | {r['rounds']} | "
                   f"{r['seconds']:.2f} | "
                   f"{r['projected_seconds']['wan']:.2f} | {r['max_abs_err']:.2e} | {r['max_rel_err']:.2e} |")
    return "\n".join(out)


def add_arguments(p) -> None:
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    p.add_argument("--out", default="bench/results/nonlinear.jsonl")


def main(args) -> int:
    sha = git_sha()
    out = Path(args.out)
    rows = []
    for part in (bench_rsqrt_sites, bench_gelu, bench_softmax, bench_layernorm):
        rows += part(sha, args.quick)
    panels = [error_vs_iterations(), error_vs_iterations(REPRO_SITE[0], 50, REPRO_SITE[1])]
    rows += [{"op": "rsqrt_error_vs_iterations", **c, "git_sha": sha} for c in panels]
    cfg = Config()
    for r in rows:
        r.setdefault("config_hash", cfg.hash())
        r.setdefault("f", cfg.frac_bits)
        r.setdefault("trunc", cfg.trunc.value)
    md = markdown([r for r in rows if r["op"] != "rsqrt_error_vs_iterations"])
    write_results(out, rows, md)
    files = plots(out.parent, panels)
    print(md)
    print(f"\nwrote {out}, {out.with_suffix('.md')}, " + ", ".join(files))
    return 0
