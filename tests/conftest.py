"""Fixtures of the fake suite: the fake GPUStack (fakes.py) and the clients pointed at it."""

import socket
import subprocess
from typing import List

import pytest

import gpustack
from fakes import REAL_CHAT, Fake, echo_embedder, reply
from gpustack import GPUStackChat, GPUStackEmbeddings, GPUStackRerank


@pytest.fixture
def fake():
    server = Fake()
    server.on("/v1/chat/completions", reply(200, REAL_CHAT))
    yield server
    gpustack.close_connections()
    server.close()


@pytest.fixture
def model(fake, monkeypatch):
    monkeypatch.delenv("GPUSTACK_API_KEY", raising=False)
    monkeypatch.delenv("GPUSTACK_SERVER_URL", raising=False)
    monkeypatch.setattr(gpustack, "INITIAL_RETRY_DELAY", 0.01)
    return GPUStackChat(id="ghost-routed", base_url=fake.url, api_key="sk-test-secret-123456")


@pytest.fixture
def agno_log():
    """The lines Agno's logger writes. It doesn't propagate to the root logger (so caplog can miss them):
    a handler of our own sits on it."""
    import logging

    from agno.utils import log

    lines: List[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Keep(logging.DEBUG)
    log.logger.addHandler(handler)
    yield lines
    log.logger.removeHandler(handler)


@pytest.fixture
def tls_fake(tmp_path):
    import shutil
    import ssl

    if not shutil.which("openssl"):
        pytest.skip("openssl command not available to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = Fake()
    server.on("/v1/chat/completions", reply(200, REAL_CHAT))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    server.server.socket = context.wrap_socket(server.server.socket, server_side=True)
    server.url = server.url.replace("http://", "https://")
    server.cert = str(cert)
    yield server
    gpustack.close_connections()
    server.close()


@pytest.fixture
def embedder(fake, monkeypatch):
    monkeypatch.setattr(gpustack, "INITIAL_RETRY_DELAY", 0.01)
    fake.on("/v1/embeddings", echo_embedder())
    return GPUStackEmbeddings(id="bge-m3", base_url=fake.url, api_key="sk-test-secret-123456")


@pytest.fixture
def reranker(fake):
    return GPUStackRerank(id="bge-reranker-v2-m3", base_url=fake.url, api_key="sk-test-secret-123456")


@pytest.fixture
def unreachable():
    """A port whose accept queue is full: the kernel drops further SYNs, as a firewall does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filling = []
    while True:  # fill the queue until a connect no longer completes
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
        except socket.timeout:
            probe.close()
            break
        filling.append(probe)
    yield f"http://127.0.0.1:{port}"
    for sock in filling:
        sock.close()
    listener.close()


@pytest.fixture(autouse=True)
def fresh_deployment_facts():
    """What one test's fake told the deployment layer must not answer for a later fake on the same port."""
    yield
    gpustack._DEPLOYMENTS.clear()
