"""Long conversations: the deployment's context window learned from GPUStack, token counts that match the
server's, compaction before the window is full, a max_tokens that fits, embedding inputs that fit."""

import asyncio
import json
from typing import Any, Dict, List

import pytest
from agno.exceptions import ContextWindowExceededError, EmbeddingError
from agno.models.message import Message

import gpustack
from fakes import agent_turns, look_up, prompt_tokens, read_at_once, reply, send, tokens_of, user, vllm_window
from gpustack import GPUStackChat, GPUStackEmbeddings


# A vLLM behind GPUStack (its fake in fakes.py: vllm_window) ##########################################################


def models_with_meta(**meta_by_model: Dict[str, Any]):
    def respond(h, seen):
        with_meta = "with_meta=true" in seen.path
        data = [{"id": name, "object": "model", "meta": meta if with_meta else None} for name, meta in meta_by_model.items()]
        send(h, 200, json.dumps({"data": data, "object": "list"}).encode())

    return respond


def lookups(fake) -> List[str]:
    return [seen.path for seen in fake.requests if seen.path.startswith("/v1/models")]


# 1. The window ######################################################################################################


def test_the_window_is_what_gpustack_says_of_the_model_asked_once(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 8192}))
    model = GPUStackChat(id="qwen3", base_url=fake.url)
    assert [model.context_window, model.context_window] == [8192, 8192]
    assert lookups(fake) == ["/v1/models?with_meta=true"]


def test_mindies_max_total_tokens_is_a_window_too(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_total_tokens": 32768, "max_input_length": 30000}))
    assert GPUStackChat(id="qwen3", base_url=fake.url).context_window == 32768


def test_llama_cpps_training_context_is_never_taken_for_the_window(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"n_ctx_train": 262144}))
    assert GPUStackChat(id="qwen3", base_url=fake.url).context_window is None


def test_a_window_set_by_the_user_wins_and_asks_nothing(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 8192}))
    model = GPUStackChat(id="qwen3", base_url=fake.url, context_window=4096)
    assert model.context_window == 4096 and fake.requests == []


def test_a_failed_lookup_is_no_window_and_no_error_and_is_not_asked_again_at_once(fake):
    fake.on("/v1/models", reply(502, b"bad gateway", "text/plain"))
    model = GPUStackChat(id="qwen3", base_url=fake.url)
    assert [model.context_window, model.context_window] == [None, None]
    assert len(lookups(fake)) == 1
    assert model.invoke(user()).content == "Hello"


def test_the_window_a_context_window_error_named_is_remembered(fake):
    fake.on("/v1/models", models_with_meta(qwen3={}))
    fake.on("/v1/chat/completions", vllm_window(20))
    model = GPUStackChat(id="qwen3", base_url=fake.url, max_retries=0)
    with pytest.raises(ContextWindowExceededError):
        model.invoke(user("a long question " * 20))
    assert model.context_window == 20


def test_vllms_newest_max_tokens_wording_is_a_context_window_error_with_its_numbers(fake):
    fake.on("/v1/chat/completions", vllm_window(8192))
    model = GPUStackChat(id="qwen3", base_url=fake.url, max_tokens=131072, context_window=1)  # too small to lower into
    with pytest.raises(ContextWindowExceededError) as caught:
        model.invoke(user())
    assert caught.value.message == (
        "max_tokens=131072cannot be greater than max_model_len=max_total_tokens=8192. Please request fewer output "
        f"tokens. (parameter=max_tokens, value=131072) (HTTP 400 from POST {fake.url}/v1/chat/completions, code 400). "
        "The request is longer than the model's context window (limit 8192 tokens): shorten the input or lower "
        "max_tokens, or raise the limit in the model's Backend Parameters on GPUStack (--max-model-len for vLLM; "
        "GPUStack starts vLLM at 8192 unless it is set)."
    )


def test_list_models_with_meta_gives_the_window(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 8192}))
    assert [item["meta"] for item in gpustack.list_models(base_url=fake.url, with_meta=True)] == [{"max_model_len": 8192}]
    assert [item["meta"] for item in gpustack.list_models(base_url=fake.url)] == [None]


