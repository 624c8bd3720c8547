"""Embeddings: GPUStackEmbeddings alone and inside Agno's knowledge machinery."""

import asyncio
import json
import threading
import time

import pytest
from agno.exceptions import EmbeddingError, ModelProviderError

import gpustack
from fakes import REAL_401, echo_embedder, embeddings_answer, overlap_reranker, read_at_once, reply, send
from gpustack import GPUStackEmbeddings, GPUStackRerank


# Embeddings ##################################################################################################


def test_seed_embed_returns_server_json(embedder, fake):
    result = embedder.embed("text")
    assert result["data"][0]["embedding"] == [4.0, 0.0, 0.0]
    assert fake.requests[-1].json == {"model": "bge-m3", "input": "text"}


def test_batch_is_one_request_and_vectors_follow_index(embedder, fake):
    vectors = embedder.parse_embeddings_response(embedder.embed(["a", "bb", "ccc"]))
    assert [v[:2] for v in vectors] == [[1.0, 0.0], [2.0, 1.0], [3.0, 2.0]]
    assert len(fake.requests) == 1


def test_aembed(embedder):
    assert asyncio.run(embedder.aembed(["a", "bb"]))["data"]


def test_base64_vectors_are_decoded(embedder, fake):
    import base64
    import struct

    raw = base64.b64encode(struct.pack("<3f", 0.5, -1.0, 2.0)).decode()
    fake.on("/v1/embeddings", reply(200, embeddings_answer([raw])))
    embedder.encoding_format = "base64"
    assert embedder.get_embedding("x") == [0.5, -1.0, 2.0]
    assert fake.requests[-1].json["encoding_format"] == "base64"


@pytest.mark.parametrize("bad", ["", "   ", [], ["ok", ""], [1]])
def test_empty_input_is_a_value_error_before_any_request(embedder, fake, bad):
    with pytest.raises(ValueError):
        embedder.embed(bad)
    with pytest.raises(ValueError):
        embedder.get_embedding(bad if isinstance(bad, str) else "")
    assert fake.requests == []


def test_dimensions_unset_is_probed_once_from_the_server(embedder, fake):
    fake.on("/v1/embeddings", echo_embedder(dims=5))
    assert embedder.dimensions == 5 and embedder.dimensions == 5
    assert len(fake.requests) == 1 and "dimensions" not in fake.requests[0].json


def test_dimensions_set_are_sent_and_checked(embedder, fake):
    embedder.dimensions = 3
    embedder.get_embedding("abc")
    assert fake.requests[-1].json["dimensions"] == 3
    embedder.dimensions = 8
    with pytest.raises(EmbeddingError, match="3-dimensional vectors but dimensions=8"):
        embedder.get_embedding("abc")


def test_embedder_interface_and_usage(embedder):
    vector, usage = embedder.get_embedding_and_usage("abcd")
    assert vector[0] == 4.0 and usage == {"prompt_tokens": 1, "total_tokens": 1}
    assert asyncio.run(embedder.async_get_embedding("ab"))[0] == 2.0
    assert asyncio.run(embedder.async_get_embedding_and_usage("ab"))[1]["total_tokens"] == 1


def test_embedder_errors_are_embedding_errors_with_status(embedder, fake):
    fake.on("/v1/embeddings", reply(401, REAL_401))
    with pytest.raises(EmbeddingError) as caught:
        embedder.get_embedding("x")
    assert caught.value.status_code == 401 and caught.value.reason == "authentication"
    with pytest.raises(ModelProviderError, match="GPUSTACK_API_KEY"):
        embedder.embed("x")


@pytest.mark.parametrize("use_async", [False, True])
def test_batches_keep_input_order(embedder, fake, use_async):
    embedder.batch_size = 2
    texts = ["a" * n for n in range(1, 8)]
    if use_async:
        vectors, usages = asyncio.run(embedder.async_get_embeddings_batch_and_usage(texts))
    else:
        vectors, usages = embedder.get_embeddings_batch_and_usage(texts)
    assert [v[0] for v in vectors] == [float(n) for n in range(1, 8)]
    assert len(usages) == 7 and len(fake.requests) == 4


