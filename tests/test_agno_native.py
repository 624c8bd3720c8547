"""A GPUStack model wherever Agno takes a model: the field names of Agno's OpenAILike and VLLM, Agno's own
message steps, what the metrics say of the server, "gpustack:<id>" strings, AgentOS, and traces."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest
from agno.models.message import Message

import gpustack
from fakes import HERE, REAL_CHAT, chat_answer, chunk, reply, stream, user
from gpustack import GPUStackChat


def answered_by(name):
    """A chat answer that says which model wrote it, as a GPUStack route's target does."""
    return reply(200, {**chat_answer("Hello"), "model": name})


# The names OpenAILike and VLLM take ##########################################################################


def test_the_vllm_cookbook_arguments_run_with_only_the_class_name_changed(fake):
    # cookbook/11_models/vllm/basic.py: VLLM(id="Qwen/Qwen2.5-7B-Instruct", top_k=20, enable_thinking=False)
    model = GPUStackChat(id="Qwen/Qwen2.5-7B-Instruct", top_k=20, enable_thinking=False, base_url=fake.url + "/v1/")
    assert model.invoke(user()).content == "Hello"
    sent = fake.requests[-1]
    assert (sent.path, sent.json["top_k"], sent.json["chat_template_kwargs"]) == (
        "/v1/chat/completions", 20, {"enable_thinking": False})


def test_the_openai_like_docs_arguments_run_with_only_the_class_name_changed(fake):
    # docs.agno.com/models/providers/openai-like, with the OpenAI SDK's names code moved from it carries
    model = GPUStackChat(
        id="mistralai/Mixtral-8x7B-Instruct-v0.1", api_key="sk-together", base_url=fake.url + "/v1",
        default_headers={"X-Team": "a", "X-Trace": "default"}, extra_headers={"X-Trace": "extra"},
        default_query={"api-version": "1", "region": "eu"}, extra_query={"region": "us"},
        extra_body={"min_p": 0.1, "chat_template_kwargs": {"foo": 1}}, max_completion_tokens=50,
    )
    assert model.invoke(user()).content == "Hello"
    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions?api-version=1&region=us"
    assert (sent.headers["X-Team"], sent.headers["X-Trace"], sent.headers["Authorization"]) == ("a", "extra", "Bearer sk-together")
    assert (sent.json["min_p"], sent.json["chat_template_kwargs"], sent.json["max_completion_tokens"]) == (0.1, {"foo": 1}, 50)


def test_headers_win_over_default_headers(fake):
    model = GPUStackChat(id="m", base_url=fake.url, default_headers={"X-A": "default"}, headers={"X-A": "ours"})
    model.invoke(user())
    assert fake.requests[-1].headers["X-A"] == "ours"


def test_extra_body_is_merged_after_request_params_one_level_deep(fake):
    model = GPUStackChat(id="m", base_url=fake.url, enable_thinking=False, request_params={"top_k": 5, "min_p": 0.2},
                         extra_body={"top_k": 7, "chat_template_kwargs": {"foo": 1}})
    model.invoke(user())
    sent = fake.requests[-1].json
    assert (sent["top_k"], sent["min_p"], sent["chat_template_kwargs"]) == (7, 0.2, {"enable_thinking": False, "foo": 1})


def test_role_map_changes_only_the_roles_it_names(fake):
    model = GPUStackChat(id="m", base_url=fake.url, role_map={"system": "developer"})
    model.invoke([Message(role="system", content="be brief"), Message(role="model", content="ok"), *user()])
    assert [m["role"] for m in fake.requests[-1].json["messages"]] == ["developer", "assistant", "user"]


def test_extra_query_reaches_text_completions_too(fake):
    fake.on("/v1/completions", reply(200, {"choices": [{"text": " there"}]}))
    GPUStackChat(id="m", base_url=fake.url, extra_query={"tenant": "x"}).complete("Hi")
    assert fake.requests[-1].path == "/v1/completions?tenant=x"


@pytest.mark.parametrize("name, words", [
    ("extra_body", "a dict"), ("extra_query", "a dict"), ("default_query", "a dict"), ("role_map", "a dict"),
    ("extra_headers", "a dict of header names to values"), ("default_headers", "a dict of header names to values"),
])
def test_a_mapping_option_that_is_not_a_dict_is_refused_at_construction(fake, name, words):
    with pytest.raises(ValueError, match=f"^{name} must be {words}, got list$"):
        GPUStackChat(id="m", base_url=fake.url, **{name: [("a", "b")]})
    assert fake.requests == []


def test_extra_headers_win_over_headers(fake):
    model = GPUStackChat(id="m", base_url=fake.url, headers={"X-A": "ours"}, extra_headers={"X-A": "extra"})
    model.invoke(user())
    assert fake.requests[-1].headers["X-A"] == "extra"


