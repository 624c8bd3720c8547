"""A real GPUStack 2.3.0 on this machine, on 127.0.0.1 only, for the live tests.

    python tests/gpustack_server.py run -- python -m pytest test_live_gpustack.py
        installs what is missing, starts PostgreSQL, GPUStack and a stand-in worker, registers
        models and API keys, runs the command with GPUSTACK_TEST_* set, and stops everything
        it started, by PID, however the command ends. Exits with the command's status.
    python tests/gpustack_server.py install
        only the installs (Debian's postgresql when absent; GPUStack in its own venv).

The stand-in worker runs GPUStack's own worker proxy; behind it, the live tests start the
project's fake on GPUSTACK_LIVE_BACKEND_PORT to play the inference backend. Standard
library only: it runs in the project's venv, and GPUStack in a venv of its own
(GPUSTACK_LIVE_VENV, default .ci/gpustack-venv, made with GPUSTACK_LIVE_PYTHON or this
Python), because GPUStack's package is also called ``gpustack`` and would shadow the
module under test.
"""

import base64
import contextlib
import ctypes
import functools
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.environ.get("GPUSTACK_LIVE_VENV") or os.path.join(ROOT, ".ci", "gpustack-venv")
# GPUStack 2.3.0 requires Python 3.10 to 3.12 (tested here with 3.11).
BASE_PYTHON = os.environ.get("GPUSTACK_LIVE_PYTHON") or sys.executable
GPUSTACK_VERSION = "2.3.0"
START_SECONDS = 240  # imports and migrations take 20-30 s on two cores; a loaded CI machine, longer

# What the live tests find on the server (names match GPUSTACK_TEST_* in test_live_gpustack.py).
CHAT, EMBEDDING, RERANK = "live-chat", "live-embed", "live-rerank"
STOPPED, PENDING = "live-stopped", "live-pending"
CHAT_WINDOW = 4096  # the chat model's context window, in its meta as a vLLM deployment's is


def log(message: str) -> None:
    print(f"[gpustack_server] {message}", file=sys.stderr, flush=True)


# Installing -------------------------------------------------------------------------


CREATECLUSTER_CONF = "/etc/postgresql-common/createcluster.conf"


def postgres_bin() -> str:
    """The directory of initdb/pg_ctl, installing Debian's postgresql when there is none."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        log("installing Debian's postgresql")
        apt = ["apt-get"] if os.geteuid() == 0 else ["sudo", "apt-get"]
        # Only the binaries: no default cluster that the package would create and start on port 5432.
        if os.geteuid() == 0 and not os.path.exists(CREATECLUSTER_CONF):
            os.makedirs(os.path.dirname(CREATECLUSTER_CONF), exist_ok=True)
            with open(CREATECLUSTER_CONF, "w") as conf:
                conf.write("create_main_cluster = false\n")
        subprocess.run(apt + ["update", "-q"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(apt + ["install", "-y", "-q", "postgresql"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return os.path.dirname(found[-1])


@functools.lru_cache(maxsize=None)
def gpustack_python() -> str:
    """GPUStack's venv python, creating the venv when it doesn't have the right GPUStack yet."""
    python = os.path.join(VENV, "bin", "python")
    probe = [python, "-c", "import importlib.metadata as m; print(m.version('gpustack'))"]
    if os.path.exists(python) and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == GPUSTACK_VERSION:
        return python
    log(f"installing gpustack=={GPUSTACK_VERSION} into {VENV} (about 0.9 GB, a few minutes)")
    subprocess.run([BASE_PYTHON, "-m", "venv", "--clear", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    f"gpustack=={GPUSTACK_VERSION}"], check=True)
    return python


# Starting and stopping ----------------------------------------------------------------


def without_proxies() -> Dict[str, str]:
    """This environment minus proxy settings: every address here is loopback, and a proxy (CI may set
    one for package downloads) must not reroute it. The installs keep them."""
    return {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}


_GIVEN_PORTS: Set[int] = set()


def free_port() -> int:
    """A port free now and not handed out before: the kernel may offer a just-closed probe's port again."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _GIVEN_PORTS:
            _GIVEN_PORTS.add(port)
            return port