@pytest.mark.parametrize("use_async", [False, True])
def test_bad_chunk_falls_back_to_one_by_one_and_keeps_the_rest(embedder, fake, use_async):
    embedder.batch_size = 3
    texts = ["aa", "poison", "cccc", "d"]
    if use_async:
        vectors, _ = asyncio.run(embedder.async_get_embeddings_batch_and_usage(texts))
    else:
        vectors, _ = embedder.get_embeddings_batch_and_usage(texts)
    assert [v[0] if v else None for v in vectors] == [2.0, None, 4.0, 1.0]


def test_embeddings_key_absent_from_repr(embedder):
    assert "sk-test-secret" not in repr(embedder)


def test_embedding_batches_run_concurrently_up_to_the_limit(embedder, fake):
    inflight, peak = [0], [0]
    lock = threading.Lock()
    respond = echo_embedder()

    def counted(h, seen):
        with lock:
            inflight[0] += 1
            peak[0] = max(peak[0], inflight[0])
        time.sleep(0.1)
        with lock:
            inflight[0] -= 1
        respond(h, seen)

    fake.on("/v1/embeddings", counted)
    embedder.batch_size, embedder.batch_concurrency = 1, 3
    asyncio.run(embedder.async_get_embeddings_batch_and_usage([f"t{i}" for i in range(9)]))
    assert peak[0] == 3


@pytest.mark.parametrize("item, problem", [
    ({"index": 0}, "an embedding that is NoneType, not a list of numbers"),
    ({"index": 0, "embedding": "!!not base64"}, "an embedding that is not valid base64"),
    ({"index": 0, "embedding": "AAAA"}, "a base64 embedding of 3 bytes, not a whole number of float32"),
    ({"index": 0, "embedding": ["0.1"]}, "an embedding holding '0.1', not a number"),
    ({"index": "0", "embedding": [0.1]}, "an embedding item that is not an object with a whole-number index"),
    ("0.1", "an embedding item that is not an object with a whole-number index"),
])
def test_broken_embedding_items_are_the_one_malformed_answer_error(embedder, fake, item, problem):
    answer = {"object": "list", "data": [item]}
    fake.on("/v1/embeddings", reply(200, answer))
    with pytest.raises(gpustack.EmbeddingError) as caught:
        embedder.get_embedding("text")
    assert str(caught.value) == f"Failed to generate embedding: GPUStack's answer has {problem}: {answer}"
    assert caught.value.provider_status_code == 502


# End to end: an Agno knowledge base built and searched through GPUStack #############################################

WORDS = ["capital", "france", "germany", "banana", "yellow", "fruit"]


def word_embedder(h, seen):
    texts = seen.json["input"]
    texts = [texts] if isinstance(texts, str) else texts
    vectors = [[1.0 + sum(w in t.lower() for w in WORDS)] + [float(w in t.lower()) for w in WORDS] for t in texts]
    send(h, 200, json.dumps(embeddings_answer(vectors)).encode())


def test_knowledge_base_embeds_stores_and_reranks_through_gpustack(fake):
    pytest.importorskip("qdrant_client")
    from agno.knowledge.knowledge import Knowledge
    from agno.vectordb.qdrant import Qdrant

    fake.on("/v1/embeddings", word_embedder)
    fake.on("/v1/rerank", overlap_reranker)
    embedder = GPUStackEmbeddings(id="bge-m3", base_url=fake.url)
    knowledge = Knowledge(vector_db=Qdrant(collection="docs", location=":memory:", embedder=embedder),
                          reranker=GPUStackRerank(id="bge-reranker-v2-m3", base_url=fake.url))
    for text in ["Paris is the capital of France.", "Bananas are a yellow fruit.", "Berlin is the capital of Germany."]:
        knowledge.insert(text_content=text)
    results = knowledge.search("What is the capital of France?", max_results=1)
    assert [d.content for d in results] == ["Paris is the capital of France."]
    assert results[0].reranking_score is not None
    paths = [r.path for r in fake.requests]
    assert "/v1/embeddings" in paths and "/v1/rerank" in paths
    assert embedder.dimensions == 7


# Embeddings inside Agno's knowledge machinery ###########################################################


