"""An OpenAI-compatible HTTP endpoint on the client's side, and a web chat page.

``cometpi api`` runs the *client* role as a local HTTP server: it holds the text, tokenizes it, and
speaks the private protocol to the model server (which sees neither the prompt nor the answer) and the
dealer.  Any OpenAI client (the ``openai`` package, ``curl``, chat front-ends) talks to it:

* ``GET /v1/models``: the one model the server serves (its card's architecture and approximations);
* ``POST /v1/chat/completions``: ``messages`` through the model's chat template, streamed by
  server-sent events (``stream: true``) or in one response;
* ``POST /v1/completions``: a raw prompt (text or token ids);
* ``GET /``: a chat page that streams the private answer with the cost of every token beside it.

One private session serves the requests, one at a time (a session's weights are masked once, which
takes seconds and 1.2 GB for SmolLM2); requests that arrive meanwhile wait in a queue of bounded length,
and one beyond it gets HTTP 429.  A session the server ended or lost is replaced at the next request
(503 for the request that met the loss); a session whose query budget is spent is replaced before the
next request.  Which fields are supported, refused or ignored: docs/api.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import logging
import threading
import time
import uuid
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .api_schema import (  # noqa: F401 - re-exported (api.ApiError, api.parse_params, ...)
    DEFAULT_MAX_TOKENS,
    MAX_STOP,
    ApiError,
    GenParams,
    StopText,
    parse_messages,
    parse_params,
    usage,
)
from .service import MAX_NEW_TOKENS  # the model server's own bound on one generation
from .tls import is_loopback
from .transport import TransportError

log = logging.getLogger("cometpi.api")

#: Requests that may wait for the session while one is served; one more gets HTTP 429.
DEFAULT_MAX_WAITING = 8


# --------------------------------------------------------------------------------------------------
# The private session
# --------------------------------------------------------------------------------------------------


class PrivateChat:
    """One private session (``service.PrivateClient``) serving requests one at a time.

    ``connect()`` makes a new ``PrivateClient``; it is called at start and again whenever the session
    was lost or its query budget is spent."""

    def __init__(self, connect, model_name: str | None = None, max_waiting: int = DEFAULT_MAX_WAITING):
        self._connect = connect
        self._lock = threading.Lock()
        self._waiting = 0
        self._count_lock = threading.Lock()
        self._cancels: set[threading.Event] = set()  # one per running or waiting request
        self.max_waiting = max_waiting
        self.client = connect()
        self.tokenizer = self.client.tokenizer  # kept across sessions (a lost session has none)
        card = self.client.card
        self.card = card  # kept: /v1/models answers while a lost session is replaced
        self.closed = False
        self.model_name = model_name or default_model_name(self.tokenizer, card)
        self.created = int(time.time())
        self.vocab = self.client.arch.vocab
        self.max_positions = self.client.arch.max_positions
        if self.client.arch.head != "lm":
            raise ValueError(f"the server's model has no LM head (head {self.client.arch.head!r}): nothing to chat "
                             "with")

    def close(self, wait: float = 10.0) -> None:
        """End the session (the server hears a bye); idempotent.  A generation still running is told to
        stop after its next token (``cancel_all``) and given ``wait`` seconds."""
        self.closed = True
        self.cancel_all()
        got = self._lock.acquire(timeout=wait)
        try:
            if self.client is not None:
                self.client.close()
                self.client = None
        finally:
            if got:
                self._lock.release()

    def cancel_all(self) -> None:
        with self._count_lock:
            for ev in list(self._cancels):
                ev.set()

    def model_card(self) -> dict:
        c = self.card
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "cometpi",
                "cometpi": {"arch": c.get("arch"), "approx": c.get("approx"), "model_hash": c.get("model_hash"),
                            "reveal": c.get("reveal"), "private": True}}

    def check_model(self, name) -> None:
        if name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist; this endpoint serves '{self.model_name}'",
                           param="model", code="model_not_found")

    def chat_ids(self, messages: list[dict]) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # noqa: BLE001 - a template that refuses these roles
            raise ApiError(400, f"the model's chat template refused the messages: {e}", param="messages",
                           code="invalid_value") from None
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return [int(i) for i in (ids[0] if ids and isinstance(ids[0], list) else ids)]

    def prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return [int(i) for i in self.tokenizer(prompt)["input_ids"]]
        if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
            if not all(0 <= i < self.vocab for i in prompt):
                raise ApiError(400, f"token ids must lie in [0, {self.vocab})", param="prompt", code="invalid_value")
            return list(prompt)
        raise ApiError(400, "'prompt' must be a string, a list of one string, or a list of token ids", param="prompt",
                       code="invalid_value")

    def check_context(self, n_prompt: int, max_tokens: int, param: str = "messages") -> None:
        if n_prompt == 0:
            raise ApiError(400, "the prompt is empty (0 tokens)", param=param, code="invalid_value")
        if max_tokens > MAX_NEW_TOKENS:
            raise ApiError(400, f"max_tokens is at most {MAX_NEW_TOKENS} here (the model server's bound), got "
                                f"{max_tokens}", param="max_tokens", code="invalid_value")
        if n_prompt + max_tokens > self.max_positions:
            raise ApiError(400, f"This model's maximum context length is {self.max_positions} tokens. However, you "
                                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in "
                                "the completion). Please reduce the prompt or the completion length.",
                           param=param, code="context_length_exceeded")

    def enter_queue(self) -> threading.Event:
        """Take a place (429 beyond ``max_waiting`` waiting); returns the request's cancel event: set
        when its HTTP client goes away (or at shutdown), it ends the generation after the next token."""
        with self._count_lock:
            if self._waiting > self.max_waiting:
                raise ApiError(429, f"the private session is busy and {self.max_waiting} requests already wait; try "
                                    "again later", type="rate_limit_error", code="queue_full")
            self._waiting += 1
            ev = threading.Event()
            self._cancels.add(ev)
            return ev

    def leave_queue(self, ev: threading.Event) -> None:
        with self._count_lock:
            self._waiting -= 1
            self._cancels.discard(ev)

    def _session(self):
        """The live session, replaced when it was lost or its query budget is spent (lock held)."""
        if self.closed:
            raise ApiError(503, "the endpoint is shutting down", type="api_error", code="server_unavailable")
        c = self.client
        spent = c is not None and c.max_queries is not None and c.queries >= c.max_queries
        if c is None or spent:
            if c is not None:
                c.close()
            self.client = None
            try:
                self.client = self._connect()
            except (TransportError, OSError, ValueError) as e:
                raise ApiError(503, f"cannot reach the private model server: {e}", type="api_error",
                               code="server_unavailable") from None
        return self.client

    def generate(self, ids: list[int], p: GenParams, on_step=None, cancel: threading.Event | None = None) -> dict:
        """Generate privately (blocking; the caller has entered the queue).  ``on_step(piece, step)``
        sees the text that can be shown so far and the step's cost, after each token.  ``cancel`` set:
        the generation ends after its next token (the server sees an early end, as at a stop string).
        A session found dead before the first token (e.g. the server ended it after its idle timeout)
        is replaced and the request tried once more."""
        with self._lock:
            for attempt in (0, 1):
                if cancel is not None and cancel.is_set():
                    raise ApiError(499, "the request was cancelled", type="api_error", code="cancelled")
                client = self._session()
                st = StopText(lambda t, c=client: c._decode(t, skip_special_tokens=True,
                                                            clean_up_tokenization_spaces=False), p.stop)
                shown, steps = 0, 0

                def until(ids_so_far, st=st):  # asked with the ids so far before each token is yielded
                    return st.update(ids_so_far) or (cancel is not None and cancel.is_set())

                try:
                    for piece in client.generate(ids, max_new_tokens=p.max_tokens, temperature=p.temperature,
                                                 top_k=p.top_k, seed=p.seed, until=until):
                        steps += 1  # st holds this token's text already (until)
                        safe = st.safe(final=False)
                        if on_step is not None:
                            on_step(safe[shown:], piece["step"])
                        shown = max(shown, len(safe))
                    break
                except (TransportError, OSError) as e:
                    client.close()
                    self.client = None  # the next request connects again
                    if attempt == 0 and not steps:
                        log.info("the private session was gone before the first token (%s): a new one", e)
                        continue
                    raise ApiError(503, f"the private session was lost: {e}", type="api_error",
                                   code="server_unavailable") from None
                except ApiError:
                    raise
                except Exception as e:  # the session's state is unknown: never reuse it
                    client.close()
                    self.client = None
                    log.exception("generation failed")
                    raise ApiError(500, f"internal error: {type(e).__name__}: {e}", type="api_error") from None
            g = client.last_generation
            eos = getattr(self.tokenizer, "eos_token_id", None)
            stopped = st.hit or (bool(g["ids"]) and g["ids"][-1] == eos)
            rest = st.safe(final=True)[shown:]
            if rest and on_step is not None:
                on_step(rest, None)
            return {"text": st.text, "ids": g["ids"], "finish_reason": "stop" if stopped else "length",
                    "usage": usage(len(ids), g)}


def default_model_name(tokenizer, card: dict) -> str:
    """The model's id when none is given: the tokenizer folder's name; SmolLM2's cache folder name for
    the bundled SmolLM2 (whose tokenizer may load from its package's GGUF folder)."""
    from .data import SMOLLM2_DIR

    arch = card.get("arch") or {}
    named = Path(str(getattr(tokenizer, "name_or_path", "") or "")).name
    if arch.get("kind") == "llama" and arch.get("vocab") == 49152 and (not named or "gguf" in named.lower()):
        return SMOLLM2_DIR
    return named or f"cometpi-{arch.get('kind', 'model')}"


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


def create_app(chat: PrivateChat):
    """The FastAPI application around one ``PrivateChat``."""
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        # say bye to the model server (uvicorn re-raises SIGTERM after this: no finally runs); a running
        # generation is told to stop after its next token
        await run_in_threadpool(chat.close)

    app = FastAPI(title="cometpi private inference", docs_url=None, redoc_url=None, lifespan=lifespan)
    page_html = (resources.files("cometpi").joinpath("web/chat.html").read_text(encoding="utf-8")
                 .replace("{{MODEL_JSON}}", json.dumps(chat.model_name).replace("<", "\\u003c"))
                 .replace("{{MODEL}}", html.escape(chat.model_name)))

    @app.exception_handler(ApiError)
    async def _api_error(_req, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def _http_error(_req, e: HTTPException):
        return JSONResponse(ApiError(e.status_code, str(e.detail), code=None).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        return JSONResponse(ApiError(400, f"invalid request: {e.errors()!r:.300}").body(), status_code=400)

    @app.exception_handler(Exception)
    async def _internal(_req, e: Exception):  # anything else: logged, and still in the API's shape
        log.error("internal error: %s: %s", type(e).__name__, e)
        return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", type="api_error").body(),
                            status_code=500)

    async def _body(req: Request) -> dict:
        kind = req.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":  # also keeps a web page's form posts (no CORS preflight) out
            raise ApiError(415, f"the request body must be JSON (Content-Type: application/json), got {kind!r}",
                           code="unsupported_media_type")
        try:
            body = await req.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if not isinstance(body.get("model"), str):
            raise ApiError(400, "'model' is required", param="model", code="invalid_value")
        chat.check_model(body.get("model"))
        return body

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [chat.model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        chat.check_model(name)
        return chat.model_card()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html

    async def _complete(req: Request, ids: list[int], p: GenParams, kind: str):
        chat.check_context(len(ids), p.max_tokens, "messages" if kind == "chat" else "prompt")
        cancel = chat.enter_queue()
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def choice(text, finish, delta=False):
            """One choice: a chat message or delta, or a completion's text (a finishing delta: ``text`` None)."""
            if kind == "chat":
                if not delta:
                    body = {"role": "assistant", "content": text}
                else:
                    body = {} if text is None else {"content": text}
                return {"index": 0, "delta" if delta else "message": body, "finish_reason": finish, "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        if not p.stream:
            async def watch():  # a client that went away: the generation ends after its next token
                while not cancel.is_set():
                    if await req.is_disconnected():
                        cancel.set()
                    await asyncio.sleep(0.5)

            watcher = asyncio.create_task(watch())
            try:
                out = await run_in_threadpool(chat.generate, ids, p, None, cancel)
            finally:
                watcher.cancel()
                chat.leave_queue(cancel)
            return {"id": rid, "object": obj, "created": created, "model": chat.model_name,
                    "choices": [choice(out["text"], out["finish_reason"])], "usage": out["usage"]}

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def put(item):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody listens any more
                cancel.set()

        def on_step(text, step):
            put(("piece", text, step))

        def work():
            try:
                out = chat.generate(ids, p, on_step, cancel)
                put(("done", out, None))
            except ApiError as e:
                put(("error", e, None))
            except Exception as e:  # noqa: BLE001 - reported to the stream, then logged
                log.exception("generation failed")
                put(("error", ApiError(500, f"internal error: {e}", type="api_error"), None))
            finally:
                chat.leave_queue(cancel)

        threading.Thread(target=work, name="api-generate", daemon=True).start()
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        def chunk(choices, **extra):
            return json.dumps({"id": rid, "object": chunk_obj, "created": created, "model": chat.model_name,
                               "choices": choices, **extra})

        async def events():
            try:
                async for e in _events():
                    yield e
            finally:  # the stream ended or its client went away: stop generating after the next token
                cancel.set()

        async def _events():
            if kind == "chat":
                yield {"data": chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None, "logprobs": None}])}
            while True:
                what, a, step = await queue.get()
                if what == "piece":
                    cost = None if step is None else {k: step[k] for k in ("online_bytes", "rounds", "seconds")}
                    yield {"data": chunk([choice(a, None, delta=True)], cometpi=cost)}
                elif what == "error":
                    yield {"data": json.dumps(a.body())}
                    break
                else:
                    yield {"data": chunk([choice(None, a["finish_reason"], delta=True)],
                                         **({"usage": None} if p.include_usage else {}))}
                    if p.include_usage:
                        yield {"data": chunk([], usage=a["usage"])}
                    break
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), ping=15)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: Request):
        body = await _body(req)
        p = parse_params(body, chat.vocab)
        return await _complete(req, chat.chat_ids(parse_messages(body)), p, "chat")

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await _body(req)
        p = parse_params(body, chat.vocab)
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", param="prompt", code="invalid_value")
        return await _complete(req, chat.prompt_ids(body["prompt"]), p, "completion")

    return app


