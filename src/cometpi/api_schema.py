"""The OpenAI API's shapes at the private endpoint (``api``): a request's generation parameters and
messages checked (``parse_params``, ``parse_messages``; what is supported, refused or ignored:
docs/api.md), its errors (``ApiError``), its stop strings applied to the generated text (``StopText``)
and its token counts with the private cost (``usage``).  No web framework, no session: plain data in
and out."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Tokens generated when a request names no ``max_tokens`` (a private token takes seconds; OpenAI's
#: default is the rest of the context).
DEFAULT_MAX_TOKENS = 64
#: At most this many stop strings (as OpenAI).
MAX_STOP = 4


class ApiError(Exception):
    """An error in the OpenAI API's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------


@dataclass
class GenParams:
    """A request's generation parameters, checked."""

    max_tokens: int
    temperature: float
    top_k: int | None
    seed: int | None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, int | float)
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} in [{lo:g}, {hi:g}], got {v!r}", param=name,
                       code="invalid_value")
    return v


#: Fields an OpenAI client may send that this endpoint accepts only at their neutral value.
_NEUTRAL = {"n": 1, "top_p": 1, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False, "best_of": 1,
            "echo": False}
#: Fields refused whatever their value (no private construction for them here).
_REFUSED = ("tools", "tool_choice", "functions", "function_call", "logit_bias", "suffix", "top_logprobs",
            "response_format", "audio", "modalities", "prediction")


def parse_params(body: dict, vocab: int) -> GenParams:
    for name, neutral in _NEUTRAL.items():
        if name in body and body[name] is not None and body[name] != neutral:
            why = {"top_p": "use 'top_k' (an extension field) to restrict sampling",
                   "n": "one completion per request"}.get(name, "not computed privately")
            raise ApiError(400, f"'{name}' other than {neutral!r} is not supported ({why})", param=name,
                           code="unsupported_parameter")
    for name in _REFUSED:
        if body.get(name) not in (None, [], {}):
            raise ApiError(400, f"'{name}' is not supported by this private endpoint", param=name,
                           code="unsupported_parameter")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, DEFAULT_MAX_TOKENS, 1, 1 << 20, integer=True)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_k = _number(body, "top_k", None, 1, vocab, integer=True)
    if top_k is not None and temperature == 0:
        top_k = None  # greedy already takes the top 1
    seed = _number(body, "seed", None, -(1 << 63), (1 << 64) - 1, integer=True)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings",
                       param="stop", code="invalid_value")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream", code="invalid_value")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options", code="invalid_value")
    return GenParams(max_tokens, temperature, top_k, seed, stop, stream, bool(opts.get("include_usage")))


def _content(message: dict, i: int) -> str:
    c = message.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: text only
        parts = []
        for p in c:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", param="messages",
                               code="unsupported_content")
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages",
                   code="invalid_value")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages", code="invalid_value")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, developer, user or assistant",
                           param="messages", code="invalid_value")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, i)})
    return out


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------


class StopText:
    """Text of the generated ids with the request's stop strings applied: ``hit`` once one appears,
    ``safe`` the text that can be shown (a tail that could begin a stop string is held back)."""

    def __init__(self, decode, stop: list[str]):
        self.decode, self.stop = decode, stop
        self.text, self.hit = "", False

    def update(self, ids: list[int]) -> bool:
        text = self.decode(ids)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.hit = text[:at], True
        self.text = text
        return self.hit

    def safe(self, final: bool) -> str:
        text = self.text
        if final or self.hit:
            return text
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            text = text.rstrip("\ufffd")
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold]


def usage(n_prompt: int, g: dict) -> dict:
    """OpenAI's token counts, and the private cost under ``cometpi``: online bytes, rounds and seconds
    of the prefill and of each token (their sums and means)."""
    steps = [g["prefill"], *g["per_token"]] if g.get("prefill") else []
    per = g["per_token"]
    tot = {k: sum(s[k] for s in steps) for k in ("online_bytes", "rounds", "seconds")}
    mean = {k: (sum(s[k] for s in per) / len(per) if per else None) for k in ("online_bytes", "rounds", "seconds")}
    return {"prompt_tokens": n_prompt, "completion_tokens": len(g["ids"]), "total_tokens": n_prompt + len(g["ids"]),
            "cometpi": {**tot, "prefill": g.get("prefill"), "per_token_mean": mean, "steps": len(steps),
                        "kv_cache_bytes_per_party": g.get("kv_cache_bytes_per_party")}}