def test_agno_page_store_check_accepts_the_embedder(embedder):
    import inspect

    # The check PageCoordinator runs for any embedder that isn't OpenAIEmbedder (agno/knowledge/page/_coordinator.py).
    assert "timeout" in inspect.signature(embedder.get_embedding).parameters


def test_agno_page_store_deadline_bounds_that_call_only(embedder, fake):
    from types import SimpleNamespace

    from agno.knowledge.page._coordinator import PageCoordinator, _is_openai_embedder
    from agno.utils.bounded import WorkBudget

    def slow(h, seen):
        time.sleep(1.0)
        echo_embedder()(h, seen)

    fake.on("/v1/embeddings", slow)
    store = SimpleNamespace(vector=SimpleNamespace(embedder=embedder, dimensions=3))
    _is_openai_embedder(embedder)  # its first call imports the openai SDK, if installed: not part of the budget
    started = time.monotonic()
    with pytest.raises(gpustack.EmbeddingError, match=r"within timeout=0\.2\d*s"):
        PageCoordinator._embeddings(store, ["a"], WorkBudget(0.3))  # Agno passes timeout=min(30, budget left)
    assert time.monotonic() - started < 0.8 and len(fake.requests) == 1  # a deadline: no retries
    assert len(embedder.get_embedding("b")) == 3  # the model's own timeout is unchanged


def test_dimensions_probe_of_an_unreachable_server_fails_fast_and_says_what_to_set(unreachable):
    embeddings = gpustack.GPUStackEmbeddings(id="bge-m3", base_url=unreachable, connect_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ModelProviderError) as caught:
        embeddings.dimensions
    assert time.monotonic() - started < 1.5
    assert caught.value.message.startswith("Cannot learn the embedding size of 'bge-m3' from GPUStack: Could not connect")
    assert caught.value.message.endswith("Set dimensions=N on GPUStackEmbeddings to skip this probe.")


# A failed batch: text by text only when the failure can be about one text ########################################


def ten_texts():
    return [f"text number {n}" for n in range(10)]


def embed_all(embedder, texts, use_async):
    if use_async:
        return asyncio.run(embedder.async_get_embeddings_batch_and_usage(texts))
    return embedder.get_embeddings_batch_and_usage(texts)


def paths(fake, prefix):
    return [seen.path for seen in fake.requests if seen.path.startswith(prefix)]


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_stopped_model_fails_the_batch_call_at_once_with_one_readiness_lookup(embedder, fake, use_async):
    fake.on("/v1/embeddings", reply(503, b'{"error":{"message":"No running instances available","code":503}}'))
    fake.on("/v2/models", reply(200, {"items": [{"id": 1, "name": "bge-m3", "replicas": 0}], "pagination": {}}))
    with pytest.raises(EmbeddingError) as caught:
        embed_all(embedder, ten_texts(), use_async)
    assert len(paths(fake, "/v1/embeddings")) == 1 + embedder.max_retries
    assert len(paths(fake, "/v2/models")) == 1
    assert "bge-m3 is stopped (0 replicas): start it in GPUStack." in str(caught.value)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_rate_limited_batch_is_never_split_into_single_texts(embedder, fake, use_async):
    fake.on("/v1/embeddings", reply(429, b'{"error":{"message":"slow down","code":429}}', headers={"Retry-After": "0"}))
    with pytest.raises(EmbeddingError, match="slow down"):
        embed_all(embedder, ten_texts(), use_async)
    assert len(paths(fake, "/v1/embeddings")) == 1 + embedder.max_retries


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_later_batches_are_not_sent_once_one_failed_for_the_server(embedder, fake, use_async):
    fake.on("/v1/embeddings", reply(401, b'{"code":401,"message":"Invalid authentication credentials"}'))
    embedder.batch_size, embedder.batch_concurrency = 2, 1
    with pytest.raises(EmbeddingError, match="Invalid authentication credentials"):
        embed_all(embedder, ten_texts(), use_async)
    assert len(paths(fake, "/v1/embeddings")) == 1


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_one_bad_text_among_ten_costs_one_request_each_and_keeps_nine(embedder, fake, agno_log, use_async):
    texts = ten_texts()
    texts[6] = "poison " + texts[6]
    vectors, _ = embed_all(embedder, texts, use_async)
    assert len(paths(fake, "/v1/embeddings")) == 1 + 10
    assert [position for position, vector in enumerate(vectors) if vector] == [0, 1, 2, 3, 4, 5, 7, 8, 9]
    assert [line for line in agno_log if "chunks failed" in line] == [
        "1 of 10 chunks failed to embed at position(s) 6: Failed to generate embedding: this text is poison "
        f"(HTTP 400 from POST {fake.url}/v1/embeddings, code 400)."
    ]


