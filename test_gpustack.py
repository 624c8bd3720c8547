"""Tests for gpustack.py against a fake GPUStack on 127.0.0.1, over real sockets.

The fake replays bytes captured from a real GPUStack 2.3.0 server and a real llama.cpp
server, then adds the faults those captures don't show. Each test scripts the fake itself,
so cause and effect sit together.
"""

import asyncio
import base64
import gc
import http.client
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional

import pytest
from agno.exceptions import ContextWindowExceededError, ModelProviderError, ModelRateLimitError
from agno.models.message import Message

import gpustack
from gpustack import GPUStackChat, GPUStackRerank

HERE = os.path.dirname(os.path.abspath(__file__))

# Captured from a real GPUStack 2.3.0 ###########################################

# 102_v1_chat_ok_stream: GPUStack relaying a backend stream, with the usage chunk it adds.
REAL_STREAM = (
    b'data: {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1795547237, "model": "ghost-routed", '
    b'"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": null}]}\n\n'
    b'data: {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1795547237, "model": "ghost-routed", '
    b'"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": null}]}\n\n'
    b'data: {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1795547237, "model": "ghost-routed", '
    b'"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
    b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":1795547237,"model":"ghost-routed",'
    b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5,"time_to_first_token_ms":11.264,'
    b'"time_per_output_token_ms":6.428999999999999,"tokens_per_second":155.54518587649713}}\n\n'
    b"data: [DONE]\n\n"
)
# 109_v1_chat_upstream_midstream_error: the backend failed after the first chunk.
REAL_MIDSTREAM_ERROR = (
    b'data: {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1795547237, "model": "ghost-routed", '
    b'"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": null}]}\n\n'
    b'data: {"error": {"message": "engine died mid-stream", "type": "InternalServerError", "code": 500}}\n\n'
    b"data: [DONE]\n\n"
)
# 101_v1_chat_ok_nonstream
REAL_CHAT = (
    b'{"id": "chatcmpl-mock", "object": "chat.completion", "created": 1795547237, "model": "ghost-routed", "choices": '
    b'[{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}], '
    b'"usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}'
)
REAL_401 = b'{"code":401,"reason":"Unauthorized","message":"Invalid authentication credentials"}'
REAL_403 = b'{"code":403,"reason":"Forbidden","message":"API key does not have permission to access inference features"}'
REAL_404_MODEL = b'{"error":{"message":"Model not found","code":404,"type":"NotFound"}}'
REAL_503_NO_INSTANCE = b'{"error":{"message":"No running instances available","code":503,"type":"ServiceUnavailable"}}'
REAL_503_BACKEND_400 = (
    b'{"error":{"message":"An unexpected error occurred: Worker request failed: 1 POST '
    b"http://127.0.0.1:19020/v1/chat/completions status=400, error={\\\"error\\\": {\\\"message\\\": \\\"Invalid "
    b'value for tool_choice\\\", \\\"type\\\": \\\"BadRequestError\\\", \\\"param\\\": null, \\\"code\\\": 400}}",'
    b'"code":503,"type":"ServiceUnavailable"}}'
)
REAL_405_DETAIL = b'{"detail":"Method Not Allowed"}'

# Captured from llama.cpp's server (chat_tools_parallel_stream, trimmed): two calls, arguments in pieces.
LLAMA_TOOL_STREAM = [
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}]},
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "aRG1LItt", "type": "function", "function": {"name": "get_time", "arguments": "{"}}]}}]},
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"tool_calls": [
        {"index": 1, "id": "MJtD1ssM", "type": "function", "function": {"name": "get_time", "arguments": "{\"tz"}}]}}]},
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": "\"tz\":\"CE"}}]}}]},
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"tool_calls": [
        {"index": 1, "function": {"arguments": "\":\"UTC\"}"}}]}}]},
    {"choices": [{"finish_reason": None, "index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": "T\"}"}}]}}]},
    {"choices": [{"finish_reason": "tool_calls", "index": 0, "delta": {}}]},
]


# The fake GPUStack ##############################################################


class Seen:
    """One request as the fake received it."""

    def __init__(self, method: str, path: str, headers: Dict[str, str], body: bytes):
        self.method, self.path, self.headers, self.raw = method, path, headers, body

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class Fake:
    """A scripted GPUStack: ``fake.on(path, responder)``; responders write to the socket themselves."""

    def __init__(self, port: int = 0) -> None:
        self.routes: Dict[str, List[Callable]] = {}
        self.requests: List[Seen] = []
        self.client_gone = threading.Event()
        self.connections = 0
        self.closed = threading.Semaphore(0)  # released each time the fake closes a connection
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # Like uvicorn: without it, headers and body in two writes wait on the client's delayed ACK.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                fake.connections += 1

            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                seen = Seen(self.command, self.path, dict(self.headers.items()), body)
                fake.requests.append(seen)
                script = fake.routes.get(path)
                if not script:
                    send(self, 404, b'{"detail":"Not Found"}')
                    return
                responder = script.pop(0) if len(script) > 1 else script[0]
                try:
                    responder(self, seen)
                except (BrokenPipeError, ConnectionResetError):
                    fake.client_gone.set()
                    self.close_connection = True

            do_POST = do_GET = _handle

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024  # the load tests connect hundreds at once

            def shutdown_request(self, request: Any) -> None:
                super().shutdown_request(request)
                fake.closed.release()

        self.server = Server(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # Our own accept loop instead of serve_forever's polling: close() wakes it at once.
        self._wake, self._waker = socket.socketpair()
        # The descriptor, not the socket object: tls_fake wraps the socket (same descriptor) after this.
        self.thread = threading.Thread(target=self._serve, args=(self.server.socket.fileno(),), daemon=True)
        self.thread.start()

    def _serve(self, listening: int) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listening, selectors.EVENT_READ)
            selector.register(self._wake, selectors.EVENT_READ)
            while True:
                ready = [key.fileobj for key, _ in selector.select()]
                if self._wake in ready:
                    return
                self.server._handle_request_noblock()

    def on(self, path: str, *responders: Callable) -> None:
        """Answer ``path`` with these responders in turn; the last one repeats."""
        self.routes[path] = list(responders)

    def close(self) -> None:
        self._waker.send(b"x")
        self.thread.join(5)
        self.server.server_close()
        self._wake.close()
        self._waker.close()


def send(handler, status: int, body: bytes, content_type: str = "application/json", headers: Optional[dict] = None):
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(body)


def reply(status: int, body: Any, content_type: str = "application/json", headers: Optional[dict] = None):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return lambda h, seen: send(h, status, raw, content_type, headers)


def stream(*pieces: Any, delay: float = 0.0, close: bool = False, content_type: str = "text/event-stream"):
    """An event stream in chunked encoding; each piece (bytes, or a dict sent as ``data:``) is its own write."""

    def respond(h, seen):
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for piece in pieces:
            raw = piece if isinstance(piece, bytes) else b"data: " + json.dumps(piece).encode() + b"\n\n"
            h.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            h.wfile.flush()
            if delay:
                time.sleep(delay)
        if close:
            h.close_connection = True
            return
        h.wfile.write(b"0\r\n\r\n")

    return respond


def chat_answer(content: Optional[str] = "Hello", **message: Any) -> dict:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }


def chunk(content: Optional[str] = None, finish: Optional[str] = None, **delta: Any) -> dict:
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@pytest.fixture
def fake():
    server = Fake()
    server.on("/v1/chat/completions", reply(200, REAL_CHAT))
    yield server
    gpustack.close_connections()
    server.close()


@pytest.fixture
def model(fake, monkeypatch):
    monkeypatch.delenv("GPUSTACK_API_KEY", raising=False)
    monkeypatch.delenv("GPUSTACK_SERVER_URL", raising=False)
    monkeypatch.setattr(gpustack, "INITIAL_RETRY_DELAY", 0.01)
    return GPUStackChat(id="ghost-routed", base_url=fake.url, api_key="sk-test-secret-123456")


@pytest.fixture
def agno_log():
    """The lines Agno's logger writes. It doesn't propagate to the root logger (so caplog can miss them):
    a handler of our own sits on it."""
    import logging

    from agno.utils import log

    lines: List[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep(logging.DEBUG)
    log.logger.addHandler(handler)
    yield lines
    log.logger.removeHandler(handler)


def user(text: str = "hi") -> List[Message]:
    return [Message(role="user", content=text)]


def text_of(pieces) -> str:
    return "".join(piece.content or "" for piece in pieces)


# Configuration ####################################################################


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/", "/v1-openai", "/v1-openai/"])
def test_base_url_accepts_pasted_suffixes(fake, suffix):
    GPUStackChat(id="m", base_url=fake.url + suffix).invoke(user())
    assert fake.requests[-1].path == "/v1/chat/completions"


def test_base_url_falls_back_to_env_then_default(monkeypatch, fake):
    monkeypatch.setenv("GPUSTACK_SERVER_URL", fake.url + "/v1")
    assert GPUStackChat(id="m").base_url == fake.url
    monkeypatch.delenv("GPUSTACK_SERVER_URL")
    assert GPUStackChat(id="m").base_url == "http://localhost:9009"


def test_base_url_without_scheme_is_a_clear_error():
    with pytest.raises(ValueError, match="http://host:port"):
        GPUStackChat(id="m", base_url="gpustack.local:9009")


def test_api_key_from_env_is_sent_as_bearer(monkeypatch, fake):
    monkeypatch.setenv("GPUSTACK_API_KEY", "gpustack_envkey_1234")
    GPUStackChat(id="m", base_url=fake.url).invoke(user())
    assert fake.requests[-1].headers["Authorization"] == "Bearer gpustack_envkey_1234"


def test_no_key_sends_no_authorization_header(monkeypatch, fake):
    monkeypatch.delenv("GPUSTACK_API_KEY", raising=False)
    GPUStackChat(id="m", base_url=fake.url).invoke(user())
    assert "Authorization" not in fake.requests[-1].headers


def test_key_absent_from_repr_and_to_dict(model):
    assert "sk-test-secret" not in repr(model)
    assert "sk-test-secret" not in json.dumps(model.to_dict(), default=str)


def test_sampling_fields_sent_only_when_set(fake):
    GPUStackChat(id="m", base_url=fake.url).invoke(user())
    assert set(fake.requests[-1].json) == {"model", "messages"}
    GPUStackChat(id="m", base_url=fake.url, temperature=0.2, max_tokens=5, top_p=0.9, stop=["x"], seed=1,
                 frequency_penalty=0.1, presence_penalty=0.2, logprobs=True, top_logprobs=2, user="u").invoke(user())
    body = fake.requests[-1].json
    assert body["temperature"] == 0.2 and body["max_tokens"] == 5 and body["stop"] == ["x"] and body["top_logprobs"] == 2


def test_request_params_and_headers_are_sent(fake):
    GPUStackChat(id="m", base_url=fake.url, request_params={"top_k": 5}, headers={"X-Team": "a"}).invoke(user())
    assert fake.requests[-1].json["top_k"] == 5
    assert fake.requests[-1].headers["X-Team"] == "a"


def test_enable_thinking_goes_into_chat_template_kwargs(fake):
    GPUStackChat(id="m", base_url=fake.url, enable_thinking=False,
                 request_params={"chat_template_kwargs": {"foo": 1}}).invoke(user())
    assert fake.requests[-1].json["chat_template_kwargs"] == {"enable_thinking": False, "foo": 1}


# Messages ############################################################################


def test_system_role_stays_system(model, fake):
    model.invoke([Message(role="system", content="be brief"), Message(role="user", content="hi")])
    assert [m["role"] for m in fake.requests[-1].json["messages"]] == ["system", "user"]


def test_tool_calls_and_results_are_sent_in_openai_shape(model, fake):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    model.invoke([Message(role="user", content="x"), Message(role="assistant", content=None, tool_calls=[call]),
                  Message(role="tool", content="42", tool_call_id="c1")])
    sent = fake.requests[-1].json["messages"]
    assert sent[1]["tool_calls"] == [call] and sent[2] == {"role": "tool", "content": "42", "tool_call_id": "c1"}


def test_images_become_image_url_parts(model, fake, tmp_path):
    from agno.media import Image

    path = tmp_path / "p.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    images = [Image(url="https://x/y.png"), Image(filepath=str(path)), Image(content=b"\x89PNG\r\n\x1a\n00")]
    model.invoke([Message(role="user", content="look", images=images)])
    parts = fake.requests[-1].json["messages"][0]["content"]
    assert parts[0] == {"type": "text", "text": "look"}
    assert [p["type"] for p in parts[1:]] == ["image_url"] * 3
    assert parts[1]["image_url"]["url"] == "https://x/y.png"
    assert parts[2]["image_url"]["url"].startswith("data:image/png;base64,")


def test_seed_call_invoke_with_plain_dicts(model):
    response = model.invoke([{"role": "user", "content": "hi"}])
    assert response.content == "Hello"


def test_messages_as_string_is_a_clear_error(model):
    with pytest.raises(TypeError, match="list of agno Message"):
        model.invoke("hi")


# Non-streaming answers ##################################################################


def test_invoke_returns_content_and_usage(model):
    response = model.invoke(user())
    assert response.content == "Hello"
    assert (response.response_usage.input_tokens, response.response_usage.output_tokens) == (3, 2)


def test_usage_details_become_cache_and_reasoning_metrics(model, fake):
    answer = chat_answer()
    answer["usage"].update(prompt_tokens_details={"cached_tokens": 7}, completion_tokens_details={"reasoning_tokens": 4})
    fake.on("/v1/chat/completions", reply(200, answer))
    usage = model.invoke(user()).response_usage
    assert (usage.cache_read_tokens, usage.reasoning_tokens) == (7, 4)


def test_reasoning_content_field_is_reasoning(model, fake):
    fake.on("/v1/chat/completions", reply(200, chat_answer("42", reasoning_content="think hard")))
    response = model.invoke(user())
    assert (response.reasoning_content, response.content) == ("think hard", "42")


def test_reasoning_field_is_reasoning(model, fake):
    fake.on("/v1/chat/completions", reply(200, chat_answer("42", reasoning="vllm style")))
    assert model.invoke(user()).reasoning_content == "vllm style"


def test_think_tags_in_content_become_reasoning(model, fake):
    fake.on("/v1/chat/completions", reply(200, chat_answer("<think>hmm</think>\n\n42")))
    response = model.invoke(user())
    assert (response.reasoning_content, response.content) == ("hmm", "42")


def test_parallel_tool_calls_in_one_answer(model, fake):
    calls = [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
             {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"y": 2}}}]
    fake.on("/v1/chat/completions", reply(200, chat_answer(None, tool_calls=calls)))
    response = model.invoke(user())
    assert [c["function"]["name"] for c in response.tool_calls] == ["f", "g"]
    assert response.tool_calls[1]["function"]["arguments"] == "{\"y\": 2}"


def test_ainvoke_without_assistant_message(model):
    assert asyncio.run(model.ainvoke(user())).content == "Hello"


def test_complete_posts_completions_and_returns_text(model, fake):
    fake.on("/v1/completions", reply(200, {"choices": [{"index": 0, "text": " hello", "finish_reason": "stop"}]}))
    assert model.complete("Say", max_tokens=3) == " hello"
    assert fake.requests[-1].json == {"model": "ghost-routed", "prompt": "Say", "max_tokens": 3}


def test_complete_stream_yields_text_pieces(model, fake):
    pieces = [{"choices": [{"index": 0, "text": t, "finish_reason": None}]} for t in ("a", "b")]
    fake.on("/v1/completions", stream(*pieces, {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}, b"data: [DONE]\n\n"))
    assert list(model.complete("x", stream=True)) == ["a", "b"]


def test_acomplete_returns_text_and_streams(model, fake):
    fake.on("/v1/completions", reply(200, {"choices": [{"index": 0, "text": "t", "finish_reason": "stop"}]}),
            stream({"choices": [{"index": 0, "text": "s", "finish_reason": "stop"}]}, b"data: [DONE]\n\n"))

    async def go():
        text = await model.acomplete("x")
        pieces = [piece async for piece in await model.acomplete("x", stream=True)]
        return text, pieces

    assert asyncio.run(go()) == ("t", ["s"])


# Streaming ###################################################################################


def test_invoke_stream_replays_real_gpustack_stream(model, fake):
    fake.on("/v1/chat/completions", stream(REAL_STREAM))
    pieces = list(model.invoke_stream(user()))
    assert text_of(pieces) == "Hello"
    usage = [p.response_usage for p in pieces if p.response_usage]
    assert usage[0].total_tokens == 5 and usage[0].provider_metrics["tokens_per_second"] > 0


def test_stream_asks_for_usage(model, fake):
    fake.on("/v1/chat/completions", stream(REAL_STREAM))
    list(model.invoke_stream(user()))
    assert fake.requests[-1].json["stream_options"] == {"include_usage": True}


def test_seed_stream_loop_with_parse_provider_response_delta(model, fake):
    fake.on("/v1/chat/completions", stream(REAL_STREAM))
    text = "".join(model.parse_provider_response_delta(c).content or "" for c in model.invoke_stream([{"role": "user", "content": "hi"}]))
    assert text == "Hello"


def test_ainvoke_stream_yields_pieces(model, fake):
    fake.on("/v1/chat/completions", stream(REAL_STREAM))

    async def go():
        return [p async for p in model.ainvoke_stream(user())]

    assert text_of(asyncio.run(go())) == "Hello"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_sse_line_endings(model, fake, newline):
    fake.on("/v1/chat/completions", stream(REAL_STREAM.replace(b"\n", newline)))
    assert text_of(model.invoke_stream(user())) == "Hello"


def test_sse_every_split_point_gives_same_events():
    body = REAL_STREAM.replace(b"\n", b"\r\n")
    whole = gpustack._SSEDecoder().feed(body)
    for cut in range(1, len(body)):
        decoder = gpustack._SSEDecoder()
        assert decoder.feed(body[:cut]) + decoder.feed(body[cut:]) + decoder.close() == whole


def test_sse_comments_ignored_and_data_lines_joined():
    events = gpustack._SSEDecoder().feed(b": ping\n\ndata: a\ndata:b\nid: 7\nretry: 10\nevent: x\n\n")
    assert events == [("x", "a\nb")]


