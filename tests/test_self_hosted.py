"""Self-hosted models that misbehave in known ways: answers left in the reasoning field, thinking that ran out of
tokens or stopped without an answer; and a conversation kept on the replica that holds its cache."""

import asyncio
import json
import threading
from typing import Any, Dict, List

import pytest
from agno.exceptions import ModelProviderError, RetryableModelProviderError

import gpustack
from fakes import chat_answer, chunk, send, stream, user
from gpustack import GPUStackChat, ThoughtTooLongError


def reasoning_only(text: str = "The answer is 42.", finish: str = "stop") -> Dict[str, Any]:
    """vLLM's deepseek_r1 parser with thinking off: the whole answer in reasoning_content, content null."""
    answer = chat_answer(None, reasoning_content=text)
    answer["choices"][0]["finish_reason"] = finish
    return answer


def reasoning_stream(text: str = "The answer is 42.", finish: str = "stop"):
    words = text.split(" ")
    pieces = [chunk(reasoning_content=word + (" " if n < len(words) - 1 else "")) for n, word in enumerate(words)]
    return stream(*pieces, chunk(finish=finish), b"data: [DONE]\n\n")


def run_agent(model: GPUStackChat, use_async: bool, streamed: bool = False, text: str = "What is the answer?") -> Any:
    """(content, status) of an agent's run: streamed, the content of its RunContent events and of a RunError."""
    from agno.agent import Agent

    agent = Agent(model=model, telemetry=False)
    if not streamed:
        output = asyncio.run(agent.arun(text)) if use_async else agent.run(text)
        return output.content, str(output.status.value)

    async def events() -> List[Any]:
        return [event async for event in agent.arun(text, stream=True)]

    seen = asyncio.run(events()) if use_async else list(agent.run(text, stream=True))
    errors = [event.content for event in seen if getattr(event, "event", "") == "RunError"]
    if errors:
        return errors[0], "ERROR"
    return "".join(event.content for event in seen if getattr(event, "event", "") == "RunContent"
                   and isinstance(event.content, str)), "COMPLETED"


# 2. The answer in the reasoning field ###############################################################################


def test_with_thinking_off_an_answer_in_the_reasoning_field_is_the_answer(fake, agno_log):
    fake.on("/v1/chat/completions", lambda h, seen: send(h, 200, json.dumps(reasoning_only()).encode()))
    model = GPUStackChat(id="qwen3", base_url=fake.url, enable_thinking=False)
    answers = [model.invoke(user()) for _ in range(2)]
    assert [(a.content, a.reasoning_content) for a in answers] == [("The answer is 42.", None)] * 2
    assert [line for line in agno_log if "reasoning parser" in line] == [
        "GPUStack model 'qwen3' answered with thinking off in its reasoning field and left content empty: its "
        "deployment's reasoning parser ignores the switch (for Qwen3 on vLLM, `--reasoning-parser qwen3` in its "
        "Backend Parameters on GPUStack honours it). The reasoning is taken as the answer."
    ]


def test_thinking_off_in_request_params_counts_too(fake):
    fake.on("/v1/chat/completions", lambda h, seen: send(h, 200, json.dumps(reasoning_only()).encode()))
    model = GPUStackChat(id="qwen3", base_url=fake.url, request_params={"chat_template_kwargs": {"enable_thinking": False}})
    assert model.invoke(user()).content == "The answer is 42."


def test_with_thinking_off_a_streamed_answer_in_the_reasoning_field_streams_as_content(fake):
    fake.on("/v1/chat/completions", reasoning_stream())
    pieces = list(GPUStackChat(id="qwen3", base_url=fake.url, enable_thinking=False).invoke_stream(user()))
    assert [piece.content for piece in pieces if piece.content] == ["The ", "answer ", "is ", "42."]
    assert not any(piece.reasoning_content for piece in pieces)


def test_with_thinking_on_reasoning_stays_reasoning(fake):
    answer = chat_answer("42.", reasoning_content="Let me think.")
    fake.on("/v1/chat/completions", lambda h, seen: send(h, 200, json.dumps(answer).encode()))
    result = GPUStackChat(id="qwen3", base_url=fake.url, enable_thinking=True).invoke(user())
    assert (result.content, result.reasoning_content) == ("42.", "Let me think.")