def test_a_server_failure_while_going_text_by_text_ends_the_loop_at_once(embedder, fake):
    fake.on("/v1/embeddings", reply(400, b'{"error":{"message":"batch rejected","code":400}}'),
            reply(502, b"bad gateway", "text/plain"))
    embedder.max_retries = 0
    with pytest.raises(EmbeddingError, match="bad gateway"):
        embedder.get_embeddings_batch_and_usage(ten_texts())
    assert len(paths(fake, "/v1/embeddings")) == 2


# The dimensions: learned once, with the model's timeout, never by copying or comparing ##############################


def slow_echo(seconds: float):
    answer = echo_embedder()

    def respond(h, seen):
        time.sleep(seconds)
        answer(h, seen)

    return respond


def test_dimensions_probe_waits_with_the_models_timeout_not_the_connect_timeout(fake):
    fake.on("/v1/embeddings", slow_echo(0.5))
    embeddings = GPUStackEmbeddings(id="bge-m3", base_url=fake.url, connect_timeout=0.2, timeout=5)
    assert embeddings.dimensions == 3


def test_dimensions_probe_that_times_out_names_the_models_timeout(fake):
    fake.on("/v1/embeddings", slow_echo(1))
    embeddings = GPUStackEmbeddings(id="bge-m3", base_url=fake.url, timeout=0.3)
    with pytest.raises(ModelProviderError) as caught:
        embeddings.dimensions
    assert caught.value.message == (
        f"Cannot learn the embedding size of 'bge-m3' from GPUStack: No answer from POST {fake.url}/v1/embeddings "
        "within timeout=0.3s; raise timeout=... if the model is slow (a cold start can take minutes). "
        "Set dimensions=N on GPUStackEmbeddings to skip this probe."
    )


def test_dimensions_are_probed_once_however_often_they_are_read(embedder, fake):
    assert [embedder.dimensions for _ in range(3)] == [3, 3, 3]
    assert len(fake.requests) == 1


def test_copying_comparing_and_printing_an_embedder_touch_no_network(embedder, fake):
    import copy
    import dataclasses

    as_dict = dataclasses.asdict(embedder)
    other = dataclasses.replace(embedder, user="someone")
    assert embedder == copy.deepcopy(embedder) and embedder != other
    assert "dimensions" not in repr(embedder) and as_dict["requested_dimensions"] is None
    assert fake.requests == []


def test_dimensions_given_survive_replace_and_are_sent(embedder, fake):
    import dataclasses

    wanted = dataclasses.replace(GPUStackEmbeddings(id="bge-m3", base_url=fake.url, dimensions=3), user="someone")
    assert wanted.dimensions == 3 and fake.requests == []
    wanted.embed("text")
    assert fake.requests[-1].json == {"model": "bge-m3", "input": "text", "dimensions": 3, "user": "someone"}


def test_a_model_deployed_for_another_task_fails_the_batch_call_at_once(embedder, fake):
    fake.on("/v1/embeddings", reply(400, b'{"object":"error","message":"The model does not support Embeddings API",'
                                         b'"type":"BadRequestError","code":400}'))
    with pytest.raises(EmbeddingError, match="deployed for another task"):
        embedder.get_embeddings_batch_and_usage(ten_texts())
    assert len(paths(fake, "/v1/embeddings")) == 1


def test_threads_reading_dimensions_at_once_make_one_probe(fake):
    fake.on("/v1/embeddings", slow_echo(0.3))
    embeddings = GPUStackEmbeddings(id="bge-m3", base_url=fake.url)
    assert read_at_once(lambda: embeddings.dimensions) == [3, 3, 3, 3]
    assert len(paths(fake, "/v1/embeddings")) == 1
