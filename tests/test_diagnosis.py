"""Diagnosis: the factory and model discovery, context-window and deployment-parameter errors, the nearest
model names, what a model without a running instance is doing, and doctor."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional

import pytest
from agno.exceptions import ContextWindowExceededError, ModelProviderError

import gpustack
from fakes import (
    HERE, REAL_401, REAL_404_MODEL, REAL_405_DETAIL, REAL_503_BACKEND_400, REAL_503_NO_INSTANCE, REAL_CHAT,
    REAL_STREAM, chat_answer, chunk, cli, echo_embedder, models_route, overlap_reranker, reply, send, stream,
    text_of, user,
)
from gpustack import GPUStack, GPUStackChat, GPUStackEmbeddings, GPUStackRerank, list_models


# Factory and model discovery ####################################################################################


@pytest.mark.parametrize("kind, cls", [("chat", GPUStackChat), ("llm", GPUStackChat), ("embeddings", GPUStackEmbeddings),
                                       ("embedding", GPUStackEmbeddings), ("rerank", GPUStackRerank), ("reranker", GPUStackRerank)])
def test_factory_and_aliases(kind, cls):
    assert type(GPUStack(model_type=kind, id="m")) is cls


def test_factory_unknown_type_lists_valid_ones():
    with pytest.raises(ValueError, match="chat.*embeddings.*rerank"):
        GPUStack(model_type="vision", id="m")


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
def test_with_recovery_off_tool_call_markup_warns_once_and_keeps_the_text(model, fake, agno_log, monkeypatch, streamed):
    monkeypatch.setattr(gpustack, "_WARNED", set())
    model.recover_tool_calls = False
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


def test_wrapped_connection_failure_stays_retryable(model, fake):
    body = {"error": {"message": "An unexpected error occurred: Worker request failed: 1 POST "
                                 "http://10.0.0.5:40000/v1/chat/completions Cannot connect to host 10.0.0.5:40000",
                      "code": 503, "type": "ServiceUnavailable"}}
    fake.on("/v1/chat/completions", reply(503, body), reply(200, REAL_CHAT))
    assert model.invoke(user()).content == "Hello" and len(fake.requests) == 2


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
    monkeypatch.setattr(gpustack, "LOOKUP_SECONDS", 0.3)

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


def test_a_relayed_backend_error_that_is_not_json_is_still_read_for_its_context_window_words(model, fake):
    body = {"error": {"message": "An unexpected error occurred: Worker request failed: 1 POST http://w/v1/chat/completions "
                                 "status=400, error=This model's maximum context length is 4096 tokens. However, your "
                                 "request has 5000 input tokens.", "code": 503, "type": "ServiceUnavailable"}}
    fake.on("/v1/chat/completions", reply(503, body))
    with pytest.raises(ContextWindowExceededError, match="limit 4096 tokens, prompt 5000 tokens"):
        model.invoke(user())
    assert len(fake.requests) == 1
