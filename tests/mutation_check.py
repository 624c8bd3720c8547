"""Does the suite notice when a safeguard is removed? For each safeguard in gpustack.py, copy the
module with that safeguard disabled, run the suite against the copy, and list the survivors.

    python tests/mutation_check.py            # every mutant, one after another (about an hour)
    python tests/mutation_check.py fork sse   # only mutants whose name contains one of these words
    python tests/mutation_check.py --live unwrapped cancel
        the live suite instead, through a real GPUStack (tests/gpustack_server.py; about 1 minute a mutant)

Not part of CI: it takes too long. Exit code 1 if any mutant survived.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, text in gpustack.py, what replaces it). Each text must occur exactly once.
MUTANTS: List[Tuple[str, str, str]] = [
    ("fork: child starts clean",
     "    os.register_at_fork(after_in_child=_start_clean_after_fork)",
     "    pass"),
    ("fork: inherited connections dropped without shutdown",
     "        idle, self._idle, self._lock = self._idle, {}, threading.Lock()\n        for conns in idle.values():\n            for conn, _ in conns:\n                conn.close()",
     "        idle, self._idle, self._lock = self._idle, {}, threading.Lock()\n        for conns in idle.values():\n            for conn, _ in conns:\n                conn.sock.shutdown(socket.SHUT_RDWR)\n                conn.close()"),
    ("resend: a request whose answer was lost is sent again silently",
     "                resp = conn.getresponse()\n",
     "                try:\n                    resp = conn.getresponse()\n                except _STALE_ERRORS:\n                    conn.close()\n                    if reused:\n                        continue\n                    raise\n"),
    ("resend: an unsent request on a dead idle connection goes out again",
     "                    conn.close()\n                    continue  # the server had closed this idle connection",
     "                    raise\n                    continue  # the server had closed this idle connection"),
    ("stale idle connection detected before reuse",
     "            if now - since < POOL_MAX_IDLE_SECONDS and _still_open(conn):",
     "            if now - since < POOL_MAX_IDLE_SECONDS:"),
    ("liveness check with poll, not select",
     "            poller = select.poll()\n            poller.register(sock, select.POLLIN)\n            return bool(poller.poll(0))",
     "            return bool(select.select([sock], [], [], 0)[0])"),
    ("connect timeout of its own",
     "    conn.timeout = conn.connect_timeout  # type: ignore[attr-defined]",
     "    conn.timeout = conn.timeout"),
    ("connect timeout message",
     "    if isinstance(reason, _ConnectTimeout) or isinstance(reason, _Unreachable) and reason.timed_out:",
     "    if False:"),
    ("cancel reaches a connecting socket",
     "            if guard is not None:\n                guard.attach(sock)\n            sock.settimeout(timeout)",
     "            sock.settimeout(timeout)"),
    ("an abandoned reply drops its connection",
     '        """Drop the connection now, whatever is left unread (GPUStack then stops generating)."""\n        conn, self._conn = self._conn, None',
     '        """Drop the connection now, whatever is left unread (GPUStack then stops generating)."""\n        return\n        conn, self._conn = self._conn, None'),
    ("socket shutdown on cancel",
     "                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked connect, send or read in the worker",
     "                pass"),
    ("plain-HTTP proxy keeps its credentials",
     '        if tunnel and "Proxy-Authorization" in headers:',
     '        if "Proxy-Authorization" in headers:'),
    ("CONNECT proxy credentials stay off the tunnelled request",
     '        if tunnel and "Proxy-Authorization" in headers:',
     '        if False:'),
    ("SSE line cap",
     "            if self._held_bytes > MAX_SSE_LINE_BYTES:",
     "            if False:"),
    ("SSE event cap",
     "            if self._size > MAX_SSE_EVENT_BYTES:",
     "            if False:"),
    ("SSE no-data cap",
     "        if self._silent > MAX_SSE_BYTES_WITHOUT_DATA:",
     "        if False:"),
    ("SSE no-data cap counts only lines without data",
     "            self._silent = 0\n            self._size += len(value)",
     "            self._size += len(value)"),
    ("malformed answers through the one helper",
     "        if kind is not None and issubclass(kind, _SHAPE_ERRORS):",
     "        if False:"),
    ("Retry-After only when finite",
     "    return number if number is not None and math.isfinite(number) else None",
     "    return number"),
    ("Retry-After cap",
     "    if asked is not None and asked > MAX_RETRY_AFTER:",
     "    if False:"),
    ("no retry for client errors",
     "    return failure.status in (408, 409, 429) or failure.status >= 500",
     "    return failure.status >= 400"),
    ("no retry for a backend 4xx wrapped in a 503",
     "    if failure.backend_status is not None and failure.backend_status < 500:\n        return False  # GPUStack wraps",
     "    if False:\n        return False  # GPUStack wraps"),
    ("no retry for a bad certificate",
     "answered=False, retry=not isinstance(reason, ssl.SSLCertVerificationError))",
     "answered=False, retry=True)"),
    ("redirects refused (a transport that follows Location)",
     "                if 200 <= reply.status < 300:\n                    return reply\n",
     "                if 200 <= reply.status < 300:\n                    return reply\n"
     "                if 300 <= reply.status < 400 and reply.headers.get(\"Location\"):\n"
     "                    url = reply.headers[\"Location\"]\n                    reply.close()\n                    continue\n"),
    ("key redaction",
     '        text = text.replace(secret, "***")',
     "        pass"),
    ("CLI exit 3 for server errors",
     "        return EXIT_CONNECTION if _no_answer(error) else EXIT_SERVER",
     "        return EXIT_USAGE"),
    ("async stream tied to its task",
     "        consumer.add_done_callback(stop)",
     "        pass"),
    ("bounded async backlog",
     '            while len(items) >= ASYNC_STREAM_BACKLOG and not state["closed"]:',
     "            while False:"),
    ("executor cap",
     "            if self._idle >= len(self._queue) or self.threads >= self.max_workers:",
     "            if self._idle >= len(self._queue):"),
    ("executor bookkeeping when a thread fails to start",
     "            self._unstarted(item)\n",
     "            pass\n"),
    ("settings validated at construction",
     "        self._transport()  # type: ignore[attr-defined]\n",
     "        pass\n"),
    ("settings built once",
     "    if cached is not None and cached[0] == key:",
     "    if False:"),
    ("URL credentials refused",
     '    if "@" in parts.netloc:',
     "    if False:"),
    ("per-call embedding deadline",
     "            transport = transport.with_timeouts(timeout, min(timeout, transport.settings.connect_timeout), max_retries=0)",
     "            pass"),
    ("dimensions probe waits with the model's timeout",
     "            answer = self._embed([\"dimension probe\"], self._transport().with_timeouts(None, max_retries=0))",
     "            answer = self._embed([\"dimension probe\"], self._transport().with_timeouts(self.connect_timeout, max_retries=0))"),
    ("dimensions probed once",
     "            if self._learned_dimensions is None:\n                self._learned_dimensions = self._probe_dimensions()",
     "            if True:\n                self._learned_dimensions = self._probe_dimensions()"),
    ("batch fallback only for a failure about one text",
     "    return status in (400, 413, 422)",
     "    return True"),
    ("text-by-text loop ends on a failure for the server",
     "            if not _about_one_text(error.__cause__):\n                raise\n",
     "            if False:\n                raise\n"),
    ("batches not yet sent are not sent after a failure",
     "        if stop.is_set():\n            return None",
     "        if False:\n            return None"),
    ("each address tried in turn",
     "            tried.append((_address_text(where), exc))",
     "            if isinstance(exc, socket.timeout):\n                raise\n            tried.append((_address_text(where), exc))"),
    ("a stream that ends before [DONE] and any finish_reason is incomplete",
     "            if not finished:\n                raise _provider_error(",
     "            if False:\n                raise _provider_error("),
    ("a default connect timeout guards a user who sets nothing",
     "DEFAULT_CONNECT_TIMEOUT = 5.0  #",
     "DEFAULT_CONNECT_TIMEOUT = 86400.0  #"),
    ("rates kept out of Agno's summed provider_metrics",
     "    return not any(word in key for word in _RATE_WORDS)",
     "    return True"),
    ("speech sent when the voices lookup fails",
     "            known = []  # the lookup is advisory: the server judges the voice",
     "            raise"),
    ("close() closes only its own server's connections",
     "            if host is None:\n                idle, self._idle = self._idle, {}",
     "            if True:\n                idle, self._idle = self._idle, {}"),
    ("a JSON answer to a stream request is capped",
     '                whole = self._decode(self.whole(reply, "POST", path), reply, url)',
     "                whole = self._decode(reply.read(), reply, url)"),
    ("window: llama.cpp's training context never taken",
     '    for key in ("max_model_len", "max_total_tokens"):',
     '    for key in ("max_model_len", "max_total_tokens", "n_ctx_train"):'),
    ("a failed lookup kept, not asked again at once",
     "                raise  # a budget cut short tells nothing of the server: not kept\n            items = error\n",
     "                raise  # a budget cut short tells nothing of the server: not kept\n            raise\n"),
    ("window: learned once, a window-less meta kept as none",
     "            if known is None or (known[0] is None and time.monotonic() - known[1] >= WINDOW_RETRY_SECONDS):",
     "            if True:"),
    ("window: the limit a context-window error named remembered",
     "                self._overflows.setdefault(model, failure.window)",
     "                pass"),
    ("window: set by the user wins",
     "        if self.requested_context_window is not None:\n            return self.requested_context_window",
     "        if False:\n            return self.requested_context_window"),
    ("window: vLLM's newest max_tokens wording recognised",
     '    ("vLLM", re.compile(r"max_(?:completion_)?tokens=',
     '    ("vLLM", re.compile(r"never(?:completion_)?tokens='),
    ("counts corrected by the server's usage",
     "        return round(text * (factor or 1.0)) + media",
     "        return text + media"),
    ("a max_tokens that cannot fit is lowered",
     "        body[name] = room\n",
     "        pass\n"),
    ("a prompt that alone exceeds the window goes as it is",
     "        if wanted <= room or room < 1:",
     "        if wanted <= room:"),
    ("compaction counted with the model's own count",
     '        counted = {} if "token_counter" in options else {"use_model_token_count": True}',
     "        counted = {}"),
    ("compaction's answer budget capped at half the window",
     "        answer = min(answer_tokens or self.max_tokens or int(window * COMPACTION_ANSWER_SHARE), window // 2)",
     "        answer = answer_tokens or self.max_tokens or int(window * COMPACTION_ANSWER_SHARE)"),
    ("compaction options given win",
     '        return Compaction(**{"compact_at_tokens": at, "on_context_overflow": True, **counted, **options})',
     '        return Compaction(**{**options, "compact_at_tokens": at, "on_context_overflow": True, **counted})'),
    ("a deployment-fix 400 is not about one text",
     "    if failure is not None and failure.retry is False:\n        return False",
     "    if False:\n        return False"),
    ("unknown client options refused",
     "    if given:\n        raise TypeError(",
     "    if False:\n        raise TypeError("),
    ("tool calls written as text recovered",
     "            calls = self._calls_in(result.content, body)\n            if calls:",
     "            calls = None\n            if calls:"),
    ("streamed tool calls written as text held back",
     "        hold = _CallHold() if self._recoverable(body) else None",
     "        hold = None"),
    ("only what may become a call is held back",
     "        if not lead or any(lead.startswith(marker) or marker.startswith(lead) for marker in _CALL_MARKERS):",
     "        if True:"),
    ("a recovered call names an offered tool",
     '    if not isinstance(item, dict) or item.get("name") not in offered:',
     "    if not isinstance(item, dict):"),
    ("nothing around recovered calls",
     '        if _HERMES_CALL.sub("", text).strip():\n            return None',
     "        if False:\n            return None"),
    ("recovered arguments are an object",
     "    if not isinstance(arguments, dict):\n        return None",
     "    if arguments is None:\n        return None"),
    ("no recovery when tool_choice is none",
     'bool(body.get("tools")) and body.get("tool_choice") != "none"',
     'bool(body.get("tools"))'),
    ("thinking off: the reasoning field is the answer",
     "        if self.thinking_off and piece.reasoning_content and not self.said:",
     "        if False:"),
    ("thinking that used the whole max tokens raises",
     '        if watch.finish == "length":',
     "        if False:"),
    ("a reasoning-only stop asks Agno to ask again",
     "        raise RetryableModelProviderError(original_error=words, retry_guidance_message=(",
     "        return None and RetryableModelProviderError(original_error=words, retry_guidance_message=("),
    ("ThoughtTooLongError's words are not taken for a context-window error",
     '"answer (finish_reason \\"length\\"). Give it room: a larger max tokens setting',
     '"answer (finish_reason \\"length\\"). Give it room: a larger max_tokens setting'),
    ("an Agno session's requests carry the session header",
     "        if not session or not self.session_affinity or any(",
     "        if True or not session or not self.session_affinity or any("),
    ("the user's session-id header wins",
     'any(name.lower() == "session-id" for name in self.headers or ())',
     "False"),
    ("the session header is a digest, never the id",
     '        return {"session-id": hashlib.sha256(f"agno-gpustack session\\0{session}".encode()).hexdigest()[:32]}',
     '        return {"session-id": session}'),
    ("embeddings truncated at the window when asked",
     '            body["truncate_prompt_tokens"] = self._truncation()',
     "            pass"),
    ("a failed call explained by the deployment, after its retries",
     "            _deployment(self.settings).explain(error, self.settings)\n",
     "            pass\n"),
    ("audio parts sent",
     "        parts.extend(audio_to_message(message.audio))",
     "        pass"),
    ("video parts sent",
     "        parts.append(_video_part(video))",
     "        pass"),
    ("files warned about",
     '        _warn_once(\n            "files",',
     '        (lambda *_: None)(\n            "files",'),
    ("context-window wordings become ContextWindowExceededError",
     "    if overflow is not None:",
     "    if False:"),
    ("GPUStack's 503 around a backend error unwrapped",
     "    found = _WRAPPED.search(words) if status == 503 else None",
     "    found = None"),
    ("missing deployment parameters never retried",
     "        failure.hint, failure.retry = fix, False",
     "        failure.hint, failure.retry = fix, None"),
    ("a failed lookup never hides the original error",
     "    except Exception:  # noqa: BLE001",
     "    except ZeroDivisionError:  # noqa: BLE001"),
    ("lookups bounded in time",
     "        seconds = max(0.1, seconds)\n",
     "        seconds = 30.0\n"),
    ("SGLang tool markup warned about",
     '        _warn_once(\n            f"tool markup {self.id}",',
     '        (lambda *_: None)(\n            f"tool markup {self.id}",'),
    ("doctor exits 1 when a check failed",
     '        return 0 if report["ok"] else EXIT_CHECK_FAILED',
     "        return 0"),
    ("images always asked for as b64_json",
     '"size": size or self.image_size, "response_format": "b64_json"}',
     '"size": size or self.image_size, "response_format": "url"}'),
    ("image MIME type read from its bytes",
     "                images.append(Image(content=data, mime_type=_image_type(data)))",
     '                images.append(Image(content=data, mime_type="image/png"))'),
    ("VoxBox's 200-with-error is an error",
     '    if isinstance(answer, dict) and isinstance(answer.get("status_code"), int) and answer["status_code"] >= 400:',
     "    if False:"),
    ("answers over the cap refused",
     "            return resp.read() if resp.length <= cap else None",
     "            return resp.read()"),
    ("a body cut short is not taken whole",
     "            return resp.read() if resp.length <= cap else None",
     "            return resp.read(cap + 1) if resp.length <= cap else None"),
    ("multipart boundary never in a part",
     "    while any(boundary.encode() in content for content in contents):",
     "    while False:"),
    ("what a lookup learned is kept for a while, per server",
     "        if known is not None and not fresh and time.monotonic() - known[0] < DEPLOYMENT_TTL:",
     "        if False:"),
    ("unknown voice refused before any request",
     "        if voice is not None and known and voice not in known:",
     "        if False:"),
    ("reading a file is not a tool",
     "tools=[sync for on, sync, _, _ in chosen if on],",
     "tools=[sync for on, sync, _, _ in chosen if on] + [self.transcribe_file],"),
]


def run(name: str, source: str, limit: float, live: bool = False) -> Tuple[bool, str, float]:
    """(killed, the first failing test or '', seconds) for one mutant."""
    with tempfile.TemporaryDirectory(prefix="gpustack-mutant-") as work:
        with open(os.path.join(work, "gpustack.py"), "w", encoding="utf-8") as handle:
            handle.write(source)
        # The suite as it stands in the project: its settings (pyproject.toml: testpaths, addopts), both conftest.py
        # files, test_gpustack.py and tests/ with the shared fake (tests/fakes.py) and every test file.
        for name_ in ("pyproject.toml", "conftest.py", "test_gpustack.py", "test_live_gpustack.py"):
            shutil.copy(os.path.join(ROOT, name_), work)
        shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(work, "tests"), ignore=shutil.ignore_patterns("__pycache__"))
        env = {**os.environ, "GPUSTACK_TEST_TIMEOUT": "20", "PYTHONDONTWRITEBYTECODE": "1", "GPUSTACK_LIVE_REQUIRED": "1"}
        # No test path for the fake suite: pyproject.toml's testpaths name it, as for a plain `pytest`.
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + (["test_live_gpustack.py"] if live else [])
        harness = [sys.executable, os.path.join(ROOT, "tests", "gpustack_server.py"), "run", "--"] if live else []
        started = time.monotonic()
        done = subprocess.run(harness + pytest, cwd=work, env=env, capture_output=True, text=True, timeout=limit)
        seconds = time.monotonic() - started
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in done.stdout.splitlines() if line.startswith(("FAILED ", "ERROR "))]
    shown = ", ".join(test.split("::")[-1][:60] for test in failed[:3]) + (f" (+{len(failed) - 3})" if len(failed) > 3 else "")
    return done.returncode != 0, shown, seconds


def main(argv: List[str]) -> int:
    with open(os.path.join(ROOT, "gpustack.py"), encoding="utf-8") as handle:
        original = handle.read()
    live = "--live" in argv
    words = [word for word in argv if word != "--live"]
    chosen = [m for m in MUTANTS if not words or any(word in m[0] for word in words)]
    survivors = []
    print(f"{'safeguard disabled':58} {'result':8} {'s':>5}  failing tests")
    for name, text, replacement in chosen:
        count = original.count(text)
        if count != 1:
            print(f"{name:58} {'STALE':8} {'':>5}  the text to mutate occurs {count} times; update MUTANTS")
            survivors.append(name)
            continue
        killed, test, seconds = run(name, original.replace(text, replacement), limit=900, live=live)
        print(f"{name:58} {'killed' if killed else 'SURVIVED':8} {seconds:5.0f}  {test}", flush=True)
        if not killed:
            survivors.append(name)
    print(f"\n{len(chosen) - len(survivors)} of {len(chosen)} mutants killed" + (f"; survivors: {survivors}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
