"""Benchmark: gpustack.py (ours) against Agno's OpenAI-compatible providers on the openai SDK (peer)
and the least work any client can do (limit), side by side in one run.

    pip install -e '.[bench]' && python bench_gpustack.py [--json results.json] [--quick]

A fast local server runs in its own process on 127.0.0.1 (asyncio, keep-alive, canned bodies).
"""

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any, Callable, Dict, List, Optional, Tuple

CHAT = json.dumps({
    "id": "c", "object": "chat.completion", "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello there"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}).encode()
PIECE = b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"tok"},"finish_reason":null}]}\n\n'
LAST = (b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
        b"data: [DONE]\n\n")
VECTOR = [0.125] * 32


# The server ####################################################################


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = json.loads(await reader.readexactly(length)) if length else {}
            path = head.split(b" ", 2)[1]
            if path.startswith(b"/v1/embeddings"):
                texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
                data = json.dumps({"object": "list", "model": "e", "usage": {"prompt_tokens": 1, "total_tokens": 1},
                                   "data": [{"object": "embedding", "index": i, "embedding": VECTOR} for i in range(len(texts))]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
                continue
            mode = str(body.get("messages", [{}])[-1].get("content", ""))
            if mode.startswith("hold:"):
                await asyncio.sleep(float(mode[5:]))
            if not body.get("stream"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(CHAT), CHAT))
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            count = int(mode[7:]) if mode.startswith("chunks:") else 5
            if mode.startswith("ttft:"):
                writer.write(_chunked(PIECE))
                await writer.drain()
                await asyncio.sleep(float(mode[5:]))
                count = 1
            writer.write(_chunked(PIECE * count) + _chunked(LAST) + b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def _serve(port_pipe: Any) -> None:
    async def main() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", 0, backlog=2048)
        port_pipe.send(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# The three clients #################################################################


def msgs(text: str = "hi"):
    from agno.models.message import Message

    return [Message(role="user", content=text)]


class Limit:
    """A persistent http.client connection, json.loads, a bare SSE line loop."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, text: str = "hi") -> Any:
        self.conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}),
                          {"Content-Type": "application/json"})
        return json.loads(self.conn.getresponse().read())

    def stream(self, text: str) -> int:
        self.conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": text}]}),
                          {"Content-Type": "application/json"})
        count = 0
        resp = self.conn.getresponse()
        for line in resp:
            if line.startswith(b"data: "):
                if line.startswith(b"data: [DONE]"):
                    break
                json.loads(line[6:])
                count += 1
        resp.read()
        return count

    def first_token(self, text: str) -> float:
        started = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": text}]}),
                          {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        for line in resp:
            if line.startswith(b"data: "):
                took = time.perf_counter() - started
                resp.read()
                return took
        return float("nan")

    def embed(self, texts: List[str]) -> None:
        self.conn.request("POST", "/v1/embeddings", json.dumps({"model": "e", "input": texts}), {"Content-Type": "application/json"})
        json.loads(self.conn.getresponse().read())

    async def acall(self, text: str) -> Any:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": text}]}).encode()
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        data = json.loads(await reader.readexactly(length))
        writer.close()
        return data


def thin_model(port: int):
    """The limit for Agent.run: the thinnest Agno Model, over one persistent http.client connection."""
    from dataclasses import dataclass

    from agno.metrics import MessageMetrics
    from agno.models.base import Model
    from agno.models.response import ModelResponse

    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @dataclass
    class Thin(Model):
        id: str = "m"
        name: str = "Thin"
        provider: str = "Thin"

        def invoke(self, messages: Any, assistant_message: Any = None, **_: Any) -> ModelResponse:
            body = json.dumps({"model": self.id, "messages": [{"role": m.role, "content": m.content} for m in messages]})
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            return self._parse_provider_response(json.loads(conn.getresponse().read()))

        def _parse_provider_response(self, response: Any, **_: Any) -> ModelResponse:
            # Token usage, as every provider reports it: Agno's run metrics depend on it.
            usage = response["usage"]
            metrics = MessageMetrics(input_tokens=usage["prompt_tokens"], output_tokens=usage["completion_tokens"],
                                     total_tokens=usage["total_tokens"])
            return ModelResponse(role="assistant", content=response["choices"][0]["message"]["content"], response_usage=metrics)

        async def ainvoke(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        def invoke_stream(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        async def ainvoke_stream(self, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError

        def _parse_provider_response_delta(self, response: Any) -> Any:
            raise NotImplementedError

    return Thin()


def ours(port: int):
    from gpustack import GPUStackChat, GPUStackEmbeddings

    return GPUStackChat(id="m", base_url=f"http://127.0.0.1:{port}"), GPUStackEmbeddings(id="e", base_url=f"http://127.0.0.1:{port}", batch_size=100)


def peer(port: int):
    from agno.knowledge.embedder.openai import OpenAIEmbedder
    from agno.models.openai.like import OpenAILike

    return (OpenAILike(id="m", base_url=f"http://127.0.0.1:{port}/v1", api_key="x"),
            OpenAIEmbedder(id="e", base_url=f"http://127.0.0.1:{port}/v1", api_key="x", batch_size=100, dimensions=32))


def invoker(model, text: str = "hi") -> Callable[[], Any]:
    """One invoke() per call, on messages built once: the caller (Agno) has its Message objects already,
    and building them (pydantic) is not the model's work, nor the limit's."""
    from agno.models.message import Message

    messages, assistant = msgs(text), Message(role="assistant")
    return lambda: model.invoke(messages=messages, assistant_message=assistant)


def consume(model, text: str) -> int:
    from agno.models.message import Message

    return sum(1 for _ in model.invoke_stream(messages=msgs(text), assistant_message=Message(role="assistant")))


async def aconsume(model, text: str) -> int:
    from agno.models.message import Message

    count = 0
    async for _ in model.ainvoke_stream(messages=msgs(text), assistant_message=Message(role="assistant")):
        count += 1
    return count


def first_token(model, text: str) -> float:
    from agno.models.message import Message

    started = time.perf_counter()
    stream = model.invoke_stream(messages=msgs(text), assistant_message=Message(role="assistant"))
    for piece in stream:
        if piece.content:
            took = time.perf_counter() - started
            for _ in stream:
                pass
            return took
    return float("nan")


# Measurements ######################################################################


def per_call_side_by_side(fns: List[Callable[[], Any]], n: int, rounds: int = 10) -> List[Tuple[float, float]]:
    """Median wall and mean CPU per call for several clients, measured in interleaved rounds after a warm-up,
    so that none is measured on a cold machine or in a quiet moment the others did not get."""
    for fn in fns:
        for _ in range(20):
            fn()
    walls: List[List[float]] = [[] for _ in fns]
    cpus = [0.0 for _ in fns]
    for _ in range(rounds):
        for index, fn in enumerate(fns):
            cpu = time.process_time()
            for _ in range(max(1, n // rounds)):
                started = time.perf_counter()
                fn()
                walls[index].append(time.perf_counter() - started)
            cpus[index] += time.process_time() - cpu
    return [(statistics.median(wall), cpu / len(wall)) for wall, cpu in zip(walls, cpus)]


def cpu_of(fn: Callable[[], Any]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def wall_of(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


_PEERS: List[Any] = []


def peer_run(coro: Any) -> Any:
    """asyncio.run for the peer, closing the SDK's async clients in the loop that made them: left to the
    garbage collector, they schedule their close on the next event loop and print a traceback (about 1 ms
    against the hundreds each of these rows takes)."""

    async def closing() -> Any:
        try:
            return await coro
        finally:
            for model in _PEERS:
                if model.async_client is not None:
                    await model.async_client.close()
                    model.async_client = None

    return asyncio.run(closing())


def import_time(statement: str, cache: str) -> float:
    """A fresh process's import, from compiled bytecode for every module, as after pip install or a first run.

    Without this, PYTHONDONTWRITEBYTECODE=1 would have gpustack.py compiled in every run while the packages
    it is compared with load the bytecode pip compiled at install. One untimed run fills the cache.
    """
    env = {**os.environ, "PYTHONPYCACHEPREFIX": cache}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    runs = []
    for attempt in range(6):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", statement], check=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
        if attempt:
            runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def memory_of(fn: Callable[[], Any]) -> Tuple[float, float]:
    """Peak traced MiB while fn runs, and MiB still held after it returns."""
    import gc

    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    fn()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return (peak - base) / 2**20, (current - base) / 2**20


def run(quick: bool) -> List[Dict[str, Any]]:
    parent, child = multiprocessing.Pipe()
    server = multiprocessing.Process(target=_serve, args=(child,), daemon=True)
    server.start()
    port = parent.recv()
    calls, chunks, texts = (100, 5000, 2000) if quick else (300, 20000, 10000)
    our_chat, our_embed = ours(port)
    peer_chat, peer_embed = peer(port)
    _PEERS.extend([peer_chat, peer_embed])
    limit = Limit(port)
    rows: List[Dict[str, Any]] = []

    def row(name: str, unit: str, o: Optional[float], p: Optional[float], lim: Optional[float]) -> None:
        rows.append({"measure": name, "unit": unit, "ours": o, "peer": p, "limit": lim})

    (wall_o, cpu_o), (wall_p, cpu_p), (wall_l, cpu_l) = per_call_side_by_side(
        [invoker(our_chat), invoker(peer_chat), limit.call], calls)
    row("invoke: median wall per call", "ms", wall_o * 1e3, wall_p * 1e3, wall_l * 1e3)
    row("invoke: CPU per call", "ms", cpu_o * 1e3, cpu_p * 1e3, cpu_l * 1e3)

    from agno.agent import Agent

    # No telemetry: its background delivery (to an address this machine can't reach) would bill its CPU to whichever row runs.
    agent_o, agent_p, agent_l = (Agent(model=model, telemetry=False) for model in (our_chat, peer_chat, thin_model(port)))
    (wall_o, cpu_o), (wall_p, cpu_p), (wall_l, cpu_l) = per_call_side_by_side(
        [lambda: agent_o.run("hi"), lambda: agent_p.run("hi"), lambda: agent_l.run("hi")], calls // 3)
    row("Agent.run one turn: median wall", "ms", wall_o * 1e3, wall_p * 1e3, wall_l * 1e3)
    row("Agent.run one turn: CPU", "ms", cpu_o * 1e3, cpu_p * 1e3, cpu_l * 1e3)

    text = f"chunks:{chunks}"
    row("stream sync: CPU per chunk", "us", cpu_of(lambda: consume(our_chat, text)) / chunks * 1e6,
        cpu_of(lambda: consume(peer_chat, text)) / chunks * 1e6, cpu_of(lambda: limit.stream(text)) / chunks * 1e6)
    row("stream async: CPU per chunk", "us", cpu_of(lambda: asyncio.run(aconsume(our_chat, text))) / chunks * 1e6,
        cpu_of(lambda: peer_run(aconsume(peer_chat, text))) / chunks * 1e6, cpu_of(lambda: limit.stream(text)) / chunks * 1e6)

    def ttft(fn: Callable[[str], float]) -> float:
        return statistics.median(fn("ttft:0.05") for _ in range(5)) * 1e3

    row("time to first token (server pauses after it)", "ms", ttft(lambda t: first_token(our_chat, t)),
        ttft(lambda t: first_token(peer_chat, t)), ttft(limit.first_token))

    for width in (64, 256):
        async def burst(make: Callable[[], Any]) -> None:
            await asyncio.gather(*[make() for _ in range(width)])

        from agno.models.message import Message

        row(f"{width} concurrent async calls held 200 ms: wall", "ms",
            wall_of(lambda: asyncio.run(burst(lambda: our_chat.ainvoke(msgs("hold:0.2"), Message(role="assistant"))))) * 1e3,
            wall_of(lambda: peer_run(burst(lambda: peer_chat.ainvoke(messages=msgs("hold:0.2"), assistant_message=Message(role="assistant"))))) * 1e3,
            wall_of(lambda: asyncio.run(burst(lambda: limit.acall("hold:0.2")))) * 1e3)

    with tempfile.TemporaryDirectory() as cache:
        row("cold import (compiled bytecode)", "ms", import_time("import gpustack", cache) * 1e3,
            import_time("import agno.models.openai, openai", cache) * 1e3, import_time("import agno.models.base", cache) * 1e3)

    corpus = [f"short text number {i}" for i in range(texts)]

    def limit_embed() -> None:
        for start in range(0, len(corpus), 100):
            limit.embed(corpus[start:start + 100])

    def peer_sync_embed() -> None:
        for start in range(0, len(corpus), 100):
            peer_embed.client.embeddings.create(input=corpus[start:start + 100], model="e")

    row("embeddings sync: texts per second", "1/s", texts / wall_of(lambda: our_embed.get_embeddings_batch_and_usage(corpus)),
        texts / wall_of(peer_sync_embed), texts / wall_of(limit_embed))
    row("embeddings async: texts per second", "1/s",
        texts / wall_of(lambda: asyncio.run(our_embed.async_get_embeddings_batch_and_usage(corpus))),
        texts / wall_of(lambda: peer_run(peer_embed.async_get_embeddings_batch_and_usage(corpus))), texts / wall_of(limit_embed))

    mem_o, mem_p, mem_l = (memory_of(lambda: consume(our_chat, text)), memory_of(lambda: consume(peer_chat, text)),
                           memory_of(lambda: limit.stream(text)))
    row(f"stream of {chunks} chunks: peak memory", "MiB", mem_o[0], mem_p[0], mem_l[0])
    row(f"stream of {chunks} chunks: memory growth", "MiB", mem_o[1], mem_p[1], mem_l[1])
    server.terminate()
    return rows


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    args = parser.parse_args()
    rows = run(args.quick)
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}, {sys.platform}")
    print(f"{'measure':52} {'unit':>5} {'ours':>10} {'peer':>10} {'limit':>10} {'ours/peer':>10} {'ours/limit':>10}")
    for r in rows:
        cells = [f"{v:10.3f}" if v is not None else f"{'-':>10}" for v in (r["ours"], r["peer"], r["limit"])]
        print(f"{r['measure']:52} {r['unit']:>5} {' '.join(cells)} {_ratio(r['ours'], r['peer']):>10} {_ratio(r['ours'], r['limit']):>10}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]}, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