# 2. Token counts that match the server ###############################################################################

ENGLISH = "the agent reads the report and checks every figure twice before it answers"
CHINESE = "代理阅读报告并在回答之前仔细检查每一个数字"


def conversation_turn(turn: int) -> str:
    return f"第{turn}轮: {CHINESE} {ENGLISH} {CHINESE}"


def test_counts_match_the_servers_within_5_percent_after_three_answers_where_agnos_are_off_by_40(fake):
    from agno.utils.tokens import count_tokens as agnos_count

    fake.on("/v1/chat/completions", vllm_window(1_000_000))
    model = GPUStackChat(id="qwen3", base_url=fake.url)
    messages: List[Message] = []
    ours, agnos = [], []
    for turn in range(40):
        messages.append(Message(role="user", content=conversation_turn(turn)))
        if turn >= 3:
            server = prompt_tokens({"messages": [model._format_message(message) for message in messages]})
            ours.append(abs(model.count_tokens(messages) - server) / server)
            agnos.append(abs(agnos_count(messages, model_id="qwen3") - server) / server)
        answer = model.invoke(messages)
        messages.append(Message(role="assistant", content=answer.content))
    assert max(ours) < 0.05
    assert min(agnos) > 0.40


def test_counting_makes_no_request(fake):
    model = GPUStackChat(id="qwen3", base_url=fake.url)
    assert model.count_tokens(user("hello there")) > 0
    assert asyncio.run(model.acount_tokens(user("hello there"))) == model.count_tokens(user("hello there"))
    assert fake.requests == []


def test_a_streamed_answer_calibrates_too(fake):
    def streamed(h, seen):
        body = seen.json
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.end_headers()
        usage = {"prompt_tokens": prompt_tokens(body), "completion_tokens": 1, "total_tokens": prompt_tokens(body) + 1}
        for event in ({"choices": [{"index": 0, "delta": {"content": "好"}, "finish_reason": "stop"}]},
                      {"choices": [], "usage": usage}):
            h.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        h.wfile.write(b"data: [DONE]\n\n")
        h.close_connection = True

    fake.on("/v1/chat/completions", streamed)
    model = GPUStackChat(id="qwen3", base_url=fake.url)
    messages = [Message(role="user", content=CHINESE * 10)]
    before = model.count_tokens(messages)
    list(model.invoke_stream(messages))
    server = prompt_tokens({"messages": [model._format_message(message) for message in messages]})
    assert model.count_tokens(messages) == server != before


# 3. Compaction before the window is full #############################################################################


def test_compaction_is_sized_for_the_window(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 4096}))
    compaction = GPUStackChat(id="qwen3", base_url=fake.url).compaction()
    assert (compaction.compact_at_tokens, compaction.use_model_token_count, compaction.on_context_overflow) == (
        4096 - 512 - 204, True, True)
    assert GPUStackChat(id="qwen3", base_url=fake.url, max_tokens=1000).compaction().compact_at_tokens == 4096 - 1000 - 204


def test_compaction_without_a_known_window_says_so_and_is_reactive(fake, agno_log):
    fake.on("/v1/models", models_with_meta(qwen3={}))
    compaction = GPUStackChat(id="qwen3-unknown", base_url=fake.url).compaction()
    assert (compaction.compact_at_tokens, compaction.on_context_overflow) == (None, True)
    assert [line for line in agno_log if "qwen3-unknown" in line] == [
        "GPUStack model 'qwen3-unknown': its context window is not known (GPUStack lists no max_model_len for it), so "
        "history is folded only after a request is refused as too long. Set context_window=N on GPUStackChat to fold "
        "before."
    ]