def test_a_copy_with_other_default_headers_sends_them(fake):
    import dataclasses

    model = GPUStackChat(id="m", base_url=fake.url, default_headers={"X-A": "old"})
    dataclasses.replace(model, default_headers={"X-A": "new"}).invoke(user())
    assert fake.requests[-1].headers["X-A"] == "new"


def test_headers_changed_later_keep_the_default_and_extra_ones(fake):
    model = GPUStackChat(id="m", base_url=fake.url, default_headers={"X-D": "d"}, extra_headers={"X-E": "e"})
    model.headers = {"X-H": "h"}
    model.invoke(user())
    sent = fake.requests[-1].headers
    assert (sent["X-D"], sent["X-H"], sent["X-E"]) == ("d", "h", "e")


def test_a_session_header_among_default_headers_wins_over_the_digest(fake):
    from agno.agent import Agent

    model = GPUStackChat(id="m", base_url=fake.url, default_headers={"session-id": "mine"})
    Agent(model=model, session_id="s1").run("hi")
    assert [value for name, value in fake.requests[-1].headers.items() if name.lower() == "session-id"] == ["mine"]


def test_max_completion_tokens_goes_to_text_completions_as_max_tokens(fake):
    fake.on("/v1/completions", reply(200, {"choices": [{"text": " there"}]}))
    GPUStackChat(id="m", base_url=fake.url, max_completion_tokens=20).complete("Hi")
    sent = fake.requests[-1].json
    assert (sent["max_tokens"], "max_completion_tokens" in sent) == (20, False)


def test_an_iterator_of_messages_is_sent_whole(model, fake):
    model.invoke(iter([Message(role="system", content="be brief"), *user()]))
    assert [m["role"] for m in fake.requests[-1].json["messages"]] == ["system", "user"]


def test_a_subclass_field_named_as_an_openai_only_option_is_its_own(fake):
    from dataclasses import dataclass

    @dataclass
    class Tagged(GPUStackChat):
        metadata: str = ""

    assert Tagged(id="m", base_url=fake.url, metadata="team-a").metadata == "team-a"


def test_openai_only_options_are_accepted_and_warned_about_once(fake, agno_log, monkeypatch):
    monkeypatch.setattr(gpustack, "_WARNED", set())
    for _ in range(2):
        model = GPUStackChat(id="ghost-routed", base_url=fake.url, organization="org-1", http_client=object(), store=True)
    model.invoke(user())
    assert agno_log == [
        "GPUStackChat ignores organization=: GPUStack has no organizations; the API key says who calls.",
        "GPUStackChat ignores http_client=: this module has its own HTTP client; set timeout, connect_timeout, "
        "max_retries, verify or headers.",
        "GPUStackChat ignores store=: GPUStack keeps no completions.",
    ]
    assert "organization" not in fake.requests[-1].json and "store" not in fake.requests[-1].json


def test_an_unknown_option_is_still_a_type_error(fake):
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        GPUStackChat(id="m", base_url=fake.url, temprature=0.2)


def test_agnos_names_for_the_embedder_and_the_reranker_are_the_same_classes():
    assert (gpustack.GPUStackEmbedder, gpustack.GPUStackReranker) == (gpustack.GPUStackEmbeddings, gpustack.GPUStackRerank)


# Agno's own message steps ####################################################################################


def test_a_turns_tool_results_kept_in_one_message_go_as_one_message_each(model, fake):
    # How older Agno sessions (Gemini's format) stored a turn's tool results; Agno's normalize_tool_messages splits them.
    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    combined = Message(role="tool", content=["1", "2"], tool_calls=[
        {"tool_call_id": "c1", "tool_name": "f", "content": "1"}, {"tool_call_id": "c2", "tool_name": "g", "content": "2"}])
    model.invoke([*user(), Message(role="assistant", tool_calls=calls), combined])
    sent = fake.requests[-1].json["messages"]
    assert [(m["role"], m.get("tool_call_id"), m["content"]) for m in sent[2:]] == [("tool", "c1", "1"), ("tool", "c2", "2")]


