"""`verispec serve`: the OpenAI-compatible server, run for real (uvicorn on 127.0.0.1, a free
port, a background thread) and spoken to with the `openai` client, or with raw HTTP where a
request must be malformed or a connection cut.

Marked `real`: every server here serves the shared float32 smollm2-135m-instruct (the server
needs a tokenizer and a chat template). One server per module; the queue and api-key tests
start small ones of their own on the same model, used only while the main one is idle."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from verispec import SpeculativeGenerator
from verispec.serve import create_app
from verispec.serve.stream import TextStream

pytestmark = pytest.mark.real

MODEL = "smollm2-135m-instruct"
COUNTING = "1, 2, 3, 4, 5,"  # a prompt the model continues for long (no early end of sequence)
HAIKU = "Write a haiku about the sea."
SLOW = 400  # max_tokens of a stream that must be cut short: ~30 s of `ar` on one CPU thread


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread, on a port the OS picked."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        # no retries: a 503 or 5xx must reach the test, not be retried away
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120)


def request(server: ServerThread, method: str, path: str, body=None, headers: dict | None = None):
    """(status, headers, parsed JSON or text) of one raw HTTP request; body bytes go as they are."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    try:
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        text = resp.read().decode()
        kind = resp.getheader("content-type", "")
        return resp.status, dict(resp.getheaders()), json.loads(text) if kind.startswith("application/json") else text
    finally:
        conn.close()


def open_stream(server: ServerThread, body: dict, events: int = 2) -> socket.socket:
    """Start a streamed /v1/completions on a raw socket and read until `events` SSE events came:
    the generation is running then. The caller cuts the connection by closing the socket."""
    payload = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
    received = b""
    while received.count(b"data: ") < events:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the stream early: {received!r}"
        received += chunk
    assert received.startswith(b"HTTP/1.1 200"), received[:200]
    return sock


def metrics(server: ServerThread, headers: dict | None = None) -> dict[tuple[str, frozenset], float]:
    """/metrics parsed by prometheus_client's own parser: {(sample name, labels): value}."""
    status, hdrs, text = request(server, "GET", "/metrics", headers=headers)
    assert status == 200 and hdrs["content-type"].startswith("text/plain"), (status, text)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(server: ServerThread, name: str, **labels) -> float:
    return metrics(server).get((name, frozenset(labels.items())), 0.0)


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(smol):
    with ServerThread(create_app(smol, "prompt-lookup", queue_size=16)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def ar(smol):
    return SpeculativeGenerator(smol, method="ar")


# --------------------------------------------------------------------------- text decoding


def test_text_stream_holds_back_split_characters():
    """Bytes as tokens: a multi-byte character's first bytes decode to U+FFFD and must wait."""
    text = "héllo 🙂 日本"
    decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    stream = TextStream(decode)
    pieces = [stream.push([b]) for b in text.encode()] + [stream.finish()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # the continuation bytes of 🙂 produced nothing until it completed


def test_text_stream_stop_string_across_tokens(smol):
    """A stop string split over tokens: its first part is held back, then the text ends before it."""
    ids = smol.encode(" 6, 7, 8, 9")
    assert "," in [smol.decode([t]) for t in ids]  # the stop string ", 8" spans two tokens
    stream = TextStream(smol.decode, [", 8"])
    pieces = [stream.push([t]) for t in ids] + [stream.finish()]
    # sent text is never taken back, so the "," before " 8" must have been held back
    assert "".join(pieces) == " 6, 7" and stream.stopped


def test_text_stream_real_tokenizer_multibyte(smol):
    text = "Emoji 🙂🎉 and 日本語 text"
    ids = smol.encode(text)
    stream = TextStream(smol.decode)
    pieces = [stream.push([t]) for t in ids] + [stream.finish()]
    assert "".join(pieces) == smol.decode(ids)
    assert not any("\ufffd" in p for p in pieces)


# --------------------------------------------------------------------------- the API


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    status, _, payload = request(server, "GET", "/health")
    assert (status, payload) == (200, {"status": "ok"})


def test_completion_streamed_and_whole_equal_ar(server, client, smol, ar):
    whole = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=24, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=24, temperature=0, stream=True))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    reference = ar.generate(COUNTING, max_new_tokens=24)
    assert whole.choices[0].text == streamed == reference.text
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 1  # step by step, not one block
    assert whole.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "length"
    usage = whole.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(smol.encode(COUNTING)), 24)
    assert usage.total_tokens == usage.prompt_tokens + 24
    assert usage.model_extra["method"] == "prompt-lookup"
    assert usage.model_extra["mean_accepted_tokens"] > 1.0  # counting: prompt lookup drafts right


