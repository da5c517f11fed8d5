"""The machine a figure was measured on: every benchmark row names it (CPU model, cores, AVX-512, torch)."""

from __future__ import annotations

import functools
import os
import platform


@functools.cache
def cpu() -> dict:
    """CPU model name, ``family/model`` as ``lscpu`` prints them, and whether it has AVX-512."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip()
                if k in ("model name", "cpu family", "model", "flags") and k not in info:
                    info[k] = v.strip()
                if not line.strip() and info:
                    break
    except OSError:
        pass
    flags = set(info.get("flags", "").split())
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(),
            "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
            "avx512": "avx512f" in flags, "cores": os.cpu_count()}


def machine() -> dict:
    """``cpu()`` with torch's version and threads, and the ring-matmul kernels chosen on this machine."""
    import torch

    from ..kernels import report

    return {**cpu(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "kernels": report()}
