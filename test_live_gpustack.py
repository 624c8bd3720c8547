"""The module against a real GPUStack server: its own authentication, routing, error wrapping and SSE relay.

Two ways to run it:

- ``python tests/gpustack_server.py run -- python -m pytest test_live_gpustack.py`` starts GPUStack 2.3.0
  on this machine (what CI does). Behind GPUStack's own worker proxy, the project's fake plays the
  inference backend, so every test runs, the scripted faults included.
- Against your own GPUStack: set ``GPUSTACK_TEST_SERVER_URL``, ``GPUSTACK_TEST_API_KEY`` and
  ``GPUSTACK_TEST_CHAT_MODEL`` (``GPUSTACK_TEST_EMBEDDING_MODEL`` and ``GPUSTACK_TEST_RERANK_MODEL``
  optional), then ``python -m pytest test_live_gpustack.py``. The tests that need the harness's keys,
  models or scripted backend are skipped, and nothing on your server is changed: only small
  inference calls and reads.

With ``GPUSTACK_LIVE_REQUIRED=1`` (CI), a test that would be skipped fails instead.
"""

import asyncio
import base64
import gc
import json
import os
import re
import struct
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import pytest
from agno.exceptions import ContextWindowExceededError, ModelProviderError
from agno.models.message import Message

import gpustack
from gpustack import GPUStackChat, GPUStackEmbeddings, GPUStackRerank, list_models
from fakes import Fake, agent_turns, chat_answer, chunk, look_up, send, stream, vllm_window

HERE = os.path.dirname(os.path.abspath(__file__))
SERVER = os.environ.get("GPUSTACK_TEST_SERVER_URL", "")
KEY = os.environ.get("GPUSTACK_TEST_API_KEY", "")
CHAT = os.environ.get("GPUSTACK_TEST_CHAT_MODEL", "")
EMBEDDING = os.environ.get("GPUSTACK_TEST_EMBEDDING_MODEL", "")
RERANK = os.environ.get("GPUSTACK_TEST_RERANK_MODEL", "")
# Set only by tests/gpustack_server.py: the port its stand-in worker relays to, where our fake answers.
BACKEND_PORT = int(os.environ.get("GPUSTACK_LIVE_BACKEND_PORT") or 0)
REQUIRED = os.environ.get("GPUSTACK_LIVE_REQUIRED") == "1"

ours = pytest.mark.ours  # needs the server tests/gpustack_server.py starts (its keys, models, scripted backend)


def needs(variable: str) -> pytest.MarkDecorator:
    return pytest.mark.needs(variable)


def unavailable(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"GPUSTACK_LIVE_REQUIRED is set, and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def available(request: pytest.FixtureRequest) -> None:
    if not (SERVER and KEY and CHAT):
        unavailable("no GPUStack: set GPUSTACK_TEST_SERVER_URL, GPUSTACK_TEST_API_KEY and GPUSTACK_TEST_CHAT_MODEL, "
                    "or run: python tests/gpustack_server.py run -- python -m pytest test_live_gpustack.py")
    if request.node.get_closest_marker("ours") and not BACKEND_PORT:
        unavailable("needs the server tests/gpustack_server.py starts (its keys, models and scripted backend)")
    for marker in request.node.iter_markers("needs"):
        if not os.environ.get(marker.args[0]):
            unavailable(f"set {marker.args[0]}")


# The backend behind GPUStack's worker proxy: our fake, answering like vLLM ############################

BACKEND_ANSWER = "Hello from the backend"


def backend_chat(h: Any, seen: Any) -> None:
    """A chat answer, streamed when asked; a tool call when tools are offered and none has run yet."""
    body = seen.json
    offered, ran = body.get("tools"), any(m.get("role") == "tool" for m in body["messages"])
    if offered and not ran:
        name = offered[0]["function"]["name"]
        call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps({"city": "Paris"})}}
        send(h, 200, json.dumps(chat_answer(None, tool_calls=[call])).encode())
    elif body.get("stream"):
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
        stream(chunk("Hello from"), chunk(" the backend"), chunk(finish="stop"), usage, b"data: [DONE]\n\n")(h, seen)
    elif body.get("response_format", {}).get("type") == "json_schema":
        send(h, 200, json.dumps(chat_answer('{"ok": true}')).encode())
    else:
        send(h, 200, json.dumps(chat_answer(BACKEND_ANSWER)).encode())


def vector_for(text: str) -> List[float]:
    return [float(len(text)), 0.5, -0.25, 1.0 / (1 + len(text))]


