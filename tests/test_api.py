"""The OpenAI-compatible endpoint (`cometpi api`): the official `openai` client and `curl`-style HTTP
against a dealer, a model server and the API as three processes on a tiny Llama with SmolLM2's
vocabulary; answers equal the fixed-point simulation's greedy tokens, `PrivateClient.generate`'s and
(first tokens, margins permitting) the plaintext model's; errors in the API's shape; the chat page in a
real headless Chromium."""

import json
import os
import shutil
import threading
import urllib.error
import urllib.request

import pytest
import torch

from cometpi.api import ApiError, GenParams, StopText, is_loopback, parse_messages, parse_params
from cometpi.convert import from_hf, reference_forward
from cometpi.nn import ApproxConfig, RingModel, greedy_decode, prepare_params

from .test_generate import save_tiny_llama

ORIGINAL = ApproxConfig.original()
MESSAGE = "Tell me about the rain"


# ----------------------------------------------------------------------------------------------------------
# Requests (no processes)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, match", [
    ("top_p", 0.5, "top_k"), ("n", 2, "one completion"), ("logprobs", True, "not computed"),
    ("tools", [{"type": "function"}], "not supported"), ("temperature", 3, r"\[0, 2\]"),
    ("max_tokens", 0, "max_tokens"), ("stop", ["a"] * 5, "at most 4"), ("stop", [""], "non-empty"),
    ("seed", "7", "integer"), ("stream", "yes", "true or false"), ("top_k", 0, "top_k"),
])
def test_unsupported_or_malformed_fields_are_refused_by_name(field, value, match):
    with pytest.raises(ApiError, match=match) as e:
        parse_params({field: value}, vocab=100)
    assert e.value.status == 400 and e.value.param == field