def run_conversation(fake, tmp_path, compaction_of, turns: int = 30, use_async: bool = False):
    from agno.agent import Agent
    from agno.db.sqlite import SqliteDb

    prompts: List[int] = []
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 4096}))
    fake.on("/v1/chat/completions", vllm_window(4096, agent_turns, prompts))
    model = GPUStackChat(id="qwen3", base_url=fake.url, max_retries=0)
    db = SqliteDb(db_file=str(tmp_path / "agent.db"))
    agent = Agent(model=model, db=db, tools=[look_up], add_history_to_context=True, num_history_runs=turns,
                  compaction=compaction_of(model), session_id="long")
    try:
        for turn in range(turns):
            if use_async:
                asyncio.run(agent.arun(f"question {turn}: what do the records say?"))
            else:
                agent.run(f"question {turn}: what do the records say?")
    finally:
        db.close()
    return prompts, agent.compaction


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_with_the_recipe_a_long_conversation_is_folded_before_any_request_is_refused(fake, tmp_path, use_async):
    prompts, compaction = run_conversation(fake, tmp_path, lambda model: model.compaction(), use_async=use_async)
    assert max(prompts) <= 4096
    assert compaction.stats.compactions >= 1


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_with_compaction_true_alone_a_request_is_refused_first(fake, tmp_path, use_async):
    prompts, compaction = run_conversation(fake, tmp_path, lambda model: True, use_async=use_async)
    assert max(prompts) > 4096
    assert compaction.stats.compactions >= 1


# 4. A max_tokens that fits ###########################################################################################


def test_a_max_tokens_larger_than_the_window_is_lowered_and_the_call_answers(fake, agno_log):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 8192}))
    fake.on("/v1/chat/completions", vllm_window(8192))
    model = GPUStackChat(id="qwen3", base_url=fake.url, max_tokens=131072, max_retries=0)
    assert model.invoke(user("你好, how are you?")).content == "好的, OK."
    sent = fake.requests[-1].json["max_tokens"]
    assert 8000 < sent < 8192 and prompt_tokens(fake.requests[-1].json) + sent <= 8192
    assert [line for line in agno_log if "cannot fit" in line] == [
        f"GPUStack model 'qwen3' has a context window of 8192 tokens: max_tokens=131072 cannot fit beside the prompt, "
        f"so it was lowered (to {sent} for this request). A max_tokens that leaves room for the prompt is sent as it is."
    ]


def test_both_names_of_max_tokens_are_lowered_when_both_cannot_fit(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 8192}))
    fake.on("/v1/chat/completions", vllm_window(8192))
    GPUStackChat(id="qwen3", base_url=fake.url, max_tokens=131072, max_completion_tokens=65536).invoke(user())
    sent = fake.requests[-1].json
    assert sent["max_tokens"] == sent["max_completion_tokens"] and prompt_tokens(sent) + sent["max_tokens"] <= 8192


def test_a_max_completion_tokens_sizes_the_compaction_recipe_as_max_tokens_does(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 8192}))
    recipe = GPUStackChat(id="qwen3", base_url=fake.url, max_completion_tokens=1000).compaction()
    assert recipe.compact_at_tokens == 8192 - 1000 - int(8192 * 0.05)


def test_a_max_tokens_that_fits_is_sent_as_it_is(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 8192}))
    fake.on("/v1/chat/completions", vllm_window(8192))
    GPUStackChat(id="qwen3", base_url=fake.url, max_tokens=1024).invoke(user())
    assert fake.requests[-1].json["max_tokens"] == 1024


def test_a_prompt_that_alone_exceeds_the_window_goes_as_it_is_and_the_server_decides(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 64}))
    fake.on("/v1/chat/completions", vllm_window(64))
    model = GPUStackChat(id="qwen3", base_url=fake.url, max_tokens=32, max_retries=0)
    with pytest.raises(ContextWindowExceededError, match="limit 64 tokens, prompt"):
        model.invoke(user(CHINESE * 5))
    assert fake.requests[-1].json["max_tokens"] == 32


# 5. Embedding inputs that fit ########################################################################################