class Stack:
    """The processes started so far, each in its own session, stopped in reverse order by PID."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.started: List[Tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: List[str], user: Optional[str] = None, stdin: Optional[str] = None,
              env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        log_file = open(os.path.join(self.workdir, f"{name}.log"), "ab")
        process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                   stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                   user=user, cwd=self.workdir, env=env, preexec_fn=_end_with_parent)
        log_file.close()
        self.started.append((name, process))
        if stdin is not None:
            assert process.stdin is not None
            process.stdin.write(stdin.encode() + b"\n")
            process.stdin.close()
        return process

    def check_alive(self) -> None:
        for name, process in self.started:
            if process.poll() is not None:
                raise RuntimeError(f"{name} (PID {process.pid}) exited with {process.returncode}:\n{self.tail(name)}")

    def stop(self) -> None:
        for _, process in reversed(self.started):
            stop_by_pid(process)
        self.started.clear()

    def tail(self, name: str, lines: int = 40) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.workdir, f"{name}.log"), errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""


# Loaded here, in the parent: a child already running as the postgres user may not read this Python's files.
_LIBC = ctypes.CDLL(None, use_errno=True)


def _end_with_parent() -> None:
    """In the child: SIGTERM when this script dies, even by SIGKILL (Linux), so nothing outlives it."""
    with contextlib.suppress(AttributeError):  # no prctl: not Linux
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_by_pid(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM to the process's own session (its PID is the group's), then SIGKILL after ``grace`` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"PID {process.pid} ignored SIGTERM for {grace:.0f} s: SIGKILL")
    # Whatever the process left in its group (GPUStack starts helpers) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def start_postgres(stack: Stack) -> str:
    """A private PostgreSQL cluster on 127.0.0.1 with role ``root`` and database ``gpustack``; its URL."""
    bin_dir, port = postgres_bin(), free_port()
    data, sockets = os.path.join(stack.workdir, "pgdata"), os.path.join(stack.workdir, "pgsock")
    os.makedirs(sockets)
    # PostgreSQL refuses to run as root: as root, run it as Debian's postgres user.
    user = "postgres" if os.geteuid() == 0 else None
    if user:
        shutil.chown(stack.workdir, user)
        shutil.chown(sockets, user)
    subprocess.run([os.path.join(bin_dir, "initdb"), "-D", data, "-U", "root", "--auth=trust", "-E", "UTF8"],
                   check=True, stdout=subprocess.DEVNULL, user=user, cwd=stack.workdir)
    stack.start("postgres", [os.path.join(bin_dir, "postgres"), "-D", data, "-p", str(port), "-k", sockets,
                             "-c", "listen_addresses=127.0.0.1"], user=user)
    pg_isready = [os.path.join(bin_dir, "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
    wait_until("PostgreSQL accepting connections", lambda: subprocess.run(pg_isready).returncode == 0, 60, stack, "postgres")
    subprocess.run([os.path.join(bin_dir, "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "root", "gpustack"],
                   check=True)
    return f"postgresql://root@127.0.0.1:{port}/gpustack?sslmode=disable"


def listening_addresses(session_ids: List[int]) -> List[str]:
    """``ip:port`` of every TCP socket listening in these sessions' processes (Linux /proc)."""
    inodes = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{pid}/stat") as stat:
                session = int(stat.read().rsplit(")", 1)[1].split()[3])  # field 6 of stat: state ppid pgrp session
            if session in session_ids:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    address, port = fields[1].split(":")
                    raw = bytes.fromhex(address)
                    # /proc writes each 32-bit word of the address in host (little-endian) order.
                    ip = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6,
                                          b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
                    found.append(f"{ip}:{int(port, 16)}")
    return found


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


class Admin:
    """GPUStack's management API as its admin (HTTP Basic)."""

    def __init__(self, url: str, password: str) -> None:
        self.url = url
        self.auth = "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()

    def call(self, method: str, path: str, body: Any = None, token: Optional[str] = None) -> Any:
        request = urllib.request.Request(self.url + path, method=method,
                                         data=None if body is None else json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {token}" if token else self.auth,
                                                  "Content-Type": "application/json"})
        try:
            with _DIRECT.open(request, timeout=30) as answer:
                raw = answer.read()
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{method} {path}: {error.code} {error.read()[:500]!r}") from None
        return json.loads(raw) if raw else None


def wait_until(what: str, ready: Any, seconds: float, stack: Stack, log_name: str = "gpustack") -> Any:
    deadline = time.monotonic() + seconds
    while True:
        stack.check_alive()
        with contextlib.suppress(OSError, RuntimeError, ValueError, KeyError, IndexError):
            found = ready()
            if found:
                return found
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {seconds:.0f} s. End of the {log_name} log:\n{stack.tail(log_name)}")
        time.sleep(0.25)


