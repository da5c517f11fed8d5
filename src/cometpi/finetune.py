"""Fine-tune a BERT classifier for the nonlinearities the secure path computes.

The model is trained through the same ``nn.forward`` that runs on shares, on float32 tensors with
autograd (``FloatModel(ideal=True)``: rsqrt is exact, so the network learns Comet's SMU and ReLU
normalisation themselves; the protocol approximates those to the rsqrt target, 1e-3).  Variants:

* ``exact``     -- GeLU, softmax, tanh (the original model; the KD teacher);
* ``comet``     -- SMU with a trainable mu per FFN channel + ReLU-softmax (Comet, §3 of the paper);
* ``mpcformer`` -- Quad GeLU + 2Quad softmax (MPCFormer's baseline).

``kd``: knowledge distillation from the exact fine-tuned model (its logits, soft targets at
temperature T, mixed with the labels by ``kd_alpha``).  Approximate variants start from the
teacher's weights when one is given (MPCFormer does the same), else from the pretrained model.

Training randomness (classifier init, data order) is seeded and reproducible; it is not protocol
randomness (that comes from AES-CTR, see ``cometpi.ring``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checkpoint
from .approx.sites import SMU_MU
from .convert import from_hf
from .nn import PER_CHANNEL, ApproxConfig, FloatModel, forward, prepare_params, trained_smu_lo

VARIANTS = ("exact", "comet", "comet-rsqrt", "mpcformer")
MU_MIN, MU_MAX = 0.1, 8.0  # trained mu is kept here: SMU's rsqrt domain starts at min mu^2


def variant_config(variant: str, smu_lo: float | None = None) -> ApproxConfig:
    """The ApproxConfig a variant is trained for (and served with)."""
    if variant == "exact":
        return ApproxConfig.exact()
    if variant == "comet":  # SMU by segments: mu is folded into the weights, no public smu_lo
        return ApproxConfig(gelu="smu", softmax="relu", smu_mu=PER_CHANNEL, smu_lo=smu_lo)
    if variant == "comet-rsqrt":  # Comet's own constructions (SMU by rsqrt, the smooth ReLU), as before issue 11
        return ApproxConfig(gelu="smu", softmax="relu", smu_mu=PER_CHANNEL, smu_form="rsqrt", relu="smooth",
                            smu_lo=smu_lo or MU_MIN**2 * 0.999)
    if variant == "mpcformer":
        return ApproxConfig(gelu="quad", softmax="quad2", guess="constant")
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


@dataclass
class FinetuneConfig:
    variant: str = "comet"
    kd: bool = False
    teacher: str | None = None  # exact fine-tuned checkpoint: the KD teacher and the starting point
    epochs: float = 1.0
    batch_size: int = 32
    lr: float = 5e-5
    mu_lr: float = 1e-2
    head_lr: float = 1e-3  # a freshly initialised classifier learns faster
    max_length: int = 64
    train_limit: int | None = None  # use the first N training rows (in the seeded order)
    kd_alpha: float = 0.5  # weight of the soft targets
    kd_temperature: float = 2.0
    seed: int = 0
    freeze_embeddings: bool = True  # the 30522 x d word table: 11.7 M parameters barely move in an epoch

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown variant {self.variant!r}; choose from {VARIANTS}")
        if self.kd and not self.teacher:
            raise ValueError("--kd needs --teacher (an exact fine-tuned checkpoint)")
        if self.kd and self.variant == "exact":
            raise ValueError("the exact variant is the teacher; KD applies to comet and mpcformer")
        if self.epochs <= 0 or self.batch_size <= 0 or self.max_length < 8:
            raise ValueError("epochs and batch size must be positive, max length >= 8")


def check_teacher(path: str) -> None:
    """Refuse a ``--teacher`` that is no checkpoint, or one fine-tuned for Comet's (or any) replacements:
    distillation needs the exact model's logits, and a student starting from approximate weights would
    learn them twice over."""
    d = Path(path)
    if not d.is_dir():
        raise ValueError(f"--teacher {path}: no checkpoint exists at {path} (give the directory written by "
                         "`cometpi finetune --variant exact --out DIR`)")
    if not (d / "config.json").is_file():
        raise ValueError(f"--teacher {path}: no checkpoint exists at {path} (the directory has no config.json)")
    meta = checkpoint.read_meta(d)
    approx = checkpoint.approx_of(meta)
    if approx is not None and not approx.is_exact:
        raise ValueError(f"--teacher {path}: this checkpoint was fine-tuned for the replacements gelu={approx.gelu} "
                         f"softmax={approx.softmax} (variant {meta.get('variant', '?')}); the KD teacher must be the "
                         "exact model: fine-tune one with `cometpi finetune --variant exact --out DIR` and pass DIR")


def _order(n: int, seed: int, epoch: int) -> list[int]:
    """A seeded permutation (hash ranks, like ``data.split``): the same on every machine."""
    return sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{epoch}:{i}".encode()).digest())


def batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled batches of similar lengths (less padding): chunks of 50 batches sorted by length."""
    order = _order(len(lengths), seed, epoch)
    chunk = batch_size * 50
    out = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c : c + chunk], key=lambda i: lengths[i])
        out += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    return [out[i] for i in _order(len(out), seed, -1 - epoch)]


