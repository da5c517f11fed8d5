"""COMETPI_PROFILE: each profiled thread writes its own CPU profile (thread clock), summarised by
``python -m cometpi.profiling``; without the variable nothing is written."""

import threading
import time

from cometpi.profiling import ENV, main, summary, thread_profile


def _busy_then_wait():
    with thread_profile("server"):
        sum(i * i for i in range(300_000))  # CPU time
        time.sleep(0.3)  # waiting: not on the thread's CPU clock


def test_thread_profiles_are_written_per_thread_on_their_cpu_clock(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    t = threading.Thread(target=_busy_then_wait)
    t.start()
    t.join()
    assert not list(tmp_path.iterdir())  # off by default

    monkeypatch.setenv(ENV, str(tmp_path / "prof"))
    threads = [threading.Thread(target=_busy_then_wait) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted((tmp_path / "prof").glob("server-*.pstats"))
    assert len(files) == 2 and not list((tmp_path / "prof").glob(".*.tmp"))  # one per thread, none half-written
    text = summary(tmp_path / "prof")
    seconds = [float(line.split(": ")[1].split()[0]) for line in text.splitlines() if line.startswith("server-")]
    assert len(seconds) == 2 and all(0 < s < 0.3 for s in seconds)  # the sleep is not counted
    assert "_busy_then_wait" in text or "<genexpr>" in text
    assert main([str(tmp_path / "prof"), "--top", "3"]) == 0 and "s CPU" in capsys.readouterr().out