def test_a_tool_result_with_no_content_is_sent_as_empty_text(model, fake):
    call = {"id": "chatcmpl-tool-9f2", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    model.invoke([*user(), Message(role="assistant", tool_calls=[call]), Message(role="tool", tool_call_id="chatcmpl-tool-9f2")])
    assert fake.requests[-1].json["messages"][2] == {"role": "tool", "content": "", "tool_call_id": "chatcmpl-tool-9f2"}


def test_tool_call_ids_go_back_as_the_server_made_them(model, fake):
    # vLLM checks its own ids (a Mistral model's are 9 characters): OpenAI's "call_" rewrite would break them.
    call = {"id": "aB3dE6gH9", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    model.invoke([*user(), Message(role="assistant", tool_calls=[call]), Message(role="tool", content="1", tool_call_id="aB3dE6gH9")])
    sent = fake.requests[-1].json["messages"]
    assert (sent[1]["tool_calls"][0]["id"], sent[2]["tool_call_id"]) == ("aB3dE6gH9", "aB3dE6gH9")


def test_an_image_a_tool_returned_reaches_the_model_as_an_image_part(model, fake):
    from agno.agent import Agent
    from agno.media import Image
    from agno.tools.function import ToolResult

    def camera() -> ToolResult:
        """Take a picture."""
        return ToolResult(content="took one", images=[Image(content=b"\x89PNG\r\n\x1a\nfake", mime_type="image/png")])

    call = {"id": "c1", "type": "function", "function": {"name": "camera", "arguments": "{}"}}
    fake.on("/v1/chat/completions", reply(200, chat_answer(None, tool_calls=[call])), reply(200, chat_answer("A cat.")))
    assert Agent(model=model, tools=[camera]).run("look").content == "A cat."
    sent = fake.requests[-1].json["messages"]
    assert sent[-2] == {"role": "tool", "content": "took one", "tool_call_id": "c1"}
    assert [part["type"] for part in sent[-1]["content"]] == ["text", "image_url"]
    assert sent[-1]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


# What the metrics say ##########################################################################################


def test_the_model_that_served_a_route_is_named_in_provider_data(model, fake):
    fake.on("/v1/chat/completions", answered_by("qwen3-fallback"))
    assert model.invoke(user()).provider_data["served_by"] == "qwen3-fallback"


def test_an_answer_from_the_model_asked_for_names_no_other(model, fake):
    fake.on("/v1/chat/completions", answered_by("ghost-routed"))
    assert "served_by" not in model.invoke(user()).provider_data


def test_a_streamed_answer_names_the_model_that_served_it(model, fake):
    from agno.agent import Agent

    pieces = [{**chunk("Hel"), "model": "qwen3-fallback"}, {**chunk("lo", finish="stop"), "model": "qwen3-fallback"}]
    fake.on("/v1/chat/completions", stream(*pieces, b"data: [DONE]\n\n"))
    *events, run = Agent(model=model).run("hi", stream=True, yield_run_output=True)
    assert "".join(event.content or "" for event in events if event.event == "RunContent") == "Hello"
    assert run.messages[-1].provider_data["served_by"] == "qwen3-fallback"


def test_each_pair_of_asked_and_served_models_is_warned_about_once(model, fake, agno_log, monkeypatch):
    monkeypatch.setattr(gpustack, "_WARNED", set())
    fake.on("/v1/chat/completions", answered_by("qwen3-fallback"), answered_by("qwen3-fallback"), answered_by("qwen3-other"))
    for _ in range(3):
        model.invoke(user())
    assert agno_log == [
        "GPUStack model 'ghost-routed': the answer came from model 'qwen3-fallback' (a route's target or its fallback). "
        "provider_data['served_by'] names it on each answer.",
        "GPUStack model 'ghost-routed': the answer came from model 'qwen3-other' (a route's target or its fallback). "
        "provider_data['served_by'] names it on each answer.",
    ]


def cached_usage():
    return {"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32, "prompt_tokens_details": {"cached_tokens": 24}}


def test_cached_prompt_tokens_reach_agnos_cache_read_tokens_in_a_run(model, fake):
    from agno.agent import Agent

    fake.on("/v1/chat/completions", reply(200, {**chat_answer(), "usage": cached_usage()}))
    run = Agent(model=model).run("hi")
    assert (run.metrics.input_tokens, run.metrics.cache_read_tokens) == (30, 24)


def test_cached_prompt_tokens_reach_agnos_cache_read_tokens_in_a_streamed_run(model, fake):
    from agno.agent import Agent

    fake.on("/v1/chat/completions", stream(chunk("Hi", finish="stop"), {"choices": [], "usage": cached_usage()},
                                           b"data: [DONE]\n\n"))
    *_, run = Agent(model=model).run("hi", stream=True, yield_run_output=True)
    metrics = run.metrics
    assert (metrics.input_tokens, metrics.cache_read_tokens) == (30, 24)


def test_cached_prompt_tokens_reach_agnos_cache_read_tokens_in_an_async_streamed_run(model, fake):
    from agno.agent import Agent

    fake.on("/v1/chat/completions", stream(chunk("Hi", finish="stop"), {"choices": [], "usage": cached_usage()},
                                           b"data: [DONE]\n\n"))
    async def run():
        return [event async for event in Agent(model=model).arun("hi", stream=True, yield_run_output=True)][-1]

    metrics = asyncio.run(run()).metrics
    assert (metrics.input_tokens, metrics.cache_read_tokens) == (30, 24)


# "gpustack:<id>" wherever Agno takes a model string ###########################################################


@pytest.fixture
def from_environment(fake, monkeypatch):
    """Where a model Agno builds from a string finds its server and key, as every provider Agno rebuilds."""
    monkeypatch.setenv("GPUSTACK_SERVER_URL", fake.url)
    monkeypatch.setenv("GPUSTACK_API_KEY", "sk-env-key-123456")
    return fake


@pytest.fixture
def agno_debug(agno_log, monkeypatch):
    import logging

    from agno.utils import log

    monkeypatch.setattr(log, "debug_on", True)
    level = log.logger.level
    log.logger.setLevel(logging.DEBUG)
    yield agno_log  # Agno's own debug lines, from threads of earlier tests too: read only gpustack's
    log.logger.setLevel(level)


def ours(lines):
    return [line for line in lines if line.startswith("gpustack:")]


def test_gpustack_is_a_provider_of_agnos_model_strings():
    # Fails when Agno moves its table of providers: the registration must then be found again.
    from agno.models.utils import MODEL_PROVIDER_CLASSES

    assert MODEL_PROVIDER_CLASSES["gpustack"] == ("gpustack", "_model_from_agno")


def test_agnos_own_gpustack_provider_is_left_as_it_is(monkeypatch, agno_debug):
    from agno.models import utils

    monkeypatch.setitem(utils.MODEL_PROVIDER_CLASSES, "gpustack", ("agno.models.gpustack", "GPUStack"))
    gpustack._join_agno_model_strings()
    assert utils.MODEL_PROVIDER_CLASSES["gpustack"] == ("agno.models.gpustack", "GPUStack")
    assert ours(agno_debug) == ["gpustack: Agno has its own 'gpustack' provider ('agno.models.gpustack', 'GPUStack'); it is kept"]


def test_our_entry_from_another_import_of_this_file_is_renewed_not_reported(monkeypatch, agno_debug):
    from agno.models import utils

    monkeypatch.setitem(utils.MODEL_PROVIDER_CLASSES, "gpustack", ("__main__", "_model_from_agno"))  # python gpustack.py
    gpustack._join_agno_model_strings()
    assert (utils.MODEL_PROVIDER_CLASSES["gpustack"], ours(agno_debug)) == (("gpustack", "_model_from_agno"), [])


def test_a_moved_table_of_providers_is_said_in_the_debug_log(monkeypatch, agno_debug):
    from agno.models import utils

    monkeypatch.delattr(utils, "MODEL_PROVIDER_CLASSES")
    gpustack._join_agno_model_strings()
    assert ours(agno_debug) == ["gpustack: Agno's MODEL_PROVIDER_CLASSES has moved; 'gpustack:<model>' strings are not registered"]


def test_an_agent_runs_on_a_gpustack_string_with_the_server_and_key_of_the_environment(from_environment):
    from agno.agent import Agent

    agent = Agent(model="gpustack:ghost-routed")
    assert (type(agent.model), agent.model.id) == (GPUStackChat, "ghost-routed")
    assert agent.run("hi").content == "Hello"
    assert from_environment.requests[-1].headers["Authorization"] == "Bearer sk-env-key-123456"


def test_an_agent_runs_async_on_a_gpustack_string(from_environment):
    from agno.agent import Agent

    assert asyncio.run(Agent(model="gpustack:ghost-routed").arun("hi")).content == "Hello"
    assert from_environment.requests[-1].json["model"] == "ghost-routed"


def test_compaction_takes_a_gpustack_string(from_environment):
    from agno.compaction.compaction import Compaction

    model = Compaction(model="gpustack:ghost-routed").model
    assert (type(model), model.id, model.base_url) == (GPUStackChat, "ghost-routed", from_environment.url)


def test_a_fallback_given_as_a_gpustack_string_answers_when_the_model_fails(from_environment):
    from agno.agent import Agent
    from agno.models.fallback import FallbackConfig

    def by_model(h, seen):
        body = REAL_CHAT if seen.json["model"] == "ghost-routed" else b'{"error":{"message":"engine died","code":500}}'
        reply(200 if seen.json["model"] == "ghost-routed" else 500, body)(h, seen)

    from_environment.on("/v1/chat/completions", by_model)
    primary = GPUStackChat(id="big-model", max_retries=0)
    agent = Agent(model=primary, fallback_config=FallbackConfig(on_error=["gpustack:ghost-routed"]))
    assert agent.run("hi").content == "Hello"
    assert [seen.json["model"] for seen in from_environment.requests] == ["big-model", "ghost-routed"]


def test_an_async_run_falls_back_to_a_gpustack_string_too(from_environment):
    from agno.agent import Agent
    from agno.models.fallback import FallbackConfig

    from_environment.on("/v1/chat/completions", reply(500, {"error": {"message": "engine died", "code": 500}}),
                        reply(200, REAL_CHAT))
    agent = Agent(model=GPUStackChat(id="big-model", max_retries=0), fallback_config=FallbackConfig(on_error=["gpustack:ghost-routed"]))
    assert asyncio.run(agent.arun("hi")).content == "Hello"
    assert [seen.json["model"] for seen in from_environment.requests] == ["big-model", "ghost-routed"]


def test_memory_optimisation_takes_a_gpustack_string(from_environment, tmp_path):
    from agno.db.sqlite import SqliteDb
    from agno.memory.manager import MemoryManager
    from agno.memory import UserMemory

    db = SqliteDb(db_file=str(tmp_path / "agno.db"))
    manager = MemoryManager(model="gpustack:ghost-routed", db=db)
    for text in ("Likes tea", "Likes green tea"):
        manager.add_user_memory(UserMemory(memory=text), user_id="ann")
    from_environment.on("/v1/chat/completions", reply(200, chat_answer("Likes tea, green tea best.")))
    optimised = manager.optimize_memories(user_id="ann", apply=False)
    assert [memory.memory for memory in optimised] == ["Likes tea, green tea best."]
    assert from_environment.requests[-1].json["model"] == "ghost-routed"


def test_async_memory_optimisation_takes_a_gpustack_string(from_environment, tmp_path):
    from agno.db.sqlite import SqliteDb
    from agno.memory import UserMemory
    from agno.memory.manager import MemoryManager

    manager = MemoryManager(model="gpustack:ghost-routed", db=SqliteDb(db_file=str(tmp_path / "agno.db")))
    for text in ("Likes tea", "Likes green tea"):
        manager.add_user_memory(UserMemory(memory=text), user_id="ann")
    from_environment.on("/v1/chat/completions", reply(200, chat_answer("Likes tea, green tea best.")))
    optimised = asyncio.run(manager.aoptimize_memories(user_id="ann", apply=False))
    assert [memory.memory for memory in optimised] == ["Likes tea, green tea best."]
    assert from_environment.requests[-1].json["model"] == "ghost-routed"


def test_a_saved_agent_is_rebuilt_without_a_registry(from_environment):
    from agno.agent import Agent

    config = Agent(name="assistant", model=GPUStackChat(id="ghost-routed", api_key="sk-test-secret-123456")).to_dict()
    assert "sk-test-secret" not in json.dumps(config, default=str)
    rebuilt = Agent.from_dict(config)
    assert (type(rebuilt.model), rebuilt.model.id, rebuilt.model.base_url) == (GPUStackChat, "ghost-routed", from_environment.url)
    assert rebuilt.run("hi").content == "Hello"
    assert asyncio.run(rebuilt.arun("hi")).content == "Hello"
    assert [seen.headers["Authorization"] for seen in from_environment.requests] == ["Bearer sk-env-key-123456"] * 2


def only_qwen3_8b(fake):
    """A GPUStack whose one chat model has capitals in its name."""
    def by_name(h, seen):
        if seen.json["model"] == "Qwen3-8B":
            return reply(200, chat_answer("Hello"))(h, seen)
        reply(404, {"error": {"message": "Model not found", "code": 404, "type": "NotFound"}})(h, seen)

    fake.on("/v1/chat/completions", by_name)
    fake.on("/v1/models", reply(200, {"data": [{"id": "Qwen3-8B"}]}))


def test_a_model_string_in_another_case_runs_on_the_running_model_of_that_name(from_environment, agno_log, monkeypatch):
    from agno.models.utils import get_model

    monkeypatch.setattr(gpustack, "_WARNED", set())

    def by_name(h, seen):
        if seen.json["model"] == "Qwen3-8B":
            return reply(200, chat_answer("Hello", ))(h, seen)
        reply(404, {"error": {"message": "Model not found", "code": 404, "type": "NotFound"}})(h, seen)

    from_environment.on("/v1/chat/completions", by_name)
    from_environment.on("/v1/models", reply(200, {"data": [{"id": "Qwen3-8B"}, {"id": "bge-m3"}]}))
    model = get_model("gpustack:qwen3-8b")  # as Agno's eval router builds it: the id lowercased
    assert [model.invoke(user()).content for _ in range(2)] == ["Hello", "Hello"]
    assert [seen.json["model"] for seen in from_environment.requests if seen.path == "/v1/chat/completions"] == [
        "qwen3-8b", "Qwen3-8B", "Qwen3-8B"]
    assert agno_log == ["GPUStack has no model 'qwen3-8b'; 'Qwen3-8B' is used, the running model of that name in another "
                        "case (Agno's evals lowercase the model id)."]


def test_a_streamed_model_string_in_another_case_runs_on_the_running_model_of_that_name(from_environment):
    from agno.models.utils import get_model

    def by_name(h, seen):
        if seen.json["model"] == "Qwen3-8B":
            return stream(chunk("Hel"), chunk("lo", finish="stop"), b"data: [DONE]\n\n")(h, seen)
        reply(404, {"error": {"message": "Model not found", "code": 404, "type": "NotFound"}})(h, seen)

    from_environment.on("/v1/chat/completions", by_name)
    from_environment.on("/v1/models", reply(200, {"data": [{"id": "Qwen3-8B"}]}))
    model = get_model("gpustack:qwen3-8b")
    assert "".join(piece.content or "" for piece in model.invoke_stream(user())) == "Hello"
    assert [seen.json["model"] for seen in from_environment.requests if seen.path == "/v1/chat/completions"] == [
        "qwen3-8b", "Qwen3-8B"]


def test_two_running_names_in_other_cases_leave_the_choice_to_the_user(from_environment):
    from agno.models.utils import get_model

    only_qwen3_8b(from_environment)
    from_environment.on("/v1/models", reply(200, {"data": [{"id": "Qwen3-8B"}, {"id": "QWEN3-8B"}]}))
    with pytest.raises(gpustack.ModelProviderError) as raised:
        get_model("gpustack:qwen3-8b").invoke(user())
    assert raised.value.status_code == 404
    assert [seen.json["model"] for seen in from_environment.requests if seen.path == "/v1/chat/completions"] == ["qwen3-8b"]


def test_an_unknown_name_in_no_other_case_is_the_404_it_was(from_environment):
    from agno.models.utils import get_model

    only_qwen3_8b(from_environment)
    from_environment.on("/v1/models", reply(200, {"data": [{"id": "llama3"}]}))
    with pytest.raises(gpustack.ModelProviderError) as raised:
        get_model("gpustack:qwen3-8b").invoke(user())
    assert raised.value.status_code == 404
    assert [seen.json["model"] for seen in from_environment.requests if seen.path == "/v1/chat/completions"] == ["qwen3-8b"]


def test_another_failure_of_a_string_built_model_is_not_looked_into(from_environment):
    from agno.models.utils import get_model

    from_environment.on("/v1/chat/completions", reply(400, {"error": {"message": "bad request: no", "code": 400}}))
    with pytest.raises(gpustack.ModelProviderError):
        get_model("gpustack:qwen3-8b").invoke(user())
    assert [seen.path for seen in from_environment.requests] == ["/v1/chat/completions"]


def test_calls_refused_together_all_go_again_under_the_one_name_found(from_environment):
    from agno.models.utils import get_model

    import threading

    arrived = threading.Barrier(2)

    def by_name(h, seen):
        if seen.json["model"] == "Qwen3-8B":
            return reply(200, chat_answer("Hello"))(h, seen)
        arrived.wait(5)  # both first requests are in before either is refused
        reply(404, {"error": {"message": "Model not found", "code": 404, "type": "NotFound"}})(h, seen)

    from_environment.on("/v1/chat/completions", by_name)
    from_environment.on("/v1/models", reply(200, {"data": [{"id": "Qwen3-8B"}]}))
    model = get_model("gpustack:qwen3-8b")

    async def both():
        return await asyncio.gather(model.ainvoke(user()), model.ainvoke(user()))

    assert [answer.content for answer in asyncio.run(both())] == ["Hello", "Hello"]
    assert sorted(seen.json["model"] for seen in from_environment.requests if seen.path == "/v1/chat/completions") == [
        "Qwen3-8B", "Qwen3-8B", "qwen3-8b", "qwen3-8b"]


def test_a_model_built_in_code_keeps_its_name_as_given(fake):
    fake.on("/v1/chat/completions", reply(404, {"error": {"message": "Model not found", "code": 404}}))
    fake.on("/v1/models", reply(200, {"data": [{"id": "Qwen3-8B"}]}))
    with pytest.raises(gpustack.ModelProviderError, match="Running models like it: Qwen3-8B"):
        GPUStackChat(id="qwen3-8b", base_url=fake.url, max_retries=0).invoke(user())
    assert [seen.json["model"] for seen in fake.requests if seen.path == "/v1/chat/completions"] == ["qwen3-8b"]


def test_the_registry_holds_a_chat_model_for_each_running_chat_model(fake):
    def by_category(h, seen):
        llm = "categories=llm" in seen.path
        reply(200, {"data": [{"id": "qwen3"}, {"id": "Llama-3"}] if llm else [{"id": "bge-m3"}]})(h, seen)

    fake.on("/v1/models", by_category)
    found = gpustack.registry(base_url=fake.url, api_key="sk-test-secret-123456", timeout=30)
    assert [(type(m), m.id, m.base_url, m.api_key, m.timeout) for m in found.models] == [
        (GPUStackChat, "qwen3", fake.url, "sk-test-secret-123456", 30),
        (GPUStackChat, "Llama-3", fake.url, "sk-test-secret-123456", 30)]


def test_the_registry_refuses_an_option_it_does_not_know(fake):
    with pytest.raises(TypeError, match="registry\\(\\) got an unexpected keyword argument 'temperature'"):
        gpustack.registry(base_url=fake.url, temperature=0.2)
    assert fake.requests == []


# Inside AgentOS ##############################################################################################


@pytest.fixture
def agent_os(from_environment, tmp_path):
    """An AgentOS app of one agent on a "gpustack:" string, with its database, through FastAPI's test client."""
    pytest.importorskip("fastapi")
    from agno.agent import Agent
    from agno.db.sqlite import SqliteDb
    from agno.os import AgentOS
    from fastapi.testclient import TestClient

    def serve(agents=(), registry=None):
        app = AgentOS(id="test-os", agents=list(agents), db=db, registry=registry).get_app()
        return TestClient(app)

    db = SqliteDb(db_file=str(tmp_path / "agno.db"))
    serve.db = db
    serve.agent = Agent(id="helper", name="Helper", model="gpustack:ghost-routed", db=db)
    return serve


def test_agentos_config_shows_an_agent_on_a_gpustack_string(agent_os):
    with agent_os([agent_os.agent]) as client:
        config = client.get("/config").json()
    assert [agent["model"] for agent in config["agents"]] == [{"id": "ghost-routed", "provider": "GPUStack"}]


def test_an_agentos_eval_run_on_the_gpustack_provider_runs_on_the_model_named_whatever_its_case(agent_os, from_environment):
    from agno.agent import Agent

    only_qwen3_8b(from_environment)
    agent = Agent(id="helper", model=GPUStackChat(id="Qwen3-8B"), db=agent_os.db)
    with agent_os([agent]) as client:  # Agno's router builds "gpustack:qwen3-8b": it lowercases the id
        answer = client.post("/eval-runs", json={"agent_id": "helper", "eval_type": "performance", "input": "hi",
                                                 "model_id": "Qwen3-8B", "model_provider": "gpustack",
                                                 "num_iterations": 1, "warmup_runs": 0})
    assert answer.status_code == 200, answer.text
    first, *then = [seen.json["model"] for seen in from_environment.requests if seen.path == "/v1/chat/completions"]
    assert (first, set(then)) == ("qwen3-8b", {"Qwen3-8B"})  # a performance eval runs the agent more than once


def test_agentos_optimises_memories_with_a_gpustack_string(agent_os, from_environment):
    from agno.memory import UserMemory
    from agno.memory.manager import MemoryManager

    for text in ("Ann likes to drink tea in the morning", "Ann likes green tea more than black tea"):
        MemoryManager(db=agent_os.db).add_user_memory(UserMemory(memory=text), user_id="ann")
    from_environment.on("/v1/chat/completions", reply(200, chat_answer("Likes tea, green tea best.")))
    with agent_os([agent_os.agent]) as client:
        answer = client.post("/optimize-memories", json={"user_id": "ann", "model": "gpustack:ghost-routed", "apply": False})
    assert answer.status_code == 200, answer.text
    assert [memory["memory"] for memory in answer.json()["memories"]] == ["Likes tea, green tea best."]


def test_agentos_rebuilds_and_runs_a_saved_agent_without_a_registry(agent_os, from_environment):
    from agno.agent import Agent

    Agent(id="saved", name="Saved", model=GPUStackChat(id="ghost-routed"), db=agent_os.db).save()
    with agent_os([agent_os.agent]) as client:
        shown = client.get("/agents/saved").json()
        run = client.post("/agents/saved/runs", data={"message": "hi", "stream": "false"})
    assert (shown["model"]["model"], shown["model"]["provider"]) == ("ghost-routed", "GPUStack")
    assert run.status_code == 200, run.text
    assert run.json()["content"] == "Hello"


def test_agentos_lists_the_registrys_gpustack_models(agent_os, from_environment):
    from_environment.on("/v1/models", reply(200, {"data": [{"id": "qwen3"}]}))
    with agent_os([agent_os.agent], registry=gpustack.registry()) as client:
        listed = client.get("/registry").json()["data"]
    assert [item["metadata"] for item in listed if item["type"] == "model"] == [
        {"class_path": "gpustack.GPUStackChat", "provider": "GPUStack", "model_id": "ghost-routed"},
        {"class_path": "gpustack.GPUStackChat", "provider": "GPUStack", "model_id": "qwen3"}]


# LLM spans in Agno's traces ##################################################################################

TRACED_RUNS = """
import asyncio, sys
sys.path.insert(0, sys.argv[3])
order = sys.argv[4]
if order == "imported first":
    import gpustack
from agno.agent import Agent
from agno.db.sqlite import SqliteDb
from agno.tracing import setup_tracing
setup_tracing(db=SqliteDb(db_file=sys.argv[1]))
import gpustack
from openinference.instrumentation.agno import AgnoInstrumentor
if order == "imported after tracing started":  # what README says to do then: start the instrumentor again
    AgnoInstrumentor().uninstrument()
AgnoInstrumentor().instrument()  # a no-op when it runs: as a second AgentOS in the process does
model = gpustack.GPUStackChat(id="ghost-routed", base_url=sys.argv[2], max_retries=0)
Agent(model=model).run("plain")
list(Agent(model=model).run("streamed", stream=True))
async def both():
    await Agent(model=model).arun("async")
    async for _ in Agent(model=model).arun("async streamed", stream=True):
        pass
asyncio.run(both())
Agent(model=model).run("refused")
"""


@pytest.mark.parametrize("order", ["imported first", "imported after tracing started"])
def test_each_model_call_is_one_llm_span_with_the_servers_token_counts(fake, tmp_path, order):
    pytest.importorskip("openinference.instrumentation.agno")
    from agno.db.sqlite import SqliteDb

    from fakes import REAL_STREAM

    def by_input(h, seen):
        said = seen.json["messages"][-1]["content"]
        if said == "refused":
            return reply(400, {"error": {"message": "bad request: refused", "code": 400}})(h, seen)
        if seen.json.get("stream"):
            return stream(REAL_STREAM)(h, seen)
        reply(200, {**chat_answer("Hello"), "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})(h, seen)

    fake.on("/v1/chat/completions", by_input)
    db_file = str(tmp_path / "traces.db")
    ran = subprocess.run([sys.executable, "-c", TRACED_RUNS, db_file, fake.url, HERE, order], timeout=120,
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    db = SqliteDb(db_file=db_file)
    traces, _ = db.get_traces(limit=50)
    spans = {trace.trace_id: [span for span in db.get_spans(trace_id=trace.trace_id)
                              if span.attributes.get("openinference.span.kind") == "LLM"] for trace in traces}
    seen = sorted((span.name, span.status_code, span.attributes["llm.model_name"], span.attributes["llm.provider"],
                   span.attributes.get("llm.token_count.prompt"), span.attributes.get("llm.token_count.completion"))
                  for found in spans.values() for span in found)
    assert seen == [
        ("GPUStackChat.ainvoke", "OK", "ghost-routed", "GPUStack", 11, 7),
        ("GPUStackChat.ainvoke_stream", "OK", "ghost-routed", "GPUStack", 3, 2),
        ("GPUStackChat.invoke", "ERROR", "ghost-routed", "GPUStack", None, None),
        ("GPUStackChat.invoke", "OK", "ghost-routed", "GPUStack", 11, 7),
        ("GPUStackChat.invoke_stream", "OK", "ghost-routed", "GPUStack", 3, 2),
    ]
    assert [len(found) for found in spans.values()] == [1] * 5  # one span a call: none inside another
    failed = next(span for found in spans.values() for span in found if span.status_code == "ERROR")
    assert "bad request: refused" in failed.status_message


def test_without_tracing_nothing_of_it_is_imported_and_the_calls_are_our_own():
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import gpustack; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'opentelemetry', 'openinference', 'wrapt'}), "
             "type(gpustack.GPUStackChat.__dict__['invoke']).__name__)")
    shown = subprocess.run([sys.executable, "-c", probe, HERE], check=True, capture_output=True, text=True, timeout=60)
    assert shown.stdout.split() == ["[]", "function"]


WRAPPED_TWICE = """
import sys
sys.path.insert(0, sys.argv[1])
import gpustack
from openinference.instrumentation.agno import AgnoInstrumentor
from opentelemetry.sdk.trace import TracerProvider
for _ in range(2):
    AgnoInstrumentor().instrument(tracer_provider=TracerProvider())
invoke = gpustack.GPUStackChat.__dict__["invoke"]
print(type(invoke).__name__, type(invoke.__wrapped__).__name__)
AgnoInstrumentor().uninstrument()
print(type(gpustack.GPUStackChat.__dict__["invoke"]).__name__)
"""


def test_the_instrumentor_wraps_the_class_once_and_unwraps_it_whole():
    pytest.importorskip("openinference.instrumentation.agno")
    shown = subprocess.run([sys.executable, "-c", WRAPPED_TWICE, HERE], capture_output=True, text=True, timeout=60)
    assert (shown.returncode, shown.stdout.split()) == (0, ["FunctionWrapper", "function", "function"]), shown.stderr