def start_gpustack(stack: Stack, database_url: str) -> Admin:
    # token_urlsafe() starts with "-" once in 64 draws, and argparse then reads "--bootstrap-password -x"
    # as a flag without its value. The "=" form takes any value; starting every password with "-"
    # makes each run prove it instead of one in 64.
    python, port, password = gpustack_python(), free_port(), "-" + secrets.token_urlsafe(16)
    flags = ["--data-dir", os.path.join(stack.workdir, "data"), "--api-port", str(port), "--port", str(free_port()),
             "--proxy-port", str(free_port()), "--database-url", database_url, "--gateway-mode", "disabled",
             "--disable-worker", "--disable-metrics", "--disable-update-check", "--disable-builtin-observability",
             "--ota-server-url", "http://127.0.0.1:9/ota", "--system-default-container-registry", "docker.io",
             f"--bootstrap-password={password}"]
    stack.start("gpustack", [python, os.path.join(HERE, "gpustack_inside.py"), "server", *flags], env=without_proxies())
    admin = Admin(f"http://127.0.0.1:{port}", password)
    started = time.monotonic()

    def healthy() -> bool:
        with _DIRECT.open(admin.url + "/healthz", timeout=5) as answer:
            return answer.status == 200

    wait_until("GPUStack's /healthz", healthy, START_SECONDS, stack)
    log(f"GPUStack {GPUSTACK_VERSION} answers on {admin.url} after {time.monotonic() - started:.0f} s")
    return admin


# What the live tests find on the server ------------------------------------------------


def register_models(admin: Admin, cluster_id: int) -> Dict[str, int]:
    """The models, by name -> id. The instances of replicas=1 models wait for a worker (state pending)."""
    ids = {}
    for name, category, replicas in ((CHAT, "llm", 1), (EMBEDDING, "embedding", 1), (RERANK, "reranker", 1),
                                     (STOPPED, "llm", 0), (PENDING, "llm", 1)):
        model = admin.call("POST", "/v2/models", {
            "name": name, "source": "local_path", "local_path": f"/models/{name}.gguf", "cluster_id": cluster_id,
            "replicas": replicas, "categories": [category], "backend": "Custom", "enable_model_route": True,
            "meta": {"max_model_len": CHAT_WINDOW} if name == CHAT else {}})
        ids[name] = model["id"]
    return ids


def serve_from_worker(stack: Stack, admin: Admin, model_id: int, worker: Dict[str, Any], backend_port: int) -> None:
    """Marks the model's instance as running on the stand-in worker, once the scheduler has given up on it.

    The scheduler writes the instance when it fails to place it ("No suitable workers"); marking it
    running before that would be overwritten.
    """
    def evaluated() -> Optional[Dict[str, Any]]:
        items = admin.call("GET", f"/v2/models/{model_id}/instances")["items"]
        return items[0] if items and items[0].get("state_message") else None

    instance = wait_until(f"the scheduler's verdict on model {model_id}", evaluated, 60, stack)
    instance_id = instance["id"]
    for field in ("id", "created_at", "updated_at"):
        instance.pop(field, None)
    instance.update(worker_id=worker["id"], worker_name=worker["name"], worker_ip="127.0.0.1", worker_ifname="lo",
                    port=backend_port, ports=[backend_port], state="running", state_message=None)
    admin.call("PUT", f"/v2/model-instances/{instance_id}", instance)


def create_keys(admin: Admin) -> Dict[str, str]:
    """API keys of each scope, by the name of the environment variable that carries them."""
    def key(name: str, **fields: Any) -> str:
        return admin.call("POST", "/v2/api-keys", {"name": name, **fields})["value"]

    return {
        "GPUSTACK_TEST_API_KEY": key("live-full"),
        "GPUSTACK_LIVE_INFERENCE_KEY": key("live-inference", scope=["inference"]),
        "GPUSTACK_LIVE_MANAGEMENT_KEY": key("live-management", scope=["management"]),
        "GPUSTACK_LIVE_OTHER_MODEL_KEY": key("live-other-model", allowed_model_names=[EMBEDDING]),
        "GPUSTACK_LIVE_EXPIRED_KEY": key("live-expired", expires_in=1),
    }


def register_worker(admin: Admin, cluster_id: int) -> Dict[str, Any]:
    """The stand-in worker as GPUStack describes it (``id``, ``token``, ...), and what it registered with."""
    registration = {"name": "live-worker", "cluster_id": cluster_id, "hostname": "live-worker", "ip": "127.0.0.1",
                    "ifname": "lo", "port": free_port(), "worker_uuid": str(uuid.uuid4()), "status": {}}
    return {**admin.call("POST", "/v2/workers", registration), "registration": registration}


