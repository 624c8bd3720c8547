"""Chat: messages and their parts, non-streaming answers, Agno agent runs, structured output, reasoning."""

import asyncio
import json

import pytest
from agno.exceptions import ModelProviderError
from agno.models.message import Message

import gpustack
from fakes import chat_answer, chunk, reply, send, stream, user


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


def test_invoke_tolerates_agno_retry_keywords(model):
    assert model.invoke(messages=user(), assistant_message=Message(role="assistant"), retry_with_guidance=True).content == "Hello"


@pytest.mark.parametrize("answer", [{"choices": []}, {"id": "x"}, [1, 2]])
def test_answer_without_choices_is_a_clear_error(model, fake, answer):
    fake.on("/v1/chat/completions", reply(200, answer))
    with pytest.raises(ModelProviderError, match="choices|not an object"):
        model.invoke(user())


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


# Inside AgentOS ###########################################################################################


def test_agent_rebuilt_from_config_uses_the_registered_gpustack_model(model, fake):
    from agno.agent import Agent
    from agno.registry import Registry

    config = Agent(name="assistant", model=model).to_dict()
    assert "sk-test-secret" not in json.dumps(config, default=str)
    rebuilt = Agent.from_dict(config, registry=Registry(models=[model]))
    assert rebuilt.model is model
    assert rebuilt.run("hi").content == "Hello"


def test_rates_are_not_summed_across_calls_by_agno(model, fake):
    from agno.metrics import MessageMetrics

    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "time_to_first_token_ms": 10.5,
             "time_per_output_token_ms": 6.4, "tokens_per_second": 155.5}
    fake.on("/v1/chat/completions", reply(200, {**chat_answer(), "usage": usage}))
    total = MessageMetrics()
    for _ in range(3):
        total += model.invoke(user()).response_usage
    assert (total.input_tokens, total.provider_metrics) == (9, {"time_to_first_token_ms": 31.5})