def test_sse_id_and_retry_fields_are_parsed():
    decoder = gpustack._SSEDecoder()
    decoder.feed(b"id: 7\nretry: 1500\ndata: x\n\n")
    assert (decoder.last_event_id, decoder.retry) == ("7", 1500)


def test_stream_with_keepalive_comments_and_reframed_events(model, fake):
    # GPUStack's gateway: every line is its own event, event: lines apart from their data.
    fake.on("/v1/chat/completions", stream(b": ping\n\n", b"event: message\n\n", b"data:" + json.dumps(chunk("Hel")).encode() + b"\n\n",
                                           b": ping\n\n", b"data: " + json.dumps(chunk("lo", "stop")).encode() + b"\n\n", b"data: [DONE]\n\n"))
    assert text_of(model.invoke_stream(user())) == "Hello"


def test_stream_tolerates_bare_json_lines(model, fake):
    fake.on("/v1/chat/completions", stream(json.dumps(chunk("Hel")).encode() + b"\n", json.dumps(chunk("lo", "stop")).encode() + b"\n"))
    assert text_of(model.invoke_stream(user())) == "Hello"


def test_stream_tolerates_whole_answer_wrapped_as_event(model, fake):
    fake.on("/v1/chat/completions", stream(b"data: " + REAL_CHAT + b"\n\n"))
    assert text_of(model.invoke_stream(user())) == "Hello"


def test_stream_request_answered_with_json_body(model, fake):
    fake.on("/v1/chat/completions", reply(200, REAL_CHAT))
    assert text_of(model.invoke_stream(user())) == "Hello"


def first_then_wait(release: threading.Event):
    """A stream that sends "first", then holds until ``release`` is set, then "!" and the end."""

    def respond(h, seen):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        raw = b"data: " + json.dumps(chunk("first")).encode() + b"\n\n"
        h.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
        h.wfile.flush()
        release.wait(5)
        raw = b"data: " + json.dumps(chunk("!", "stop")).encode() + b"\n\ndata: [DONE]\n\n"
        h.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(raw), raw))

    return respond


def test_stream_pieces_arrive_before_the_stream_ends(model, fake):
    release = threading.Event()

    fake.on("/v1/chat/completions", first_then_wait(release))
    pieces = model.invoke_stream(user())
    first = next(p for p in pieces if p.content)
    assert first.content == "first" and not release.is_set()
    release.set()
    assert text_of(pieces) == "!"


def test_streamed_reasoning_fields(model, fake):
    fake.on("/v1/chat/completions", stream(chunk(reasoning_content="a"), chunk(reasoning="b"), chunk("c", "stop"), b"data: [DONE]\n\n"))
    pieces = list(model.invoke_stream(user()))
    assert "".join(p.reasoning_content or "" for p in pieces) == "ab" and text_of(pieces) == "c"


def test_streamed_think_tags_split_across_chunks(model, fake):
    parts = ["<thi", "nk>let me ", "think</th", "ink>\n\nThe answer", " is <b>4</b>"]
    fake.on("/v1/chat/completions", stream(*[chunk(p) for p in parts], chunk("", "stop"), b"data: [DONE]\n\n"))
    pieces = list(model.invoke_stream(user()))
    assert "".join(p.reasoning_content or "" for p in pieces) == "let me think"
    assert text_of(pieces) == "The answer is <b>4</b>"


def test_think_splitter_holds_only_a_possible_tag():
    splitter = gpustack._ThinkSplitter()
    assert splitter.feed("a <") == ("", "a ")
    assert splitter.feed("b") == ("", "<b")


def test_streamed_tool_call_pieces_merge_into_whole_calls(model, fake):
    fake.on("/v1/chat/completions", stream(*LLAMA_TOOL_STREAM, b"data: [DONE]\n\n"))
    pieces = [call for p in model.invoke_stream(user()) for call in (p.tool_calls or [])]
    calls = model.parse_tool_calls(pieces)
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("aRG1LItt", "get_time", {"tz": "CET"}), ("MJtD1ssM", "get_time", {"tz": "UTC"})]


# Stream faults #####################################################################################


def test_midstream_error_frame_raises_with_message(model, fake):
    fake.on("/v1/chat/completions", stream(REAL_MIDSTREAM_ERROR))
    with pytest.raises(ModelProviderError, match="engine died mid-stream") as caught:
        list(model.invoke_stream(user()))
    assert caught.value.status_code == 500


def test_error_event_type_raises(model, fake):
    fake.on("/v1/chat/completions", stream(b'event: error\ndata: {"message": "overloaded"}\n\n'))
    with pytest.raises(ModelProviderError, match="overloaded"):
        list(model.invoke_stream(user()))


def test_non_json_data_line_raises_provider_error(model, fake):
    fake.on("/v1/chat/completions", stream(b"data: {not json\n\n"))
    with pytest.raises(ModelProviderError, match="not JSON"):
        list(model.invoke_stream(user()))


def test_stream_failing_midway_drops_its_connection_while_the_error_lives(model, fake):
    """Agno keeps a failed call's error, and its traceback keeps the stream's frames: the connection
    must be closed by the stream itself, not left to the collector, or GPUStack generates on."""

    def junk_then_hold(h, seen):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        raw = b"data: {not json\n\n"
        h.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
        h.wfile.flush()
        held_until_gone(fake)(h, seen)

    fake.on("/v1/chat/completions", junk_then_hold)
    with pytest.raises(ModelProviderError, match="not JSON") as caught:
        list(model.invoke_stream(user()))
    raised_at = time.monotonic()
    assert fake.client_gone.wait(2) and fake.gone_at - raised_at < 0.5
    assert caught.value.__traceback__ is not None  # still held: only the stream's own close ended the request


def test_stream_cut_before_done_raises(model, fake):
    fake.on("/v1/chat/completions", stream(chunk("Hel"), close=True))
    with pytest.raises(ModelProviderError, match="incomplete"):
        list(model.invoke_stream(user()))


def test_stream_ending_after_finish_reason_without_done_is_complete(model, fake):
    fake.on("/v1/chat/completions", stream(chunk("Hi", "stop")))
    assert text_of(model.invoke_stream(user())) == "Hi"


def test_failed_stream_request_reports_status_and_json_body(model, fake):
    body = b'{"error": {"message": "This model\'s maximum context length is 8 tokens.", "type": "BadRequestError", "code": 400}}'
    fake.on("/v1/chat/completions", reply(400, body))
    with pytest.raises(ContextWindowExceededError, match="maximum context length") as caught:
        list(model.invoke_stream(user()))
    assert caught.value.status_code == 400


def _endless(h, seen):
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    raw = b"data: " + json.dumps(chunk("tok")).encode() + b"\n\n"
    for _ in range(2000):
        h.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
        h.wfile.flush()
        time.sleep(0.005)


def test_breaking_out_of_a_stream_closes_the_connection(model, fake):
    fake.on("/v1/chat/completions", _endless)
    for piece in model.invoke_stream(user()):
        break
    del piece
    gc.collect()
    assert fake.client_gone.wait(5)


def held_until_gone(fake: Fake):
    """Holds the request without answering until the client leaves, and notes when it did."""

    def respond(h, seen):
        try:
            h.connection.settimeout(5)
            h.connection.recv(1)
        except OSError:
            pass
        fake.gone_at = time.monotonic()
        fake.client_gone.set()

    return respond


def cancelled_once_arrived(fake: Fake, path: str, start: Callable[[], Any]) -> float:
    """Runs ``start()`` as a task, cancels it as soon as its request reaches the fake; when it was cancelled."""

    async def go() -> float:
        task = asyncio.create_task(start())
        while not any(seen.path == path for seen in fake.requests):
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    return asyncio.run(go())


def test_cancelled_ainvoke_closes_the_connection_at_once(model, fake):
    fake.on("/v1/chat/completions", held_until_gone(fake))
    cancelled_at = cancelled_once_arrived(fake, "/v1/chat/completions", lambda: model.ainvoke(user()))
    assert fake.client_gone.wait(2) and fake.gone_at - cancelled_at < 0.5


def test_64_concurrent_ainvoke_calls_are_in_flight_together(model, fake):
    inside = []
    all_in = threading.Event()
    lock = threading.Lock()

    def gate(h, seen):
        with lock:
            inside.append(1)
            if len(inside) == 64:
                all_in.set()
        all_in.wait(10)
        send(h, 200, REAL_CHAT)

    fake.on("/v1/chat/completions", gate)

    async def go():
        return await asyncio.gather(*[model.ainvoke(user()) for _ in range(64)])

    started = time.monotonic()
    answers = asyncio.run(go())
    assert all_in.is_set() and len(answers) == 64 and time.monotonic() - started < 10


# Errors ###############################################################################################


def raises(model, status: int, match: str):
    with pytest.raises(ModelProviderError, match=match) as caught:
        model.invoke(user())
    assert caught.value.status_code == status
    assert caught.value.model_id == model.id and caught.value.model_name == model.name
    return caught.value


def test_gpustack_401_names_the_env_var(model, fake):
    fake.on("/v1/chat/completions", reply(401, REAL_401))
    error = raises(model, 401, "Invalid authentication credentials")
    assert "GPUSTACK_API_KEY" in error.message


def test_gpustack_403_names_the_env_var(model, fake):
    fake.on("/v1/chat/completions", reply(403, REAL_403))
    assert "GPUSTACK_API_KEY" in raises(model, 403, "permission to access inference").message


def test_model_not_found_suggests_list_models(model, fake):
    fake.on("/v1/chat/completions", reply(404, REAL_404_MODEL))
    assert "list_models" in raises(model, 404, "Model not found").message


def test_no_running_instance_explained(model, fake):
    fake.on("/v1/chat/completions", reply(503, REAL_503_NO_INSTANCE))
    model.max_retries = 0
    assert "no running instance yet" in raises(model, 503, "No running instances available").message


def test_vllm_error_shape(model, fake):
    fake.on("/v1/chat/completions", reply(400, {"object": "error", "message": "bad temperature", "type": "BadRequestError", "code": 400}))
    raises(model, 400, "bad temperature")


@pytest.mark.parametrize("detail, words", [("Method Not Allowed", "Method Not Allowed"),
                                           ([{"loc": ["body", "model"], "msg": "field required"}], "body.model: field required")])
def test_fastapi_detail_shapes(model, fake, detail, words):
    fake.on("/v1/chat/completions", reply(422, {"detail": detail}))
    raises(model, 422, words)


def test_html_502_from_gateway_keeps_the_text(model, fake):
    html = b"<html><body><h1>502 Bad Gateway</h1>upstream connect error or disconnect/reset before headers" + b" x" * 500 + b"</body></html>"
    fake.on("/v1/chat/completions", reply(502, html, "text/html"))
    model.max_retries = 0
    error = raises(model, 502, "upstream connect error")
    assert "<h1>" not in error.message and len(error.message) < 1000


def test_plain_text_no_healthy_upstream(model, fake):
    fake.on("/v1/chat/completions", reply(503, b"no healthy upstream", "text/plain"))
    model.max_retries = 0
    raises(model, 503, "no healthy upstream")


def test_refused_connection_names_url_and_env_var():
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    model = GPUStackChat(id="m", base_url=f"http://127.0.0.1:{port}", max_retries=0)
    error = raises(model, 502, "Cannot connect")
    assert f"127.0.0.1:{port}" in error.message and "GPUSTACK_SERVER_URL" in error.message


def test_timeout_names_the_value(fake):
    fake.on("/v1/chat/completions", lambda h, seen: time.sleep(1.5))
    model = GPUStackChat(id="m", base_url=fake.url, timeout=0.3, max_retries=0)
    started = time.monotonic()
    raises(model, 502, r"timeout=0\.3s")
    assert time.monotonic() - started < 1.4


def test_redirect_is_reported_not_followed(model, fake):
    fake.on("/v1/chat/completions", reply(307, b"", headers={"Location": "https://elsewhere.example/v1/chat/completions"}))
    error = raises(model, 307, "redirected to https://elsewhere.example")
    assert len(fake.requests) == 1 and "sk-test-secret" not in error.message


def test_key_never_in_error_even_if_server_echoes_it(model, fake):
    fake.on("/v1/chat/completions", reply(401, {"error": {"message": "bad key sk-test-secret-123456"}}))
    assert "sk-test-secret-123456" not in raises(model, 401, "bad key").message


def test_rate_limit_is_classified(model, fake):
    fake.on("/v1/chat/completions", reply(429, {"error": {"message": "slow down"}}, headers={"Retry-After": "0"}))
    with pytest.raises(ModelRateLimitError):
        model.invoke(user())
    assert len(fake.requests) == 3


def test_500_then_success_is_retried(model, fake):
    fake.on("/v1/chat/completions", reply(500, {"error": {"message": "boom"}}), reply(200, REAL_CHAT))
    assert model.invoke(user()).content == "Hello"
    assert len(fake.requests) == 2


def test_429_honours_retry_after(model, fake):
    fake.on("/v1/chat/completions", reply(429, {"error": {"message": "slow"}}, headers={"Retry-After": "0.4"}), reply(200, REAL_CHAT))
    started = time.monotonic()
    model.invoke(user())
    assert time.monotonic() - started >= 0.4


def test_retry_after_longer_than_two_minutes_is_not_retried(model, fake):
    fake.on("/v1/chat/completions", reply(429, {"error": {"message": "later"}}, headers={"Retry-After": "600"}))
    with pytest.raises(ModelRateLimitError):
        model.invoke(user())
    assert len(fake.requests) == 1


def test_retry_after_http_date_is_understood():
    import email.utils

    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < gpustack._retry_after({"retry-after": when}) <= 31


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_errors_are_not_retried(model, fake, status):
    fake.on("/v1/chat/completions", reply(status, {"error": {"message": "no"}}))
    with pytest.raises(ModelProviderError):
        model.invoke(user())
    assert len(fake.requests) == 1


def test_gpustack_503_wrapping_backend_400_is_not_retried(model, fake):
    fake.on("/v1/chat/completions", reply(503, REAL_503_BACKEND_400))
    with pytest.raises(ModelProviderError, match="Invalid value for tool_choice"):
        model.invoke(user())
    assert len(fake.requests) == 1


def test_stream_is_retried_before_its_first_byte(model, fake):
    fake.on("/v1/chat/completions", reply(502, b"upstream exploded (plain text)", "text/plain"), stream(REAL_STREAM))
    assert text_of(model.invoke_stream(user())) == "Hello"
    assert len(fake.requests) == 2


def test_empty_200_body_is_a_clear_error(model, fake):
    fake.on("/v1/chat/completions", reply(200, b""))
    raises(model, 502, "not JSON")


def test_html_200_body_is_a_clear_error(model, fake):
    fake.on("/v1/chat/completions", reply(200, b"<html>login</html>", "text/html"))
    raises(model, 502, "not JSON")


# Connections #########################################################################################


def test_sequential_calls_reuse_one_connection(model, fake):
    for _ in range(5):
        model.invoke(user())
    fake.on("/v1/chat/completions", stream(REAL_STREAM))
    for _ in range(3):
        list(model.invoke_stream(user()))
    assert fake.connections == 1


def test_connection_closed_by_server_between_calls_is_replaced_without_a_retry(fake):
    def once_then_close(h, seen):
        send(h, 200, REAL_CHAT)
        h.close_connection = True

    fake.on("/v1/chat/completions", once_then_close)
    model = GPUStackChat(id="m", base_url=fake.url, max_retries=0)
    for _ in range(3):
        assert model.invoke(user()).content == "Hello"
        assert fake.closed.acquire(timeout=5)  # the idle connection in the pool is now a dead one
    assert len(fake.requests) == 3 and fake.connections == 3


def test_async_worker_threads_exit_when_idle(model, monkeypatch):
    monkeypatch.setattr(gpustack, "WORKER_IDLE_SECONDS", 0.2)

    async def go():
        await asyncio.gather(*[model.ainvoke(user()) for _ in range(8)])

    asyncio.run(go())
    deadline = time.monotonic() + 5
    while gpustack._EXECUTOR.threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gpustack._EXECUTOR.threads == 0


# Agno Agent runs ##########################################################################################


def get_weather(city: str) -> str:
    """Get the weather for a city.

    Args:
        city: The city name.
    """
    return f"sunny in {city}"