def collate(enc: dict, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask) for the rows ``idx`` of a tokenizer's unpadded output."""
    rows = [enc["input_ids"][i] for i in idx]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.int64)
    mask = torch.zeros(len(rows), T, dtype=torch.int64)
    for j, r in enumerate(rows):
        ids[j, : len(r)] = torch.tensor(r)
        mask[j, : len(r)] = 1
    return ids, mask


def logits_of(arch, params: dict, cfg: ApproxConfig, ids, mask, *, ideal: bool, dtype=torch.float32):
    """Logits of the float model (differentiable when params require grad)."""
    ops = FloatModel(prepare_params(arch, params, cfg), dtype, ideal=ideal)
    B, T = ids.shape
    return forward(ops, arch, cfg, batch=B, length=T, input_ids=ids, attention_mask=mask)


@torch.no_grad()
def predict(arch, params, cfg: ApproxConfig, enc: dict, *, ideal: bool, batch_size: int = 64,
            dtype=torch.float32, desc: str | None = None) -> torch.Tensor:
    """Logits (N, labels) for every row of ``enc``, in order."""
    n = len(enc["input_ids"])
    lengths = [len(r) for r in enc["input_ids"]]
    order = sorted(range(n), key=lambda i: lengths[i])
    out = torch.zeros(n, arch.num_labels, dtype=torch.float64)
    p = {k: v.detach().to(dtype) for k, v in params.items()}
    for s in tqdm(range(0, n, batch_size), desc=desc, disable=desc is None, unit="batch", leave=False):
        idx = order[s : s + batch_size]
        ids, mask = collate(enc, idx)
        out[idx] = logits_of(arch, p, cfg, ids, mask, ideal=ideal, dtype=dtype).to(torch.float64)
    return out


