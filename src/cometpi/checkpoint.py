"""Fine-tuned checkpoints: a Hugging Face directory plus cometpi's sidecar files.

A directory written by ``cometpi finetune`` is an ordinary HF checkpoint (``config.json`` with the
label names, ``model.safetensors``, the tokenizer files), so ``transformers`` loads it too, plus:

* ``cometpi.json`` -- the approximations the model was trained for (an ``ApproxConfig``, which
  ``cometpi serve`` uses unless flags override it), how it was trained, and its dev accuracy;
* ``smu_mu.safetensors`` -- Comet's trained per-channel SMU mu (``layers.{i}.ffn.smu_mu``), which HF
  has no key for.  It is a server weight like any other: the server adds mu^2 to its share locally.

Directories are written to a temporary sibling and renamed, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .approx.config import ApproxConfig
from .convert import Arch, from_hf

META_FILE = "cometpi.json"
MU_FILE = "smu_mu.safetensors"


def load(model_dir: str | Path) -> tuple[Arch, dict[str, torch.Tensor], dict]:
    """``(arch, float64 params incl. trained mu, meta)`` of a checkpoint directory; meta is {} for a
    plain HF checkpoint.  Raises ValueError naming the file if a sidecar is malformed."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    arch, params = from_hf(model_dir)
    meta = read_meta(model_dir)
    mu_path = model_dir / MU_FILE
    if mu_path.is_file():
        mus = load_file(str(mu_path))
        want = {f"layers.{i}.ffn.smu_mu" for i in range(arch.layers)}
        if set(mus) != want:
            raise ValueError(f"{mu_path}: expected tensors {sorted(want)}, found {sorted(mus)}")
        for k, v in mus.items():
            if tuple(v.shape) != (arch.ffn,):
                raise ValueError(f"{mu_path}: {k} has shape {tuple(v.shape)}, expected ({arch.ffn},)")
            params[k] = v.to(torch.float64)
    return arch, params, meta


def read_meta(model_dir: str | Path) -> dict:
    """The ``cometpi.json`` of a checkpoint directory ({} if it has none), without loading the weights."""
    meta_path = Path(model_dir) / META_FILE
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object")
    return meta


def approx_of(meta: dict):
    """The ApproxConfig a checkpoint was trained for, or None."""
    cfg = meta.get("approx")
    if cfg is None:
        return None
    cfg = dict(cfg)
    # written before SMU's segments and the narrow ReLU (issue 11): trained with Comet's own constructions
    if cfg.get("gelu") == "smu":
        cfg.setdefault("smu_form", "rsqrt")
    if cfg.get("softmax") == "relu":
        cfg.setdefault("relu", "smooth")
    return ApproxConfig(**cfg)


def save(out_dir: str | Path, hf_model, tokenizer, params: dict[str, torch.Tensor], arch: Arch, meta: dict) -> Path:
    """Write ``params`` into ``hf_model`` and save it, the tokenizer and the sidecars to ``out_dir``
    atomically (an existing directory is replaced only once the new one is complete)."""
    from safetensors.torch import save_file

    from .convert import to_hf_state_dict

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    missing, unexpected = hf_model.load_state_dict(to_hf_state_dict(arch, params), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"cannot write the checkpoint: HF keys missing {missing}, unexpected {unexpected}")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        mus = {k: v.detach().to(torch.float32).contiguous() for k, v in params.items() if k.endswith(".smu_mu")}
        if mus:
            save_file(mus, str(tmp / MU_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        for p in tmp.iterdir():
            os.chmod(p, 0o644)
        os.chmod(tmp, 0o755)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