@pytest.mark.parametrize("use_async", [False, True], ids=["run", "arun"])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_an_agent_with_thinking_off_answers_with_what_was_in_the_reasoning_field(fake, use_async, streamed):
    whole = lambda h, seen: send(h, 200, json.dumps(reasoning_only()).encode())  # noqa: E731
    fake.on("/v1/chat/completions", reasoning_stream() if streamed else whole)
    model = GPUStackChat(id="qwen3", base_url=fake.url, enable_thinking=False)
    assert run_agent(model, use_async, streamed) == ("The answer is 42.", "COMPLETED")


# 3. Thinking that ran out ############################################################################################


def test_thinking_that_used_the_whole_max_tokens_fails_with_the_number_and_is_not_retried(fake):
    fake.on("/v1/chat/completions", lambda h, seen: send(h, 200, json.dumps(reasoning_only("Hmm, let me", "length")).encode()))
    with pytest.raises(ThoughtTooLongError) as caught:
        GPUStackChat(id="qwen3", base_url=fake.url, max_tokens=256).invoke(user())
    assert caught.value.message == (
        "GPUStack model 'qwen3' spent all 256 tokens it may write thinking, and gave no answer (finish_reason "
        "\"length\"). Give it room: a larger max tokens setting, thinking switched off (enable_thinking=False), or a "
        "smaller reasoning budget where the backend has one."
    )
    assert ModelProviderError.classify(caught.value) is caught.value  # not taken for a context-window error
    assert [seen.path for seen in fake.requests].count("/v1/chat/completions") == 1


@pytest.mark.parametrize("use_async", [False, True], ids=["run", "arun"])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_an_agent_whose_model_thought_until_max_tokens_fails_with_the_numbers(fake, use_async, streamed):
    whole = lambda h, seen: send(h, 200, json.dumps(reasoning_only("Hmm, let me", "length")).encode())  # noqa: E731
    fake.on("/v1/chat/completions", reasoning_stream("Hmm, let me think", "length") if streamed else whole)
    content, status = run_agent(GPUStackChat(id="qwen3", base_url=fake.url, max_tokens=128), use_async, streamed)
    assert status == "ERROR" and "spent all 128 tokens it may write thinking, and gave no answer" in content
    assert [seen.path for seen in fake.requests].count("/v1/chat/completions") == 1


def test_stopping_after_thinking_without_an_answer_asks_agno_to_ask_again(fake):
    fake.on("/v1/chat/completions", lambda h, seen: send(h, 200, json.dumps(reasoning_only("I should say 42.")).encode()))
    with pytest.raises(RetryableModelProviderError) as caught:
        GPUStackChat(id="qwen3", base_url=fake.url).invoke(user())
    assert caught.value.original_error == (
        "GPUStack model 'qwen3' stopped after its reasoning without an answer (finish_reason 'stop', no content, no "
        "tool call).")


@pytest.mark.parametrize("use_async", [False, True], ids=["run", "arun"])
def test_an_agent_asked_again_after_a_reasoning_only_answer_gets_the_answer(fake, use_async):
    fake.on("/v1/chat/completions", lambda h, seen: send(h, 200, json.dumps(reasoning_only("I should say 42.")).encode()),
            lambda h, seen: send(h, 200, json.dumps(chat_answer("42.")).encode()))
    assert run_agent(GPUStackChat(id="qwen3", base_url=fake.url), use_async) == ("42.", "COMPLETED")
    assert fake.requests[1].json["messages"][-1] == {
        "role": "user",
        "content": "You stopped after thinking, without writing an answer. Write your final answer to the last message now."}


def test_an_agent_whose_second_answer_is_empty_too_gets_a_clear_error(fake):
    fake.on("/v1/chat/completions", lambda h, seen: send(h, 200, json.dumps(reasoning_only("I should say 42.")).encode()))
    assert run_agent(GPUStackChat(id="qwen3", base_url=fake.url), False) == (
        "Max retries with guidance reached. Error: GPUStack model 'qwen3' stopped after its reasoning without an answer "
        "(finish_reason 'stop', no content, no tool call).", "ERROR")
    assert len(fake.requests) == 2


def test_an_answer_with_a_tool_call_and_reasoning_is_no_empty_answer(fake):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    answer = chat_answer(None, reasoning_content="I will call f.", tool_calls=[call])
    fake.on("/v1/chat/completions", lambda h, seen: send(h, 200, json.dumps(answer).encode()))
    assert GPUStackChat(id="qwen3", base_url=fake.url).invoke(user()).tool_calls


