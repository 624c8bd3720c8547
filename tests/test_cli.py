"""The command line: ``python gpustack.py chat|complete|embed|rerank|models``."""

import json
import os
import subprocess
import sys

from fakes import HERE, REAL_401, REAL_STREAM, _endless, cli, echo_embedder, models_route, reply, stream


# Command line ##################################################################################################


def test_cli_chat_streams_the_answer(fake):
    fake.on("/v1/chat/completions", stream(REAL_STREAM))
    done = cli(fake, "chat", "-m", "ghost-routed", "hi", "--system", "be brief", "--temperature", "0.1")
    assert (done.returncode, done.stdout, done.stderr) == (0, "Hello\n", "")
    body = fake.requests[-1].json
    assert body["stream"] is True and body["temperature"] == 0.1 and body["messages"][0]["role"] == "system"


def test_cli_chat_no_stream_and_json(fake):
    done = cli(fake, "chat", "-m", "m", "hi", "--json")
    assert json.loads(done.stdout)["content"] == "Hello" and json.loads(done.stdout)["usage"]["total_tokens"] == 5
    assert cli(fake, "chat", "-m", "m", "hi", "--no-stream").stdout == "Hello\n"


def test_cli_reads_prompt_from_stdin(fake):
    cli(fake, "chat", "-m", "m", "-", "--no-stream", stdin="from a pipe\n")
    assert fake.requests[-1].json["messages"][-1]["content"] == "from a pipe"


def test_cli_complete(fake):
    fake.on("/v1/completions", reply(200, {"choices": [{"index": 0, "text": " there", "finish_reason": "stop"}]}))
    assert cli(fake, "complete", "-m", "m", "hello", "--no-stream").stdout == " there\n"


def test_cli_embed_prints_vectors_and_dims(fake):
    fake.on("/v1/embeddings", echo_embedder(dims=4))
    done = cli(fake, "embed", "-m", "e", "a", "bb")
    assert [json.loads(line)[0] for line in done.stdout.splitlines()] == [1.0, 2.0]
    assert cli(fake, "embed", "-m", "e", "--dims", "-", stdin="x\ny\n").stdout == "4\n4\n"


def test_cli_rerank_prints_ranked_documents(fake):
    fake.on("/v1/rerank", reply(200, {"results": [{"index": 1, "relevance_score": 0.25}, {"index": 0, "relevance_score": 0.75}]}))
    done = cli(fake, "rerank", "-m", "r", "q", "first", "second")
    assert done.stdout == "0.7500\tfirst\n0.2500\tsecond\n"
    assert json.loads(cli(fake, "rerank", "-m", "r", "q", "first", "second", "--json").stdout)[0]["document"] == "first"


def test_cli_models_with_categories(fake):
    fake.on("/v1/models", models_route)
    assert "owner/bge-m3\tembedding" in cli(fake, "models").stdout
    assert cli(fake, "models", "--category", "reranker").stdout == "bge-reranker-v2-m3\treranker\n"


def test_cli_api_key_file(fake, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("gpustack_from_file_1234\n")
    cli(fake, "chat", "-m", "m", "hi", "--no-stream", "--api-key-file", str(key_file))
    assert fake.requests[-1].headers["Authorization"] == "Bearer gpustack_from_file_1234"


def test_cli_server_error_is_one_line_without_key_exit_3(fake):
    fake.on("/v1/chat/completions", reply(401, REAL_401))
    done = cli(fake, "chat", "-m", "m", "hi", key="gpustack_secret_abcdef")
    assert done.returncode == 3 and len(done.stderr.strip().splitlines()) == 1
    assert "GPUSTACK_API_KEY" in done.stderr and "gpustack_secret_abcdef" not in done.stderr + done.stdout


def test_cli_connection_error_exit_4(fake):
    done = cli(fake, "models", "--server", "http://127.0.0.1:1", "--timeout", "2")
    assert done.returncode == 4 and "Cannot connect" in done.stderr and "Traceback" not in done.stderr


def test_cli_usage_error_exit_2(fake):
    assert cli(fake, "chat", "hi").returncode == 2
    assert cli(fake, "chat", "-m", "m", "hi", "--api-key-file", "/no/such/file").returncode == 2


def test_cli_ctrl_c_while_streaming_exits_130_and_closes_connection(fake):
    import signal

    fake.on("/v1/chat/completions", _endless)
    env = {**os.environ, "GPUSTACK_SERVER_URL": fake.url}
    # A shell's background job (CI, `pytest &`) starts with SIGINT ignored, and children inherit that.
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "gpustack.py"), "chat", "-m", "m", "hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.read(3) == b"tok"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 130
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert fake.client_gone.wait(5)


def test_cli_exits_3_on_a_malformed_answer(fake):
    fake.on("/v1/embeddings", reply(200, {"data": [{"index": 0}]}))
    done = cli(fake, "embed", "-m", "m", "hi")
    assert done.returncode == 3
    assert done.stderr == (
        "gpustack: error: GPUStack's answer has an embedding that is NoneType, not a list of numbers: "
        "{'data': [{'index': 0}]}\n"
    )


def test_an_internal_type_error_is_not_reported_as_a_usage_error(fake, monkeypatch):
    import pytest

    import gpustack

    def broken(*args, **kwargs):
        raise TypeError("a bug of ours")

    import logging

    monkeypatch.setattr(gpustack, "list_models", broken)
    level = logging.getLogger("agno").level  # main() quiets Agno's logger, for the process it runs in
    try:
        with pytest.raises(TypeError, match="a bug of ours"):
            gpustack.main(["models", "--server", fake.url])
    finally:
        logging.getLogger("agno").setLevel(level)


def test_timeout_help_gives_each_commands_default():
    import gpustack

    for command in ("models", "doctor", "image"):
        assert "(default: 600; doctor 30; image, speak, transcribe 900)" in " ".join(
            gpustack._parser()._subparsers._group_actions[0].choices[command].format_help().split())


def test_models_json_asks_for_the_meta(fake):
    fake.on("/v1/models", models_route)
    assert cli(fake, "models", "--json").returncode == 0
    assert [seen.path for seen in fake.requests][0] == "/v1/models?with_meta=true"
