"""Runs inside GPUStack 2.3.0's own virtual environment, started by tests/gpustack_server.py.

    python gpustack_inside.py server [gpustack start flags...]
        GPUStack's server, with every listening socket on 127.0.0.1 (it has no flag for that).
    python gpustack_inside.py worker PORT BACKEND_PORT SERVER_URL
        A stand-in worker: GPUStack's own worker proxy (routes/worker/proxy.py) on PORT, relaying
        every model instance to the test backend on BACKEND_PORT. The worker's token and
        registration body come as JSON on stdin; it sends GPUStack its status and heartbeats.

Not part of the module and never imported by it: this file needs GPUStack's packages.
"""

import asyncio
import json
import sys
import types


def _loopback_only() -> None:
    """Puts GPUStack's listeners on 127.0.0.1: its API (uvicorn) and its tunnel proxy (asyncio)."""
    import uvicorn

    config_init, start_server = uvicorn.Config.__init__, asyncio.start_server

    def config_on_loopback(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["host"] = "127.0.0.1"
        config_init(self, *args, **kwargs)

    async def server_on_loopback(client_connected_cb, host=None, port=None, **kwargs):  # type: ignore[no-untyped-def]
        return await start_server(client_connected_cb, "127.0.0.1", port, **kwargs)

    uvicorn.Config.__init__ = config_on_loopback  # type: ignore[method-assign]
    asyncio.start_server = server_on_loopback  # type: ignore[assignment]


def server(flags: list) -> None:
    _loopback_only()
    from gpustack.main import main

    sys.argv = ["gpustack", "start", *flags]
    main()


async def _heartbeats(server_url: str, token: str, status: dict) -> None:
    import aiohttp

    headers = {"Authorization": f"Bearer {token}"}
    # A connection per request: a beat every 5 s reuses a connection just as uvicorn's 5 s keep-alive drops it.
    async with aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(force_close=True)) as session:
        while True:
            for path, body in (("/v2/worker-status", status), ("/v2/worker-heartbeat", {})):
                try:
                    async with session.post(server_url + path, json=body) as answer:
                        if answer.status >= 400:
                            print(f"stand-in worker: {path} -> {answer.status} {await answer.text()}", file=sys.stderr)
                except aiohttp.ClientError as error:
                    print(f"stand-in worker: {path} failed: {error}", file=sys.stderr)
            await asyncio.sleep(5)


def worker(port: int, backend_port: int, server_url: str) -> None:
    import aiohttp
    import uvicorn
    from contextlib import asynccontextmanager
    from fastapi import FastAPI
    from starlette.middleware.base import BaseHTTPMiddleware
    from gpustack.api import exceptions
    from gpustack.routes import probes
    from gpustack.routes.worker import proxy

    given = json.loads(sys.stdin.readline())
    token, status = given["token"], given["status"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        connector = aiohttp.TCPConnector(force_close=True)  # as GPUStack's worker sets it up
        app.state.http_client = aiohttp.ClientSession(connector=connector, trust_env=True)
        app.state.http_client_no_proxy = aiohttp.ClientSession(connector=connector)
        beating = asyncio.create_task(_heartbeats(server_url, token, status))
        yield
        beating.cancel()
        await app.state.http_client.close()
        await app.state.http_client_no_proxy.close()

    app = FastAPI(title="GPUStack stand-in worker", lifespan=lifespan)
    app.state.token = token
    app.state.config = types.SimpleNamespace(token=None, get_server_url=lambda: server_url)
    app.state.worker_ip_getter = lambda: "127.0.0.1"
    app.state.get_instance_port_by_model_instance_id = lambda instance_id: backend_port
    app.state.record_successful_inference = lambda instance_id: None
    app.add_middleware(BaseHTTPMiddleware, dispatch=proxy.set_port_from_model_name)
    app.include_router(probes.router)  # the server checks /healthz to call a worker reachable
    app.include_router(proxy.router)
    exceptions.register_handlers(app)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(sys.argv[2:])
    elif sys.argv[1] == "worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}: server or worker")