# 4. Session affinity #################################################################################################


def session_headers(fake) -> List[Any]:
    return [next((value for name, value in seen.headers.items() if name.lower() == "session-id"), None)
            for seen in fake.requests if seen.path == "/v1/chat/completions"]


def weather_turns(h, seen):
    messages = seen.json["messages"]
    if messages[-1]["role"] == "user":
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        return send(h, 200, json.dumps(chat_answer(None, tool_calls=[call])).encode())
    if seen.json.get("stream"):
        return stream(chunk("Sunny."), chunk(finish="stop"), b"data: [DONE]\n\n")(h, seen)
    send(h, 200, json.dumps(chat_answer("Sunny.")).encode())


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


def test_every_request_of_a_session_carries_one_digest_of_its_id_and_never_the_id(fake, tmp_path):
    from agno.agent import Agent
    from agno.db.sqlite import SqliteDb

    fake.on("/v1/chat/completions", weather_turns)
    db = SqliteDb(db_file=str(tmp_path / "s.db"))
    agent = Agent(model=GPUStackChat(id="qwen3", base_url=fake.url), tools=[get_weather], db=db, telemetry=False)
    try:
        agent.run("Weather?", session_id="user-alice@example.com")
        list(agent.run("And now?", session_id="user-alice@example.com", stream=True))
        asyncio.run(agent.arun("And later?", session_id="user-alice@example.com"))
        agent.run("Weather?", session_id="user-bob@example.com")
    finally:
        db.close()
    headers = session_headers(fake)
    assert len(headers) == 8 and len(set(headers[:6])) == 1 and headers[6] == headers[7] != headers[0]
    assert len(headers[0]) == 32 and all(header for header in headers)
    assert not any("alice" in json.dumps(seen.headers) + seen.raw.decode() for seen in fake.requests)


def test_the_digest_is_the_same_in_every_process(fake):
    import subprocess
    import sys

    from fakes import HERE

    class Run:
        session_id = "s-1"

    here = GPUStackChat(id="qwen3", base_url=fake.url)._affinity(Run())
    there = subprocess.run([sys.executable, "-c", "import gpustack\nclass Run: session_id = 's-1'\n"
                            "print(gpustack.GPUStackChat(id='q', base_url='http://h:1')._affinity(Run())['session-id'])"],
                           cwd=HERE, capture_output=True, text=True, check=True).stdout.strip()
    assert here == {"session-id": there}


def test_direct_calls_carry_no_session_header(fake):
    GPUStackChat(id="qwen3", base_url=fake.url).invoke(user())
    assert session_headers(fake) == [None]


def test_session_affinity_can_be_turned_off_and_the_users_header_wins(fake):
    class Run:
        session_id = "s-1"

    GPUStackChat(id="qwen3", base_url=fake.url, session_affinity=False).invoke(user(), run_response=Run())
    GPUStackChat(id="qwen3", base_url=fake.url, headers={"Session-Id": "mine"}).invoke(user(), run_response=Run())
    assert session_headers(fake) == [None, "mine"]


# 1. Tool calls written as text #######################################################################################

WEATHER_TOOL = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
HERMES = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'  # SGLang, vLLM hermes
TWO_HERMES = HERMES + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
LLAMA_TAG = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_BARE = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
MISTRAL = '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'
STRING_ARGUMENTS = '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}</tool_call>'


def answered(content: str):
    return lambda h, seen: send(h, 200, json.dumps(chat_answer(content)).encode())


def calls_of(result) -> List[Any]:
    return [(call["function"]["name"], json.loads(call["function"]["arguments"])) for call in result.tool_calls or ()]


