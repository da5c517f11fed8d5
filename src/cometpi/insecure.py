"""One warning per process for each insecure option in use (its name carries 'insecure'); a leaf module,
so that any layer (the transport's plaintext links, the approximations' small floods) can warn."""

from __future__ import annotations

import warnings

_WARNED: set[str] = set()


def warn_insecure_once(name: str, message: str) -> None:
    """Warn once per process about an insecure option (its name carries 'insecure')."""
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"{name}: {message}", UserWarning, stacklevel=3)


__all__ = ["warn_insecure_once"]
