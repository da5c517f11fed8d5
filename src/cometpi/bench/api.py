"""``cometpi bench api``: SmolLM2 through the OpenAI-compatible endpoint next to ``PrivateClient.generate``.

A dealer and a SmolLM2 model server run as processes.  First this process is the client and generates
``--tokens`` tokens greedily for the chat message (what ``cometpi generate --chat`` does); then
``cometpi api`` runs as a third process against the same server and the same message is sent to it by
``/v1/chat/completions`` with ``stream: true``, timing each streamed token as it arrives here; then
generate runs once more (a later session on a warm server is faster: the order would favour the API).
The API's overhead per token is the median interval between streamed tokens against the median step
of the two generate runs, all on one machine one after the other.  The tokens must be equal.  Writes
bench/results/api.json; asserts nothing.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("--message", default="What is the capital of France?")
    p.add_argument("--tokens", type=int, default=8, help="tokens generated in each run (default %(default)s)")
    p.add_argument("--out", default="bench/results/api.json")


def _stream(url: str, body: dict) -> tuple[list[str], list[float], dict]:
    """The streamed pieces, the arrival time of each, and the usage chunk."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    pieces, times, usage = [], [], None
    with urllib.request.urlopen(req, timeout=3600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            msg = json.loads(line[5:])
            if msg.get("usage"):
                usage = msg["usage"]
            if msg.get("cometpi"):  # one chunk per generated token
                pieces.append(msg["choices"][0]["delta"].get("content", ""))
                times.append(time.perf_counter())
    return pieces, times, usage


def _generate(saddr: str, daddr: str, model: str, args) -> dict:
    """One session of ``PrivateClient.generate`` (what ``cometpi generate --chat`` runs): its costs."""
    from ..client import PrivateClient

    with PrivateClient(saddr, daddr, tokenizer=model, timeout=600) as client:
        ids = client.encode_prompt(args.message, chat=True)[0].tolist()
        t0 = time.perf_counter()
        for _ in client.generate(ids, max_new_tokens=args.tokens):
            pass
        return {**client.last_generation, "wall_s": time.perf_counter() - t0}


def main(args) -> int:
    from ..data import smollm2_path
    from ..serve import spawn, spawn_roles, stop
    from .machine import machine
    from .ops import git_sha

    model = smollm2_path()
    with spawn_roles(model, "--timeout", "600") as roles:
        saddr, daddr = roles.saddr, roles.daddr
        gens = [_generate(saddr, daddr, model, args)]
        api, aaddr = spawn(["api", "--server", saddr, "--dealer", daddr, "--tokenizer", model, "--port", "0",
                            "--model-name", "smollm2"], timeout=300)
        try:
            t0 = time.perf_counter()
            pieces, times, usage = _stream(f"http://{aaddr}/v1/chat/completions", {
                "model": "smollm2", "messages": [{"role": "user", "content": args.message}],
                "max_tokens": args.tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
            api_wall = time.perf_counter() - t0
        finally:
            stop(api)  # the API's session ends (its bye), then generate again
        gens.append(_generate(saddr, daddr, model, args))
    gen_steps = [st["seconds"] for g in gens for st in g["per_token"]]
    api_steps = [b - a for a, b in zip(times, times[1:], strict=False)]
    gen_med, api_med = statistics.median(gen_steps), statistics.median(api_steps)
    same = all("".join(pieces) == g["text"] for g in gens)
    row = {"bench": "api", "model": "SmolLM2-135M-Instruct", "message": args.message, "tokens": args.tokens,
           "prompt_tokens": gens[0]["prompt_tokens"], "same_tokens": same,
           "generate": [{"prefill_s": g["prefill"]["seconds"], "per_token": [st["seconds"] for st in g["per_token"]],
                         "wall_s": g["wall_s"]} for g in gens],
           "api": {"first_token_s": times[0] - t0 if times else None, "per_token": api_steps, "wall_s": api_wall,
                   "usage_per_token_mean_s": usage["cometpi"]["per_token_mean"]["seconds"] if usage else None},
           "generate_per_token_median_s": gen_med, "api_per_token_median_s": api_med,
           "api_overhead_per_token": api_med / gen_med - 1,
           "command": f"cometpi bench api --tokens {args.tokens}", "machine": machine(), "git": git_sha(),
           "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1) + "\n")
    print(f"generate: {gen_med:.3f} s per token; API: {api_med:.3f} s per token (overhead "
          f"{100 * row['api_overhead_per_token']:+.1f}%); same tokens: {same}; wrote {out}")
    return 0