@pytest.mark.parametrize("content, calls", [
    (HERMES, [("get_weather", {"city": "Paris"})]),
    ("  " + TWO_HERMES + "\n", [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
    (LLAMA_TAG, [("get_weather", {"city": "Paris"})]),
    (LLAMA_BARE, [("get_weather", {"city": "Paris"})]),
    (MISTRAL, [("get_weather", {"city": "Paris"})]),
    (STRING_ARGUMENTS, [("get_weather", {"city": "Paris"})]),
], ids=["hermes", "two-hermes", "llama-tag", "llama-bare", "mistral", "string-arguments"])
def test_tool_calls_written_as_text_become_tool_calls(fake, content, calls):
    fake.on("/v1/chat/completions", answered(content))
    result = GPUStackChat(id="qwen3", base_url=fake.url).invoke(user(), tools=WEATHER_TOOL)
    assert (calls_of(result), result.content) == (calls, None)
    assert all(call["id"].startswith("call_") and call["type"] == "function" for call in result.tool_calls)


def test_a_think_block_before_the_calls_is_reasoning_and_the_calls_are_calls(fake):
    fake.on("/v1/chat/completions", answered("<think>I need the weather.</think>\n\n" + HERMES))
    result = GPUStackChat(id="qwen3", base_url=fake.url).invoke(user(), tools=WEATHER_TOOL)
    assert (calls_of(result), result.reasoning_content) == ([("get_weather", {"city": "Paris"})], "I need the weather.")


@pytest.mark.parametrize("content", [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}</tool_call>',  # not valid JSON
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not a tool offered
    '<tool_call>{"name": "get_weather", "arguments": ["Paris"]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "get_weather", "arguments": "Paris"}</tool_call>',  # a string that holds no object
    "To get the weather I would call " + HERMES,  # inside prose
    "```\n" + HERMES + "\n```",  # inside a code fence
    "> " + HERMES,  # inside a quote
    HERMES + " and that is how you call it.",  # followed by prose
    '{"name": "get_weather"}',  # a JSON answer that only has a name
    '[TOOL_CALLS]{"name": "get_weather", "arguments": {}}',  # Mistral's list missing
], ids=["bad-json", "unknown-name", "list-arguments", "string-no-object", "prose", "fence", "quote", "trailing",
        "bare-name", "mistral-no-list"])
def test_text_that_is_not_exactly_tool_calls_stays_text(fake, content):
    fake.on("/v1/chat/completions", answered(content))
    result = GPUStackChat(id="qwen3", base_url=fake.url).invoke(user(), tools=WEATHER_TOOL)
    assert (result.tool_calls, result.content) == ([], content)


def test_never_when_tool_choice_is_none_or_no_tool_was_offered_or_recovery_is_off(fake):
    fake.on("/v1/chat/completions", answered(HERMES))
    model = GPUStackChat(id="qwen3", base_url=fake.url)
    assert model.invoke(user(), tools=WEATHER_TOOL, tool_choice="none").content == HERMES
    assert model.invoke(user()).content == HERMES
    assert GPUStackChat(id="qwen3", base_url=fake.url, recover_tool_calls=False).invoke(user(), tools=WEATHER_TOOL).content == HERMES


def test_a_recovery_is_warned_about_once_per_model_with_the_deployment_fix(fake, agno_log, monkeypatch):
    monkeypatch.setattr(gpustack, "_WARNED", set())
    fake.on("/v1/chat/completions", answered(MISTRAL))
    model = GPUStackChat(id="mistral-small", base_url=fake.url)
    for _ in range(2):
        model.invoke(user(), tools=WEATHER_TOOL)
    assert agno_log == [
        "GPUStack model 'mistral-small' wrote its tool calls as text (Mistral format) and they were taken as tool calls: "
        "its deployment needs a tool-call parser. In its Backend Parameters on GPUStack: vLLM "
        "`--enable-auto-tool-choice --tool-call-parser=mistral`, SGLang `--tool-call-parser=mistral`, llama.cpp `--jinja`."
    ]


def streamed_before_the_rest(fake, first: str, rest: str) -> List[str]:
    """The content that reaches the caller while the server holds back the rest of its stream; then the rest."""
    release = threading.Event()

    def first_then_wait(h, seen):
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        h.wfile.write(b"data: " + json.dumps(chunk(first)).encode() + b"\n\n")
        h.wfile.flush()
        release.wait(5)
        h.wfile.write(b"data: " + json.dumps(chunk(rest, "stop")).encode() + b"\n\ndata: [DONE]\n\n")
        h.close_connection = True

    fake.on("/v1/chat/completions", first_then_wait)
    pieces = GPUStackChat(id="qwen3", base_url=fake.url).invoke_stream(user(), tools=WEATHER_TOOL)
    before = next(piece for piece in pieces if piece.content).content
    release.set()
    return [before, "".join(piece.content or "" for piece in pieces)]


def test_in_a_stream_only_what_may_become_a_call_is_held_back(fake):
    assert streamed_before_the_rest(fake, "It is ", "sunny.") == ["It is ", "sunny."]


@pytest.mark.parametrize("content", [HERMES, MISTRAL, LLAMA_TAG])
def test_a_streamed_call_written_as_text_comes_out_as_a_tool_call(fake, content):
    cuts = [content[:5], content[5:17], content[17:]]
    fake.on("/v1/chat/completions", stream(*[chunk(cut) for cut in cuts], chunk(finish="stop"), b"data: [DONE]\n\n"))
    model = GPUStackChat(id="qwen3", base_url=fake.url)
    pieces = list(model.invoke_stream(user(), tools=WEATHER_TOOL))
    assert not any(piece.content for piece in pieces)
    merged = model.parse_tool_calls([call for piece in pieces for call in piece.tool_calls or ()])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in merged] == [("get_weather", {"city": "Paris"})]