def test_chat_streamed_and_whole_equal_ar(server, client, ar):
    messages = [{"role": "user", "content": HAIKU}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reference = ar.generate(HAIKU, max_new_tokens=20, chat=True)
    assert whole.choices[0].message.content == streamed == reference.text
    assert whole.choices[0].message.role == "assistant" and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    final = chunks[-1]  # include_usage: one last chunk, no choices, the usage
    assert final.choices == [] and final.usage.completion_tokens == whole.usage.completion_tokens == 20
    assert final.usage.prompt_tokens == len(reference.prompt_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_stream_ends_with_done(server):
    status, headers, text = request(server, "POST", "/v1/completions",
                                    {"model": MODEL, "prompt": COUNTING, "max_tokens": 4, "temperature": 0,
                                     "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_end_of_sequence_is_finish_reason_stop(client, ar):
    reference = ar.generate("Say hi.", max_new_tokens=64, chat=True)
    assert len(reference.token_ids) < 64  # the model ends its turn by itself here
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                         max_tokens=64, temperature=0)
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].message.content == reference.text
    assert out.usage.completion_tokens == len(reference.token_ids)


@pytest.mark.parametrize("stop", [", 8", [" 9", ", 8"]])
def test_stop_strings_cut_the_text(client, stop):
    kwargs = dict(model=MODEL, prompt=COUNTING, max_tokens=24, temperature=0, stop=stop)
    whole = client.completions.create(**kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True) if c.choices)
    assert whole.choices[0].text == streamed == " 6, 7"
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 24  # the generation stopped there too


def test_per_request_method(client, ar):
    base = dict(model=MODEL, prompt=COUNTING, max_tokens=12, temperature=0)
    plain = client.completions.create(**base, extra_body={"verispec": {"method": "ar"}})
    tuned = client.completions.create(**base, extra_body={"verispec": {"method": "prompt-lookup",
                                                                        "options": {"k": 3}}})
    assert plain.usage.model_extra["method"] == "ar" and plain.usage.model_extra["mean_accepted_tokens"] == 1.0
    assert tuned.usage.model_extra["method"] == "prompt-lookup"
    assert plain.choices[0].text == tuned.choices[0].text == ar.generate(COUNTING, max_new_tokens=12).text


def test_sampling_with_a_seed_repeats(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    first, second = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == second and first


def test_gumbel_sampling_gives_the_seeds_tokens_whatever_the_method(client):
    """rule=gumbel: a sampled answer is a function of the seed, the same from ar and prompt lookup."""
    kwargs = dict(model=MODEL, prompt=COUNTING, max_tokens=24, temperature=0.9, seed=11)
    texts = [client.completions.create(**kwargs, extra_body={"verispec": {"method": m, "options": {"rule": "gumbel"}}})
             .choices[0].text for m in ("ar", "prompt-lookup")]
    assert texts[0] == texts[1] and texts[0]


# --------------------------------------------------------------------------- bad requests

TOO_LONG = 9000  # past smollm2's 8192 positions
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (name, path, body (bytes: sent as is), status, param, words the message must hold)
    ("malformed json", CHAT, b'{"model": "smollm2', 400, None, "JSON"),
    ("body not an object", CHAT, b"[1, 2]", 400, None, "JSON object"),
    ("unknown model", CHAT, {"model": "gpt-9", "messages": USER}, 404, "model", "does not exist"),
    ("missing model", CHAT, {"messages": USER}, 400, "model", "model"),
    ("unknown method", CHAT, {"model": MODEL, "messages": USER, "verispec": {"method": "telepathy"}}, 400,
     "verispec.method", "unknown method"),
    ("bad method option", COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": 2,
                                        "verispec": {"method": "prompt-lookup", "options": {"k": "many"}}},
     400, "verispec", "k"),
    ("empty messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages", "at least one"),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages", "messages"),
    ("missing prompt", COMPLETIONS, {"model": MODEL}, 400, "prompt", "prompt"),
    ("empty prompt", COMPLETIONS, {"model": MODEL, "prompt": ""}, 400, "prompt", "empty"),
    ("prompt id out of range", COMPLETIONS, {"model": MODEL, "prompt": [1, 10 ** 7]}, 400, "prompt", "49152"),
    ("max_tokens zero", CHAT, {"model": MODEL, "messages": USER, "max_tokens": 0}, 400, "max_tokens", "at least 1"),
    ("max_tokens not integer", CHAT, {"model": MODEL, "messages": USER, "max_tokens": 8.5}, 400, "max_tokens",
     "integer"),
    ("max_tokens a string", COMPLETIONS, {"model": MODEL, "prompt": "a", "max_tokens": "ten"}, 400, "max_tokens",
     "integer"),
    ("past the context", CHAT, {"model": MODEL, "messages": USER, "max_tokens": TOO_LONG}, 400, "max_tokens",
     "8192"),
    ("temperature not a number", CHAT, {"model": MODEL, "messages": USER, "temperature": "hot"}, 400,
     "temperature", "number"),
    ("negative temperature", CHAT, {"model": MODEL, "messages": USER, "temperature": -0.5}, 400, "temperature",
     "0 to 2"),
    ("top_p zero", CHAT, {"model": MODEL, "messages": USER, "top_p": 0}, 400, "top_p", "(0, 1]"),
    ("top_p above one", COMPLETIONS, {"model": MODEL, "prompt": "a", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ("n above one", CHAT, {"model": MODEL, "messages": USER, "n": 2}, 400, "n", "n must be 1"),
    ("unknown role", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400,
     "messages[0].role", "role"),
    ("tool role", CHAT, {"model": MODEL, "messages": [{"role": "tool", "content": "hi"}]}, 400,
     "messages[0].role", "tool calling"),
    ("content not text", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "string"),
    ("image content part", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages[0].content[0]", "text only"),
    ("message not an object", CHAT, {"model": MODEL, "messages": ["hi"]}, 400, "messages[0]", "object"),
    ("stop not strings", COMPLETIONS, {"model": MODEL, "prompt": "a", "stop": [1, 2]}, 400, "stop", "strings"),
    ("stream_options without stream", CHAT, {"model": MODEL, "messages": USER, "stream_options":
                                             {"include_usage": True}}, 400, "stream_options", "stream"),
    ("unsupported logprobs", COMPLETIONS, {"model": MODEL, "prompt": "a", "logprobs": 3}, 400, "logprobs",
     "not supported"),
    ("unknown route", "/v1/embeddings", {"model": MODEL, "input": "a"}, 404, None, "Unknown request URL"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_an_openai_error(server, case):
    name, path, body, status, param, words = case
    got, _, payload = request(server, "POST", path, body)
    assert got == status, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] and error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_wrong_http_method_and_streamed_errors(server):
    status, _, payload = request(server, "GET", COMPLETIONS)
    assert status == 405 and "not allowed" in payload["error"]["message"]
    # a streamed request's errors come before the stream starts: a plain JSON error and status
    status, _, payload = request(server, "POST", CHAT, {"model": MODEL, "messages": [], "stream": True})
    assert status == 400 and payload["error"]["param"] == "messages"


def test_openai_client_raises_its_errors(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-9", messages=USER)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="a", max_tokens=TOO_LONG)
    assert err.value.code == "context_length_exceeded" and "8192" in err.value.message


def test_still_serving_after_bad_requests(server, client):
    assert len(BAD_REQUESTS) >= 15
    out = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=3, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 3
    assert metric(server, "verispec_requests_total", route=CHAT, status="400") >= 10


# --------------------------------------------------------------------------- concurrency


def test_load_four_clients_ten_requests_each(server, client):
    """4 concurrent clients x 10 requests, every kind at once: no error, none lost, and no
    cross-talk (greedy answers to one prompt, streamed or not, are all the same)."""
    before = {route: metric(server, "verispec_requests_total", route=route, status="200")
              for route in (COMPLETIONS, CHAT)}

    def one(kind: int, prompt: str) -> tuple[str, str]:
        """kind 0/1: completions whole/streamed, 2/3: chat whole/streamed; (endpoint and prompt, text)."""
        if kind < 2:
            out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                            stream=kind == 1)
            text = out.choices[0].text if kind == 0 else "".join(c.choices[0].text for c in out if c.choices)
            return "completion " + prompt, text
        out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=8, temperature=0, stream=kind == 3)
        if kind == 2:
            return "chat " + prompt, out.choices[0].message.content
        return "chat " + prompt, "".join(c.choices[0].delta.content or "" for c in out if c.choices)

    def worker(w: int) -> list[tuple[str, str]]:  # client w: one kind of request, two prompts in turn
        return [one(w, ("1, 2, 3," if j % 2 else "a, b, c,")) for j in range(10)]

    with ThreadPoolExecutor(4) as pool:
        results = [r for rs in pool.map(worker, range(4)) for r in rs]
    assert len(results) == 40
    answers: dict[str, set[str]] = {}
    for key, text in results:
        answers.setdefault(key, set()).add(text)
    assert len(answers) == 4 and all(len(texts) == 1 and "" not in texts for texts in answers.values()), answers
    after = {route: metric(server, "verispec_requests_total", route=route, status="200")
             for route in (COMPLETIONS, CHAT)}
    assert after[COMPLETIONS] - before[COMPLETIONS] == 20 and after[CHAT] - before[CHAT] == 20


def test_disconnect_mid_stream_frees_the_server(server, client):
    cancelled = metric(server, "verispec_cancelled_generations_total")
    tokens = metric(server, "verispec_generated_tokens_total", method="ar")
    sock = open_stream(server, {"model": MODEL, "prompt": COUNTING, "max_tokens": SLOW, "temperature": 0,
                                "verispec": {"method": "ar"}})
    sock.close()
    start = time.monotonic()
    out = client.completions.create(model=MODEL, prompt=COUNTING, max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4
    assert time.monotonic() - start < 15  # the rest of the cut generation would take ~30 s
    wait_for(lambda: metric(server, "verispec_cancelled_generations_total") == cancelled + 1, what="the cancel")
    assert metric(server, "verispec_generated_tokens_total", method="ar") - tokens < SLOW / 4
    assert metric(server, "verispec_generation_running") == 0


def test_full_queue_gives_503(smol):
    with ServerThread(create_app(smol, "prompt-lookup", queue_size=1)) as small:
        running = open_stream(small, {"model": MODEL, "prompt": COUNTING, "max_tokens": SLOW, "temperature": 0,
                                      "verispec": {"method": "ar"}})
        queued: list = []
        waiter = threading.Thread(target=lambda: queued.append(request(small, "POST", COMPLETIONS, {
            "model": MODEL, "prompt": COUNTING, "max_tokens": 2, "temperature": 0})))
        waiter.start()
        wait_for(lambda: metric(small, "verispec_queue_depth") == 1, what="the second request to queue")
        status, headers, payload = request(small, "POST", COMPLETIONS, {"model": MODEL, "prompt": "a"})
        assert status == 503 and payload["error"]["code"] == "queue_full" and headers.get("retry-after") == "1"
        assert payload["error"]["type"] == "server_error" and "queue size 1" in payload["error"]["message"]
        running.close()  # frees the model: the queued request runs next
        waiter.join(60)
        assert queued and queued[0][0] == 200 and queued[0][2]["usage"]["completion_tokens"] == 2
        assert metric(small, "verispec_requests_total", route=COMPLETIONS, status="503") == 1
        assert metric(small, "verispec_queue_depth") == 0


def test_health_answers_while_generating(server):
    sock = open_stream(server, {"model": MODEL, "prompt": COUNTING, "max_tokens": SLOW, "temperature": 0,
                                "verispec": {"method": "ar"}})
    try:
        start = time.monotonic()
        assert request(server, "GET", "/health")[0] == 200
        assert time.monotonic() - start < 2  # the event loop is not blocked by the generation
        assert metric(server, "verispec_generation_running") == 1
    finally:
        sock.close()
    wait_for(lambda: metric(server, "verispec_generation_running") == 0, what="the cut stream to stop")


# --------------------------------------------------------------------------- api key and metrics


def test_api_key_required_when_set(smol):
    with ServerThread(create_app(smol, "ar", api_key="s3cret", queue_size=2)) as locked:
        with pytest.raises(openai.AuthenticationError):
            locked.client("wrong").models.list()
        status, _, payload = request(locked, "POST", CHAT, {"model": MODEL, "messages": USER})  # no header
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        assert request(locked, "GET", "/metrics")[0] == 401
        assert request(locked, "GET", "/health")[0] == 200  # the one open route
        good = locked.client("s3cret")
        assert [m.id for m in good.models.list().data] == [MODEL]
        out = good.completions.create(model=MODEL, prompt=COUNTING, max_tokens=2, temperature=0)
        assert out.usage.completion_tokens == 2
        assert metrics(locked, {"Authorization": "Bearer s3cret"})[
            ("verispec_requests_total", frozenset({"route": "/metrics", "status": "401"}.items()))] == 1


def test_metrics_page_is_prometheus_text(server):
    status, headers, text = request(server, "GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"verispec_requests", "verispec_generated_tokens", "verispec_tokens_per_second",
            "verispec_mean_accepted_tokens", "verispec_queue_depth"} <= set(families)
    assert families["verispec_requests"].type == "counter" and families["verispec_queue_depth"].type == "gauge"
    values = metrics(server)
    assert values[("verispec_mean_accepted_tokens", frozenset({"method": "prompt-lookup"}.items()))] >= 1.0
    assert values[("verispec_tokens_per_second", frozenset({"method": "prompt-lookup"}.items()))] > 0
    assert values[("verispec_generated_tokens_total", frozenset({"method": "prompt-lookup"}.items()))] > 0


def test_default_method_auto_says_what_it_runs_and_equals_ar(smol, ar):
    """A server started as a user would (method auto): smollm2 has a shipped EAGLE head, so
    auto is the hybrid; the text is still exactly ar's and usage names the method."""
    with ServerThread(create_app(smol)) as default:
        whole = default.client().completions.create(model=MODEL, prompt=COUNTING, max_tokens=16, temperature=0)
    assert whole.choices[0].text == ar.generate(COUNTING, max_new_tokens=16).text
    assert whole.usage.model_extra["method"] == SpeculativeGenerator(smol).method