def backend_embeddings(h: Any, seen: Any) -> None:
    body = seen.json
    texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = []
    for index, text in enumerate(texts):
        vector: Any = vector_for(text)
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    answer = {"object": "list", "model": body["model"], "data": data, "usage": {"prompt_tokens": len(texts), "total_tokens": len(texts)}}
    send(h, 200, json.dumps(answer).encode())


def words(text: str) -> set:
    return {word.strip(".,?!").lower() for word in text.split()}


def backend_rerank(h: Any, seen: Any) -> None:
    """Scores each document by the words it shares with the query."""
    body = seen.json
    results = [{"index": i, "document": {"text": d}, "relevance_score": len(words(d) & words(body["query"])) / 10}
               for i, d in enumerate(body["documents"])]
    results.sort(key=lambda result: -result["relevance_score"])
    send(h, 200, json.dumps({"id": "rerank-1", "model": body["model"], "results": results,
                             "usage": {"prompt_tokens": 9, "total_tokens": 9}}).encode())


@pytest.fixture
def backend() -> Any:
    """Our fake as the inference backend, when the server is the harness's; None against a user's server."""
    if not BACKEND_PORT:
        yield None
        return
    fake = Fake(port=BACKEND_PORT)
    fake.on("/v1/chat/completions", backend_chat)
    fake.on("/v1/embeddings", backend_embeddings)
    fake.on("/v1/rerank", backend_rerank)
    yield fake
    gpustack.close_connections()
    fake.close()


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpustack, "INITIAL_RETRY_DELAY", 0.01)


def chat(model: str = CHAT, key: str = KEY, **settings: Any) -> GPUStackChat:
    return GPUStackChat(id=model, base_url=SERVER, api_key=key, **{"max_tokens": 32, "timeout": 60, **settings})


def ask(text: str = "Reply with one word: OK") -> List[Message]:
    return [Message(role="user", content=text)]


def refused(**settings: Any) -> ModelProviderError:
    """The error a chat call with these settings raises."""
    with pytest.raises(ModelProviderError) as caught:
        chat(**settings).invoke(ask())
    return caught.value


def said(backend: Optional[Fake], content: Optional[str], expected: str = BACKEND_ANSWER) -> None:
    """The exact answer from our backend; from a user's model, some answer."""
    if backend is not None:
        assert content == expected
    else:
        assert content and content.strip()


def backend_saw(backend: Fake, path: str) -> List[Dict[str, Any]]:
    return [seen.json for seen in backend.requests if seen.path == path]


# Discovery ############################################################################################


def test_list_models_shows_each_running_model_with_its_category(backend):
    found = {item["id"]: item["categories"] for item in list_models(SERVER, KEY)}
    assert "llm" in found[CHAT]
    if EMBEDDING:
        assert "embedding" in found[EMBEDDING]
    if RERANK:
        assert "reranker" in found[RERANK]
    if backend is not None:  # the stopped and the pending model have no running instance: GPUStack doesn't list them
        assert found == {CHAT: ["llm"], EMBEDDING: ["embedding"], RERANK: ["reranker"]}


# Chat ##################################################################################################


def test_chat_answers_with_usage(backend):
    answer = chat().invoke(ask())
    said(backend, answer.content)
    assert answer.response_usage.input_tokens > 0 and answer.response_usage.output_tokens > 0
    if backend is not None:
        assert backend_saw(backend, "/v1/chat/completions")[-1]["messages"] == [{"role": "user", "content": "Reply with one word: OK"}]


def test_chat_stream_relayed_by_gpustack_with_its_usage_chunk(backend):
    pieces = list(chat().invoke_stream(ask()))
    said(backend, "".join(piece.content or "" for piece in pieces))
    usage = [piece.response_usage for piece in pieces if piece.response_usage]
    assert len(usage) == 1 and usage[0].output_tokens > 0
    if backend is not None:
        assert (usage[0].input_tokens, usage[0].output_tokens, usage[0].total_tokens) == (3, 2, 5)
        assert backend_saw(backend, "/v1/chat/completions")[-1]["stream_options"] == {"include_usage": True}


def test_async_chat_and_stream(backend):
    model = chat()

    async def go() -> Any:
        answer = await model.ainvoke(ask())
        pieces = [piece async for piece in model.ainvoke_stream(ask())]
        return answer, pieces

    answer, pieces = asyncio.run(go())
    said(backend, answer.content)
    said(backend, "".join(piece.content or "" for piece in pieces))


GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_tool_call_comes_back_as_a_tool_call(backend):
    forced = {"type": "function", "function": {"name": "get_weather"}}
    answer = chat(max_tokens=64).invoke(ask("What is the weather in Paris?"), tools=[GET_WEATHER], tool_choice=forced)
    assert [call["function"]["name"] for call in answer.tool_calls] == ["get_weather"]
    assert isinstance(json.loads(answer.tool_calls[0]["function"]["arguments"])["city"], str)
    if backend is not None:
        sent = backend_saw(backend, "/v1/chat/completions")[-1]
        assert sent["tools"] == [GET_WEATHER] and sent["tool_choice"] == forced


@ours
def test_agent_runs_a_python_tool_through_gpustack(backend):
    from agno.agent import Agent

    ran: List[str] = []

    def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
            city: The city name.
        """
        ran.append(city)
        return f"sunny in {city}"

    output = Agent(model=chat(), tools=[get_weather], telemetry=False).run("What is the weather in Paris?")
    assert ran == ["Paris"] and output.content == BACKEND_ANSWER
    tool_message = backend_saw(backend, "/v1/chat/completions")[-1]["messages"][-1]
    assert tool_message["role"] == "tool" and tool_message["content"] == "sunny in Paris"


SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}


def test_json_schema_answer_follows_the_schema(backend):
    answer = chat(max_tokens=64).invoke(ask("Is water wet? Answer in JSON."), response_format=SCHEMA)
    assert isinstance(json.loads(answer.content)["ok"], bool)
    if backend is not None:
        assert backend_saw(backend, "/v1/chat/completions")[-1]["response_format"] == SCHEMA


# Embeddings and rerank #################################################################################


@needs("GPUSTACK_TEST_EMBEDDING_MODEL")
def test_embeddings_float_and_base64_give_the_same_vectors(backend):
    texts = ["GPUStack runs models.", "Agno builds agents."]
    plain = GPUStackEmbeddings(id=EMBEDDING, base_url=SERVER, api_key=KEY)
    packed = GPUStackEmbeddings(id=EMBEDDING, base_url=SERVER, api_key=KEY, encoding_format="base64")
    floats, decoded = [plain.get_embedding(t) for t in texts], [packed.get_embedding(t) for t in texts]
    assert len(floats[0]) == len(decoded[0]) > 0
    for a, b in zip(floats, decoded):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-3
    if backend is not None:
        assert floats == [vector_for(t) for t in texts]
        assert [body.get("encoding_format") for body in backend_saw(backend, "/v1/embeddings")] == [None, None, "base64", "base64"]


@needs("GPUSTACK_TEST_RERANK_MODEL")
def test_rerank_puts_the_relevant_document_first(backend):
    reranker = GPUStackRerank(id=RERANK, base_url=SERVER, api_key=KEY)
    documents = ["Bananas are yellow.", "GPUStack runs models on GPUs."]
    ranked = reranker.rerank("What runs models on GPUs?", documents)
    assert [item["document"] for item in ranked][0] == "GPUStack runs models on GPUs."
    assert ranked[0]["relevance_score"] > ranked[1]["relevance_score"]


# GPUStack's own errors #################################################################################


def test_wrong_key_is_401_naming_the_variable(backend):
    error = refused(key="gpustack_0000000000000000_00000000000000000000000000000000")
    assert error.status_code == 401
    assert "Invalid authentication credentials" in error.message and "GPUSTACK_API_KEY" in error.message
    if backend is not None:
        assert backend.requests == []


@ours
def test_expired_key_is_401(backend):
    error = refused(key=os.environ["GPUSTACK_LIVE_EXPIRED_KEY"])
    assert error.status_code == 401 and "Invalid authentication credentials" in error.message


@ours
def test_management_only_key_is_403_on_inference(backend):
    error = refused(key=os.environ["GPUSTACK_LIVE_MANAGEMENT_KEY"])
    assert error.status_code == 403
    assert "API key does not have permission to access inference features" in error.message
    assert "GPUSTACK_API_KEY" in error.message and backend.requests == []


@ours
def test_inference_only_key_chats_but_cant_read_model_states(backend):
    key, name = os.environ["GPUSTACK_LIVE_INFERENCE_KEY"], os.environ["GPUSTACK_LIVE_STOPPED_MODEL"]
    assert chat(key=key).invoke(ask()).content == BACKEND_ANSWER
    error = refused(model=name, key=key, max_retries=0)
    # /v2 refuses this key (403), so the error can't tell stopped from deploying, and says only what it knows.
    assert error.status_code == 503 and f"{name} exists but has no running instance." in error.message
    assert "0 replicas" not in error.message


def test_unknown_model_is_404_naming_the_running_model_like_it(backend):
    error = refused(model=CHAT + "x")
    assert error.status_code == 404
    # The server as the client normalised it (a URL given with /v1 or a trailing slash loses them).
    root = gpustack._settings(SERVER, KEY, None, None, True, ()).root
    found = re.search(rf"Model '{re.escape(CHAT)}x' not found on GPUStack at {re.escape(root)}\. Running models like it: (.+?)\.(?:\s|$)",
                      error.message)
    assert found, error.message
    # On a user's cluster other names may be as near; on ours, the chat model is the only one.
    assert found[1] == CHAT if backend is not None else CHAT in found[1].split(", ")


@ours
def test_key_restricted_to_another_model_gets_404(backend):
    error = refused(key=os.environ["GPUSTACK_LIVE_OTHER_MODEL_KEY"])
    assert error.status_code == 404 and "Model not found" in error.message
    assert backend.requests == []


@ours
def test_stopped_model_is_503_saying_it_is_stopped(backend):
    name = os.environ["GPUSTACK_LIVE_STOPPED_MODEL"]
    error = refused(model=name, max_retries=0)
    assert error.status_code == 503 and "No running instances available" in error.message
    assert f"{name} is stopped (0 replicas): start it in GPUStack." in error.message


@ours
def test_pending_model_is_503_saying_what_its_instance_is_doing(backend):
    name = os.environ["GPUSTACK_LIVE_PENDING_MODEL"]
    error = refused(model=name, max_retries=0)
    assert error.status_code == 503 and "No running instances available" in error.message
    # The scheduler's note after "is pending: " changes when it retries (every 180 s): not asserted.
    assert re.search(rf"{name} exists but 0 of 1 instances are ready: {name}-\w+ is pending\b", error.message)


# Backend errors as GPUStack relays them ###############################################################

CONTEXT_400 = {"error": {"message": "This model's maximum context length is 8192 tokens. However, you requested 9000 tokens "
                         "(8000 in the messages, 1000 in the completion). Please reduce the length of the messages or "
                         "completion.", "type": "BadRequestError", "param": None, "code": 400}}


def backend_error(status: int, body: Dict[str, Any]) -> Any:
    return lambda h, seen: send(h, status, json.dumps(body).encode())


@ours
def test_backend_400_wrapped_in_gpustack_503_is_unwrapped_and_not_retried(backend):
    backend.on("/v1/chat/completions", backend_error(400, CONTEXT_400))
    with pytest.raises(ContextWindowExceededError) as caught:
        chat(max_retries=2).invoke(ask())
    assert caught.value.status_code == 400 and "relayed by GPUStack" in caught.value.message
    assert "maximum context length is 8192 tokens" in caught.value.message
    assert len(backend.requests) == 1


@ours
def test_backend_400_on_a_stream_is_relayed_as_is(backend):
    backend.on("/v1/chat/completions", backend_error(400, CONTEXT_400))
    with pytest.raises(ContextWindowExceededError) as caught:
        list(chat(max_retries=2).invoke_stream(ask()))
    assert caught.value.status_code == 400 and len(backend.requests) == 1


@ours
def test_backend_500_wrapped_in_gpustack_503_is_retried(backend):
    failed = backend_error(500, {"error": {"message": "EngineCore encountered an issue.", "type": "InternalServerError", "code": 500}})
    backend.on("/v1/chat/completions", failed, failed, backend_chat)
    assert chat(max_retries=2).invoke(ask()).content == BACKEND_ANSWER
    assert len(backend.requests) == 3


@ours
def test_backend_midstream_error_raises_with_its_words(backend):
    backend.on("/v1/chat/completions", stream(chunk("Hel"), {"error": {"message": "engine died mid-stream", "type": "InternalServerError", "code": 500}},
                                              b"data: [DONE]\n\n"))
    with pytest.raises(ModelProviderError, match="engine died mid-stream"):
        list(chat().invoke_stream(ask()))


def one_token_then_silence(fake: Fake, first: bytes = b"data: " + json.dumps(chunk("tok")).encode() + b"\n\n") -> Any:
    """One token, then nothing until the relay's connection to us closes (a backend deep in a long prefill).

    Silence makes the client's own close the only thing that can end the request: no later
    write of ours would notice the client is gone.
    """
    return lambda h, seen: _token_then_silence(fake, h, first)


def _token_then_silence(fake: Fake, h: Any, raw: bytes) -> None:
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    h.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
    h.wfile.flush()
    h.connection.settimeout(20)
    try:
        h.connection.recv(1)  # b"" once GPUStack's worker proxy drops the connection
    except OSError:
        return
    fake.gone_at = time.monotonic()
    fake.client_gone.set()
    h.close_connection = True


@ours
def test_abandoned_stream_reaches_the_backend_as_a_disconnect(backend):
    backend.on("/v1/chat/completions", one_token_then_silence(backend))
    pieces = chat().invoke_stream(ask())
    assert next(pieces).content == "tok"
    left = time.monotonic()
    pieces.close()
    assert backend.client_gone.wait(10), "the backend kept generating for a client that left"
    assert backend.gone_at - left < 2


@ours
def test_stream_failing_midway_reaches_the_backend_as_a_disconnect_while_the_error_lives(backend):
    backend.on("/v1/chat/completions", one_token_then_silence(backend, b"data: {not json\n\n"))
    with pytest.raises(ModelProviderError, match="not JSON") as caught:
        list(chat().invoke_stream(ask()))
    raised_at = time.monotonic()
    assert backend.client_gone.wait(10), "the backend kept generating after the stream failed"
    assert backend.gone_at - raised_at < 2
    assert caught.value.__traceback__ is not None  # its frames still hold the stream: only its own close ended it


@ours
def test_cancelled_async_stream_reaches_the_backend_as_a_disconnect(backend):
    """Cancelled while the task awaits something else (Agno handling a chunk), with the collector off:
    only the stream's tie to its task can close the connection."""
    backend.on("/v1/chat/completions", one_token_then_silence(backend))
    model = chat()

    async def consume(first: asyncio.Event) -> None:
        async for _ in model.ainvoke_stream(ask()):
            first.set()
            await asyncio.sleep(30)

    async def go() -> float:
        first = asyncio.Event()
        task = asyncio.create_task(consume(first))
        await first.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    gc.disable()
    try:
        cancelled_at = asyncio.run(go())
        assert backend.client_gone.wait(10), "the backend kept generating for a cancelled task"
    finally:
        gc.enable()
    assert backend.gone_at - cancelled_at < 2