def test_a_held_stream_that_is_no_call_comes_out_as_text_at_its_end(fake):
    text = '{"answer": "sunny"}'
    fake.on("/v1/chat/completions", stream(chunk(text[:4]), chunk(text[4:], "stop"), b"data: [DONE]\n\n"))
    pieces = list(GPUStackChat(id="qwen3", base_url=fake.url).invoke_stream(user(), tools=WEATHER_TOOL))
    assert "".join(piece.content or "" for piece in pieces) == text


def agent_with_markup(fake, streamed_server: bool):
    """SGLang without --tool-call-parser: the call as markup in content; then the answer from the tool's result."""

    def respond(h, seen):
        results = [m for m in seen.json["messages"] if m["role"] == "tool"]
        answer = f"It is {results[0]['content']}." if results else HERMES
        if streamed_server:
            return stream(chunk(answer[:9]), chunk(answer[9:], "stop"), b"data: [DONE]\n\n")(h, seen)
        send(h, 200, json.dumps(chat_answer(answer)).encode())

    fake.on("/v1/chat/completions", respond)


@pytest.mark.parametrize("use_async", [False, True], ids=["run", "arun"])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_an_agent_runs_the_tool_a_model_wrote_as_text_and_answers_with_its_result(fake, use_async, streamed):
    from agno.agent import Agent

    agent_with_markup(fake, streamed)
    ran: List[str] = []

    def get_weather(city: str) -> str:
        """The weather in a city."""
        ran.append(city)
        return f"sunny in {city}"

    agent = Agent(model=GPUStackChat(id="qwen3", base_url=fake.url), tools=[get_weather], telemetry=False)
    if streamed:
        async def events() -> List[Any]:
            return [event async for event in agent.arun("Weather in Paris?", stream=True)]

        seen = asyncio.run(events()) if use_async else list(agent.run("Weather in Paris?", stream=True))
        content = "".join(e.content for e in seen if getattr(e, "event", "") == "RunContent" and isinstance(e.content, str))
    else:
        content = (asyncio.run(agent.arun("Weather in Paris?")) if use_async else agent.run("Weather in Paris?")).content
    assert ran == ["Paris"] and content == "It is sunny in Paris."


# What a second look found ############################################################################################


@pytest.mark.parametrize("content", ["To get the weather I would call " + HERMES, "```\n" + HERMES + "\n```", "> " + HERMES,
                                     HERMES + " and that is how you call it."], ids=["prose", "fence", "quote", "trailing"])
def test_streamed_text_that_is_not_exactly_tool_calls_stays_text(fake, content):
    fake.on("/v1/chat/completions", stream(chunk(content[:20]), chunk(content[20:], "stop"), b"data: [DONE]\n\n"))
    pieces = list(GPUStackChat(id="qwen3", base_url=fake.url).invoke_stream(user(), tools=WEATHER_TOOL))
    assert "".join(piece.content or "" for piece in pieces) == content and not any(p.tool_calls for p in pieces)


def test_a_json_answer_whose_name_is_no_string_is_text_not_a_crash(fake):
    answer = '{"name": {"first": "Ada"}, "born": 1815}'
    fake.on("/v1/chat/completions", answered(answer))
    assert GPUStackChat(id="qwen3", base_url=fake.url).invoke(user(), tools=WEATHER_TOOL).content == answer


def test_a_bare_json_answer_with_more_than_a_name_and_arguments_is_text(fake):
    answer = '{"name": "get_weather", "parameters": {"city": "Paris"}, "note": "a record, not a call"}'
    fake.on("/v1/chat/completions", answered(answer))
    assert GPUStackChat(id="qwen3", base_url=fake.url).invoke(user(), tools=WEATHER_TOOL).content == answer