def start_worker(stack: Stack, admin: Admin, worker: Dict[str, Any], backend_port: int) -> None:
    registration = worker["registration"]
    # state_message None clears the "Heartbeat lost" note, which otherwise keeps a worker not_ready.
    given = {"token": worker["token"], "status": {**registration, "state_message": None}}
    stack.start("worker", [gpustack_python(), os.path.join(HERE, "gpustack_inside.py"), "worker",
                           str(registration["port"]), str(backend_port), admin.url], stdin=json.dumps(given),
                env=without_proxies())


def bring_up(stack: Stack) -> Dict[str, str]:
    """Everything, started and registered; the environment the live tests read."""
    admin = start_gpustack(stack, start_postgres(stack))
    cluster_id = admin.call("POST", "/v2/clusters", {"name": "live", "provider": "Docker"})["id"]
    backend_port = free_port()
    # The worker is registered before the models and started after them: the scheduler, finding no
    # ready worker, leaves their instances pending, and we mark the running ones ourselves.
    worker = register_worker(admin, cluster_id)
    models = register_models(admin, cluster_id)
    for name in (CHAT, EMBEDDING, RERANK):
        serve_from_worker(stack, admin, models[name], worker, backend_port)
    start_worker(stack, admin, worker, backend_port)
    keys = create_keys(admin)

    def worker_ready() -> bool:
        return admin.call("GET", f"/v2/workers/{worker['id']}")["state"] == "ready"

    def all_listed() -> bool:
        listed = admin.call("GET", "/v1/models", token=keys["GPUSTACK_TEST_API_KEY"])["data"]
        return {CHAT, EMBEDDING, RERANK} <= {item["id"] for item in listed}

    def expired() -> bool:
        try:
            admin.call("GET", "/v1/models", token=keys["GPUSTACK_LIVE_EXPIRED_KEY"])
        except RuntimeError as error:
            return ": 401 " in str(error)
        return False

    wait_until("the stand-in worker ready", worker_ready, 60, stack, "worker")
    wait_until(f"{CHAT}, {EMBEDDING} and {RERANK} listed in /v1/models", all_listed, 60, stack)
    wait_until("the expired key refused", expired, 30, stack)
    exposed = [a for a in listening_addresses([p.pid for _, p in stack.started]) if not a.startswith(("127.0.0.1:", "::1:"))]
    if exposed:
        raise RuntimeError(f"listening beyond loopback: {', '.join(exposed)}")
    return {"GPUSTACK_TEST_SERVER_URL": admin.url, **keys,
            "GPUSTACK_TEST_CHAT_MODEL": CHAT, "GPUSTACK_TEST_EMBEDDING_MODEL": EMBEDDING,
            "GPUSTACK_TEST_RERANK_MODEL": RERANK, "GPUSTACK_LIVE_STOPPED_MODEL": STOPPED,
            "GPUSTACK_LIVE_PENDING_MODEL": PENDING, "GPUSTACK_LIVE_BACKEND_PORT": str(backend_port)}


@contextlib.contextmanager
def running_gpustack() -> Iterator[Dict[str, str]]:
    workdir = tempfile.mkdtemp(prefix="gpustack-live-")
    stack = Stack(workdir)
    try:
        yield bring_up(stack)
    finally:
        stack.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(command: List[str]) -> int:
    """Runs ``command`` against a fresh GPUStack; everything started is stopped however it ends."""
    signal.signal(signal.SIGTERM, _interrupted)
    started = time.monotonic()
    with running_gpustack() as environment:
        log(f"ready after {time.monotonic() - started:.0f} s; running: {' '.join(command)}")
        return subprocess.run(command, env={**without_proxies(), **environment}, preexec_fn=_end_with_parent).returncode


def main(argv: List[str]) -> int:
    if argv[:1] == ["install"]:
        postgres_bin(), gpustack_python()
        return 0
    if argv[:1] == ["run"] and "--" in argv and argv[argv.index("--") + 1:]:
        try:
            return run(argv[argv.index("--") + 1:])
        except KeyboardInterrupt as interrupt:
            log(f"interrupted ({interrupt or 'Ctrl-C'}): everything started was stopped")
            return 130
        except (RuntimeError, subprocess.CalledProcessError) as failure:
            log(f"could not bring GPUStack up, everything started was stopped: {failure}")
            return 1
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
