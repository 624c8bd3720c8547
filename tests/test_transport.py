"""Transport: configuration, errors and retries, connections, TLS and proxies, answer headers, async
transport, fork, and the safeguards around them."""

import asyncio
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
from typing import Any, List

import pytest
from agno.exceptions import ModelProviderError, ModelRateLimitError

import gpustack
from fakes import (
    HERE, REAL_401, REAL_403, REAL_404_MODEL, REAL_503_BACKEND_400, REAL_503_NO_INSTANCE, REAL_CHAT, REAL_STREAM,
    Fake, _endless, busy_workers, chat_answer, models_route, reply, send, stream, text_of, user, wait_for,
)
from gpustack import GPUStackChat, GPUStackEmbeddings, GPUStackRerank


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


def test_url_credentials_are_refused_at_construction_without_showing_them(fake):
    with pytest.raises(ValueError) as caught:
        GPUStackChat(id="m", base_url=fake.url.replace("http://", "http://user:pw-secret@"))
    assert str(caught.value) == (
        f"GPUStack server URL must not carry user:password@ ({fake.url!r}); pass the key as api_key=... or GPUSTACK_API_KEY"
    )


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


def test_x_should_retry_false_stops_retries(model, fake):
    fake.on("/v1/chat/completions", reply(500, {"error": {"message": "fatal"}}, headers={"x-should-retry": "false"}))
    with pytest.raises(ModelProviderError, match="fatal"):
        model.invoke(user())
    assert len(fake.requests) == 1


def test_retry_after_ms_is_understood():
    assert gpustack._retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25


def test_error_object_inside_a_200_answer_raises_its_message(model, fake):
    fake.on("/v1/chat/completions", reply(200, {"error": {"message": "backend gone", "code": 503}}))
    with pytest.raises(ModelProviderError, match="backend gone"):
        model.invoke(user())


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


def test_idle_connection_closed_by_the_server_is_not_used_for_a_get(fake, agno_log):
    # A GET is one write, which succeeds even on a connection the server closed: only the liveness
    # check before reuse keeps it off a dead connection (and out of a retry).
    def models_then_close(h, seen):
        models_route(h, seen)
        h.close_connection = True

    fake.on("/v1/models", models_then_close)
    transport = gpustack._Transport(gpustack._settings(fake.url, None, None, 0, None, ()))
    for _ in range(3):
        assert len(transport.call("GET", "models", expect="data")["data"]) == 3
        assert fake.closed.acquire(timeout=5)
    assert agno_log == [] and len(fake.requests) == 3 and fake.connections == 3


# TLS, proxies, logs ##########################################################################################


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


def test_certificate_failure_is_not_retried(tls_fake, monkeypatch):
    monkeypatch.setattr(gpustack, "INITIAL_RETRY_DELAY", 2.0)
    started = time.monotonic()
    with pytest.raises(ModelProviderError, match="certificate"):
        GPUStackChat(id="m", base_url=tls_fake.url, max_retries=2).invoke(user())
    assert time.monotonic() - started < 1.5


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


# Hardening: hostile streams, misbehaving servers, resources, load ##################################################


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


def test_unreachable_host_fails_after_the_connect_timeout_with_its_own_message(unreachable):
    model = GPUStackChat(id="m", base_url=unreachable, connect_timeout=0.3, timeout=60, max_retries=0)
    started = time.monotonic()
    with pytest.raises(ModelProviderError) as caught:
        model.invoke(user())
    assert 0.3 <= time.monotonic() - started < 2
    assert caught.value.message == (
        f"Could not connect to {unreachable}/v1/chat/completions (tried {unreachable[len('http://'):]}) within "
        "connect_timeout=0.3s: the host is "
        "unreachable or a firewall drops the packets. Check the address and the network path to GPUStack "
        "(VPN, firewall, proxy settings); raise connect_timeout=... only for a very slow network."
    )


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


# Malformed answers and odd headers ########################################################################


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


# Addresses, the default connect timeout, connections of one server ################################################