def serve(chat: PrivateChat, host: str = "127.0.0.1", port: int = 8000, *, ssl_certfile=None, ssl_keyfile=None,
          allow_remote: bool = False, log_level: str = "warning") -> None:
    """Run the endpoint with uvicorn until interrupted, after printing 'listening on HOST:PORT'.  An
    address other than loopback needs TLS (``ssl_certfile`` and ``ssl_keyfile``) or ``allow_remote``:
    the endpoint hands out the plaintext."""
    import socket

    import uvicorn

    tls = bool(ssl_certfile and ssl_keyfile)
    if not is_loopback(host) and not tls and not allow_remote:
        raise ValueError(f"refusing to serve the plaintext API on {host}: anyone who reaches it reads the prompts "
                         "and answers; bind 127.0.0.1, give --ssl-certfile and --ssl-keyfile, or pass --allow-remote")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)  # before the banner: a client that reads it may connect at once
    bound = sock.getsockname()[1]
    config = uvicorn.Config(create_app(chat), ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                            log_level=log_level, lifespan="on")
    print(f"cometpi api listening on {host}:{bound}", flush=True)
    print(f"  chat page: http{'s' if tls else ''}://{host}:{bound}/   OpenAI base URL: "
          f"http{'s' if tls else ''}://{host}:{bound}/v1   model: {chat.model_name}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