def windowed_embedder(window: int):
    """vLLM's embeddings: a text over the window is refused, unless truncate_prompt_tokens cuts it."""

    def respond(h, seen):
        body = seen.json
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        cut = body.get("truncate_prompt_tokens")
        for text in texts:
            if tokens_of(text) > window and cut is None:
                message = (f"This model's maximum context length is {window} tokens. However, your request has "
                           f"{tokens_of(text)} input tokens. Please reduce the length of the input messages.")
                return send(h, 400, json.dumps({"error": {"message": message, "type": "BadRequestError",
                                                          "code": 400}}).encode())
        vectors = [{"index": i, "embedding": [1.0, float(len(t) % 7), 0.5]} for i, t in enumerate(texts)]
        send(h, 200, json.dumps({"data": vectors, "usage": {"prompt_tokens": 1, "total_tokens": 1}}).encode())

    return respond


LONG_CHINESE_DOCUMENT = "。".join(f"第{n}段: {CHINESE * 3}" for n in range(40))


def knowledge_on(fake, embedder):
    from agno.knowledge.chunking.fixed import FixedSizeChunking
    from agno.knowledge.knowledge import Knowledge
    from agno.knowledge.reader.text_reader import TextReader
    from agno.vectordb.qdrant import Qdrant

    pytest.importorskip("qdrant_client")
    reader = TextReader(chunking_strategy=FixedSizeChunking(chunk_size=1500))
    return Knowledge(vector_db=Qdrant(collection="docs", location=":memory:", embedder=embedder)), reader


def test_a_text_longer_than_the_embedding_window_gets_one_clear_error(fake, tmp_path):
    fake.on("/v1/models", models_with_meta(**{"bge-m3": {"max_model_len": 512}}))
    fake.on("/v1/embeddings", windowed_embedder(512))
    embedder = GPUStackEmbeddings(id="bge-m3", base_url=fake.url, dimensions=3)
    with pytest.raises(EmbeddingError) as caught:
        embedder.get_embedding("长" * 900)
    assert str(caught.value).endswith(
        "A text is longer than 'bge-m3' can embed (512 tokens): it is about 900 tokens (900 characters, starting "
        f"{'长' * 30!r}). Split documents into smaller chunks (a smaller chunk_size in Agno's chunking), or set "
        "truncate=True on GPUStackEmbeddings to embed each text up to the window."
    )


def test_with_truncate_the_server_cuts_at_the_window_and_says_so_once(fake, agno_log):
    fake.on("/v1/models", models_with_meta(**{"bge-m3": {"max_model_len": 512}}))
    fake.on("/v1/embeddings", windowed_embedder(512))
    embedder = GPUStackEmbeddings(id="bge-m3", base_url=fake.url, dimensions=3, truncate=True)
    vectors, _ = embedder.get_embeddings_batch_and_usage(["长" * 900, "short"])
    assert len(vectors) == 2 and all(vectors)
    assert {seen.json["truncate_prompt_tokens"] for seen in fake.requests if seen.path == "/v1/embeddings"} == {512}
    assert len([line for line in agno_log if "text past it is not embedded" in line]) == 1


def test_a_long_chinese_document_inserts_whole_with_truncate_and_is_found(fake, tmp_path):
    fake.on("/v1/models", models_with_meta(**{"bge-m3": {"max_model_len": 512}}))
    fake.on("/v1/embeddings", windowed_embedder(512))
    path = tmp_path / "report.txt"
    path.write_text(LONG_CHINESE_DOCUMENT, encoding="utf-8")
    knowledge, reader = knowledge_on(fake, GPUStackEmbeddings(id="bge-m3", base_url=fake.url, dimensions=3, truncate=True))
    knowledge.insert(path=str(path), reader=reader)
    assert knowledge.search("第1段", max_results=1)


def test_a_long_chinese_document_without_truncate_fails_naming_the_window(fake, tmp_path, agno_log):
    fake.on("/v1/models", models_with_meta(**{"bge-m3": {"max_model_len": 512}}))
    fake.on("/v1/embeddings", windowed_embedder(512))
    path = tmp_path / "report.txt"
    path.write_text(LONG_CHINESE_DOCUMENT, encoding="utf-8")
    knowledge, reader = knowledge_on(fake, GPUStackEmbeddings(id="bge-m3", base_url=fake.url, dimensions=3))
    knowledge.insert(path=str(path), reader=reader)
    errors = [line for line in agno_log if "Failed to generate embedding" in line]
    assert len(errors) == 1 and "can embed (512 tokens): it is about 1408 tokens (1465 characters, starting " \
        "'第0段: 代理阅读报告并在回答之前仔细检查每一个数字代理阅读'). Split documents into smaller chunks" in errors[0]


