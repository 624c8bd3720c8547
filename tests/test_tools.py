"""GPUStackTools: images, speech and transcription, alone, in Agno agents and on the command line."""

import asyncio
import base64
import json
import os
import subprocess
import sys
from typing import List

import pytest
from agno.exceptions import ModelProviderError

import gpustack
from fakes import HERE, REAL_401, cancelled_once_arrived, chat_answer, cli, held_until_gone, reply, send
from gpustack import GPUStackChat


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
    assert caught.value.message == (f"GPUStack's answer to POST {fake.url}/v1/images/generations is larger than 1024 bytes; "
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


def test_speech_is_sent_as_asked_when_the_voices_lookup_fails(fake):
    fake.on("/v1/models", reply(502, b"bad gateway", "text/plain"))
    fake.on("/v1/audio/speech", reply(200, MP3, "audio/mpeg"))
    tools = gpustack.GPUStackTools(speech_model="cosyvoice", base_url=fake.url, max_retries=0)
    assert tools.speech("Hello", voice="English Male").content == MP3
    assert tools.speech("Hello").content == MP3
    spoken = [seen.json for seen in fake.requests if seen.path == "/v1/audio/speech"]
    assert spoken == [
        {"model": "cosyvoice", "input": "Hello", "voice": "English Male", "response_format": "mp3"},
        {"model": "cosyvoice", "input": "Hello", "response_format": "mp3"},
    ]


def test_a_timeout_given_as_none_is_the_media_default(fake):
    tools = gpustack.GPUStackTools(image_model="flux", base_url=fake.url, timeout=None)
    assert tools._settings.timeout == gpustack.DEFAULT_MEDIA_TIMEOUT == 900