def _base_model(model_dir: str, labels: list[str], seed: int):
    """The HF classifier to start from: a checkpoint with a head as is, or a bare BertModel (e.g. the
    bundled MiniLM) with a new pooler-based classifier (seeded init)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type != "bert":
        raise ValueError(f"finetune supports BERT checkpoints (got model_type {config.model_type!r})")
    id2label = dict(enumerate(labels))
    kw = {"num_labels": len(labels), "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}
    return transformers.BertForSequenceClassification.from_pretrained(
        model_dir, local_files_only=True, attn_implementation="eager", ignore_mismatched_sizes=False,
        use_safetensors=True, **kw)


def finetune(cfg: FinetuneConfig, train_rows, dev_rows, out_dir: str, *, base: str, labels: list[str],
             tokenizer, data_name: str, log=print) -> dict:
    """Train, evaluate on dev, save the checkpoint; returns its metadata (also in cometpi.json)."""
    import transformers

    transformers.logging.set_verbosity_error()  # "newly initialized classifier" is expected here
    if cfg.teacher:
        check_teacher(cfg.teacher)
    start_dir = cfg.teacher or base
    hf = _base_model(start_dir, labels, cfg.seed)
    arch, params64 = from_hf(hf)
    params = {k: v.to(torch.float32) for k, v in params64.items()}
    if cfg.variant.startswith("comet"):
        for i in range(arch.layers):
            params[f"layers.{i}.ffn.smu_mu"] = torch.full((arch.ffn,), SMU_MU)
    frozen = {"embeddings.word"} if cfg.freeze_embeddings else set()
    for k, v in params.items():
        v.requires_grad_(k not in frozen)
    groups = [
        {"params": [v for k, v in params.items() if k.startswith(("classifier", "pooler"))], "lr": cfg.head_lr},
        {"params": [v for k, v in params.items() if k.endswith("smu_mu")], "lr": cfg.mu_lr, "weight_decay": 0.0},
        {"params": [v for k, v in params.items() if v.requires_grad and not k.startswith(("classifier", "pooler"))
                    and not k.endswith("smu_mu")], "lr": cfg.lr},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.01)
    approx = variant_config(cfg.variant)

    if cfg.train_limit:
        train_rows = [train_rows[i] for i in _order(len(train_rows), cfg.seed, -100)[: cfg.train_limit]]
    texts = [t for t, _ in train_rows]
    y = torch.tensor([lab for _, lab in train_rows])
    enc = tokenizer(texts, truncation=True, max_length=cfg.max_length)
    dev_enc = tokenizer([t for t, _ in dev_rows], truncation=True, max_length=cfg.max_length)
    dev_y = torch.tensor([lab for _, lab in dev_rows])
    lengths = [len(r) for r in enc["input_ids"]]

    teacher_logits = None
    if cfg.kd:
        t_arch, t_params, _ = checkpoint.load(cfg.teacher)
        teacher_logits = predict(t_arch, t_params, ApproxConfig.exact(), enc, ideal=True,
                                 desc="teacher logits (KD)").to(torch.float32)

    n_epochs = math.ceil(cfg.epochs)
    plan = [batches(lengths, cfg.batch_size, cfg.seed, e) for e in range(n_epochs)]
    steps = [b for e in plan for b in e][: max(1, round(cfg.epochs * len(plan[0])))]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, len(steps) // 10)) * max(0.0, 1 - s / len(steps)))
    t0 = time.perf_counter()
    bar = tqdm(steps, desc=f"finetune {cfg.variant}{'+kd' if cfg.kd else ''}", unit="batch")
    ema_loss, ema_acc, losses = None, None, []
    for idx in bar:
        ids, mask = collate(enc, idx)
        logits = logits_of(arch, params, approx, ids, mask, ideal=True)
        loss = F.cross_entropy(logits, y[idx])
        if teacher_logits is not None:
            tau = cfg.kd_temperature
            soft = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(teacher_logits[idx] / tau, -1),
                            log_target=True, reduction="batchmean") * tau * tau
            loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * soft
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([v for v in params.values() if v.requires_grad], 1.0)
        opt.step()
        sched.step()
        if cfg.variant.startswith("comet"):
            with torch.no_grad():
                for i in range(arch.layers):
                    params[f"layers.{i}.ffn.smu_mu"].abs_().clamp_(MU_MIN, MU_MAX)
        acc = float((logits.argmax(-1) == y[idx]).float().mean())
        losses.append(loss.item())
        ema_loss = losses[-1] if ema_loss is None else 0.95 * ema_loss + 0.05 * losses[-1]
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}")
    seconds = time.perf_counter() - t0

    dev_logits = predict(arch, params, approx, dev_enc, ideal=True, desc="dev")
    dev_acc = float((dev_logits.argmax(-1) == dev_y).float().mean())
    smu_lo = None  # SMU by segments needs none (ModelServer derives it from mu for --smu-form rsqrt)
    if cfg.variant == "comet-rsqrt":  # SMU's rsqrt domain starts at the smallest trained mu^2
        smu_lo = trained_smu_lo(params, arch.layers)
    meta = {
        "variant": cfg.variant, "kd": cfg.kd, "approx": variant_config(cfg.variant, smu_lo).to_dict(),
        "data": data_name, "train_rows": len(train_rows), "dev_rows": len(dev_rows), "dev_accuracy": dev_acc,
        "train_seconds": round(seconds, 1), "steps": len(steps), "loss_first_tenth": _mean_loss(losses, first=True),
        "loss_last_tenth": _mean_loss(losses, first=False), "threads": torch.get_num_threads(),
        "base": None if cfg.teacher else Path(base).name, "teacher": Path(cfg.teacher).name if cfg.teacher else None,
        "config": dataclasses.asdict(cfg), "labels": labels,
    }
    checkpoint.save(out_dir, hf, tokenizer, params, arch, meta)
    log(f"saved {out_dir}: dev accuracy {dev_acc:.4f} ({len(dev_rows)} rows), trained {seconds:.0f} s")
    return meta


def _mean_loss(losses: list[float], first: bool) -> float:
    k = max(1, len(losses) // 10)
    part = losses[:k] if first else losses[-k:]
    return round(sum(part) / len(part), 4)


def load_dataset(data: str, text_col: str = "text", label_col: str = "label", seed: int = 0):
    """``(train, dev, test, labels, name)``: ``rt`` (Rotten Tomatoes, rotten/fresh) or a CSV/JSONL
    file, split 80/10/10 by ``data.split`` (seeded); string labels become ids in sorted order."""
    from . import data as D

    if data == "rt":
        rows, labels, name = D.rotten_tomatoes(), ["rotten", "fresh"], "rotten_tomatoes"
    else:
        rows, name = D.load_table(data, text_col, label_col), Path(data).name
        values = sorted({lab for _, lab in rows}, key=lambda v: (isinstance(v, str), v))
        if len(values) < 2:
            raise ValueError(f"{data}: column {label_col!r} has {len(values)} distinct label(s); need at least 2")
        ids = {v: i for i, v in enumerate(values)}
        labels = [str(v) for v in values]
        rows = [(t, ids[lab]) for t, lab in rows]
    train, dev, test = D.split(rows, seed=seed)
    return train, dev, test, labels, name