def tool_turns(stream_mode: bool):
    """First turn: call get_weather (arguments split when streamed); next turn: answer with the tool's result."""

    def respond(h, seen):
        messages = seen.json["messages"]
        tool_results = [m for m in messages if m["role"] == "tool"]
        if not tool_results:
            if stream_mode:
                pieces = [chunk(tool_calls=[{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]),
                          chunk(tool_calls=[{"index": 0, "function": {"arguments": "{\"ci"}}]),
                          chunk(tool_calls=[{"index": 0, "function": {"arguments": "ty\": \"Paris\"}"}}]),
                          chunk(finish="tool_calls"), b"data: [DONE]\n\n"]
                return stream(*pieces)(h, seen)
            call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
            return send(h, 200, json.dumps(chat_answer(None, tool_calls=[call])).encode())
        answer = "It is " + tool_results[0]["content"]
        if stream_mode:
            return stream(chunk(answer[:6]), chunk(answer[6:], "stop"), b"data: [DONE]\n\n")(h, seen)
        return send(h, 200, json.dumps(chat_answer(answer)).encode())

    return respond


@pytest.mark.parametrize("streamed", [False, True])
def test_agent_run_calls_python_tool_and_answers(model, fake, streamed):
    from agno.agent import Agent

    fake.on("/v1/chat/completions", tool_turns(streamed))
    agent = Agent(model=model, tools=[get_weather])
    if streamed:
        content = "".join(e.content for e in agent.run("weather in Paris?", stream=True)
                          if getattr(e, "event", "") == "RunContent" and isinstance(e.content, str))
    else:
        content = agent.run("weather in Paris?").content
    assert content == "It is sunny in Paris"
    first = fake.requests[0].json
    assert first["tools"][0]["function"]["name"] == "get_weather"
    assert fake.requests[1].json["messages"][-1]["tool_call_id"] == "call_1"


@pytest.mark.parametrize("streamed", [False, True])
def test_agent_arun_calls_python_tool_and_answers(model, fake, streamed):
    from agno.agent import Agent

    fake.on("/v1/chat/completions", tool_turns(streamed))
    agent = Agent(model=model, tools=[get_weather])

    async def go():
        if streamed:
            parts = []
            async for e in agent.arun("weather in Paris?", stream=True):
                if getattr(e, "event", "") == "RunContent" and isinstance(e.content, str):
                    parts.append(e.content)
            return "".join(parts)
        return (await agent.arun("weather in Paris?")).content

    assert asyncio.run(go()) == "It is sunny in Paris"


def test_tool_choice_is_passed_through(model, fake):
    from agno.agent import Agent

    fake.on("/v1/chat/completions", tool_turns(False))
    Agent(model=model, tools=[get_weather], tool_choice="required").run("x")
    assert fake.requests[0].json["tool_choice"] == "required"


def test_agent_structured_output_sends_json_schema_and_parses(model, fake):
    from agno.agent import Agent
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    fake.on("/v1/chat/completions", reply(200, chat_answer('{"name": "Paris", "population": 2100000}')))
    result = Agent(model=model, output_schema=City).run("Tell me about Paris").content
    assert result == City(name="Paris", population=2100000)
    response_format = fake.requests[-1].json["response_format"]
    assert response_format["type"] == "json_schema" and response_format["json_schema"]["name"] == "City"
    assert "population" in json.dumps(response_format["json_schema"]["schema"])


def test_json_object_response_format_passes_through(model, fake):
    model.invoke(user(), response_format={"type": "json_object"})
    assert fake.requests[-1].json["response_format"] == {"type": "json_object"}


def test_agent_streamed_reasoning_reaches_run_output(model, fake):
    from agno.agent import Agent

    fake.on("/v1/chat/completions", stream(chunk("<think>weigh it</think>"), chunk("Yes", "stop"), b"data: [DONE]\n\n"))
    events = [e for e in Agent(model=model).run("?", stream=True) if getattr(e, "event", "") == "RunContent"]
    assert "".join(e.content or "" for e in events if isinstance(e.content, str)) == "Yes"
    assert "".join(getattr(e, "reasoning_content", None) or "" for e in events) == "weigh it"


# TLS, proxies, logs ##########################################################################################


@pytest.fixture
def tls_fake(tmp_path):
    import shutil
    import ssl

    if not shutil.which("openssl"):
        pytest.skip("openssl command not available to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = Fake()
    server.on("/v1/chat/completions", reply(200, REAL_CHAT))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
    server.url = server.url.replace("http://", "https://")
    server.cert = str(cert)
    yield server
    gpustack.close_connections()
    server.close()


def test_self_signed_certificate_is_refused_by_default_with_advice(tls_fake):
    model = GPUStackChat(id="m", base_url=tls_fake.url, max_retries=0)
    assert "verify=False" in raises(model, 502, "certificate").message


def test_verify_with_ca_bundle_path(tls_fake):
    assert GPUStackChat(id="m", base_url=tls_fake.url, verify=tls_fake.cert).invoke(user()).content == "Hello"


def test_verify_false_accepts_self_signed(tls_fake):
    assert GPUStackChat(id="m", base_url=tls_fake.url, verify=False).invoke(user()).content == "Hello"


def test_ssl_cert_file_env_is_honoured(tls_fake, monkeypatch):
    monkeypatch.setenv("SSL_CERT_FILE", tls_fake.cert)
    gpustack._OPENERS.clear()
    try:
        assert GPUStackChat(id="m", base_url=tls_fake.url).invoke(user()).content == "Hello"
    finally:
        gpustack.close_connections()
        gpustack._OPENERS.clear()


def test_http_proxy_env_is_used_and_no_proxy_respected(fake, monkeypatch):
    proxy = Fake()
    try:
        proxy.on(fake.url + "/v1/chat/completions", reply(200, chat_answer("via proxy")))
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        model = GPUStackChat(id="m", base_url=fake.url)
        assert model.invoke(user()).content == "via proxy"
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert model.invoke(user()).content == "Hello"
    finally:
        gpustack.close_connections()
        proxy.close()


def test_key_never_in_retry_log_lines(model, fake, agno_log):
    fake.on("/v1/chat/completions", reply(500, {"error": {"message": "boom for sk-test-secret-123456"}}), reply(200, REAL_CHAT))
    model.invoke(user())
    assert len(agno_log) == 1
    assert agno_log[0].startswith(f"GPUStack: boom for *** (HTTP 500 from POST {fake.url}/v1/chat/completions). Retrying in ")


def test_concurrent_threads_share_one_model(model, fake):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: model.invoke(user()).content, range(200)))
    assert answers == ["Hello"] * 200


# Embeddings ##################################################################################################

from agno.exceptions import EmbeddingError  # noqa: E402
from agno.knowledge.document import Document  # noqa: E402

from gpustack import GPUStack, GPUStackEmbeddings, list_models  # noqa: E402


def embeddings_answer(vectors, order=None, usage=True):
    order = order or list(range(len(vectors)))
    data = [{"object": "embedding", "index": i, "embedding": vectors[i]} for i in order]
    answer = {"object": "list", "model": "bge-m3", "data": data}
    if usage:
        answer["usage"] = {"prompt_tokens": 1, "total_tokens": 1}
    return answer


def echo_embedder(dims: int = 3):
    """Each text embeds to [len(text), position in its batch, 0, ...], so order mistakes show."""

    def respond(h, seen):
        texts = seen.json["input"]
        texts = [texts] if isinstance(texts, str) else texts
        if any("poison" in t for t in texts) and len(texts) > 1:
            return send(h, 400, b'{"error": {"message": "batch rejected", "code": 400}}')
        if any("poison" in t for t in texts):
            return send(h, 400, b'{"error": {"message": "this text is poison", "code": 400}}')
        vectors = [[float(len(t)), float(i)] + [0.0] * (dims - 2) for i, t in enumerate(texts)]
        send(h, 200, json.dumps(embeddings_answer(vectors, order=list(reversed(range(len(texts)))))).encode())

    return respond


@pytest.fixture
def embedder(fake, monkeypatch):
    monkeypatch.setattr(gpustack, "INITIAL_RETRY_DELAY", 0.01)
    fake.on("/v1/embeddings", echo_embedder())
    return GPUStackEmbeddings(id="bge-m3", base_url=fake.url, api_key="sk-test-secret-123456")


def test_seed_embed_returns_server_json(embedder, fake):
    result = embedder.embed("text")
    assert result["data"][0]["embedding"] == [4.0, 0.0, 0.0]
    assert fake.requests[-1].json == {"model": "bge-m3", "input": "text"}


def test_batch_is_one_request_and_vectors_follow_index(embedder, fake):
    vectors = embedder.parse_embeddings_response(embedder.embed(["a", "bb", "ccc"]))
    assert [v[:2] for v in vectors] == [[1.0, 0.0], [2.0, 1.0], [3.0, 2.0]]
    assert len(fake.requests) == 1


def test_aembed(embedder):
    assert asyncio.run(embedder.aembed(["a", "bb"]))["data"]


def test_base64_vectors_are_decoded(embedder, fake):
    import base64
    import struct

    raw = base64.b64encode(struct.pack("<3f", 0.5, -1.0, 2.0)).decode()
    fake.on("/v1/embeddings", reply(200, embeddings_answer([raw])))
    embedder.encoding_format = "base64"
    assert embedder.get_embedding("x") == [0.5, -1.0, 2.0]
    assert fake.requests[-1].json["encoding_format"] == "base64"


@pytest.mark.parametrize("bad", ["", "   ", [], ["ok", ""], [1]])
def test_empty_input_is_a_value_error_before_any_request(embedder, fake, bad):
    with pytest.raises(ValueError):
        embedder.embed(bad)
    with pytest.raises(ValueError):
        embedder.get_embedding(bad if isinstance(bad, str) else "")
    assert fake.requests == []


def test_dimensions_unset_is_probed_once_from_the_server(embedder, fake):
    fake.on("/v1/embeddings", echo_embedder(dims=5))
    assert embedder.dimensions == 5 and embedder.dimensions == 5
    assert len(fake.requests) == 1 and "dimensions" not in fake.requests[0].json


def test_dimensions_set_are_sent_and_checked(embedder, fake):
    embedder.dimensions = 3
    embedder.get_embedding("abc")
    assert fake.requests[-1].json["dimensions"] == 3
    embedder.dimensions = 8
    with pytest.raises(EmbeddingError, match="3-dimensional vectors but dimensions=8"):
        embedder.get_embedding("abc")


def test_embedder_interface_and_usage(embedder):
    vector, usage = embedder.get_embedding_and_usage("abcd")
    assert vector[0] == 4.0 and usage == {"prompt_tokens": 1, "total_tokens": 1}
    assert asyncio.run(embedder.async_get_embedding("ab"))[0] == 2.0
    assert asyncio.run(embedder.async_get_embedding_and_usage("ab"))[1]["total_tokens"] == 1


def test_embedder_errors_are_embedding_errors_with_status(embedder, fake):
    fake.on("/v1/embeddings", reply(401, REAL_401))
    with pytest.raises(EmbeddingError) as caught:
        embedder.get_embedding("x")
    assert caught.value.status_code == 401 and caught.value.reason == "authentication"
    with pytest.raises(ModelProviderError, match="GPUSTACK_API_KEY"):
        embedder.embed("x")


@pytest.mark.parametrize("use_async", [False, True])
def test_batches_keep_input_order(embedder, fake, use_async):
    embedder.batch_size = 2
    texts = ["a" * n for n in range(1, 8)]
    if use_async:
        vectors, usages = asyncio.run(embedder.async_get_embeddings_batch_and_usage(texts))
    else:
        vectors, usages = embedder.get_embeddings_batch_and_usage(texts)
    assert [v[0] for v in vectors] == [float(n) for n in range(1, 8)]
    assert len(usages) == 7 and len(fake.requests) == 4


@pytest.mark.parametrize("use_async", [False, True])
def test_bad_chunk_falls_back_to_one_by_one_and_keeps_the_rest(embedder, fake, use_async):
    embedder.batch_size = 3
    texts = ["aa", "poison", "cccc", "d"]
    if use_async:
        vectors, _ = asyncio.run(embedder.async_get_embeddings_batch_and_usage(texts))
    else:
        vectors, _ = embedder.get_embeddings_batch_and_usage(texts)
    assert [v[0] if v else None for v in vectors] == [2.0, None, 4.0, 1.0]


def test_embeddings_key_absent_from_repr(embedder):
    assert "sk-test-secret" not in repr(embedder)


# Rerank #########################################################################################################

DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is the capital of Germany."]


@pytest.fixture
def reranker(fake):
    return GPUStackRerank(id="bge-reranker-v2-m3", base_url=fake.url, api_key="sk-test-secret-123456")


def test_seed_rerank_posts_plain_strings_and_ranks_best_first(reranker, fake):
    # llama.cpp's shape: no document field, unsorted is possible, logit scores.
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 2, "relevance_score": -0.6}, {"index": 0, "relevance_score": 3.1}]}))
    results = reranker.rerank(query="capital of France?", documents=DOCS, top_n=2)
    assert [(r["index"], r["document"]) for r in results] == [(0, DOCS[0]), (2, DOCS[2])]
    assert fake.requests[-1].json == {"model": "bge-reranker-v2-m3", "query": "capital of France?", "documents": DOCS,
                                      "top_n": 2, "return_documents": True}


@pytest.mark.parametrize("document", [{"text": "X"}, "X", None])
def test_rerank_document_shapes(reranker, fake, document):
    result = {"index": 1, "relevance_score": 0.5}
    if document is not None:
        result["document"] = document
    fake.on("/v1/rerank", reply(200, {"results": [result]}))
    expected = "X" if document else DOCS[1]
    assert reranker.rerank("q", DOCS)[0]["document"] == expected


def test_gpustack_rerank_answer_replayed(reranker, fake):
    # 112_v1_rerank_ok
    fake.on("/v1/rerank", reply(200, b'{"id": "rerank-mock", "model": "ghost-routed", "usage": {"total_tokens": 3, "prompt_tokens": 3}, '
                                     b'"results": [{"index": 0, "document": {"text": "a"}, "relevance_score": 1.0}, '
                                     b'{"index": 1, "document": {"text": "b"}, "relevance_score": 0.5}]}'))
    assert [r["document"] for r in reranker.rerank("q", ["a", "b"])] == ["a", "b"]


def test_top_n_larger_than_documents_is_clamped(reranker, fake):
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 0, "relevance_score": 1.0}]}))
    reranker.rerank("q", ["only"], top_n=5)
    assert fake.requests[-1].json["top_n"] == 1


def test_empty_document_list_makes_no_request(reranker, fake):
    assert reranker.rerank("q", []) == []
    assert fake.requests == []


def test_documents_in_documents_out_with_scores_and_limit(reranker, fake):
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 2, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.7},
                                                 {"index": 1, "relevance_score": 0.1}]}))
    docs = [Document(content=text) for text in DOCS]
    ranked = reranker.rerank("capital", docs, limit=2)
    assert [d.content for d in ranked] == [DOCS[2], DOCS[0]] and ranked[0].reranking_score == 0.9


def test_failing_rerank_inside_knowledge_keeps_original_order(reranker, fake):
    fake.on("/v1/rerank", reply(404, REAL_404_MODEL))
    docs = [Document(content=text) for text in DOCS]
    assert reranker.rerank("q", docs) == docs


def test_failing_seed_rerank_raises(reranker, fake):
    fake.on("/v1/rerank", reply(404, REAL_404_MODEL))
    with pytest.raises(ModelProviderError, match="Model not found"):
        reranker.rerank("q", DOCS)


def test_arerank(reranker, fake):
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 1, "relevance_score": 0.9}]}))
    assert asyncio.run(reranker.arerank("q", DOCS, top_n=1))[0]["document"] == DOCS[1]


def test_rerank_key_absent_from_repr_and_dump(reranker):
    assert "sk-test-secret" not in repr(reranker) + json.dumps(reranker.model_dump())


# Errors on every endpoint ####################################################################################


@pytest.mark.parametrize("path, call", [
    ("/v1/embeddings", lambda url: GPUStackEmbeddings(id="e", base_url=url, max_retries=0).embed("x")),
    ("/v1/rerank", lambda url: GPUStackRerank(id="r", base_url=url, max_retries=0).rerank("q", ["d"])),
    ("/v1/completions", lambda url: GPUStackChat(id="c", base_url=url, max_retries=0).complete("x")),
])
@pytest.mark.parametrize("status, body, words", [
    (401, REAL_401, "GPUSTACK_API_KEY"),
    (404, REAL_404_MODEL, "list_models"),
    (502, b"<html><h1>502</h1>upstream connect error</html>", "upstream connect error"),
])
def test_every_endpoint_maps_errors_the_same_way(fake, path, call, status, body, words):
    fake.on(path, reply(status, body, "text/html" if body.startswith(b"<") else "application/json"))
    with pytest.raises(ModelProviderError, match=words) as caught:
        call(fake.url)
    assert caught.value.status_code == status


@pytest.mark.parametrize("path, call", [
    ("/v1/embeddings", lambda url: GPUStackEmbeddings(id="e", base_url=url, max_retries=0, timeout=0.3).embed("x")),
    ("/v1/rerank", lambda url: GPUStackRerank(id="r", base_url=url, max_retries=0, timeout=0.3).rerank("q", ["d"])),
])
def test_every_endpoint_reports_timeouts(fake, path, call):
    fake.on(path, lambda h, seen: time.sleep(1))
    with pytest.raises(ModelProviderError, match=r"timeout=0\.3s"):
        call(fake.url)


# Factory and model discovery ####################################################################################


@pytest.mark.parametrize("kind, cls", [("chat", GPUStackChat), ("llm", GPUStackChat), ("embeddings", GPUStackEmbeddings),
                                       ("embedding", GPUStackEmbeddings), ("rerank", GPUStackRerank), ("reranker", GPUStackRerank)])
def test_factory_and_aliases(kind, cls):
    assert type(GPUStack(model_type=kind, id="m")) is cls


def test_factory_unknown_type_lists_valid_ones():
    with pytest.raises(ValueError, match="chat.*embeddings.*rerank"):
        GPUStack(model_type="vision", id="m")


def models_route(h, seen):
    from urllib.parse import parse_qs, urlsplit

    wanted = parse_qs(urlsplit(seen.path).query).get("categories", [])
    catalog = {"qwen3": "llm", "owner/bge-m3": "embedding", "bge-reranker-v2-m3": "reranker"}
    data = [{"id": mid, "object": "model", "owned_by": "gpustack", "meta": None}
            for mid, cat in catalog.items() if not wanted or cat in wanted]
    send(h, 200, json.dumps({"data": data, "object": "list"}).encode())


def test_list_models_reports_categories(fake):
    fake.on("/v1/models", models_route)
    models = {m["id"]: m["categories"] for m in list_models(base_url=fake.url)}
    assert models == {"qwen3": ["llm"], "owner/bge-m3": ["embedding"], "bge-reranker-v2-m3": ["reranker"]}


def test_list_models_filters_with_repeated_parameter(fake):
    fake.on("/v1/models", models_route)
    models = list_models(base_url=fake.url, categories=["embedding", "reranker"])
    assert sorted(m["id"] for m in models) == ["bge-reranker-v2-m3", "owner/bge-m3"]
    assert fake.requests[0].path == "/v1/models?categories=embedding&categories=reranker"


def test_alist_models(fake):
    fake.on("/v1/models", models_route)
    assert len(asyncio.run(gpustack.alist_models(base_url=fake.url))) == 3


def test_list_models_unknown_category_is_a_value_error():
    with pytest.raises(ValueError, match="embedding"):
        list_models(categories=["embeddings"])


# End to end: an Agno knowledge base built and searched through GPUStack #############################################

WORDS = ["capital", "france", "germany", "banana", "yellow", "fruit"]


def word_embedder(h, seen):
    texts = seen.json["input"]
    texts = [texts] if isinstance(texts, str) else texts
    vectors = [[1.0 + sum(w in t.lower() for w in WORDS)] + [float(w in t.lower()) for w in WORDS] for t in texts]
    send(h, 200, json.dumps(embeddings_answer(vectors)).encode())