def test_in_a_batch_the_longest_text_is_named_by_its_position_and_the_others_are_embedded(fake, agno_log):
    fake.on("/v1/models", models_with_meta(**{"bge-m3": {"max_model_len": 512}}))
    fake.on("/v1/embeddings", windowed_embedder(512))
    embedder = GPUStackEmbeddings(id="bge-m3", base_url=fake.url, dimensions=3)
    vectors, _ = embedder.get_embeddings_batch_and_usage(["short", "长" * 900, "also short"])
    assert [bool(vector) for vector in vectors] == [True, False, True]
    assert any("the longest of these 3 texts, at position 1, is about 900 tokens" in line for line in agno_log)


def test_a_meta_without_a_window_is_kept_as_none_not_asked_again(fake, monkeypatch):
    monkeypatch.setattr(gpustack, "DEPLOYMENT_TTL", 0)
    fake.on("/v1/models", models_with_meta(qwen3={"n_ctx_train": 32768}))
    fake.on("/v1/chat/completions", vllm_window(8192))
    model = GPUStackChat(id="qwen3", base_url=fake.url, max_tokens=64)
    for _ in range(3):
        model.invoke(user())
    assert lookups(fake) == ["/v1/models?with_meta=true"]


def test_compaction_caps_a_max_tokens_larger_than_half_the_window(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 8192}))
    model = GPUStackChat(id="qwen3", base_url=fake.url, max_tokens=131072)
    assert model.compaction().compact_at_tokens == 8192 - 4096 - 409


def test_compaction_options_given_win_over_the_recipes(fake):
    fake.on("/v1/models", models_with_meta(qwen3={"max_model_len": 4096}))
    model = GPUStackChat(id="qwen3", base_url=fake.url)
    assert model.compaction(compact_at_tokens=1000, on_context_overflow=False).compact_at_tokens == 1000
    counted = model.compaction(token_counter=lambda messages, tools: 1)
    assert counted.use_model_token_count is False and counted.token_counter is not None


def test_a_subclass_takes_context_window_too(fake):
    import dataclasses

    @dataclasses.dataclass
    class Mine(GPUStackChat):
        team: str = "search"

    assert Mine(id="qwen3", base_url=fake.url, context_window=2048).context_window == 2048 and fake.requests == []


def test_a_model_not_listed_yet_is_asked_about_again_later(fake, monkeypatch):
    monkeypatch.setattr(gpustack, "DEPLOYMENT_TTL", 0)
    monkeypatch.setattr(gpustack, "WINDOW_RETRY_SECONDS", 0)
    fake.on("/v1/models", models_with_meta(), models_with_meta(qwen3={"max_model_len": 8192}))
    model = GPUStackChat(id="qwen3", base_url=fake.url)
    assert [model.context_window, model.context_window] == [None, 8192]


def test_a_plain_subclass_takes_context_window_before_any_other_instance(fake):
    import subprocess
    import sys

    from fakes import HERE

    code = ("import gpustack\nclass Mine(gpustack.GPUStackChat): pass\n"
            "print(Mine(id='q', base_url='http://h:1', context_window=8192).context_window)")
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "8192"


def test_threads_asking_for_the_window_at_once_make_one_lookup(fake):
    import time

    def slow_meta(h, seen):
        time.sleep(0.3)
        models_with_meta(qwen3={"max_model_len": 8192})(h, seen)

    fake.on("/v1/models", slow_meta)
    model = GPUStackChat(id="qwen3", base_url=fake.url)
    assert read_at_once(lambda: model.context_window) == [8192] * 4
    assert lookups(fake) == ["/v1/models?with_meta=true"]
