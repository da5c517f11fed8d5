"""Where each party's CPU time goes: cProfile per thread, on that thread's own CPU clock.

Set ``COMETPI_PROFILE=DIR`` for any role (dealer, server, client) and each session thread writes
``DIR/<role>-<pid>-<thread id>.pstats`` when it ends: the server's session handler, the dealer's
link threads, the parties' dealer read loops and a ``PrivateClient``.  The clock is
``time.thread_time`` (CPU time of that thread), so waiting on a peer counts nothing and the files
add up to the process's CPU time spent in Python threads (torch's worker threads are not Python
threads: their time shows in the calling function's).  cProfile slows Python-heavy code by about
1.5-2x; use the shares, not the totals, and time without it.

``python -m cometpi.profiling DIR [--top N]`` prints each file's CPU seconds and its functions by
own time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ENV = "COMETPI_PROFILE"


@contextmanager
def thread_profile(role: str):
    """Profile the calling thread inside the block when ``COMETPI_PROFILE`` names a folder."""
    where = os.environ.get(ENV)
    if not where:
        yield
        return
    prof = cProfile.Profile(time.thread_time)
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        out = Path(where)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{role}-{os.getpid()}-{threading.get_ident()}.tmp"
        prof.dump_stats(tmp)
        tmp.replace(out / f"{role}-{os.getpid()}-{threading.get_ident()}.pstats")  # never half-written


def summary(folder: str | Path, top: int = 15) -> str:
    """Each profile's CPU seconds and its ``top`` functions by own time, one block per file."""
    lines = []
    for path in sorted(Path(folder).glob("*.pstats")):
        st = pstats.Stats(str(path))
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])  # (cc, nc, tottime, cumtime, callers)
        lines.append(f"{path.name}: {st.total_tt:.2f} s CPU")
        for (file, line, fn), (_, calls, own, cum, _) in rows[:top]:
            where = file.split("site-packages/")[-1].split("src/")[-1]
            lines.append(f"  {own:7.2f} s own {cum:7.2f} s cum {calls:9,d}x  {fn} ({where}:{line})")
    return "\n".join(lines) if lines else f"no profiles in {folder}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cometpi.profiling", description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args(argv)
    print(summary(args.folder, args.top))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