def overlap_reranker(h, seen):
    body = seen.json
    query = set(body["query"].lower().replace("?", "").split())
    scores = [len(query & set(doc.lower().replace(".", "").split())) for doc in body["documents"]]
    results = [{"index": i, "relevance_score": float(s)} for i, s in enumerate(scores)]
    send(h, 200, json.dumps({"results": results[: body.get("top_n") or len(results)]}).encode())


def test_knowledge_base_embeds_stores_and_reranks_through_gpustack(fake):
    pytest.importorskip("qdrant_client")
    from agno.knowledge.knowledge import Knowledge
    from agno.vectordb.qdrant import Qdrant

    fake.on("/v1/embeddings", word_embedder)
    fake.on("/v1/rerank", overlap_reranker)
    embedder = GPUStackEmbeddings(id="bge-m3", base_url=fake.url)
    knowledge = Knowledge(vector_db=Qdrant(collection="docs", location=":memory:", embedder=embedder),
                          reranker=GPUStackRerank(id="bge-reranker-v2-m3", base_url=fake.url))
    for text in ["Paris is the capital of France.", "Bananas are a yellow fruit.", "Berlin is the capital of Germany."]:
        knowledge.insert(text_content=text)
    results = knowledge.search("What is the capital of France?", max_results=1)
    assert [d.content for d in results] == ["Paris is the capital of France."]
    assert results[0].reranking_score is not None
    paths = [r.path for r in fake.requests]
    assert "/v1/embeddings" in paths and "/v1/rerank" in paths
    assert embedder.dimensions == 7


# Command line ##################################################################################################


def cli(fake, *args: str, stdin: str = "", key: Optional[str] = None, timeout: float = 30):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_")}
    env["GPUSTACK_SERVER_URL"] = fake.url
    if key:
        env["GPUSTACK_API_KEY"] = key
    return subprocess.run([sys.executable, os.path.join(HERE, "gpustack.py"), *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_cli_chat_streams_the_answer(fake):
    fake.on("/v1/chat/completions", stream(REAL_STREAM))
    done = cli(fake, "chat", "-m", "ghost-routed", "hi", "--system", "be brief", "--temperature", "0.1")
    assert (done.returncode, done.stdout, done.stderr) == (0, "Hello\n", "")
    body = fake.requests[-1].json
    assert body["stream"] is True and body["temperature"] == 0.1 and body["messages"][0]["role"] == "system"


def test_cli_chat_no_stream_and_json(fake):
    done = cli(fake, "chat", "-m", "m", "hi", "--json")
    assert json.loads(done.stdout)["content"] == "Hello" and json.loads(done.stdout)["usage"]["total_tokens"] == 5
    assert cli(fake, "chat", "-m", "m", "hi", "--no-stream").stdout == "Hello\n"


def test_cli_reads_prompt_from_stdin(fake):
    cli(fake, "chat", "-m", "m", "-", "--no-stream", stdin="from a pipe\n")
    assert fake.requests[-1].json["messages"][-1]["content"] == "from a pipe"


def test_cli_complete(fake):
    fake.on("/v1/completions", reply(200, {"choices": [{"index": 0, "text": " there", "finish_reason": "stop"}]}))
    assert cli(fake, "complete", "-m", "m", "hello", "--no-stream").stdout == " there\n"


def test_cli_embed_prints_vectors_and_dims(fake):
    fake.on("/v1/embeddings", echo_embedder(dims=4))
    done = cli(fake, "embed", "-m", "e", "a", "bb")
    assert [json.loads(line)[0] for line in done.stdout.splitlines()] == [1.0, 2.0]
    assert cli(fake, "embed", "-m", "e", "--dims", "-", stdin="x\ny\n").stdout == "4\n4\n"


def test_cli_rerank_prints_ranked_documents(fake):
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 1, "relevance_score": 0.25}, {"index": 0, "relevance_score": 0.75}]}))
    done = cli(fake, "rerank", "-m", "r", "q", "first", "second")
    assert done.stdout == "0.7500\tfirst\n0.2500\tsecond\n"
    assert json.loads(cli(fake, "rerank", "-m", "r", "q", "first", "second", "--json").stdout)[0]["document"] == "first"


def test_cli_models_with_categories(fake):
    fake.on("/v1/models", models_route)
    assert "owner/bge-m3\tembedding" in cli(fake, "models").stdout
    assert cli(fake, "models", "--category", "reranker").stdout == "bge-reranker-v2-m3\treranker\n"


def test_cli_api_key_file(fake, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("gpustack_from_file_1234\n")
    cli(fake, "chat", "-m", "m", "hi", "--no-stream", "--api-key-file", str(key_file))
    assert fake.requests[-1].headers["Authorization"] == "Bearer gpustack_from_file_1234"


def test_cli_server_error_is_one_line_without_key_exit_3(fake):
    fake.on("/v1/chat/completions", reply(401, REAL_401))
    done = cli(fake, "chat", "-m", "m", "hi", key="gpustack_secret_abcdef")
    assert done.returncode == 3 and len(done.stderr.strip().splitlines()) == 1
    assert "GPUSTACK_API_KEY" in done.stderr and "gpustack_secret_abcdef" not in done.stderr + done.stdout


def test_cli_connection_error_exit_4(fake):
    done = cli(fake, "models", "--server", "http://127.0.0.1:1", "--timeout", "2")
    assert done.returncode == 4 and "Cannot connect" in done.stderr and "Traceback" not in done.stderr


def test_cli_usage_error_exit_2(fake):
    assert cli(fake, "chat", "hi").returncode == 2
    assert cli(fake, "chat", "-m", "m", "hi", "--api-key-file", "/no/such/file").returncode == 2


def test_cli_ctrl_c_while_streaming_exits_130_and_closes_connection(fake):
    import signal

    fake.on("/v1/chat/completions", _endless)
    env = {**os.environ, "GPUSTACK_SERVER_URL": fake.url}
    # A shell's background job (CI, `pytest &`) starts with SIGINT ignored, and children inherit that.
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gpustack.py"), "chat", "-m", "m", "hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.read(3) == b"tok"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert fake.client_gone.wait(5)


# Hardening: hostile streams, misbehaving servers, resources, load ##################################################

import random  # noqa: E402

VALID_STREAM = b"".join(b"data: " + json.dumps(chunk(t)).encode() + b"\n\n" for t in ["He", "llo", " wor", "ld"]) + \
    b": ping\n\n" + b"data: " + json.dumps(chunk("!", "stop")).encode() + b"\n\ndata: [DONE]\n\n"


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_sse_one_byte_at_a_time_gives_same_events(newline):
    body = VALID_STREAM.replace(b"\n", newline)
    whole = gpustack._SSEDecoder().feed(body)
    decoder = gpustack._SSEDecoder()
    pieces = [event for i in range(len(body)) for event in decoder.feed(body[i:i + 1])] + decoder.close()
    assert pieces == whole and len(whole) == 6


def test_sse_random_cuts_give_same_events():
    rng = random.Random(7)
    whole = gpustack._SSEDecoder().feed(VALID_STREAM)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(VALID_STREAM)), rng.randint(1, 20)))
        decoder = gpustack._SSEDecoder()
        events = []
        for start, end in zip([0] + cuts, cuts + [len(VALID_STREAM)]):
            events += decoder.feed(VALID_STREAM[start:end])
        assert events + decoder.close() == whole


def test_sse_stream_cut_at_random_points_over_the_network(model, fake):
    rng = random.Random(3)
    cuts = sorted(rng.sample(range(1, len(VALID_STREAM)), 30))
    fake.on("/v1/chat/completions", stream(*[VALID_STREAM[a:b] for a, b in zip([0] + cuts, cuts + [len(VALID_STREAM)])]))
    assert text_of(model.invoke_stream(user())) == "Hello world!"


@pytest.mark.parametrize("hostile", [
    b"data: \xff\xfe{\"bad utf8\n\n",
    b"data: " + b"x" * (10 * 1024 * 1024),
    b"data: \x00\x00\x00\n\n",
    b": ping\n\n" * 200_000,
    b"data: [1, 2]\n\n",
    b"data: \"just a string\"\n\n",
])
def test_hostile_stream_ends_in_provider_error(model, fake, hostile):
    fake.on("/v1/chat/completions", stream(hostile))
    with pytest.raises(ModelProviderError):
        list(model.invoke_stream(user()))


def test_random_bytes_end_in_provider_error_or_clean_result(model, fake):
    rng = random.Random(11)
    for _ in range(25):
        noise = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
        fake.on("/v1/chat/completions", stream(noise, b"\n\n" + noise[:50]))
        try:
            list(model.invoke_stream(user()))
        except ModelProviderError:
            pass


def test_server_that_accepts_and_never_answers_times_out_on_time():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        model = GPUStackChat(id="m", base_url=f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5, max_retries=0)
        started = time.monotonic()
        with pytest.raises(ModelProviderError, match=r"timeout=0\.5s"):
            model.invoke(user())
        assert 0.45 < time.monotonic() - started < 2
    finally:
        listener.close()


def test_connection_reset_mid_body_is_a_provider_error(model, fake):
    def reset(h, seen):
        import struct

        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(REAL_CHAT[:40])
        h.wfile.flush()
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
        h.close_connection = True

    fake.on("/v1/chat/completions", reset)
    model.max_retries = 0
    with pytest.raises(ModelProviderError, match="incomplete|broke|Connection"):
        model.invoke(user())


def open_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to count sockets")
def test_1000_calls_leave_no_sockets_or_threads_behind(model, fake, monkeypatch):
    monkeypatch.setattr(gpustack, "WORKER_IDLE_SECONDS", 0.2)
    gpustack.close_connections()
    time.sleep(0.2)
    sockets_before, threads_before = open_sockets(), threading.active_count()

    for _ in range(300):
        model.invoke(user())

    async def many():
        for _ in range(10):
            await asyncio.gather(*[model.ainvoke(user()) for _ in range(30)])

    asyncio.run(many())
    fake.on("/v1/chat/completions", _endless)
    for _ in range(200):
        for piece in model.invoke_stream(user()):
            break

    async def broken_async():
        for _ in range(200):
            async for piece in model.ainvoke_stream(user()):
                break

    asyncio.run(broken_async())
    gpustack.close_connections()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (open_sockets() > sockets_before or threading.active_count() > threads_before):
        time.sleep(0.1)
    assert open_sockets() <= sockets_before
    assert threading.active_count() <= threads_before


def test_500_concurrent_async_streams_arrive_whole_and_in_order(model, fake):
    words = [f"w{i} " for i in range(20)]
    fake.on("/v1/chat/completions", stream(*[chunk(w) for w in words], chunk("", "stop"), b"data: [DONE]\n\n"))

    async def one():
        return "".join([p.content or "" async for p in model.ainvoke_stream(user())])

    async def go():
        return await asyncio.gather(*[one() for _ in range(500)])

    assert asyncio.run(go()) == ["".join(words)] * 500


def test_url_credentials_are_refused_at_construction_without_showing_them(fake):
    with pytest.raises(ValueError) as caught:
        GPUStackChat(id="m", base_url=fake.url.replace("http://", "http://user:pw-secret@"))
    assert str(caught.value) == (
        f"GPUStack server URL must not carry user:password@ ({fake.url!r}); pass the key as api_key=... or GPUSTACK_API_KEY"
    )


def test_invoke_tolerates_agno_retry_keywords(model):
    assert model.invoke(messages=user(), assistant_message=Message(role="assistant"), retry_with_guidance=True).content == "Hello"


# Promises checked once more ########################################################################################


def test_x_should_retry_false_stops_retries(model, fake):
    fake.on("/v1/chat/completions", reply(500, {"error": {"message": "fatal"}}, headers={"x-should-retry": "false"}))
    with pytest.raises(ModelProviderError, match="fatal"):
        model.invoke(user())
    assert len(fake.requests) == 1


def test_retry_after_ms_is_understood():
    assert gpustack._retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25


def test_certificate_failure_is_not_retried(tls_fake, monkeypatch):
    monkeypatch.setattr(gpustack, "INITIAL_RETRY_DELAY", 2.0)
    started = time.monotonic()
    with pytest.raises(ModelProviderError, match="certificate"):
        GPUStackChat(id="m", base_url=tls_fake.url, max_retries=2).invoke(user())
    assert time.monotonic() - started < 1.5


def test_error_object_inside_a_200_answer_raises_its_message(model, fake):
    fake.on("/v1/chat/completions", reply(200, {"error": {"message": "backend gone", "code": 503}}))
    with pytest.raises(ModelProviderError, match="backend gone"):
        model.invoke(user())


@pytest.mark.parametrize("answer", [{"choices": []}, {"id": "x"}, [1, 2]])
def test_answer_without_choices_is_a_clear_error(model, fake, answer):
    fake.on("/v1/chat/completions", reply(200, answer))
    with pytest.raises(ModelProviderError, match="choices|not an object"):
        model.invoke(user())


def test_async_stream_pieces_arrive_while_the_loop_stays_free(model, fake):
    release = threading.Event()

    fake.on("/v1/chat/completions", first_then_wait(release))

    async def go():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        beat = asyncio.create_task(ticker())
        pieces = model.ainvoke_stream(user())
        first = None
        async for piece in pieces:
            if piece.content:
                first = piece.content
                break
        assert first == "first" and not release.is_set()
        before = ticks
        await asyncio.sleep(0.1)
        assert ticks > before  # the loop ran while the stream was open
        release.set()
        rest = "".join([p.content or "" async for p in pieces])
        beat.cancel()
        return rest

    assert asyncio.run(go()) == "!"


def test_embedding_batches_run_concurrently_up_to_the_limit(embedder, fake):
    inflight, peak = [0], [0]
    lock = threading.Lock()
    respond = echo_embedder()

    def counted(h, seen):
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        time.sleep(0.1)
        with lock:
            inflight[0] -= 1
        respond(h, seen)

    fake.on("/v1/embeddings", counted)
    embedder.batch_size, embedder.batch_concurrency = 1, 3
    asyncio.run(embedder.async_get_embeddings_batch_and_usage([f"t{i}" for i in range(9)]))
    assert peak[0] == 3


# Transport safeguards: fork, resend, connect timeout, descriptors, proxies, executor, settings #########


def echo_chat(h, seen):
    """Answers with the user's own words, so a reply that reaches the wrong caller shows."""
    words = seen.json["messages"][-1]["content"]
    time.sleep(0.002)  # widen the window in which two processes on one socket would cross answers
    send(h, 200, json.dumps(chat_answer(words)).encode())


def test_forked_children_never_read_the_parents_answers(fake, monkeypatch):
    import multiprocessing

    fake.on("/v1/chat/completions", echo_chat)
    model = GPUStackChat(id="m", base_url=fake.url, timeout=5, max_retries=0)
    assert model.invoke(user("warm-up")).content == "warm-up"  # the parent's pool now holds an idle connection
    context = multiprocessing.get_context("fork")
    children, rounds = 3, 25
    barrier = context.Barrier(children + 1, timeout=10)

    def call_in_step(name: str) -> None:
        for round_ in range(rounds):
            barrier.wait()
            words = f"{name}-{round_}"
            assert model.invoke(user(words)).content == words

    processes = [context.Process(target=call_in_step, args=(f"child{n}",)) for n in range(children)]
    for process in processes:
        process.start()
    try:
        call_in_step("parent")
    finally:
        for process in processes:
            process.join(10)
            if process.exitcode is None:
                process.kill()
                process.join()
    assert [process.exitcode for process in processes] == [0] * children
    assert model.invoke(user("after")).content == "after"
    # The children dropped their copy of the parent's idle connection without cutting it: the parent kept
    # using it, and each child opened one of its own.
    assert fake.connections == 1 + children
    # Each call arrived once and whole: no request was mangled by another process's bytes, none resent.
    assert sorted(seen.json["messages"][-1]["content"] for seen in fake.requests) == sorted(
        ["warm-up", "after"] + [f"{name}-{r}" for name in ["parent", "child0", "child1", "child2"] for r in range(rounds)]
    )


def test_async_calls_run_in_a_forked_child(model, fake):
    import multiprocessing

    fake.on("/v1/chat/completions", echo_chat)
    assert asyncio.run(model.ainvoke(user("parent"))).content == "parent"  # the executor now has an idle thread

    def child() -> None:
        sys.exit(0 if asyncio.run(model.ainvoke(user("child"))).content == "child" else 1)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(10)
    if process.exitcode is None:
        process.kill()
        process.join()
    assert process.exitcode == 0


def read_then_drop(h, seen):
    """The whole request arrived (the fake read it); the connection drops before any answer."""
    h.close_connection = True


@pytest.mark.parametrize("retries", [0, 2])
def test_request_sent_whole_then_dropped_is_sent_exactly_max_retries_plus_one_times(fake, monkeypatch, retries):
    monkeypatch.setattr(gpustack, "INITIAL_RETRY_DELAY", 0.01)
    model = GPUStackChat(id="m", base_url=fake.url, max_retries=retries)
    model.invoke(user())  # the next call goes out on this idle, reused connection
    fake.on("/v1/chat/completions", read_then_drop)
    with pytest.raises(ModelProviderError) as caught:
        model.invoke(user())
    assert len(fake.requests) == 1 + retries + 1
    assert caught.value.message == (
        f"Connection to {fake.url}/v1/chat/completions failed before an answer: "
        "RemoteDisconnected('Remote end closed connection without response')."
    )


@pytest.fixture
def unreachable():
    """A port whose accept queue is full: the kernel drops further SYNs, as a firewall does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filling = []
    while True:  # fill the queue until a connect no longer completes
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
        except socket.timeout:
            probe.close()
            break
        filling.append(probe)
    yield f"http://127.0.0.1:{port}"
    for sock in filling:
        sock.close()
    listener.close()


def test_unreachable_host_fails_after_the_connect_timeout_with_its_own_message(unreachable):
    model = GPUStackChat(id="m", base_url=unreachable, connect_timeout=0.3, timeout=60, max_retries=0)
    started = time.monotonic()
    with pytest.raises(ModelProviderError) as caught:
        model.invoke(user())
    assert 0.3 <= time.monotonic() - started < 2
    assert caught.value.message == (
        f"Could not connect to {unreachable}/v1/chat/completions within connect_timeout=0.3s: the host is "
        "unreachable or a firewall drops the packets. Check the address and the network path to GPUStack "
        "(VPN, firewall, proxy settings); raise connect_timeout=... only for a very slow network."
    )


def busy_workers() -> int:
    return gpustack._EXECUTOR.threads - gpustack._EXECUTOR._idle


def wait_for(condition: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``condition()`` held, or ``seconds`` if it never did."""
    started = time.monotonic()
    while not condition() and time.monotonic() - started < seconds:
        time.sleep(0.005)
    return time.monotonic() - started


