"""The fake GPUStack that the tests in this folder share, and what they script it with.

The fake is an HTTP server on 127.0.0.1, reached over real sockets. It replays bytes captured from a
real GPUStack 2.3.0 server and a real llama.cpp server, then adds the faults those captures don't show.
Each test scripts the fake itself (``fake.on(path, responder)``), so cause and effect sit together.

Plain helpers only: the fixtures built on them are in conftest.py beside this file. Only what tests in
more than one file use is here; a helper that serves one file stays in that file.
test_live_gpustack.py plays the inference backend behind a real GPUStack with the same fake.
"""

import asyncio
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional

import pytest
from agno.models.message import Message

import gpustack

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the project's root: gpustack.py is there

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


def user(text: str = "hi") -> List[Message]:
    return [Message(role="user", content=text)]


def text_of(pieces) -> str:
    return "".join(piece.content or "" for piece in pieces)


# Responders and helpers used by tests in more than one file ############################################


def event_stream_head(h) -> None:
    """The head of a 200 event stream in chunked encoding."""
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()


def _endless(h, seen):
    event_stream_head(h)
    raw = b"data: " + json.dumps(chunk("tok")).encode() + b"\n\n"
    for _ in range(2000):
        h.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
        h.wfile.flush()
        time.sleep(0.005)


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


def models_route(h, seen):
    from urllib.parse import parse_qs, urlsplit

    wanted = parse_qs(urlsplit(seen.path).query).get("categories", [])
    catalog = {"qwen3": "llm", "owner/bge-m3": "embedding", "bge-reranker-v2-m3": "reranker"}
    data = [{"id": mid, "object": "model", "owned_by": "gpustack", "meta": None}
            for mid, cat in catalog.items() if not wanted or cat in wanted]
    send(h, 200, json.dumps({"data": data, "object": "list"}).encode())


def overlap_reranker(h, seen):
    body = seen.json
    query = set(body["query"].lower().replace("?", "").split())
    scores = [len(query & set(doc.lower().replace(".", "").split())) for doc in body["documents"]]
    results = [{"index": i, "relevance_score": float(s)} for i, s in enumerate(scores)]
    send(h, 200, json.dumps({"results": results[: body.get("top_n") or len(results)]}).encode())


def cli(fake, *args: str, stdin: str = "", key: Optional[str] = None, timeout: float = 30):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_")}
    env["GPUSTACK_SERVER_URL"] = fake.url
    if key:
        env["GPUSTACK_API_KEY"] = key
    return subprocess.run([sys.executable, os.path.join(HERE, "gpustack.py"), *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


def busy_workers() -> int:
    return gpustack._EXECUTOR.threads - gpustack._EXECUTOR._idle


def wait_for(condition: Callable[[], bool], seconds: float) -> float:
    """Seconds until ``condition()`` held, or ``seconds`` if it never did."""
    started = time.monotonic()
    while not condition() and time.monotonic() - started < seconds:
        time.sleep(0.005)
    return time.monotonic() - started


# A vLLM with a context window, and a tokenizer unlike len // 4 (tests/test_context_window.py, the live suite) ########


def tokens_of(text: str) -> int:
    """The fake's tokenizer: each CJK character one token, each run of ASCII letters or digits one token."""
    return len(re.findall(r"[\u4e00-\u9fff]|[A-Za-z0-9]+", text))


def prompt_tokens(body: Dict[str, Any]) -> int:
    """What the fake's chat template makes of a request: each message's text and 3 tokens around it; the tools."""
    total = 0
    for message in body["messages"]:
        content = message.get("content")
        total += 3 + tokens_of(content if isinstance(content, str) else json.dumps(content or ""))
        total += tokens_of(json.dumps(message.get("tool_calls") or ""))
    return total + tokens_of(json.dumps(body.get("tools") or ""))


def vllm_window(window: int, answer=lambda body: chat_answer("好的, OK."), seen_prompts: Optional[List[int]] = None):
    """A chat endpoint that refuses what doesn't fit ``window`` with vLLM's own words, and reports its count."""

    def respond(h, seen):
        body = seen.json
        prompt = prompt_tokens(body)
        if seen_prompts is not None:
            seen_prompts.append(prompt)
        wanted = body.get("max_tokens")
        if prompt > window:
            message = (f"This model's maximum context length is {window} tokens. However, your request has {prompt} "
                       "input tokens. Please reduce the length of the input messages.")
        elif wanted is not None and wanted > window:
            message = (f"max_tokens={wanted}cannot be greater than max_model_len=max_total_tokens={window}. Please "
                       f"request fewer output tokens. (parameter=max_tokens, value={wanted})")
        elif wanted is not None and prompt + wanted > window:
            message = (f"'max_tokens' or 'max_completion_tokens' is too large: {wanted}. This model's maximum context "
                       f"length is {window} tokens and your request has {prompt} input tokens "
                       f"({wanted} > {window} - {prompt}).")
        else:
            answered = answer(body)
            answered["usage"] = {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3}
            return send(h, 200, json.dumps(answered).encode())
        send(h, 400, json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None,
                                           "code": 400}}).encode())

    return respond


LONG_RESULT = " ".join(f"row {n} holds the value {n * 7} for the quarterly report" for n in range(60))


def look_up(query: str) -> str:
    """Look a query up in the records."""
    return LONG_RESULT


def agent_turns(body: Dict[str, Any]) -> Dict[str, Any]:
    """Agno's summarizer gets a summary; a user turn gets a call of the tool; a tool result gets the answer."""
    first = body["messages"][0]
    if first["role"] == "system" and "summar" in str(first["content"]).lower():
        return chat_answer("Earlier turns: the records were looked up for each question.")
    if body["messages"][-1]["role"] == "user":
        call = {"id": f"call_{len(body['messages'])}", "type": "function",
                "function": {"name": "look_up", "arguments": json.dumps({"query": "records"})}}
        return chat_answer(None, tool_calls=[call])
    return chat_answer("The records say 42.")


def read_at_once(read: Callable[[], Any], threads: int = 4) -> List[Any]:
    """What ``read`` gives in each of a few threads started together (for what must be learned only once)."""
    results: List[Any] = []
    readers = [threading.Thread(target=lambda: results.append(read())) for _ in range(threads)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join()
    return results
