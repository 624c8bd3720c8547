"""The deployment: what the module learns about a server and its models, learned lazily after a failure (or
when asked), cached per server for a short time, shared by every model, list_models and diagnose."""


import pytest
from agno.exceptions import ModelProviderError

import gpustack
from fakes import REAL_404_MODEL, REAL_503_NO_INSTANCE, models_route, reply, user
from gpustack import GPUStackChat, list_models


def lookups(fake, prefix="/v1/models"):
    return [seen.path for seen in fake.requests if seen.path.startswith(prefix)]


def failing(fake, model_id: str = "qwen-3") -> ModelProviderError:
    with pytest.raises(ModelProviderError) as caught:
        GPUStackChat(id=model_id, base_url=fake.url, max_retries=0).invoke(user())
    return caught.value


def test_a_call_that_succeeds_asks_the_server_nothing_else(model, fake):
    fake.on("/v1/models", models_route)
    model.invoke(user())
    assert [seen.path for seen in fake.requests] == ["/v1/chat/completions"]


def test_a_failed_call_is_explained_once_after_its_retries(fake, monkeypatch):
    monkeypatch.setattr(gpustack, "INITIAL_RETRY_DELAY", 0.01)
    fake.on("/v1/chat/completions", reply(503, REAL_503_NO_INSTANCE))
    fake.on("/v2/models", reply(200, {"items": [{"id": 1, "name": "qwen3", "replicas": 0}], "pagination": {}}))
    with pytest.raises(ModelProviderError) as caught:
        GPUStackChat(id="qwen3", base_url=fake.url, max_retries=2).invoke(user())
    assert [seen.path.split("?")[0] for seen in fake.requests] == ["/v1/chat/completions"] * 3 + ["/v2/models"]
    assert caught.value.message == (
        f"No running instances available (HTTP 503 from POST {fake.url}/v1/chat/completions, code 503). "
        "qwen3 is stopped (0 replicas): start it in GPUStack."
    )


def test_models_of_one_server_share_what_was_learned(fake):
    fake.on("/v1/chat/completions", reply(404, REAL_404_MODEL))
    fake.on("/v1/models", models_route)
    first, second = failing(fake), failing(fake)
    assert first.message.endswith("Running models like it: qwen3.") and second.message == first.message
    assert lookups(fake) == ["/v1/models"]


def test_what_was_learned_is_asked_again_after_its_lifetime(fake, monkeypatch):
    fake.on("/v1/chat/completions", reply(404, REAL_404_MODEL))
    fake.on("/v1/models", models_route)
    failing(fake)
    monkeypatch.setattr(gpustack, "DEPLOYMENT_TTL", 0)  # its lifetime over, without waiting it out
    failing(fake)
    assert lookups(fake) == ["/v1/models", "/v1/models"]


def test_list_models_asks_afresh_and_leaves_its_answer_for_the_models(fake):
    fake.on("/v1/chat/completions", reply(404, REAL_404_MODEL))
    fake.on("/v1/models", models_route)
    list_models(base_url=fake.url)
    list_models(base_url=fake.url)
    asked = len(lookups(fake))
    assert failing(fake).message.endswith("Running models like it: qwen3.")
    assert asked == 2 * (1 + len(gpustack.MODEL_CATEGORIES)) and len(lookups(fake)) == asked


def test_list_models_takes_the_models_client_options(fake):
    fake.on("/v1/models", models_route)
    list_models(base_url=fake.url, headers={"X-Trace": "7"}, connect_timeout=2)
    assert {seen.headers.get("X-Trace") for seen in fake.requests} == {"7"}
    with pytest.raises(ValueError, match="connect_timeout must be a positive number of seconds, got 0"):
        list_models(base_url=fake.url, connect_timeout=0)


def test_diagnose_takes_the_models_client_options(fake):
    fake.on("/healthz", reply(200, "ok"))
    fake.on("/version", reply(200, {"version": "v2.3.0"}))
    gpustack.diagnose(base_url=fake.url, headers={"X-Trace": "7"})
    assert [seen.headers.get("X-Trace") for seen in fake.requests[:2]] == ["7", "7"]


def test_the_deployment_of_a_server_is_one_object_for_every_model(fake):
    settings = [GPUStackChat(id=name, base_url=fake.url)._transport().settings for name in ("a", "b")]
    assert gpustack._deployment(settings[0]) is gpustack._deployment(settings[1])


def test_a_failed_lookup_is_kept_too_and_asked_again_after_its_lifetime(fake, monkeypatch):
    fake.on("/v1/chat/completions", reply(404, REAL_404_MODEL))
    fake.on("/v1/models", reply(502, b"bad gateway", "text/plain"))
    failing(fake), failing(fake)
    assert lookups(fake) == ["/v1/models"]
    monkeypatch.setattr(gpustack, "DEPLOYMENT_TTL", 0)
    failing(fake)
    assert lookups(fake) == ["/v1/models", "/v1/models"]


def test_list_models_refuses_an_option_it_does_not_know(fake):
    with pytest.raises(TypeError, match="list_models\\(\\) got an unexpected keyword argument 'timeot'"):
        list_models(base_url=fake.url, timeot=3)
    assert fake.requests == []