def resolving_to(monkeypatch, name: str, *ports: int) -> None:
    """``name`` resolves to 127.0.0.1 on each of these ports, in order (as a host with an IPv6 and an IPv4
    address would): the sockets stay real, only the name service is scripted."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host != name:
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", each)) for each in ports]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_a_black_holed_first_address_is_passed_over_for_the_next(fake, unreachable, monkeypatch):
    resolving_to(monkeypatch, "gpustack.test", port_of(unreachable), port_of(fake.url))
    model = GPUStackChat(id="m", base_url="http://gpustack.test:9", connect_timeout=0.3, max_retries=0)
    started = time.monotonic()
    assert model.invoke(user()).content == "Hello"
    assert 0.3 <= time.monotonic() - started < 1.5
    assert len(fake.requests) == 1


def test_an_unreachable_host_names_every_address_it_tried(unreachable, monkeypatch):
    dead = port_of(unreachable)
    resolving_to(monkeypatch, "gpustack.test", dead, dead)
    model = GPUStackChat(id="m", base_url="http://gpustack.test:9", connect_timeout=0.3, max_retries=0)
    started = time.monotonic()
    with pytest.raises(ModelProviderError) as caught:
        model.invoke(user())
    assert 0.6 <= time.monotonic() - started < 2
    assert caught.value.message.startswith(
        f"Could not connect to http://gpustack.test:9/v1/chat/completions (tried 127.0.0.1:{dead}, 127.0.0.1:{dead}) "
        "within connect_timeout=0.3s: the host is unreachable"
    )


def test_a_user_who_sets_nothing_is_protected_from_a_black_holed_host_after_five_seconds(unreachable):
    model = GPUStackChat(id="m", base_url=unreachable, max_retries=0)
    started = time.monotonic()
    with pytest.raises(ModelProviderError, match=r"within connect_timeout=5s"):
        model.invoke(user())
    assert 5 <= time.monotonic() - started < 7


def test_model_close_closes_only_its_own_servers_connections(fake):
    other = Fake()
    other.on("/v1/chat/completions", reply(200, REAL_CHAT))
    try:
        mine, theirs = GPUStackChat(id="m", base_url=fake.url), GPUStackChat(id="m", base_url=other.url)
        mine.invoke(user()), theirs.invoke(user())
        mine.close()
        mine.invoke(user()), theirs.invoke(user())
        assert (fake.connections, other.connections) == (2, 1)
    finally:
        gpustack.close_connections()
        other.close()


def test_https_connections_are_reused_too(tls_fake):
    model = GPUStackChat(id="m", base_url=tls_fake.url, verify=tls_fake.cert)
    for _ in range(3):
        model.invoke(user())
    assert tls_fake.connections == 1


# Failures as data #####################################################################################################


def test_a_failure_travels_as_data_with_the_backends_own_status(model, fake):
    fake.on("/v1/chat/completions", reply(503, REAL_503_BACKEND_400))
    with pytest.raises(ModelProviderError) as caught:
        model.invoke(user())
    failure = caught.value.failure
    assert (failure.status, failure.backend_status, failure.answered, failure.path) == (400, 400, True, "chat/completions")
    assert failure.where == (f"HTTP 400 from the model's backend, relayed by GPUStack as HTTP 503 from POST "
                             f"{fake.url}/v1/chat/completions")


def test_a_call_that_got_no_answer_says_so_in_its_failure(unreachable):
    with pytest.raises(ModelProviderError) as caught:
        GPUStackChat(id="m", base_url=unreachable, connect_timeout=0.2, max_retries=0).invoke(user())
    assert (caught.value.failure.status, caught.value.failure.answered) == (502, False)


# The standard library, public side only ###############################################################################


def test_the_only_private_name_of_the_standard_library_in_use_is_http_clients_connection_seam():
    """Every ``._name`` the module reads or writes is one it defines itself, but ``_create_connection``: the seam
    HTTPConnection.__init__ sets for opening its socket, named in a comment where it is used."""
    import ast

    with open(os.path.join(HERE, "gpustack.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    own = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    own |= {target.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self"}
    own |= {name for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for item in node.body
            if isinstance(item, (ast.Assign, ast.AnnAssign))
            for name in ([t.id for t in item.targets if isinstance(t, ast.Name)] if isinstance(item, ast.Assign)
                         else [item.target.id] if isinstance(item.target, ast.Name) else [])}
    own |= {element.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets)
            for element in ast.walk(node.value) if isinstance(element, ast.Constant) and isinstance(element.value, str)}
    private = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
               and node.attr.startswith("_") and not node.attr.startswith("__")}
    assert private - own == {"_create_connection"}