# Command line ##########################################################################################


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUSTACK_")}
    env.update(GPUSTACK_SERVER_URL=SERVER, GPUSTACK_API_KEY=KEY)
    return subprocess.run([sys.executable, os.path.join(HERE, "gpustack.py"), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_cli_models_lists_the_chat_model(backend):
    done = cli("models", "--json")
    assert done.returncode == 0, done.stderr
    assert "llm" in {item["id"]: item["categories"] for item in json.loads(done.stdout)}[CHAT]


def test_cli_chat_streams_the_answer(backend):
    done = cli("chat", "-m", CHAT, "--max-tokens", "32", "Reply with one word: OK")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    said(backend, done.stdout.rstrip("\n"))


@ours
def test_cli_chat_for_a_stopped_model_exits_3_with_the_reason(backend):
    name = os.environ["GPUSTACK_LIVE_STOPPED_MODEL"]
    done = cli("chat", "-m", name, "hi")
    assert done.returncode == 3 and f"{name} is stopped (0 replicas): start it in GPUStack." in done.stderr
    assert KEY not in done.stderr


def test_doctor_finds_the_deployment_ready(backend):
    models = [m for m in (CHAT, EMBEDDING, RERANK) if m]
    args = ["doctor", "--json", *[arg for m in models for arg in ("-m", m)]]
    done = cli(*args)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], done.stdout
    assert report["version"] == ("v2.3.0" if backend is not None else report["version"])
    checks = [(check["model"], check["check"]) for check in report["checks"]]
    assert (None, "server") in checks and (CHAT, "chat") in checks and (CHAT, "tools") in checks
    if backend is not None:
        assert checks == [(None, "server"), (None, "API key"), (None, "running models"),
                          (CHAT, "chat"), (CHAT, "stream"), (CHAT, "tools"), (CHAT, "json_schema"),
                          (EMBEDDING, "embedding"), (RERANK, "rerank")]


# Long conversations ###################################################################################


@ours
def test_the_chat_models_window_is_what_gpustack_reports(backend):
    assert chat().context_window == 4096  # tests/gpustack_server.py: CHAT_WINDOW, in the model's meta


@ours
def test_doctor_lists_the_chat_models_window(backend):
    done = cli("doctor", "--json")
    catalog = [check for check in json.loads(done.stdout)["checks"] if check["check"] == "running models"]
    assert f"{CHAT} (llm, context 4096)" in catalog[0]["detail"]


@ours
def test_a_long_conversation_is_folded_before_gpustack_refuses_a_request(backend, tmp_path):
    from agno.agent import Agent
    from agno.db.sqlite import SqliteDb

    prompts: List[int] = []
    backend.on("/v1/chat/completions", vllm_window(4096, agent_turns, prompts))
    model = chat(max_tokens=None, max_retries=0)
    db = SqliteDb(db_file=str(tmp_path / "agent.db"))
    agent = Agent(model=model, db=db, tools=[look_up], add_history_to_context=True, num_history_runs=30,
                  compaction=model.compaction(), session_id="long", telemetry=False)
    try:
        for turn in range(30):
            agent.run(f"question {turn}: what do the records say?")
    finally:
        db.close()
    assert max(prompts) <= 4096 and agent.compaction.stats.compactions >= 1



# Self-hosted models ###################################################################################


@ours
def test_sglang_markup_through_gpustack_becomes_a_tool_call_the_agent_runs(backend):
    from agno.agent import Agent

    def sglang_without_a_parser(h: Any, seen: Any) -> None:
        results = [m for m in seen.json["messages"] if m.get("role") == "tool"]
        answer = f"It is {results[0]['content']}." if results else (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
        send(h, 200, json.dumps(chat_answer(answer)).encode())

    backend.on("/v1/chat/completions", sglang_without_a_parser)
    ran: List[str] = []

    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return f"sunny in {city}"

    output = Agent(model=chat(), tools=[get_weather], telemetry=False).run("What is the weather in Paris?")
    assert ran == ["Paris"] and output.content == "It is sunny in Paris."


@ours
def test_a_sessions_digest_reaches_the_backend_behind_gpustacks_worker_proxy(backend):
    from agno.agent import Agent

    model = chat()
    Agent(model=model, telemetry=False).run("Hello", session_id="live-session")

    class Run:
        session_id = "live-session"

    seen = [request for request in backend.requests if request.path == "/v1/chat/completions"][-1]
    header = next((value for name, value in seen.headers.items() if name.lower() == "session-id"), None)
    assert header == model._affinity(Run())["session-id"] and "live-session" not in json.dumps(seen.headers)


# Wherever Agno takes a model ##########################################################################


def test_an_agent_on_a_gpustack_string_runs_through_gpustack(backend, monkeypatch):
    from agno.agent import Agent

    monkeypatch.setenv("GPUSTACK_SERVER_URL", SERVER)
    monkeypatch.setenv("GPUSTACK_API_KEY", KEY)
    output = Agent(model=f"gpustack:{CHAT}", telemetry=False).run("Reply with one word: OK")
    said(backend, output.content)


def test_a_model_string_in_another_case_finds_the_running_model_through_gpustacks_404(backend, monkeypatch):
    from agno.models.utils import get_model

    monkeypatch.setenv("GPUSTACK_SERVER_URL", SERVER)
    monkeypatch.setenv("GPUSTACK_API_KEY", KEY)
    model = get_model(f"gpustack:{CHAT.swapcase()}")  # Agno's eval router lowercases: any other case is the same case
    said(backend, model.invoke(ask()).content)
    assert model.id == CHAT


@ours
def test_the_served_model_and_the_cached_prompt_tokens_come_through_gpustack(backend):
    usage = {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32, "prompt_tokens_details": {"cached_tokens": 24}}

    def routed(h: Any, seen: Any) -> None:
        answer = {**chat_answer(BACKEND_ANSWER), "model": f"{CHAT}-fallback", "usage": usage}
        if seen.json.get("stream"):
            return stream({**chunk(BACKEND_ANSWER, finish="stop"), "model": f"{CHAT}-fallback"},
                          {"choices": [], "usage": usage, "model": f"{CHAT}-fallback"}, b"data: [DONE]\n\n")(h, seen)
        send(h, 200, json.dumps(answer).encode())

    backend.on("/v1/chat/completions", routed)
    answer = chat().invoke(ask())
    assert (answer.provider_data["served_by"], answer.response_usage.cache_read_tokens) == (f"{CHAT}-fallback", 24)
    pieces = list(chat().invoke_stream(ask()))
    assert {piece.provider_data["served_by"] for piece in pieces if piece.provider_data} == {f"{CHAT}-fallback"}
    assert [piece.response_usage.cache_read_tokens for piece in pieces if piece.response_usage] == [24]
