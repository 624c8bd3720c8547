"""Event streams: SSE decoding, streaming chat answers, stream faults and caps, cancelled async streams."""

import asyncio
import gc
import json
import random
import threading
import time
from typing import Any, List

import pytest
from agno.exceptions import ContextWindowExceededError, ModelProviderError

import gpustack
from fakes import (
    LLAMA_TOOL_STREAM, REAL_CHAT, REAL_MIDSTREAM_ERROR, REAL_STREAM, Fake, _endless, busy_workers,
    cancelled_once_arrived, chat_answer, chunk, event_stream_head, held_until_gone, reply, send, stream, text_of, user, wait_for,
)
from gpustack import GPUStackChat


# Streaming ###################################################################################


def test_invoke_stream_replays_real_gpustack_stream(model, fake):
    fake.on("/v1/chat/completions", stream(REAL_STREAM))
    pieces = list(model.invoke_stream(user()))
    assert text_of(pieces) == "Hello"
    usage = [p.response_usage for p in pieces if p.response_usage]
    assert usage[0].total_tokens == 5 and usage[0].provider_metrics == {"time_to_first_token_ms": 11.264}


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
        event_stream_head(h)
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


def test_breaking_out_of_a_stream_closes_the_connection(model, fake):
    fake.on("/v1/chat/completions", _endless)
    for piece in model.invoke_stream(user()):
        break
    del piece
    gc.collect()
    assert fake.client_gone.wait(5)


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


def test_broken_usage_in_a_stream_is_the_one_malformed_answer_error(model, fake):
    fake.on("/v1/chat/completions", stream(chunk("hi"), {"choices": [], "usage": {"prompt_tokens": "many"}}))
    with pytest.raises(ModelProviderError, match=r"^GPUStack's answer has a part this client cannot read \(ValueError"):
        list(model.invoke_stream(user()))


# Hardening: hostile streams, misbehaving servers, resources, load ##################################################

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


def test_random_bytes_in_a_stream_end_in_one_of_its_named_errors(model, fake):
    rng = random.Random(11)
    for _ in range(25):
        noise = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000)))
        fake.on("/v1/chat/completions", stream(noise, b"\n\n" + noise[:50]))
        with pytest.raises(ModelProviderError) as caught:
            list(model.invoke_stream(user()))
        assert caught.value.message.startswith((
            "GPUStack sent a stream event that is not JSON: ",
            f"The stream from {fake.url}/v1/chat/completions ended before [DONE] and before any finish_reason",
        ))


def test_a_stream_whose_chunked_body_ends_cleanly_without_done_or_finish_reason_is_incomplete(model, fake):
    fake.on("/v1/chat/completions", stream(chunk("Hel"), chunk("lo")))
    with pytest.raises(ModelProviderError) as caught:
        list(model.invoke_stream(user()))
    assert caught.value.message == (
        f"The stream from {fake.url}/v1/chat/completions ended before [DONE] and before any finish_reason: the "
        "connection was cut and the answer is incomplete."
    )


def test_a_close_delimited_stream_without_done_or_finish_reason_is_incomplete(model, fake):
    def close_delimited(h, seen):
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
                      b"data: " + json.dumps(chunk("Hello")).encode() + b"\n\n")
        h.close_connection = True

    fake.on("/v1/chat/completions", close_delimited)
    with pytest.raises(ModelProviderError, match=r"ended before \[DONE\] and before any finish_reason"):
        list(model.invoke_stream(user()))


def test_a_json_answer_to_a_stream_request_is_capped_like_any_answer(model, fake, monkeypatch):
    monkeypatch.setattr(gpustack, "MAX_ANSWER_BYTES", 1024)
    fake.on("/v1/chat/completions", reply(200, chat_answer("x" * 2000)))
    with pytest.raises(ModelProviderError) as caught:
        list(model.invoke_stream(user()))
    assert caught.value.message == (
        f"GPUStack's answer to POST {fake.url}/v1/chat/completions is larger than 1024 bytes; it was not read."
    )


def test_500_concurrent_async_streams_arrive_whole_and_in_order(model, fake):
    words = [f"w{i} " for i in range(20)]
    fake.on("/v1/chat/completions", stream(*[chunk(w) for w in words], chunk("", "stop"), b"data: [DONE]\n\n"))

    async def one():
        return "".join([p.content or "" async for p in model.ainvoke_stream(user())])

    async def go():
        return await asyncio.gather(*[one() for _ in range(500)])

    assert asyncio.run(go()) == ["".join(words)] * 500


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
