"""The entry of gpustack.py's tests: the module against a fake GPUStack on 127.0.0.1, over real sockets.

A plain ``pytest`` here runs this file and tests/ (testpaths in pyproject.toml); no server is needed.
The tests are in tests/, a file for each promise:

    tests/test_transport.py   configuration, errors and retries, addresses and connections, TLS and
                              proxies, failures as data, async transport, fork
    tests/test_events.py      SSE decoding, streaming, stream faults and caps, cancelled async streams
    tests/test_chat.py        messages and their parts, non-streaming answers, Agno agent runs,
                              structured output, reasoning
    tests/test_self_hosted.py models that misbehave: tool calls as text, the answer in the reasoning
                              field, thinking that ran out; session affinity
    tests/test_context_window.py  the deployment's window, counts that match the server, compaction,
                              a max_tokens that fits, embedding inputs that fit
    tests/test_embeddings.py  GPUStackEmbeddings, alone and inside Agno's knowledge machinery
    tests/test_rerank.py      GPUStackRerank
    tests/test_tools.py       GPUStackTools: images, speech, transcription
    tests/test_deployment.py  what the module learns about a server: when it asks, how long it keeps it
    tests/test_diagnosis.py   the factory and list_models, the errors explained, doctor
    tests/test_agno_native.py wherever Agno takes a model: OpenAILike's and VLLM's names, Agno's message
                              steps, served-by and cache figures, "gpustack:<id>" strings, AgentOS, traces
    tests/test_cli.py         the command line

They share one fake: tests/fakes.py holds the server, the bytes captured from a real GPUStack and the
responders used in more than one file; tests/conftest.py the fixtures on it (fake, model, embedder, ...).
conftest.py here limits each test's time and puts tests/ on sys.path.

One file: ``pytest tests/test_events.py``; one test: ``pytest tests/test_events.py -k sse_line_endings``.
test_live_gpustack.py runs the module through a real GPUStack instead (README.md, Tests); a plain
``pytest`` leaves it out. What stays in this file is the module's public surface.
"""

import gpustack


def test_every_name_in_all_exists():
    assert [name for name in gpustack.__all__ if not hasattr(gpustack, name)] == []


def test_the_module_imports_only_the_standard_library_and_agno():
    """Anywhere in it, optional imports inside functions too: the design's promise to those who vendor the file."""
    import ast
    import importlib.util
    import os
    import sys
    import sysconfig

    def standard(name: str) -> bool:
        if hasattr(sys, "stdlib_module_names"):  # Python 3.10+
            return name in sys.stdlib_module_names
        spec = importlib.util.find_spec(name)
        return spec is not None and (spec.origin in ("built-in", "frozen")
                                     or (spec.origin or "").startswith(sysconfig.get_paths()["stdlib"]))

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpustack.py"), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert {name.split(".")[0] for name in names if not standard(name.split(".")[0])} == {"agno"}