def test_a_hermes_call_with_parameters_keeps_them(fake):
    fake.on("/v1/chat/completions", answered('<tool_call>{"name": "get_weather", "parameters": {"city": "Oslo"}}</tool_call>'))
    result = GPUStackChat(id="qwen3", base_url=fake.url).invoke(user(), tools=WEATHER_TOOL)
    assert calls_of(result) == [("get_weather", {"city": "Oslo"})]


def test_a_request_that_named_its_tool_recovers_only_a_call_of_that_tool(fake):
    tools = WEATHER_TOOL + [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    fake.on("/v1/chat/completions", answered(HERMES))
    forced = {"type": "function", "function": {"name": "get_time"}}
    result = GPUStackChat(id="qwen3", base_url=fake.url).invoke(user(), tools=tools, tool_choice=forced)
    assert (result.tool_calls, result.content) == ([], HERMES)


def test_a_json_answer_that_is_no_call_streams_as_it_comes(fake):
    assert streamed_before_the_rest(fake, '{"city": ', '"Paris"}') == ['{"city": ', '"Paris"}']


def test_with_thinking_off_a_think_block_in_the_content_stays_reasoning(fake, agno_log):
    fake.on("/v1/chat/completions", stream(chunk("<think>I ponder"), chunk("</think>Hello"), chunk(finish="stop"),
                                           b"data: [DONE]\n\n"))
    pieces = list(GPUStackChat(id="qwen3", base_url=fake.url, enable_thinking=False).invoke_stream(user()))
    assert "".join(p.content or "" for p in pieces) == "Hello"
    assert "".join(p.reasoning_content or "" for p in pieces) == "I ponder"
    assert not [line for line in agno_log if "reasoning parser" in line]


def test_with_thinking_off_content_after_reasoning_is_not_blamed_on_the_parser(fake, agno_log, monkeypatch):
    monkeypatch.setattr(gpustack, "_WARNED", set())
    fake.on("/v1/chat/completions", stream(chunk(reasoning_content="Thinking. "), chunk("Answer."), chunk(finish="stop"),
                                           b"data: [DONE]\n\n"))
    pieces = list(GPUStackChat(id="qwen3", base_url=fake.url, enable_thinking=False).invoke_stream(user()))
    assert "".join(p.content or "" for p in pieces) == "Thinking. Answer."
    assert not [line for line in agno_log if "reasoning parser" in line]


def test_an_empty_think_block_and_nothing_else_is_no_reasoning_to_ask_again_about(fake):
    fake.on("/v1/chat/completions", stream(chunk("<think>\n\n</think>\n\n"), chunk(finish="stop"), b"data: [DONE]\n\n"))
    pieces = list(GPUStackChat(id="qwen3", base_url=fake.url).invoke_stream(user()))
    assert not any(piece.content for piece in pieces)


def test_doctor_passes_a_reasoning_model_whose_few_tokens_went_to_thinking(fake):
    from fakes import models_route

    fake.on("/healthz", lambda h, seen: send(h, 200, b'"ok"'))
    fake.on("/version", lambda h, seen: send(h, 200, b'{"version": "v2.3.0"}'))
    fake.on("/v1/models", models_route)
    def thinks_until_length(h, seen):
        if seen.json.get("stream"):
            return reasoning_stream("Let me", "length")(h, seen)
        send(h, 200, json.dumps(reasoning_only("Let me", "length")).encode())

    fake.on("/v1/chat/completions", thinks_until_length)
    report = gpustack.diagnose(base_url=fake.url, api_key="k", models=["qwen3"])
    checks = {check["check"]: check for check in report["checks"] if check["model"] == "qwen3"}
    assert [checks[name]["ok"] for name in ("chat", "stream", "tools", "json_schema")] == [True] * 4
    assert checks["stream"]["detail"] == "answered with reasoning only: the check's few tokens are too few to finish thinking"


def test_the_session_digest_is_pinned(fake):
    class Run:
        session_id = "s-1"

    assert GPUStackChat(id="qwen3", base_url=fake.url)._affinity(Run()) == {"session-id": "96dcaa1e2ec89b0e330dab19754246c6"}


def test_a_users_own_x_client_request_id_wins_too(fake):
    class Run:
        session_id = "s-1"

    GPUStackChat(id="qwen3", base_url=fake.url, headers={"X-Client-Request-Id": "mine"}).invoke(user(), run_response=Run())
    assert session_headers(fake) == [None]
