"""Rerank: GPUStackRerank, with plain strings and with Agno documents."""

import asyncio
import json

import pytest
from agno.exceptions import ModelProviderError
from agno.knowledge.document import Document

from fakes import REAL_404_MODEL, reply


# Rerank #########################################################################################################

DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is the capital of Germany."]


def test_seed_rerank_posts_plain_strings_and_ranks_best_first(reranker, fake):
    # llama.cpp's shape: no document field, unsorted is possible, logit scores.
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 2, "relevance_score": -0.6}, {"index": 0, "relevance_score": 3.1}]}))
    results = reranker.rerank(query="capital of France?", documents=DOCS, top_n=2)
    assert [(r["index"], r["document"]) for r in results] == [(0, DOCS[0]), (2, DOCS[2])]
    assert fake.requests[-1].json == {"model": "bge-reranker-v2-m3", "query": "capital of France?", "documents": DOCS,
                                      "top_n": 2, "return_documents": True}


@pytest.mark.parametrize("document", [{"text": "X"}, "X", None])
def test_rerank_document_shapes(reranker, fake, document):
    result = {"index": 1, "relevance_score": 0.5}
    if document is not None:
        result["document"] = document
    fake.on("/v1/rerank", reply(200, {"results": [result]}))
    expected = "X" if document else DOCS[1]
    assert reranker.rerank("q", DOCS)[0]["document"] == expected


def test_gpustack_rerank_answer_replayed(reranker, fake):
    # 112_v1_rerank_ok
    fake.on("/v1/rerank", reply(200, b'{"id": "rerank-mock", "model": "ghost-routed", "usage": {"total_tokens": 3, "prompt_tokens": 3}, '
                                     b'"results": [{"index": 0, "document": {"text": "a"}, "relevance_score": 1.0}, '
                                     b'{"index": 1, "document": {"text": "b"}, "relevance_score": 0.5}]}'))
    assert [r["document"] for r in reranker.rerank("q", ["a", "b"])] == ["a", "b"]


def test_top_n_larger_than_documents_is_clamped(reranker, fake):
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 0, "relevance_score": 1.0}]}))
    reranker.rerank("q", ["only"], top_n=5)
    assert fake.requests[-1].json["top_n"] == 1


def test_empty_document_list_makes_no_request(reranker, fake):
    assert reranker.rerank("q", []) == []
    assert fake.requests == []


def test_documents_in_documents_out_with_scores_and_limit(reranker, fake):
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 2, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.7},
                                                 {"index": 1, "relevance_score": 0.1}]}))
    docs = [Document(content=text) for text in DOCS]
    ranked = reranker.rerank("capital", docs, limit=2)
    assert [d.content for d in ranked] == [DOCS[2], DOCS[0]] and ranked[0].reranking_score == 0.9


@pytest.mark.parametrize("answer", [
    {"results": [{"index": 2, "relevance_score": 0.9, "document": {"text": DOCS[2]}}, {"index": 0, "relevance_score": 0.7}]},
    {"results": [{"index": 0, "score": 0.7, "document": DOCS[0]}, {"index": 2, "score": 0.9}]},
])
def test_strings_come_back_in_one_shape_whatever_the_server_sent(reranker, fake, answer):
    fake.on("/v1/rerank", reply(200, answer))
    assert reranker.rerank("capital", DOCS) == [{"index": 2, "relevance_score": 0.9, "document": DOCS[2]},
                                                 {"index": 0, "relevance_score": 0.7, "document": DOCS[0]}]


def test_strings_honour_limit_as_documents_do(reranker, fake):
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 2, "relevance_score": 0.9}, {"index": 0, "relevance_score": 0.7},
                                                 {"index": 1, "relevance_score": 0.1}]}))
    assert [r["index"] for r in reranker.rerank("capital", DOCS, limit=2)] == [2, 0]
    assert fake.requests[-1].json["top_n"] == 2


@pytest.mark.parametrize("limit, top_n", [(3, 1), (1, 3)])
def test_the_smaller_of_limit_and_top_n_is_kept(reranker, fake, limit, top_n):
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 2, "relevance_score": 0.9}]}))
    assert reranker.rerank("capital", DOCS, limit=limit, top_n=top_n) == [
        {"index": 2, "relevance_score": 0.9, "document": DOCS[2]}]
    assert fake.requests[-1].json["top_n"] == 1


def test_a_limit_that_is_not_a_positive_number_is_refused(reranker, fake):
    with pytest.raises(ValueError, match="^limit must be a positive whole number, got 0$"):
        reranker.rerank("capital", DOCS, limit=0)
    assert fake.requests == []


def test_failing_rerank_inside_knowledge_keeps_original_order(reranker, fake):
    fake.on("/v1/rerank", reply(404, REAL_404_MODEL))
    docs = [Document(content=text) for text in DOCS]
    assert reranker.rerank("q", docs) == docs


def test_failing_seed_rerank_raises(reranker, fake):
    fake.on("/v1/rerank", reply(404, REAL_404_MODEL))
    with pytest.raises(ModelProviderError, match="Model not found"):
        reranker.rerank("q", DOCS)


def test_arerank(reranker, fake):
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 1, "relevance_score": 0.9}]}))
    assert asyncio.run(reranker.arerank("q", DOCS, top_n=1))[0]["document"] == DOCS[1]


def test_rerank_key_absent_from_repr_and_dump(reranker):
    assert "sk-test-secret" not in repr(reranker) + json.dumps(reranker.model_dump())


@pytest.mark.parametrize("answer, problem", [
    ({"results": [{"index": 0, "relevance_score": None}]}, "a result for document 0 with score None"),
    ({"results": [{"index": True, "relevance_score": 1.0}]}, "a result for document True of 2"),
    ({"results": ["0"]}, "a result for document None of 2"),
])
def test_broken_rerank_results_are_the_one_malformed_answer_error(reranker, fake, answer, problem):
    fake.on("/v1/rerank", reply(200, answer))
    with pytest.raises(ModelProviderError) as caught:
        reranker.rerank("q", ["a", "b"])
    assert caught.value.message == f"GPUStack's answer has {problem}: {answer}"


def test_a_rerankers_client_options_can_be_changed_and_are_checked(reranker):
    reranker.timeout = 5
    assert reranker.timeout == 5 and reranker._transport().settings.timeout == 5
    with pytest.raises(ValueError, match="timeout must be a positive number of seconds, got -1"):
        reranker.timeout = -1


def test_a_rejected_option_leaves_the_one_in_use(reranker):
    before = reranker.timeout
    with pytest.raises(ValueError):
        reranker.timeout = 0
    assert reranker.timeout == before