def test_defaults_and_neutral_values():
    p = parse_params({"top_p": 1, "n": 1, "presence_penalty": 0, "user": "x", "max_completion_tokens": 5,
                      "stop": "\n"}, vocab=100)
    assert p == GenParams(max_tokens=5, temperature=1.0, top_k=None, seed=None, stop=["\n"])
    assert parse_params({"temperature": 0, "top_k": 5}, vocab=100).top_k is None  # greedy: the top 1 already
    msgs = parse_messages({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}]}]})
    assert msgs == [{"role": "system", "content": "ab"}]
    for bad in ([], [{"role": "tool", "content": "x"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(ApiError):
            parse_messages({"messages": bad})


def test_stop_strings_cut_the_text_and_hold_back_a_possible_start():
    pieces = {1: "Hello", 2: " wor", 3: "ld.", 4: " Bye"}
    st = StopText(lambda ids: "".join(pieces[i] for i in ids), ["world", "Bye"])
    assert not st.update([1]) and st.safe(False) == "Hello"
    assert not st.update([1, 2]) and st.safe(False) == "Hello "  # "wor" may begin "world": held back
    assert st.update([1, 2, 3]) and st.text == "Hello " and st.safe(False) == "Hello "
    plain = StopText(lambda ids: "ab\ufffd", [])
    plain.update([0])
    assert plain.safe(False) == "ab" and plain.safe(True) == "ab\ufffd"  # an incomplete UTF-8 sequence waits


def test_the_plaintext_api_binds_loopback_only_unless_told():
    from cometpi.api import serve

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    with pytest.raises(ValueError, match="refusing to serve the plaintext API on 0.0.0.0"):
        serve(None, "0.0.0.0", 0)


# ----------------------------------------------------------------------------------------------------------
# Three processes and the API
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """The tiny Llama of test_generate with 128 positions (SmolLM2's chat template takes ~30)."""
    return save_tiny_llama(tmp_path_factory.mktemp("model"), max_positions=128)


@pytest.fixture(scope="module")
def stack(tiny_llama):
    """Dealer, model server and API as processes; yields (api base URL, server addr, dealer addr, procs)."""
    from cometpi.serve import spawn, spawn_roles, stop

    with spawn_roles(tiny_llama, "--workers", "2", timeout=120) as roles:
        api, aaddr = spawn(["api", "--server", roles.saddr, "--dealer", roles.daddr, "--port", "0", "--model-name",
                            "tiny", "--max-waiting", "1"], timeout=180)
        try:
            yield f"http://{aaddr}", roles.saddr, roles.daddr, {"server": roles.server, "api": api}
        finally:
            stop(api)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """The chat prompt's ids and the simulation's greedy continuation (ids and text, 4 tokens)."""
    from cometpi.service import load_tokenizer

    arch, params = from_hf(str(tiny_llama))
    tok = load_tokenizer(None, arch)
    ids = tok.apply_chat_template([{"role": "user", "content": MESSAGE}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = torch.as_tensor(ids["input_ids"] if hasattr(ids, "keys") else ids).reshape(1, -1)
    want = list(greedy_decode(RingModel(prepare_params(arch, params, ORIGINAL)), arch, ORIGINAL, prompt_ids=ids,
                              prompt_length=ids.shape[1], max_new=4))
    return {"ids": ids, "tokens": want, "text": tok.decode(want, skip_special_tokens=True), "tok": tok,
            "arch": arch, "params": params}


def _openai(base):
    openai = pytest.importorskip("openai")
    return openai, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_client_gets_the_private_answer(stack, reference):
    """Non-streaming and streaming chat completions through the official client equal the simulation's
    greedy tokens; the usage carries the token counts and the private cost."""
    base, *_ = stack
    openai, client = _openai(base)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    msgs = [{"role": "user", "content": MESSAGE}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == reference["text"] and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("length", "stop")
    u = r.usage
    assert u.prompt_tokens == reference["ids"].shape[1] and u.completion_tokens == 4
    cost = u.model_extra["cometpi"]
    assert cost["steps"] == 4 and cost["online_bytes"] > 0 and cost["rounds"] > 0
    assert cost["prefill"]["online_bytes"] > cost["per_token_mean"]["online_bytes"] > 0
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["text"]
    assert chunks[-1].usage.completion_tokens == 4 and not chunks[-1].choices
    costs = [c.model_extra.get("cometpi") for c in chunks if c.model_extra.get("cometpi")]
    assert len(costs) == 4 and all(c["rounds"] > 0 for c in costs)  # one cost per token, for the chat page


def test_completions_equal_the_private_client_and_the_plaintext_model(stack, reference):
    """/v1/completions with the prompt's token ids gives PrivateClient.generate's tokens (another session
    on the same server) and the plaintext model's first tokens (margins permitting, as test_generate)."""
    from cometpi.service import PrivateClient

    base, saddr, daddr, _ = stack
    _, client = _openai(base)
    ids = reference["ids"][0].tolist()
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    with PrivateClient(saddr, daddr) as pc:
        direct = list(pc.generate(ids, max_new_tokens=4))
    assert r.choices[0].text == "".join(p["text"] for p in direct) == reference["text"]
    assert [p["token"] for p in direct] == reference["tokens"]
    seq, plain = reference["ids"], []
    for _ in range(3):
        nxt = int(reference_forward(reference["arch"], reference["params"], seq)[0, -1].argmax())
        plain.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
    assert plain == reference["tokens"][:3]


def test_stop_strings_and_seeds(stack, reference):
    base, *_ = stack
    _, client = _openai(base)
    msgs = [{"role": "user", "content": MESSAGE}]
    second = reference["tok"].decode(reference["tokens"][1:2], skip_special_tokens=True).strip()
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0, stop=[second])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == reference["text"][: reference["text"].find(second)]
    assert r.usage.completion_tokens == 2  # the client stopped the session at the token that completed it
    a, b = (client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=1.5, seed=7)
            .choices[0].message.content for _ in range(2))
    assert a == b


def test_errors_in_the_api_shape(stack):
    base, *_ = stack
    openai, client = _openai(base)
    msgs = [{"role": "user", "content": "x"}]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=msgs)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=msgs, max_tokens=500)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 128" in e.value.message
    with pytest.raises(openai.BadRequestError, match="top_k"):
        client.chat.completions.create(model="tiny", messages=msgs, top_p=0.3)
    with pytest.raises(openai.BadRequestError, match="at most 1024"):  # the server's own bound, refused here
        client.completions.create(model="tiny", prompt=[1, 2], max_tokens=1025)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client.completions.create(model="tiny", prompt="", max_tokens=2)
    for data, kind, code, what in ((b"{not json", "application/json", 400, "not valid JSON"),
                                   (b'{"messages": []}', "application/json", 400, "'model' is required"),
                                   (b'{"model": "tiny"}', "text/plain", 415, "Content-Type: application/json")):
        req = urllib.request.Request(base + "/v1/chat/completions", data=data, method="POST",
                                     headers={"Content-Type": kind})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == code and what in json.loads(e.value.read())["error"]["message"]


def test_concurrent_requests_are_queued_never_mixed(stack, reference):
    """With one session and --max-waiting 1, two requests at once are served one after the other, each
    with its own answer; a request beyond the queue gets 429."""
    base, *_ = stack
    openai, client = _openai(base)
    msgs = [{"role": "user", "content": MESSAGE}]
    out, errors = {}, []

    def ask(i):
        try:
            r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
            out[i] = r.choices[0].message.content
        except openai.RateLimitError as e:
            errors.append(e.code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(out) >= 2 and all(v == reference["text"] for v in out.values())
    assert len(out) + len(errors) == 4 and set(errors) <= {"queue_full"}


def test_a_client_that_goes_away_frees_the_session(stack, reference):
    """A streamed request whose client disconnects after the first token stops generating after its
    next token: a request right after it is served at once, and correctly."""
    import http.client
    import time
    from urllib.parse import urlparse

    base, *_ = stack
    msgs = [{"role": "user", "content": MESSAGE}]
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    conn.request("POST", "/v1/chat/completions", json.dumps({
        "model": "tiny", "messages": msgs, "max_tokens": 90, "temperature": 0, "stream": True}),
        {"Content-Type": "application/json"})
    stream = conn.getresponse()
    while b'"cometpi"' not in stream.readline():  # the first token's chunk: then hang up
        pass
    conn.sock.close()
    conn.close()
    _, client = _openai(base)
    t0 = time.perf_counter()
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    waited = time.perf_counter() - t0
    t0 = time.perf_counter()
    client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, temperature=0)
    alone = time.perf_counter() - t0
    assert r.choices[0].message.content == reference["text"]
    # without the stop the request waits for ~88 more tokens of the abandoned one (22x its own 4)
    assert waited < 3 * alone + 2, f"waited {waited:.1f} s against {alone:.1f} s alone: the abandoned " \
                                   "generation (90 tokens) was not stopped"


def test_chat_page_in_a_real_browser(stack, reference, tmp_path):
    """The page served at / streams the private answer into the conversation with the cost per token,
    in headless Chromium (the distribution's package) driven by Playwright."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine (`apt-get install chromium`; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    base, *_ = stack
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(base + "/")
            assert "tiny" in page.title()
            page.fill("#max", "4")
            page.fill("#input", MESSAGE)
            page.press("#input", "Enter")
            page.wait_for_selector("body[data-state=done]", timeout=180_000)
            assert page.inner_text(".msg.user .text") == MESSAGE
            assert page.inner_text(".msg.assistant .text") == reference["text"].strip() or \
                page.eval_on_selector(".msg.assistant .text", "e => e.textContent") == reference["text"]
            cost = page.inner_text(".msg.assistant .cost")
            assert "4 tokens privately" in cost and "per token" in cost and "rounds" in cost
            page.screenshot(path=str(tmp_path / "chat.png"))
            shot = os.environ.get("COMETPI_API_SCREENSHOT")  # docs/api-chat.png is made this way
            if shot:
                page.screenshot(path=shot)
        finally:
            browser.close()


def test_a_lost_server_gives_503_and_the_next_request_reconnects(stack, tiny_llama):
    """The model server goes away: the request that meets the lost session gets 503 in the API's shape,
    and the next one tries a new session and says that the server cannot be reached (503, no hang)."""
    from cometpi.serve import stop

    base, _saddr, _, procs = stack
    openai, client = _openai(base)
    stop(procs["server"])
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       temperature=0)
    assert e.value.status_code == 503 and e.value.code == "server_unavailable"
    with pytest.raises(openai.APIStatusError) as e:  # the next request tries to connect again, and says so
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       temperature=0)
    assert e.value.status_code == 503 and "cannot reach" in e.value.message
    assert [m.id for m in client.models.list().data] == ["tiny"]  # the card is kept while there is no session


def test_a_session_the_server_ended_while_idle_is_replaced(tiny_llama, reference):
    """The server ends a session idle past its --idle-timeout (here at least --timeout, 3 s): the next
    request opens a new session and is answered (not a 503)."""
    import time

    from cometpi.serve import spawn, spawn_roles, stop

    with spawn_roles(tiny_llama, "--idle-timeout", "1", "--timeout", "3", timeout=120) as roles:
        api, aaddr = spawn(["api", "--server", roles.saddr, "--dealer", roles.daddr, "--port", "0", "--model-name",
                            "tiny", "--timeout", "30"], timeout=180)
        try:
            _, client = _openai(f"http://{aaddr}")
            time.sleep(6)  # the server gives up on the idle session
            r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": MESSAGE}],
                                               max_tokens=4, temperature=0)
            assert r.choices[0].message.content == reference["text"]
        finally:
            stop(api)