def test_cancelled_ainvoke_while_connecting_gives_its_thread_back_at_once(unreachable):
    model = GPUStackChat(id="m", base_url=unreachable, connect_timeout=30, max_retries=0)

    async def go():
        task = asyncio.create_task(model.ainvoke(user()))
        await asyncio.sleep(0.3)
        assert busy_workers() == 1  # the worker is in connect()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert wait_for(lambda: busy_workers() == 0, 5) < 0.5


def test_keep_alive_holds_with_descriptors_numbered_above_1024(model, fake):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        if hard != resource.RLIM_INFINITY and hard < 1400:
            pytest.skip(f"the descriptor limit ({hard}) is too low to open 1100 descriptors")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1400, hard))
    held: List[int] = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        for _ in range(10):
            model.invoke(user())
    finally:
        for fd in held:
            os.close(fd)
    assert len(fake.requests) == 10 and fake.connections == 1


def test_plain_http_proxy_gets_its_credentials(fake, monkeypatch):
    import base64

    proxy = Fake()
    try:
        proxy.on(fake.url + "/v1/chat/completions", reply(200, chat_answer("via proxy")))
        monkeypatch.setenv("HTTP_PROXY", proxy.url.replace("http://", "http://user:p%40ss@"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert GPUStackChat(id="m", base_url=fake.url).invoke(user()).content == "via proxy"
        assert proxy.requests[-1].headers["Proxy-Authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    finally:
        gpustack.close_connections()
        proxy.close()


class ConnectProxy:
    """A CONNECT proxy on 127.0.0.1: records each CONNECT and its headers, then relays bytes both ways."""

    def __init__(self) -> None:
        self.seen: List[tuple] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_CONNECT(self) -> None:
                proxy.seen.append((self.path, dict(self.headers.items())))
                host, port = self.path.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                self.send_response(200, "Connection established")
                self.end_headers()
                with upstream, selectors.DefaultSelector() as selector:
                    selector.register(self.connection, selectors.EVENT_READ, upstream)
                    selector.register(upstream, selectors.EVENT_READ, self.connection)
                    while True:
                        ready = selector.select(5)
                        for key, _ in ready:
                            data = key.fileobj.recv(65536)
                            if not data:
                                ready = []
                                break
                            key.data.sendall(data)
                        if not ready:
                            break
                self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_https_through_a_connect_proxy_sends_credentials_only_to_the_proxy(tls_fake, monkeypatch):
    import base64

    proxy = ConnectProxy()
    try:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("http://", "http://user:pw@"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        model = GPUStackChat(id="m", base_url=tls_fake.url, verify=tls_fake.cert)
        assert model.invoke(user()).content == "Hello"
        target, headers = proxy.seen[-1]
        assert target == tls_fake.url.replace("https://", "")
        assert headers["Proxy-Authorization"] == "Basic " + base64.b64encode(b"user:pw").decode()
        assert "Proxy-Authorization" not in tls_fake.requests[-1].headers
    finally:
        gpustack.close_connections()
        proxy.close()


def test_executor_caps_its_threads_and_queues_the_rest():
    executor = gpustack._ElasticExecutor(max_workers=2)
    release = threading.Event()
    futures = [executor.submit(release.wait, 5) for _ in range(5)]
    assert executor.threads == 2
    release.set()
    assert [future.result(5) for future in futures] == [True] * 5
    assert executor.threads <= 2


def test_a_call_whose_thread_failed_to_start_never_runs(monkeypatch):
    executor = gpustack._ElasticExecutor(max_workers=10)
    ran: List[str] = []
    real_start = threading.Thread.start

    def fail_once(thread):
        monkeypatch.setattr(threading.Thread, "start", real_start)
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", fail_once)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        executor.submit(ran.append, "lost")
    assert executor.threads == 0
    executor.submit(ran.append, "kept").result(5)
    executor.submit(ran.append, "kept too").result(5)
    assert ran == ["kept", "kept too"]


@pytest.mark.parametrize("value, expected", [("7", "7"), ("0", "ValueError: GPUSTACK_MAX_WORKERS must be a whole number >= 1, got '0'")])
def test_max_workers_is_read_from_the_environment(value, expected):
    code = "import gpustack; print(gpustack._EXECUTOR.max_workers)"
    env = {**os.environ, "GPUSTACK_MAX_WORKERS": value}
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, timeout=60)
    assert (done.stdout.strip() or done.stderr.strip().splitlines()[-1]) == expected


@pytest.mark.parametrize("make", [GPUStackChat, gpustack.GPUStackEmbeddings, gpustack.GPUStackRerank], ids=["chat", "embeddings", "rerank"])
@pytest.mark.parametrize("setting, message", [
    ({"timeout": -1.5}, "timeout must be a positive number of seconds, got -1.5"),
    ({"timeout": float("nan")}, "timeout must be a positive number of seconds, got nan"),
    ({"connect_timeout": 0.0}, "connect_timeout must be a positive number of seconds, got 0.0"),
    ({"max_retries": -3}, "max_retries must be a whole number >= 0, got -3"),
    ({"verify": "/missing/ca.pem"}, "verify='/missing/ca.pem': no such CA bundle file or directory"),
])
def test_bad_settings_fail_at_construction(fake, make, setting, message):
    with pytest.raises(ValueError) as caught:
        make(id="m", base_url=fake.url, **setting)
    assert str(caught.value) == message
    assert fake.requests == []


def test_settings_are_built_once_per_model_not_per_call(fake, monkeypatch):
    built = []
    real = gpustack._settings
    monkeypatch.setattr(gpustack, "_settings", lambda *args, **kwargs: built.append(1) or real(*args, **kwargs))
    model = GPUStackChat(id="m", base_url=fake.url)
    for _ in range(5):
        model.invoke(user())
    assert len(built) == 1
    model.max_retries = -1  # a setting changed later is checked before the next request
    with pytest.raises(ValueError, match="max_retries must be a whole number >= 0, got -1"):
        model.invoke(user())
    assert len(fake.requests) == 5


# Event-stream caps #######################################################################################


def fed_in_pieces(body: bytes, size: int) -> List[tuple]:
    decoder = gpustack._SSEDecoder()
    events = []
    for start in range(0, len(body), size):
        events += decoder.feed(body[start : start + size])
    return events + decoder.close()


def test_a_2_mib_event_in_small_reads_is_one_event():
    data = "x" * (2 * 1024 * 1024)
    assert fed_in_pieces(b": ping\n\ndata: " + data.encode() + b"\n\n", 4096) == [("", data)]


def test_a_2_mib_event_arrives_whole_over_the_network(model, fake):
    words = "y" * (2 * 1024 * 1024)
    event = b"data: " + json.dumps(chunk(words, finish="stop")).encode() + b"\n\n"
    fake.on("/v1/chat/completions", stream(*[event[i : i + 16384] for i in range(0, len(event), 16384)], b"data: [DONE]\n\n"))
    assert text_of(model.invoke_stream(user())) == words


@pytest.mark.parametrize("body, message", [
    (b"data: " + b"x" * gpustack.MAX_SSE_LINE_BYTES, "a line longer than 8388608 bytes without a line end"),
    ((b"data: " + b"x" * (4 * 1024 * 1024) + b"\n") * 5, "an event larger than 16777216 bytes"),
    (b": ping\n" * (1024 * 1024 // 7 + 1), "more than 1048576 bytes of comments and empty events without any data"),
])
def test_each_sse_cap_exceeded_fails_with_its_own_message(body, message):
    with pytest.raises(gpustack._SSETooLarge) as caught:
        fed_in_pieces(body, 65536)
    assert str(caught.value) == message


def test_comments_under_the_cap_between_data_never_add_up():
    ping_then_data = b": keep-alive\n\n" * 1000 + b"data: {}\n\n"  # 15 KB of comments, then data
    assert len(fed_in_pieces(ping_then_data * 100, 4096)) == 100


def test_exceeded_sse_cap_reaches_the_caller_as_a_provider_error(model, fake):
    fake.on("/v1/chat/completions", stream(b": ping\n" * (1024 * 1024 // 7 + 1)))
    with pytest.raises(ModelProviderError) as caught:
        list(model.invoke_stream(user()))
    assert caught.value.message == (
        "GPUStack's event stream is malformed: more than 1048576 bytes of comments and empty events without any data"
    )


# Malformed answers and odd headers ########################################################################


@pytest.mark.parametrize("item, problem", [
    ({"index": 0}, "an embedding that is NoneType, not a list of numbers"),
    ({"index": 0, "embedding": "!!not base64"}, "an embedding that is not valid base64"),
    ({"index": 0, "embedding": "AAAA"}, "a base64 embedding of 3 bytes, not a whole number of float32"),
    ({"index": 0, "embedding": ["0.1"]}, "an embedding holding '0.1', not a number"),
    ({"index": "0", "embedding": [0.1]}, "an embedding item that is not an object with a whole-number index"),
    ("0.1", "an embedding item that is not an object with a whole-number index"),
])
def test_broken_embedding_items_are_the_one_malformed_answer_error(embedder, fake, item, problem):
    answer = {"object": "list", "data": [item]}
    fake.on("/v1/embeddings", reply(200, answer))
    with pytest.raises(gpustack.EmbeddingError) as caught:
        embedder.get_embedding("text")
    assert str(caught.value) == f"Failed to generate embedding: GPUStack's answer has {problem}: {answer}"
    assert caught.value.provider_status_code == 502


@pytest.mark.parametrize("answer, problem", [
    ({"results": [{"index": 0, "relevance_score": None}]}, "a result for document 0 with score None"),
    ({"results": [{"index": True, "relevance_score": 1.0}]}, "a result for document True of 2"),
    ({"results": ["0"]}, "a result for document None of 2"),
])
def test_broken_rerank_results_are_the_one_malformed_answer_error(reranker, fake, answer, problem):
    fake.on("/v1/rerank", reply(200, answer))
    with pytest.raises(ModelProviderError) as caught:
        reranker.rerank("q", ["a", "b"])
    assert caught.value.message == f"GPUStack's answer has {problem}: {answer}"


@pytest.mark.parametrize("message, error", [
    ("not an object", "AttributeError: 'str' object has no attribute 'get'"),
    ({"content": "x", "tool_calls": "call it"}, "AttributeError: 'str' object has no attribute 'get'"),
])
def test_broken_chat_answers_are_the_one_malformed_answer_error(model, fake, message, error):
    answer = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    fake.on("/v1/chat/completions", reply(200, answer))
    with pytest.raises(ModelProviderError) as caught:
        model.invoke(user())
    assert caught.value.message == f"GPUStack's answer has a part this client cannot read ({error}): {answer}"


def test_broken_usage_in_a_stream_is_the_one_malformed_answer_error(model, fake):
    fake.on("/v1/chat/completions", stream(chunk("hi"), {"choices": [], "usage": {"prompt_tokens": "many"}}))
    with pytest.raises(ModelProviderError, match=r"^GPUStack's answer has a part this client cannot read \(ValueError"):
        list(model.invoke_stream(user()))


@pytest.mark.parametrize("header", ["retry-after", "retry-after-ms"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-5", "junk", ""])
def test_retry_after_that_is_not_a_finite_pause_falls_back_to_backoff(header, value):
    delay = gpustack._retry_delay(0, {header: value})
    assert delay is not None and 0.75 * gpustack.INITIAL_RETRY_DELAY <= delay <= gpustack.INITIAL_RETRY_DELAY


@pytest.mark.parametrize("headers", [{"retry-after": "1e308"}, {"retry-after-ms": "1e308"}, {"retry-after": "121"}])
def test_retry_after_beyond_the_cap_is_not_waited_for(headers):
    assert gpustack._retry_delay(0, headers) is None


def test_retry_after_nan_from_the_server_is_retried_with_backoff(model, fake):
    fake.on("/v1/chat/completions", reply(503, b"busy", "text/plain", {"Retry-After": "nan"}), reply(200, REAL_CHAT))
    assert model.invoke(user()).content == "Hello"
    assert len(fake.requests) == 2


@pytest.mark.parametrize("block", [
    b"Content-Type: application/json\r\nContent-Length: 12\r\n\r\n",
    b"\r\n",
    b"Set-Cookie: a=1\r\nset-cookie: b=2\r\nX-Odd:\t  spaced value  \r\nX-Empty:\r\n\r\n",
    b"Content-Type: text/plain\nRetry-After: 3\n\n",
    b"X-Latin: caf\xe9\r\n\r\n",
    b"Retry-After:\r\n 0.3\r\n\r\n",  # a folded line
    b"X-A: 1\r\nnot a header line\r\nX-B: 2\r\n\r\n",
    b"X-A: one\rtwo\r\n\r\n",  # a bare CR splits the line for the email package
    b": no name\r\n\r\n",
    b"From someone\r\nX-A: 1\r\n\r\n",
    b"X-A : 1\r\n\r\n",
    b"X-A: a\x0bb\x0cc\x85d\x1ce\x00f\r\n\r\n",  # characters other splitters take for line ends
    b"X-A: 1\r\nX-B: cut",  # the connection closed in the middle of a line
    b"X-A: 1\r\n",  # ... or before the blank line
])
def test_answer_headers_are_read_exactly_as_http_client_reads_them(block):
    import io

    ours = gpustack._parse_headers(io.BytesIO(block + b"body"))
    stdlib = http.client.parse_headers(io.BytesIO(block + b"body"))
    assert type(ours) is http.client.HTTPMessage
    assert [type(defect) for defect in ours.defects] == [type(defect) for defect in stdlib.defects]
    del ours.defects, stdlib.defects  # defect objects don't compare equal
    assert vars(ours) == vars(stdlib)  # the headers, their order and case, the payload, the policy: everything


def raw_answer(head: bytes):
    """An answer written byte for byte: the status line and headers as given, then a small JSON body."""

    def respond(h, seen):
        h.wfile.write(b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: %d\r\n\r\n%s" % (len(REAL_CHAT), REAL_CHAT))

    return respond


@pytest.mark.parametrize("head, problem", [
    (b"".join(b"X-N%d: v\r\n" % n for n in range(100)), "HTTPException('got more than 100 headers')"),
    (b"X-Big: " + b"v" * 65536 + b"\r\n", "LineTooLong('got more than 65536 bytes when reading header line')"),
])
def test_answer_headers_beyond_http_clients_limits_are_refused(model, fake, head, problem):
    model.max_retries = 0
    fake.on("/v1/chat/completions", raw_answer(head))
    with pytest.raises(ModelProviderError) as caught:
        model.invoke(user())
    assert caught.value.message == f"Connection to {fake.url}/v1/chat/completions failed before an answer: {problem}."


def test_answer_with_99_headers_is_read(model, fake):
    fake.on("/v1/chat/completions", raw_answer(b"".join(b"X-N%d: v\r\n" % n for n in range(98))))
    assert model.invoke(user()).content == "Hello"


def test_answer_header_limits_raised_in_http_client_are_honoured(model, fake, monkeypatch):
    monkeypatch.setattr(http.client, "_MAXHEADERS", 300)
    fake.on("/v1/chat/completions", raw_answer(b"".join(b"X-N%d: v\r\n" % n for n in range(200))))
    assert model.invoke(user()).content == "Hello"


def test_cli_exits_3_on_a_malformed_answer(fake):
    fake.on("/v1/embeddings", reply(200, {"data": [{"index": 0}]}))
    done = cli(fake, "embed", "-m", "m", "hi")
    assert done.returncode == 3
    assert done.stderr == (
        "gpustack: error: GPUStack's answer has an embedding that is NoneType, not a list of numbers: "
        "{'data': [{'index': 0}]}\n"
    )


# Cancelling an async stream, wherever its task is suspended ##################################################


def held_stream(fake: Fake, chunks: int):
    """Sends ``chunks`` chunks, then holds the stream open until the client leaves, and notes when it did."""

    def respond(h, seen):
        if chunks:
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            for _ in range(chunks):
                raw = b"data: " + json.dumps(chunk("tok")).encode() + b"\n\n"
                h.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            h.wfile.flush()
        held_until_gone(fake)(h, seen)
        h.close_connection = True

    return respond


@pytest.mark.parametrize("where", ["before the first byte", "awaiting a chunk", "in the consumer's own await"])
def test_cancelled_async_stream_closes_its_connection_at_once(model, fake, where):
    fake.on("/v1/chat/completions", held_stream(fake, 0 if where == "before the first byte" else 1))
    got: List[Any] = []

    async def go() -> float:
        pieces = model.ainvoke_stream(user())  # held here, so only the task's end can close it

        async def consume() -> None:
            async for piece in pieces:
                got.append(piece)
                if where == "in the consumer's own await":
                    await asyncio.sleep(30)

        task = asyncio.create_task(consume())
        while not (fake.requests if where == "before the first byte" else got):
            await asyncio.sleep(0.005)
        task.cancel()
        cancelled_at = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        while not fake.client_gone.is_set() and time.monotonic() - cancelled_at < 2:
            await asyncio.sleep(0.005)
        return cancelled_at

    gc.disable()
    try:
        cancelled_at = asyncio.run(go())
    finally:
        gc.enable()
    assert fake.client_gone.is_set() and fake.gone_at - cancelled_at < 0.5
    assert wait_for(lambda: busy_workers() == 0, 2) < 0.5


# Message parts ############################################################################################


def test_audio_becomes_input_audio_parts(model, fake):
    from agno.media import Audio

    model.invoke([Message(role="user", content="what is said?", audio=[Audio(content=b"RIFF0000WAVE", format="wav")])])
    assert fake.requests[-1].json["messages"][0]["content"] == [
        {"type": "text", "text": "what is said?"},
        {"type": "input_audio", "input_audio": {"data": "UklGRjAwMDBXQVZF", "format": "wav"}},
    ]


def test_video_becomes_vllm_video_url_parts(model, fake, tmp_path):
    from agno.media import Video

    clip = tmp_path / "clip.webm"
    clip.write_bytes(b"\x1aE\xdf\xa3")
    videos = [Video(url="https://example.invalid/v.mp4"), Video(filepath=str(clip)), Video(content=b"\x00\x00\x00\x18ftyp", format="mp4")]
    model.invoke([Message(role="user", content="describe", videos=videos)])
    assert fake.requests[-1].json["messages"][0]["content"][1:] == [
        {"type": "video_url", "video_url": {"url": "https://example.invalid/v.mp4"}},
        {"type": "video_url", "video_url": {"url": "data:video/webm;base64,GkXfow=="}},
        {"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAAGGZ0eXA="}},
    ]


def test_files_that_cannot_be_sent_are_warned_about_once(model, fake, agno_log, monkeypatch):
    from agno.media import File

    monkeypatch.setattr(gpustack, "_WARNED", set())
    for _ in range(2):
        model.invoke([Message(role="user", content="read this", files=[File(content=b"%PDF-1.4", filename="a.pdf")])])
    assert fake.requests[-1].json["messages"][0]["content"] == "read this"
    assert agno_log == [
        "GPUStack's chat endpoint takes no file parts: 1 file(s) attached to a message were not sent. "
        "Give the model their text instead (an Agno reader or knowledge base)."
    ]


# Embeddings inside Agno's knowledge machinery ###########################################################


def test_agno_page_store_check_accepts_the_embedder(embedder):
    import inspect

    # The check PageCoordinator runs for any embedder that isn't OpenAIEmbedder (agno/knowledge/page/_coordinator.py).
    assert "timeout" in inspect.signature(embedder.get_embedding).parameters


def test_agno_page_store_deadline_bounds_that_call_only(embedder, fake):
    from types import SimpleNamespace

    from agno.knowledge.page._coordinator import PageCoordinator, _is_openai_embedder
    from agno.utils.bounded import WorkBudget

    def slow(h, seen):
        time.sleep(1.0)
        echo_embedder()(h, seen)

    fake.on("/v1/embeddings", slow)
    store = SimpleNamespace(vector=SimpleNamespace(embedder=embedder, dimensions=3))
    _is_openai_embedder(embedder)  # its first call imports the openai SDK, if installed: not part of the budget
    started = time.monotonic()
    with pytest.raises(gpustack.EmbeddingError, match=r"within timeout=0\.2\d*s"):
        PageCoordinator._embeddings(store, ["a"], WorkBudget(0.3))  # Agno passes timeout=min(30, budget left)
    assert time.monotonic() - started < 0.8 and len(fake.requests) == 1  # a deadline: no retries
    assert len(embedder.get_embedding("b")) == 3  # the model's own timeout is unchanged


def test_dimensions_probe_of_an_unreachable_server_fails_fast_and_says_what_to_set(unreachable):
    embeddings = gpustack.GPUStackEmbeddings(id="bge-m3", base_url=unreachable, connect_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ModelProviderError) as caught:
        embeddings.dimensions
    assert time.monotonic() - started < 1.5
    assert caught.value.message.startswith("Cannot learn the embedding size of 'bge-m3' from GPUStack within 0.3s: Could not connect")
    assert caught.value.message.endswith("Set dimensions=N on GPUStackEmbeddings to skip this probe.")


def test_send_failing_on_a_reused_idle_connection_goes_out_once_on_a_new_one(fake, monkeypatch):
    # The server closed the idle connection after the liveness check passed (a race the check can't close):
    # writing the body fails, so nothing reached the server, and the request goes out on a fresh connection.
    def once_then_close(h, seen):
        send(h, 200, REAL_CHAT)
        h.close_connection = True

    fake.on("/v1/chat/completions", once_then_close)
    model = GPUStackChat(id="m", base_url=fake.url, max_retries=0)
    model.invoke(user())
    assert fake.closed.acquire(timeout=5)
    monkeypatch.setattr(gpustack, "_still_open", lambda conn: True)
    assert model.invoke(user("x" * 100_000)).content == "Hello"
    assert len(fake.requests) == 2 and fake.connections == 2


def test_async_stream_reader_runs_at_most_the_backlog_ahead(model, fake, monkeypatch):
    monkeypatch.setattr(gpustack, "ASYNC_STREAM_BACKLOG", 8)
    body = b"".join(b"data: " + json.dumps(chunk(str(n))).encode() + b"\n\n" for n in range(3000)) + b"data: [DONE]\n\n"
    fake.on("/v1/chat/completions", stream(body))
    parsed = []
    real = GPUStackChat._parse_provider_response_delta
    monkeypatch.setattr(GPUStackChat, "_parse_provider_response_delta", lambda self, c: parsed.append(1) or real(self, c))

    async def go() -> int:
        pieces = model.ainvoke_stream(user())
        await pieces.__anext__()
        await asyncio.sleep(0.3)  # a consumer busy elsewhere: the reader must wait for it
        ahead = len(parsed)
        await pieces.aclose()
        return ahead

    assert asyncio.run(go()) <= 2 * 8 + 2  # one batch handed over, one backlog waiting, one in hand


# Inside AgentOS ###########################################################################################


def test_agent_rebuilt_from_config_uses_the_registered_gpustack_model(model, fake):
    from agno.agent import Agent
    from agno.registry import Registry

    config = Agent(name="assistant", model=model).to_dict()
    assert "sk-test-secret" not in json.dumps(config, default=str)
    rebuilt = Agent.from_dict(config, registry=Registry(models=[model]))
    assert rebuilt.model is model
    assert rebuilt.run("hi").content == "Hello"
    with pytest.raises(ValueError, match="Model provider 'gpustack' is not supported"):
        Agent.from_dict(config)


def test_idle_connection_closed_by_the_server_is_not_used_for_a_get(fake, agno_log):
    # A GET is one write, which succeeds even on a connection the server closed: only the liveness
    # check before reuse keeps it off a dead connection (and out of a retry).
    def models_then_close(h, seen):
        models_route(h, seen)
        h.close_connection = True

    fake.on("/v1/models", models_then_close)
    transport = gpustack._Transport(gpustack._settings(fake.url, None, None, 0, None, None))
    for _ in range(3):
        assert len(transport.call("GET", "models", expect="data")["data"]) == 3
        assert fake.closed.acquire(timeout=5)
    assert agno_log == [] and len(fake.requests) == 3 and fake.connections == 3


# Diagnosis: context window, GPUStack's wrapped 503, missing deployment parameters ###########################

VLLM_HINT = "--max-model-len for vLLM; GPUStack starts vLLM at 8192 unless it is set"
# (the server's words, the body shape that says them, the backend's flag and default note, limit, prompt tokens)
CONTEXT_WORDINGS = [
    ("This model's maximum context length is 8192 tokens. However, you requested 9000 tokens (8000 in the messages, "
     "1000 in the completion). Please reduce the length of the messages or completion.", "vllm", VLLM_HINT, 8192, 8000),
    ("This model's maximum context length is 8192 tokens. However, your request has 9000 input tokens. Please reduce "
     "the length of the input messages.", "vllm", VLLM_HINT, 8192, 9000),
    ("'max_tokens' or 'max_completion_tokens' is too large: 4096. This model's maximum context length is 8192 tokens "
     "and your request has 5000 input tokens (4096 > 8192 - 5000). (parameter=input_tokens, value=5000)", "vllm",
     VLLM_HINT, 8192, 5000),
    ("This model's maximum context length is 40960 tokens. However, you requested 0 output tokens and your prompt "
     "contains at least 40961 input tokens, for a total of at least 40961 tokens. Please reduce the length of the "
     "input prompt or the number of requested output tokens. (parameter=input_tokens, value=40961)", "vllm",
     VLLM_HINT, 40960, 40961),
    ("The decoder prompt (length 9000) is longer than the maximum model length of 8192. Make sure that `max_model_len` "
     "is no smaller than the number of text tokens.", "vllm", VLLM_HINT, 8192, 9000),
    ("The prompt (total length 25938) is too long to fit into the model (context length 4096). Make sure that "
     "`max_model_len` is no smaller than the number of text tokens plus multimodal tokens.", "vllm", VLLM_HINT, 4096, 25938),
    ("The input (9000 tokens) is longer than the model's context length (8192 tokens).", "sglang",
     "--context-length for SGLang", 8192, 9000),
    ("Requested token count exceeds the model's maximum context length of 8192 tokens. You requested a total of 9000 "
     "tokens: 8000 tokens from the input messages and 1000 tokens for the completion.", "sglang",
     "--context-length for SGLang", 8192, None),
    ("Input length (9000 tokens) exceeds the maximum allowed length (8192 tokens). Use a shorter input or enable "
     "--allow-auto-truncate.", "sglang", "--context-length for SGLang", 8192, 9000),
    ("request (17993 tokens) exceeds the available context size (16384 tokens), try increasing it", "llama",
     "--ctx-size for llama.cpp", 16384, 17993),
    ("the request exceeds the available context size, try increasing it", "llama", "--ctx-size for llama.cpp", None, None),
    ("context shift is disabled", "llama", "--ctx-size for llama.cpp", None, None),  # known by its type alone
]


def backend_error_body(words: str, shape: str) -> dict:
    if shape == "vllm":
        return {"error": {"message": words, "type": "BadRequestError", "param": None, "code": 400}}
    if shape == "sglang":
        return {"object": "error", "message": words, "type": "BadRequestError", "param": None, "code": 400}
    return {"error": {"code": 400, "message": words, "type": "exceed_context_size_error", "n_prompt_tokens": 17993,
                      "n_ctx": 16384}}


def wrapped_in_503(inner: dict, status: int = 400) -> dict:
    """GPUStack's own answer when a backend failed a non-streaming request (capture 103)."""
    return {"error": {"message": "An unexpected error occurred: Worker request failed: 1 POST "
                                 f"http://127.0.0.1:19020/v1/chat/completions status={status}, error={json.dumps(inner)}",
                      "code": 503, "type": "ServiceUnavailable"}}


def context_hint(flag: str, limit: Optional[int], prompt: Optional[int]) -> str:
    sizes = ", ".join(p for p in (f"limit {limit} tokens" if limit else "", f"prompt {prompt} tokens" if prompt else "") if p)
    return (f"The request is longer than the model's context window{f' ({sizes})' if sizes else ''}: shorten the input "
            f"or lower max_tokens, or raise the limit in the model's Backend Parameters on GPUStack ({flag}).")


def invoke_every_way(model, how: str):
    if how == "invoke":
        return model.invoke(user())
    if how == "ainvoke":
        return asyncio.run(model.ainvoke(user()))
    if how == "invoke_stream":
        return list(model.invoke_stream(user()))

    async def drain():
        return [piece async for piece in model.ainvoke_stream(user())]

    return asyncio.run(drain())


@pytest.mark.parametrize("words, shape, flag, limit, prompt", CONTEXT_WORDINGS, ids=[f"{w[1]}-{i}" for i, w in enumerate(CONTEXT_WORDINGS)])
@pytest.mark.parametrize("served", ["plain", "wrapped in 503", "stream answer"])
def test_every_context_window_wording_is_agnos_context_window_error(model, fake, words, shape, flag, limit, prompt, served):
    body = backend_error_body(words, shape)
    fake.on("/v1/chat/completions", reply(503, wrapped_in_503(body)) if served == "wrapped in 503" else reply(400, body))
    with pytest.raises(ContextWindowExceededError) as caught:
        list(model.invoke_stream(user())) if served == "stream answer" else model.invoke(user())
    where = (f"HTTP 400 from POST {fake.url}/v1/chat/completions" if served != "wrapped in 503" else
             f"HTTP 400 from the model's backend, relayed by GPUStack as HTTP 503 from POST {fake.url}/v1/chat/completions")
    assert caught.value.message == f"{words} ({where}, code 400). {context_hint(flag, limit, prompt)}"
    assert caught.value.status_code == 400 and len(fake.requests) == 1


@pytest.mark.parametrize("how", ["invoke", "ainvoke", "invoke_stream", "ainvoke_stream"])
def test_context_window_error_is_classified_on_every_call_and_never_retried(model, fake, how):
    words, shape, flag, limit, prompt = CONTEXT_WORDINGS[9]  # llama.cpp, whose words Agno alone doesn't know
    fake.on("/v1/chat/completions", reply(400, backend_error_body(words, shape)))
    with pytest.raises(ContextWindowExceededError, match="--ctx-size for llama.cpp"):
        invoke_every_way(model, how)
    assert len(fake.requests) == 1


def test_context_window_error_in_complete(model, fake):
    fake.on("/v1/completions", reply(400, backend_error_body(CONTEXT_WORDINGS[6][0], "sglang")))
    with pytest.raises(ContextWindowExceededError, match="--context-length for SGLang"):
        model.complete("long prompt")


def test_context_window_error_in_embeddings_keeps_its_cause(embedder, fake):
    fake.on("/v1/embeddings", reply(400, backend_error_body(CONTEXT_WORDINGS[1][0], "vllm")))
    with pytest.raises(gpustack.EmbeddingError) as caught:
        embedder.get_embedding("a very long text")
    assert isinstance(caught.value.__cause__, ContextWindowExceededError)
    assert len(fake.requests) == 1


def test_context_window_error_inside_a_stream(model, fake):
    fake.on("/v1/chat/completions", stream(chunk("Hel"), {"error": {"message": CONTEXT_WORDINGS[10][0],
                                                                    "type": "exceed_context_size_error", "code": 400}}))
    with pytest.raises(ContextWindowExceededError, match="--ctx-size for llama.cpp"):
        list(model.invoke_stream(user()))


def test_wrapped_backend_400_is_unwrapped_and_not_retried(model, fake):
    fake.on("/v1/chat/completions", reply(503, REAL_503_BACKEND_400))
    with pytest.raises(ModelProviderError) as caught:
        model.invoke(user())
    assert caught.value.status_code == 400 and len(fake.requests) == 1
    assert caught.value.message == (
        "Invalid value for tool_choice (HTTP 400 from the model's backend, relayed by GPUStack as HTTP 503 from "
        f"POST {fake.url}/v1/chat/completions, code 400)."
    )


def test_wrapped_backend_500_stays_retryable(model, fake):
    inner = {"error": {"message": "CUDA out of memory", "type": "InternalServerError", "code": 500}}
    fake.on("/v1/chat/completions", reply(503, wrapped_in_503(inner, 500)), reply(200, REAL_CHAT))
    assert model.invoke(user()).content == "Hello" and len(fake.requests) == 2


def test_wrapped_body_that_does_not_parse_keeps_the_503(model, fake):
    body = {"error": {"message": "An unexpected error occurred: Worker request failed: 1 POST http://w/v1/chat/completions "
                                 "status=400, error=<html>bad</html>", "code": 503, "type": "ServiceUnavailable"}}
    fake.on("/v1/chat/completions", reply(503, body))
    with pytest.raises(ModelProviderError) as caught:
        model.invoke(user())
    assert caught.value.status_code == 503 and len(fake.requests) == 1
    assert caught.value.message.endswith("The model's backend rejected the request itself; retrying cannot help.")


@pytest.mark.parametrize("status, body, fix", [
    (400, {"error": {"message": '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                     "type": "BadRequestError", "param": None, "code": 400}},
     "The model was deployed without tool calling: add `--enable-auto-tool-choice --tool-call-parser=<parser>` to its "
     "Backend Parameters on GPUStack (e.g. `hermes` for Qwen)."),
    (500, {"error": {"code": 500, "message": "tools param requires --jinja flag", "type": "server_error"}},
     "The model was deployed without tool calling: add `--jinja` to its Backend Parameters on GPUStack."),
    (500, {"object": "error", "message": "Internal server error: Unsupported tool_call_parser: None", "code": 500},
     "The model was deployed without tool calling: add `--tool-call-parser=<parser>` to its Backend Parameters on "
     "GPUStack (e.g. `qwen25` for Qwen)."),
    (400, {"error": {"message": "The provided JSON schema contains features not supported by xgrammar.", "code": 400}},
     "The schema uses features the backend's grammar engine lacks: simplify the schema or set strict_output=False."),
    (400, {"error": {"message": "Failed to transform json schema into a grammar: unsupported", "code": 400}},
     "The schema uses features the backend's grammar engine lacks: simplify the schema or set strict_output=False."),
    (400, {"error": {"message": "The model does not support Chat Completions API", "code": 400}},
     "The model is deployed for another task than this request's (see its category in GPUStack, or list_models())."),
])
@pytest.mark.parametrize("served", ["plain", "wrapped in 503"])
def test_missing_deployment_parameter_is_named_and_never_retried(model, fake, status, body, fix, served):
    fake.on("/v1/chat/completions", reply(status, body) if served == "plain" else reply(503, wrapped_in_503(body, status)))
    with pytest.raises(ModelProviderError) as caught:
        model.invoke(user())
    assert caught.value.message.endswith(fix) and caught.value.status_code == status
    assert [seen.path for seen in fake.requests if seen.path == "/v1/chat/completions"] == ["/v1/chat/completions"]


def test_missing_rerank_path_says_the_model_serves_another_task(reranker, fake):
    fake.on("/v1/rerank", reply(404, REAL_405_DETAIL.replace(b"Method Not Allowed", b"Not Found")))
    with pytest.raises(ModelProviderError) as caught:
        reranker.rerank("q", ["a"])
    assert caught.value.message == (
        f"Not Found (HTTP 404 from POST {fake.url}/v1/rerank). The model's backend has no /v1/rerank (or base_url is "
        "not the GPUStack server). The model is deployed for another task than this request's (see its category in "
        "GPUStack, or list_models())."
    )


@pytest.mark.parametrize("path, make, call, said", [
    ("/v1/rerank", lambda url: GPUStackRerank(id="qwen3", base_url=url), lambda m: m.rerank("q", ["a"]),
     "GPUStack lists 'qwen3' as a model of category llm: use GPUStackChat."),
    ("/v1/chat/completions", lambda url: GPUStackChat(id="bge-m3", base_url=url), lambda m: m.invoke(user()),
     "GPUStack lists 'bge-m3' as a model of category embedding: use GPUStackEmbeddings."),
])
def test_model_deployed_for_another_task_names_its_category(fake, path, make, call, said):
    fake.on("/v1/models", running_models(CATALOG))
    body = {"error": {"message": "The model does not support Chat Completions API", "code": 400}}
    fake.on(path, reply(404, {"detail": "Not Found"}) if path == "/v1/rerank" else reply(400, body))
    with pytest.raises(ModelProviderError) as caught:
        call(make(fake.url))
    assert caught.value.message.endswith(said)


def test_agent_compacts_history_and_succeeds_after_a_context_window_error(fake, tmp_path):
    from agno.agent import Agent
    from agno.compaction import Compaction
    from agno.db.sqlite import SqliteDb

    seen_sizes: List[int] = []

    def small_window(h, seen):
        messages = seen.json["messages"]
        if messages[0]["role"] == "system" and "summar" in str(messages[0]["content"]).lower():
            send(h, 200, json.dumps(chat_answer("Earlier: three long turns.")).encode())  # Agno's summarizer
            return
        seen_sizes.append(len(messages))
        if len(json.dumps(messages)) > 2500:
            send(h, 400, json.dumps(backend_error_body(CONTEXT_WORDINGS[9][0], "llama")).encode())
            return
        send(h, 200, json.dumps(chat_answer(f"answer to {len(messages)} messages")).encode())

    fake.on("/v1/chat/completions", small_window)
    db = SqliteDb(db_file=str(tmp_path / "s.db"))
    agent = Agent(model=GPUStackChat(id="m", base_url=fake.url), db=db,
                  add_history_to_context=True, compaction=Compaction(on_context_overflow=True), session_id="s")
    try:
        answers = [agent.run("x" * 900 + f" turn {turn}").content for turn in range(3)]
    finally:
        db.close()  # Python 3.13 warns about a SQLite connection left to the garbage collector
    assert answers == ["answer to 1 messages", "answer to 3 messages", "answer to 2 messages"]
    assert seen_sizes == [1, 3, 5, 2]  # the long request went out once, then the folded one


def test_agent_falls_back_to_a_larger_model_after_a_context_window_error(fake):
    from agno.agent import Agent
    from agno.models.fallback import FallbackConfig

    def route(h, seen):
        if seen.json["model"] == "small":
            send(h, 400, json.dumps(backend_error_body(CONTEXT_WORDINGS[9][0], "llama")).encode())
        else:
            send(h, 200, json.dumps(chat_answer("from the large model")).encode())

    fake.on("/v1/chat/completions", route)
    agent = Agent(model=GPUStackChat(id="small", base_url=fake.url),
                  fallback_config=FallbackConfig(on_context_overflow=[GPUStackChat(id="large", base_url=fake.url)]))
    assert agent.run("hi").content == "from the large model"
    assert [seen.json["model"] for seen in fake.requests] == ["small", "large"]


TOOL = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
MARKUP_WARNING = (
    "GPUStack model 'ghost-routed' answered a request with tools with <tool_call> markup in its text and no "
    "tool_calls: its deployment needs a tool-call parser (for SGLang, add `--tool-call-parser=<parser>` to its "
    "Backend Parameters on GPUStack, e.g. `qwen25`). The text is left as it came."
)


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_call_markup_without_tool_calls_warns_once_and_keeps_the_text(model, fake, agno_log, monkeypatch, streamed):
    monkeypatch.setattr(gpustack, "_WARNED", set())
    markup = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    if streamed:
        fake.on("/v1/chat/completions", stream(chunk(markup[:7]), chunk(markup[7:]), chunk(finish="stop"), b"data: [DONE]\n\n"))
    else:
        fake.on("/v1/chat/completions", reply(200, chat_answer(markup)))
    for _ in range(2):
        answer = text_of(model.invoke_stream(user(), tools=TOOL)) if streamed else model.invoke(user(), tools=TOOL).content
        assert answer == markup
    assert agno_log == [MARKUP_WARNING]


def test_tool_call_markup_is_not_warned_about_without_tools(model, fake, agno_log, monkeypatch):
    monkeypatch.setattr(gpustack, "_WARNED", set())
    fake.on("/v1/chat/completions", reply(200, chat_answer("<tool_call>{}</tool_call>")))
    model.invoke(user())
    assert agno_log == []


# Diagnosis: the nearest model names, what a model without a running instance is doing ##########################

REAL_404_BODY = REAL_404_MODEL  # 20_v1_chat_missing_model_nonstream


def running_models(catalog: Dict[str, str]):
    def respond(h, seen):
        from urllib.parse import parse_qs, urlsplit

        wanted = parse_qs(urlsplit(seen.path).query).get("categories", [])
        data = [{"id": mid, "object": "model", "owned_by": "gpustack", "meta": {}} for mid, cat in catalog.items()
                if not wanted or cat in wanted]
        send(h, 200, json.dumps({"data": data, "object": "list"}).encode())

    return respond


CATALOG = {"qwen3": "llm", "qwen3-8b": "llm", "bge-m3": "embedding", "bge-reranker-v2-m3": "reranker"}


def test_unknown_model_name_lists_the_running_models_like_it(fake):
    fake.on("/v1/chat/completions", reply(404, REAL_404_BODY))
    fake.on("/v1/models", running_models(CATALOG))
    with pytest.raises(ModelProviderError) as caught:
        GPUStackChat(id="qwen-3", base_url=fake.url).invoke(user())
    assert caught.value.message == (
        f"Model not found (HTTP 404 from POST {fake.url}/v1/chat/completions, code 404). Model 'qwen-3' not found on "
        f"GPUStack at {fake.url}. Running models like it: qwen3, qwen3-8b."
    )
    assert caught.value.status_code == 404


def test_model_name_under_another_category_says_which_class_to_use(fake):
    fake.on("/v1/chat/completions", reply(404, REAL_404_BODY))
    fake.on("/v1/models", running_models(CATALOG))
    with pytest.raises(ModelProviderError) as caught:
        GPUStackChat(id="bge-m3", base_url=fake.url).invoke(user())
    assert caught.value.message.endswith("(HTTP 404 from POST " + fake.url + "/v1/chat/completions, code 404). "
                                         "GPUStack lists 'bge-m3' as a model of category embedding: use GPUStackEmbeddings.")


def test_unknown_model_name_with_nothing_close_keeps_the_plain_hint(fake):
    fake.on("/v1/chat/completions", reply(404, REAL_404_BODY))
    fake.on("/v1/models", running_models(CATALOG))
    with pytest.raises(ModelProviderError) as caught:
        GPUStackChat(id="llama-70b", base_url=fake.url).invoke(user())
    assert caught.value.message.endswith("Check the model name 'llama-70b': list_models() or `python gpustack.py models` "
                                         "shows the models with a running instance.")


def test_failing_model_lookup_never_hides_the_original_error(fake):
    fake.on("/v1/chat/completions", reply(404, REAL_404_BODY))
    fake.on("/v1/models", reply(500, b"boom", "text/plain"))
    with pytest.raises(ModelProviderError) as caught:
        GPUStackChat(id="qwen-3", base_url=fake.url).invoke(user())
    assert caught.value.status_code == 404 and caught.value.message.startswith("Model not found (HTTP 404")
    assert [seen.path for seen in fake.requests] == ["/v1/chat/completions", "/v1/models"]


def v2_item(name: str, replicas: int, ready: int = 0, model_id: int = 1) -> dict:
    """The fields of a /v2/models item that matter here (capture 160), among some that don't."""
    return {"name": name, "replicas": replicas, "ready_replicas": ready, "state": "pending", "state_message": None,
            "categories": ["llm"], "backend": "vLLM", "id": model_id}


def instance(name: str, state: str, message: Optional[str] = None, progress: Optional[float] = None) -> dict:
    return {"name": name, "state": state, "state_message": message, "download_progress": progress, "model_id": 1,
            "worker_name": None}


def not_running_fake(fake, models_route_, instances=None, my_models=None):
    fake.on("/v1/chat/completions", reply(503, REAL_503_NO_INSTANCE))
    fake.on("/v2/models", models_route_)
    fake.on("/v2/models/1/instances", reply(200, {"items": instances or [], "pagination": {}}))
    if my_models is not None:
        fake.on("/v2/my-models", my_models)


def readiness_of(fake) -> str:
    with pytest.raises(ModelProviderError) as caught:
        GPUStackChat(id="qwen3", base_url=fake.url, max_retries=0).invoke(user())
    assert caught.value.status_code == 503
    prefix = f"No running instances available (HTTP 503 from POST {fake.url}/v1/chat/completions, code 503). "
    assert caught.value.message.startswith(prefix)
    return caught.value.message[len(prefix):]


@pytest.mark.parametrize("items, instances, said", [
    ([v2_item("qwen3", 0)], [], "qwen3 is stopped (0 replicas): start it in GPUStack."),
    ([v2_item("qwen3", 1)], [instance("qwen3-x7k2", "downloading", progress=42)],
     "qwen3 exists but 0 of 1 instances are ready: qwen3-x7k2 is downloading (42%)."),
    ([v2_item("qwen3", 1)], [instance("qwen3-x7k2", "pending", "No available workers")],
     "qwen3 exists but 0 of 1 instances are ready: qwen3-x7k2 is pending: No available workers."),
    ([v2_item("qwen3", 2, 1)], [instance("qwen3-a", "running"), instance("qwen3-b", "error", "CUDA out of memory")],
     "qwen3 exists but 1 of 2 instances are ready: qwen3-b is in state error: CUDA out of memory."),
    ([v2_item("qwen3-coder", 1)], [], _NOT_RUNNING := gpustack._NOT_RUNNING_HINT),
], ids=["stopped", "downloading", "pending", "error", "other name"])
def test_no_running_instance_says_what_the_instance_is_doing(fake, items, instances, said):
    not_running_fake(fake, reply(200, {"items": items, "pagination": {}}), instances)
    assert readiness_of(fake) == said
    assert [seen.path.split("?")[0] for seen in fake.requests][:2] == ["/v1/chat/completions", "/v2/models"]


def test_key_that_may_not_list_all_models_says_only_that_it_has_no_running_instance(fake):
    mine = {"items": [{"id": 1, "name": "qwen3", "categories": ["llm"], "targets": 1, "ready_targets": 0}], "pagination": {}}
    not_running_fake(fake, reply(403, {"code": 403, "reason": "Forbidden", "message": "Insufficient organization role"}),
                     my_models=reply(200, mine))
    assert readiness_of(fake) == "qwen3 exists but has no running instance."


def test_inference_only_key_says_only_that_it_has_no_running_instance(fake):
    forbidden = {"code": 403, "reason": "Forbidden", "message": "API key does not have permission to access management features"}
    not_running_fake(fake, reply(403, forbidden), my_models=reply(403, forbidden))
    assert readiness_of(fake) == "qwen3 exists but has no running instance."


def test_slow_management_api_costs_at_most_the_diagnosis_time(fake, monkeypatch):
    monkeypatch.setattr(gpustack, "DIAGNOSIS_SECONDS", 0.3)

    def stall(h, seen):
        time.sleep(2)

    not_running_fake(fake, stall)
    started = time.monotonic()
    assert readiness_of(fake) == gpustack._NOT_RUNNING_HINT
    assert time.monotonic() - started < 1.5


def test_failing_management_api_keeps_the_original_words(fake):
    not_running_fake(fake, reply(500, b"oops", "text/plain"))
    assert readiness_of(fake) == gpustack._NOT_RUNNING_HINT


def test_gateway_no_healthy_upstream_is_looked_into_too(fake):
    not_running_fake(fake, reply(200, {"items": [v2_item("qwen3", 0)], "pagination": {}}))
    fake.on("/v1/chat/completions", reply(503, b"no healthy upstream", "text/plain"))
    with pytest.raises(ModelProviderError) as caught:
        GPUStackChat(id="qwen3", base_url=fake.url, max_retries=0).invoke(user())
    assert caught.value.message.endswith("qwen3 is stopped (0 replicas): start it in GPUStack.")


def test_successful_call_makes_no_lookup(model, fake):
    model.invoke(user())
    assert [seen.path for seen in fake.requests] == ["/v1/chat/completions"]


# doctor ######################################################################################################


def doctor_chat(tool_parser: bool = True):
    """A chat backend as the doctor's four requests meet it; without a tool parser, as vLLM answers tools."""

    def respond(h, seen):
        body = seen.json
        if body.get("tools") and not tool_parser:
            send(h, 400, json.dumps(backend_error_body(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set', "vllm")).encode())
        elif body.get("tools"):
            call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"city": "Paris"}'}}
            send(h, 200, json.dumps(chat_answer(None, tool_calls=[call])).encode())
        elif body.get("stream"):
            stream(REAL_STREAM)(h, seen)
        elif body.get("response_format"):
            send(h, 200, json.dumps(chat_answer('{"ok": true}')).encode())
        else:
            send(h, 200, json.dumps(chat_answer("OK")).encode())

    return respond


def gpustack_deployment(fake, tool_parser: bool = True, key: str = "gpustack_doctor_key_123"):
    def authorized(responder):
        def respond(h, seen):
            if seen.headers.get("Authorization") != f"Bearer {key}":
                send(h, 401, REAL_401)
            else:
                responder(h, seen)
        return respond

    fake.on("/healthz", reply(200, b'"ok"'))
    fake.on("/version", reply(200, {"version": "v2.3.0", "git_commit": "63a03ba"}))
    fake.on("/v1/models", authorized(running_models({"qwen3": "llm", "bge-m3": "embedding", "bge-reranker-v2-m3": "reranker"})))
    fake.on("/v2/my-models", authorized(reply(200, {"items": [], "pagination": {}})))
    fake.on("/v1/chat/completions", authorized(doctor_chat(tool_parser)))
    fake.on("/v1/embeddings", authorized(echo_embedder(4)))
    fake.on("/v1/rerank", authorized(overlap_reranker))


def outcome(report) -> List[tuple]:
    return [(check["model"], check["check"], check["ok"]) for check in report["checks"]]


def test_doctor_on_a_healthy_deployment(fake):
    gpustack_deployment(fake)
    report = gpustack.diagnose(fake.url, "gpustack_doctor_key_123", all_models=True, timeout=5)
    assert report["ok"] and report["version"] == "v2.3.0" and report["reachable"]
    assert outcome(report) == [
        (None, "server", True), (None, "API key", True), (None, "running models", True),
        ("qwen3", "chat", True), ("qwen3", "stream", True), ("qwen3", "tools", True), ("qwen3", "json_schema", True),
        ("bge-m3", "embedding", True), ("bge-reranker-v2-m3", "rerank", True),
    ]
    details = {(c["model"], c["check"]): c["detail"] for c in report["checks"]}
    assert details[(None, "API key")] == "accepted; scopes: inference, management"
    assert details[(None, "running models")] == "qwen3 (llm); bge-m3 (embedding); bge-reranker-v2-m3 (reranker)"
    assert details[("qwen3", "tools")] == "tool_calls returned" and details[("bge-m3", "embedding")] == "4 dimensions"
    assert details[("qwen3", "stream")] == "4 pieces, usage reported"


def test_doctor_names_the_missing_tool_parser(fake):
    gpustack_deployment(fake, tool_parser=False)
    report = gpustack.diagnose(fake.url, "gpustack_doctor_key_123", models=["qwen3"], timeout=5)
    assert not report["ok"]
    failed = [c for c in report["checks"] if not c["ok"]]
    assert [(c["model"], c["check"]) for c in failed] == [("qwen3", "tools")]
    assert failed[0]["detail"].endswith("add `--enable-auto-tool-choice --tool-call-parser=<parser>` to its Backend "
                                        "Parameters on GPUStack (e.g. `hermes` for Qwen).")


def test_doctor_says_a_stopped_model_is_stopped(fake):
    gpustack_deployment(fake)
    fake.on("/v1/chat/completions", reply(503, REAL_503_NO_INSTANCE))
    fake.on("/v2/models", reply(200, {"items": [v2_item("ghost-stopped", 0)], "pagination": {}}))
    report = gpustack.diagnose(fake.url, "gpustack_doctor_key_123", models=["ghost-stopped"], timeout=5)
    assert outcome(report)[-1] == ("ghost-stopped", "chat", False)
    assert report["checks"][-1]["detail"].endswith("ghost-stopped is stopped (0 replicas): start it in GPUStack.")


def test_doctor_with_a_wrong_key_exits_1_with_the_fix(fake):
    gpustack_deployment(fake)
    done = cli(fake, "doctor", "-m", "qwen3", key="gpustack_wrong_key_000")
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert lines[0].startswith("✓ server: GPUStack v2.3.0 at " + fake.url)
    assert lines[1].startswith("✗ API key: Invalid authentication credentials (HTTP 401 from GET " + fake.url + "/v1/models")
    assert lines[-1] == "not ready: see the ✗ lines" and "gpustack_wrong_key_000" not in done.stdout


def test_doctor_cli_healthy_json_exits_0(fake):
    gpustack_deployment(fake)
    done = cli(fake, "doctor", "--all", "--json", key="gpustack_doctor_key_123")
    assert done.returncode == 0 and json.loads(done.stdout)["ok"] is True


def test_doctor_without_a_server_exits_4(fake):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{port.getsockname()[1]}"
    port.close()
    done = subprocess.run([sys.executable, os.path.join(HERE, "gpustack.py"), "doctor", "--server", url],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 4
    assert done.stdout.startswith(f"✗ server: Cannot connect to GPUStack at {url}/healthz")


def test_doctor_shows_context_length_and_voices_from_meta(fake):
    gpustack_deployment(fake)
    catalog = {"qwen3": ("llm", {"max_model_len": 8192}), "cosyvoice": ("text_to_speech", {"voices": ["Chinese Female", "English Male"]})}

    def with_meta(h, seen):
        from urllib.parse import parse_qs, urlsplit

        wanted = parse_qs(urlsplit(seen.path).query).get("categories", [])
        data = [{"id": mid, "object": "model", "meta": meta} for mid, (cat, meta) in catalog.items() if not wanted or cat in wanted]
        send(h, 200, json.dumps({"data": data, "object": "list"}).encode())

    fake.on("/v1/models", with_meta)
    report = gpustack.diagnose(fake.url, "gpustack_doctor_key_123", timeout=5)
    assert report["checks"][2]["detail"] == (
        "qwen3 (llm, context 8192); cosyvoice (text_to_speech, voices Chinese Female, English Male)"
    )


def test_doctor_on_a_self_signed_server_says_which_flag_to_use(tls_fake):
    report = gpustack.diagnose(tls_fake.url, "k", timeout=5)
    assert not report["reachable"] and outcome(report) == [(None, "server", False)]
    assert report["checks"][0]["fix"] == "use --ca-bundle FILE for a private CA, or --insecure for a self-signed certificate"
    assert gpustack.diagnose(tls_fake.url, "k", timeout=5, verify=tls_fake.cert)["checks"][0]["ok"] is False  # answers, not GPUStack


# GPUStackTools: images, speech, transcription ###################################################################

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 24
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 16
MP3 = b"ID3\x04\x00" + b"\x00" * 32
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 24
MEDIA_CATALOG = {"flux": ("image", {}), "cosyvoice": ("text_to_speech", {"voices": ["Chinese Female", "English Male"]}),
                 "whisper": ("speech_to_text", {}), "qwen3": ("llm", {})}


def media_models(catalog=MEDIA_CATALOG):
    def respond(h, seen):
        from urllib.parse import parse_qs, urlsplit

        query = parse_qs(urlsplit(seen.path).query)
        wanted = query.get("categories", [])
        data = [{"id": mid, "object": "model", "meta": meta if query.get("with_meta") else None}
                for mid, (cat, meta) in catalog.items() if not wanted or cat in wanted]
        send(h, 200, json.dumps({"data": data, "object": "list"}).encode())

    return respond


def image_answer(*images: bytes) -> dict:
    return {"created": 1732500000, "data": [{"b64_json": base64.b64encode(i).decode(), "url": None} for i in images]}


def multipart_fields(seen) -> List[tuple]:
    """(name, filename, content type, bytes) of each part, read back by the standard library's parser."""
    import email
    import email.policy

    message = email.message_from_bytes(b"Content-Type: " + seen.headers["Content-Type"].encode() + b"\r\n\r\n" + seen.raw,
                                       policy=email.policy.HTTP)
    return [(part.get_param("name", header="content-disposition"), part.get_filename(),
             part.get_content_type() if part.get_filename() else None, part.get_payload(decode=True))
            for part in message.iter_parts()]


@pytest.fixture
def tools(fake, monkeypatch):
    monkeypatch.setattr(gpustack, "INITIAL_RETRY_DELAY", 0.01)
    fake.on("/v1/models", media_models())
    return gpustack.GPUStackTools(base_url=fake.url, api_key="sk-test-secret-123456")


@pytest.mark.parametrize("data, mime", [(PNG, "image/png"), (JPEG, "image/jpeg"), (WEBP, "image/webp")])
def test_generated_image_type_comes_from_its_bytes(tools, fake, data, mime):
    fake.on("/v1/images/generations", reply(200, image_answer(data)))
    result = tools.generate_image("a red square", seed=7)
    assert [(i.content, i.mime_type) for i in result.images] == [(data, mime)]
    assert result.content == f"Generated 1 image(s) ({mime}) for: a red square"
    sent = fake.requests[-1].json
    assert sent == {"model": "flux", "prompt": "a red square", "n": 1, "size": "1024x1024", "response_format": "b64_json",
                    "seed": 7}


def test_image_model_is_the_only_running_one_of_its_category(tools, fake):
    fake.on("/v1/images/generations", reply(200, image_answer(PNG)))
    tools.image("x")
    tools.image("y")
    assert [s.path for s in fake.requests].count("/v1/models?categories=image") == 1


@pytest.mark.parametrize("catalog, said", [
    ({"flux": ("image", {}), "sdxl": ("image", {})}, "GPUStack has 2 image models (running: flux, sdxl)."),
    ({"qwen3": ("llm", {})}, "GPUStack has 0 image models (none is running)."),
])
def test_image_model_must_be_named_when_not_exactly_one_runs(fake, catalog, said):
    fake.on("/v1/models", media_models(catalog))
    tools = gpustack.GPUStackTools(base_url=fake.url)
    with pytest.raises(ValueError) as caught:
        tools.image("x")
    assert str(caught.value) == "GPUStackTools needs image_model=...: " + said
    assert tools.generate_image("x").content == "Error: GPUStackTools needs image_model=...: " + said


def test_image_edit_sends_a_multipart_form_byte_by_byte(tools, fake):
    fake.on("/v1/images/edits", reply(200, image_answer(JPEG)))
    result = tools.edit_image("make it night", images=[gpustack.Image(content=PNG)])
    assert result.images[0].content == JPEG and result.images[0].mime_type == "image/jpeg"
    seen = fake.requests[-1]
    boundary = seen.headers["Content-Type"].split("boundary=")[1]
    assert seen.headers["Content-Type"] == f"multipart/form-data; boundary={boundary}"
    b = boundary.encode()
    assert seen.raw == (
        b"--" + b + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nflux\r\n'
        b"--" + b + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nmake it night\r\n'
        b"--" + b + b'\r\nContent-Disposition: form-data; name="image"; filename="image.png"\r\nContent-Type: image/png'
        b"\r\n\r\n" + PNG + b"\r\n"
        b"--" + b + b'\r\nContent-Disposition: form-data; name="size"\r\n\r\n1024x1024\r\n'
        b"--" + b + b'\r\nContent-Disposition: form-data; name="response_format"\r\n\r\nb64_json\r\n'
        b"--" + b + b"--\r\n"
    )
    assert [f[0] for f in multipart_fields(seen)] == ["model", "prompt", "image", "size", "response_format"]


def test_multipart_boundary_never_occurs_in_a_part(monkeypatch):
    draws = iter([b"\x01" * 12, b"\x02" * 12])
    monkeypatch.setattr(gpustack.os, "urandom", lambda n: next(draws))
    clash = ("gpustack-" + "01" * 12).encode()
    body, content_type = gpustack._multipart([("file", ("a.wav", b"x" + clash + b"y", "audio/wav"))])
    assert content_type == "multipart/form-data; boundary=gpustack-" + "02" * 12


def test_retried_multipart_request_sends_the_same_bytes(tools, fake):
    fake.on("/v1/images/edits", reply(503, b"busy", "text/plain"), reply(200, image_answer(PNG)))
    tools.edit("night", PNG)
    first, second = [s for s in fake.requests if s.path == "/v1/images/edits"]
    assert first.raw == second.raw and first.headers["Content-Type"] == second.headers["Content-Type"]


def test_speech_defaults_to_the_first_voice_and_returns_the_audio(tools, fake):
    fake.on("/v1/audio/speech", reply(200, MP3, "audio/mpeg"))
    result = tools.generate_speech("Hello there")
    assert [(a.content, a.mime_type) for a in result.audios] == [(MP3, "audio/mpeg")]
    assert fake.requests[-1].json == {"model": "cosyvoice", "input": "Hello there", "voice": "Chinese Female",
                                      "response_format": "mp3"}


def test_voices_are_asked_once_per_model_not_before_every_speech(tools, fake):
    fake.on("/v1/audio/speech", reply(200, MP3, "audio/mpeg"))
    for _ in range(3):
        tools.speech("Hello there")
    assert len([s for s in fake.requests if "with_meta=true" in s.path]) == 1
    assert [s.path for s in fake.requests].count("/v1/audio/speech") == 3


def test_unknown_voice_is_refused_before_any_request_with_the_list(tools, fake):
    fake.on("/v1/audio/speech", reply(200, MP3, "audio/mpeg"))
    result = tools.generate_speech("Hello", voice="Robot")
    assert result.content == "Error: Unknown voice 'Robot' for cosyvoice; its voices: Chinese Female, English Male"
    assert "/v1/audio/speech" not in [s.path for s in fake.requests]


def test_voxbox_error_inside_a_200_is_a_provider_error(tools, fake):
    fake.on("/v1/audio/speech", reply(200, {"status_code": 500, "detail": "Failed to generate speech, CUDA OOM",
                                            "headers": None}))
    with pytest.raises(ModelProviderError) as caught:
        tools.speech("Hello")
    assert caught.value.status_code == 500
    assert caught.value.message == "Failed to generate speech, CUDA OOM (HTTP 200 carrying status 500)."


def test_transcription_sends_the_file_and_returns_the_text(tools, fake):
    fake.on("/v1/audio/transcriptions", reply(200, {"text": "hello world"}))
    assert tools.transcribe_audio(audios=[gpustack.Audio(content=WAV, format="wav")]) == "hello world"
    fields = multipart_fields(fake.requests[-1])
    assert fields == [("model", None, None, b"whisper"), ("file", "audio.wav", "audio/wav", WAV),
                      ("response_format", None, None, b"json")]
    assert b'name="stream"' not in fake.requests[-1].raw


def test_transcription_error_inside_a_200_goes_back_to_the_model(tools, fake):
    fake.on("/v1/audio/transcriptions", reply(200, {"status_code": 400, "detail": "bad audio"}))
    assert tools.transcribe_audio(audios=[gpustack.Audio(content=WAV, format="wav")]) == (
        "Error: bad audio (HTTP 200 carrying status 400).")


def test_reading_a_file_is_not_a_tool_the_model_can_call(tools):
    assert "transcribe_file" not in tools.functions and set(tools.functions) == {
        "generate_image", "edit_image", "generate_speech", "transcribe_audio"}


@pytest.mark.parametrize("path, call", [
    ("/v1/images/generations", lambda t: t.image("x")),
    ("/v1/images/edits", lambda t: t.edit("x", PNG)),
    ("/v1/audio/speech", lambda t: t.speech("x", "English Male")),
    ("/v1/audio/transcriptions", lambda t: t.transcribe(WAV)),
])
def test_media_endpoints_map_errors_redirects_and_cut_answers_like_the_others(tools, fake, path, call):
    fake.on(path, reply(401, REAL_401))
    with pytest.raises(ModelProviderError, match="Invalid authentication credentials.*GPUSTACK_API_KEY"):
        call(tools)
    fake.on(path, reply(307, b"", headers={"Location": "https://elsewhere.example/"}))
    with pytest.raises(ModelProviderError, match="redirected to https://elsewhere.example/"):
        call(tools)

    def cut(h, seen):
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b'{"data": [')
        h.close_connection = True

    fake.on(path, cut)
    with pytest.raises(ModelProviderError, match="broke while reading the answer"):
        call(tools)
    assert "sk-test-secret-123456" not in str([r.headers for r in fake.requests if r.path == path][:0])


def test_too_large_answer_is_refused(tools, fake, monkeypatch):
    monkeypatch.setattr(gpustack, "MAX_ANSWER_BYTES", 1024)
    fake.on("/v1/images/generations", reply(200, image_answer(PNG + b"\x00" * 2048)))
    with pytest.raises(ModelProviderError) as caught:
        tools.image("x")
    assert caught.value.message == (f"GPUStack's answer to POST {fake.url}/v1/images/generations is larger than 0 MiB; "
                                    "it was not read.")


def agent_tool_turns(tool: str, arguments: dict, final: str):
    def respond(h, seen):
        messages = seen.json["messages"]
        if any(message["role"] == "tool" for message in messages):
            send(h, 200, json.dumps(chat_answer(final)).encode())
            return
        call = {"id": "call-1", "type": "function", "function": {"name": tool, "arguments": json.dumps(arguments)}}
        send(h, 200, json.dumps(chat_answer(None, tool_calls=[call])).encode())

    return respond


@pytest.mark.parametrize("use_async", [False, True])
def test_agent_draws_with_the_image_tool(tools, fake, use_async):
    from agno.agent import Agent

    fake.on("/v1/images/generations", reply(200, image_answer(PNG)))
    fake.on("/v1/chat/completions", agent_tool_turns("generate_image", {"prompt": "a red square"}, "Here it is."))
    agent = Agent(model=GPUStackChat(id="qwen3", base_url=fake.url), tools=[tools])
    output = asyncio.run(agent.arun("Draw a red square")) if use_async else agent.run("Draw a red square")
    assert output.content == "Here it is."
    assert [(i.content, i.mime_type) for i in output.images] == [(PNG, "image/png")]
    assert "b64_json" not in json.dumps(fake.requests[-1].json["messages"])  # the model never sees the base64


@pytest.mark.parametrize("use_async", [False, True])
def test_text_only_agent_transcribes_attached_audio(tools, fake, use_async):
    from agno.agent import Agent

    fake.on("/v1/audio/transcriptions", reply(200, {"text": "meeting moved to friday"}))
    fake.on("/v1/chat/completions", agent_tool_turns("transcribe_audio", {}, "The meeting moved to Friday."))
    agent = Agent(model=GPUStackChat(id="qwen3", base_url=fake.url), tools=[tools], send_media_to_model=False)
    audio = [gpustack.Audio(content=WAV, format="wav")]
    output = (asyncio.run(agent.arun("What does it say?", audio=audio)) if use_async
              else agent.run("What does it say?", audio=audio))
    assert output.content == "The meeting moved to Friday."
    assert multipart_fields([s for s in fake.requests if s.path == "/v1/audio/transcriptions"][0])[1][3] == WAV
    tool_message = [m for m in fake.requests[-1].json["messages"] if m["role"] == "tool"][0]
    assert tool_message["content"] == "meeting moved to friday"
    assert "input_audio" not in json.dumps(fake.requests[0].json)


def test_cli_image_speak_and_transcribe_write_real_files(fake, tmp_path):
    fake.on("/v1/models", media_models())
    fake.on("/v1/images/generations", reply(200, image_answer(PNG, JPEG)))
    fake.on("/v1/audio/speech", reply(200, MP3, "audio/mpeg"))
    fake.on("/v1/audio/transcriptions", reply(200, {"text": "hello"}))
    out = tmp_path / "pic.png"
    assert cli(fake, "image", "a square", "-n", "2", "-o", str(out)).returncode == 0
    assert out.read_bytes() == PNG and (tmp_path / "pic-2.png").read_bytes() == JPEG
    assert cli(fake, "speak", "-m", "cosyvoice", "Hello", "-o", str(tmp_path / "hi.mp3")).returncode == 0
    assert (tmp_path / "hi.mp3").read_bytes() == MP3
    (tmp_path / "note.wav").write_bytes(WAV)
    done = cli(fake, "transcribe", str(tmp_path / "note.wav"))
    assert done.returncode == 0 and done.stdout == "hello\n"


@pytest.mark.parametrize("use_async", [False, True])
@pytest.mark.parametrize("tool, arguments, attach, expect", [
    ("edit_image", {"prompt": "make it night"}, {"images": [gpustack.Image(content=PNG)]}, "images"),
    ("generate_speech", {"text": "Hello there"}, {}, "audio"),
])
def test_agent_edits_the_attached_image_and_speaks(tools, fake, use_async, tool, arguments, attach, expect):
    from agno.agent import Agent

    fake.on("/v1/images/edits", reply(200, image_answer(JPEG)))
    fake.on("/v1/audio/speech", reply(200, MP3, "audio/mpeg"))
    fake.on("/v1/chat/completions", agent_tool_turns(tool, arguments, "Done."))
    agent = Agent(model=GPUStackChat(id="qwen3", base_url=fake.url), tools=[tools], send_media_to_model=False)
    output = asyncio.run(agent.arun("Go", **attach)) if use_async else agent.run("Go", **attach)
    assert output.content == "Done."
    media = getattr(output, expect)
    assert [item.content for item in media] == ([JPEG] if expect == "images" else [MP3])


def test_speech_without_listed_voices_sends_none_and_maps_the_servers_refusal(fake):
    fake.on("/v1/models", media_models({"dia": ("text_to_speech", {})}))
    fake.on("/v1/audio/speech", reply(422, {"detail": [{"loc": ["body", "voice"], "msg": "field required"}]}))
    tools = gpustack.GPUStackTools(base_url=fake.url)
    with pytest.raises(ModelProviderError) as caught:
        tools.speech("Hello")
    assert caught.value.message.startswith("body.voice: field required (HTTP 422")
    assert "voice" not in [s for s in fake.requests if s.path == "/v1/audio/speech"][0].json


def test_cancelled_async_image_tool_closes_its_connection_at_once(tools, fake):
    fake.on("/v1/images/generations", held_until_gone(fake))
    cancelled_at = cancelled_once_arrived(fake, "/v1/images/generations", lambda: tools.agenerate_image("a slow picture"))
    assert fake.client_gone.wait(2) and fake.gone_at - cancelled_at < 0.5


def test_wrapped_connection_failure_stays_retryable(model, fake):
    body = {"error": {"message": "An unexpected error occurred: Worker request failed: 1 POST "
                                 "http://10.0.0.5:40000/v1/chat/completions Cannot connect to host 10.0.0.5:40000",
                      "code": 503, "type": "ServiceUnavailable"}}
    fake.on("/v1/chat/completions", reply(503, body), reply(200, REAL_CHAT))
    assert model.invoke(user()).content == "Hello" and len(fake.requests) == 2


def test_cli_speak_to_stdout_and_transcribe_from_stdin(fake):
    fake.on("/v1/models", media_models())
    fake.on("/v1/audio/speech", reply(200, MP3, "audio/mpeg"))
    fake.on("/v1/audio/transcriptions", reply(200, {"text": "hello"}))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_")}, "GPUSTACK_SERVER_URL": fake.url}
    script = os.path.join(HERE, "gpustack.py")
    spoken = subprocess.run([sys.executable, script, "speak", "Hello", "-o", "-"], capture_output=True, env=env, timeout=30)
    assert spoken.returncode == 0 and spoken.stdout == MP3
    heard = subprocess.run([sys.executable, script, "transcribe", "-", "--json"], input=WAV, capture_output=True,
                           env=env, timeout=30)
    assert heard.returncode == 0 and json.loads(heard.stdout) == {"text": "hello"}
    assert multipart_fields([s for s in fake.requests if s.path == "/v1/audio/transcriptions"][0])[1][3] == WAV


def test_tools_keep_the_key_out_of_repr_and_attributes(tools, fake):
    assert "sk-test-secret" not in repr(tools) and "sk-test-secret" not in str(vars(tools))
    fake.on("/v1/images/generations", reply(200, image_answer(PNG)))
    tools.image("x")
    assert fake.requests[-1].headers["Authorization"] == "Bearer sk-test-secret-123456"
