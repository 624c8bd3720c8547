"""Agno models, embedders and rerankers for GPUStack, on the Python standard library alone.

GPUStack serves models through OpenAI-compatible endpoints. This one module gives Agno:

    from gpustack import GPUStackChat, GPUStackEmbeddings, GPUStackRerank
    agent = Agent(model=GPUStackChat(id="qwen3"))

It imports only the standard library and ``agno``: HTTP goes through ``urllib.request``
(with a connection-reusing handler under it), async through worker threads, and the
server-sent-events parser is written here. Run ``python gpustack.py --help`` for the
command line.
"""

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import contextvars
import dataclasses
import difflib
import email.utils
import functools
import hashlib
import http.client
import json
import math
import mimetypes
import operator
import os
import random
import re
import select
import selectors
import socket
import ssl
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncGenerator,
    AsyncIterator,
    Callable,
    ClassVar,
    Dict,
    Generator,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from agno.exceptions import ContextWindowExceededError, EmbeddingError, ModelProviderError, RetryableModelProviderError
from agno.knowledge.document import Document
from agno.knowledge.embedder.base import Embedder, pad_batch_embeddings, raise_embedding_error
from agno.knowledge.reranker.base import Reranker
from agno.media import Audio, Image
from agno.metrics import MessageMetrics
from agno.models.base import Model
from agno.models.message import Message
from agno.models.response import ModelResponse
from agno.tools import Toolkit
from agno.tools.function import ToolResult
from agno.utils.message import normalize_tool_messages

__version__ = "0.1.0"

__all__ = [
    "GPUStackChat",
    "GPUStackEmbeddings",
    "GPUStackRerank",
    "GPUStackTools",
    "GPUStack",
    "list_models",
    "alist_models",
    "close_connections",
    "diagnose",
    "ThoughtTooLongError",
    "GPUStackEmbedder",
    "GPUStackReranker",
    "registry",
]

T = TypeVar("T")

# Configuration and errors ####################################################

DEFAULT_SERVER_URL = "http://localhost:9009"
SERVER_URL_ENV = "GPUSTACK_SERVER_URL"
API_KEY_ENV = "GPUSTACK_API_KEY"

DEFAULT_TIMEOUT = 600.0  # seconds to wait for data, as in the OpenAI SDK
DEFAULT_CONNECT_TIMEOUT = 5.0  # seconds to open a connection (TCP, proxy tunnel, TLS), as in the OpenAI SDK
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 120.0  # a server that asks for a longer pause is not retried

ERROR_SNIPPET_CHARS = 400  # of a plain-text or HTML error body, what a message keeps
ERROR_BODY_BYTES = 64 * 1024  # of an error body, what is read at all
READ_BLOCK_BYTES = 64 * 1024
MAX_SSE_LINE_BYTES = 8 * 1024 * 1024  # one line of an event stream
MAX_SSE_EVENT_BYTES = 16 * 1024 * 1024  # one event, all its data lines together
MAX_SSE_BYTES_WITHOUT_DATA = 1024 * 1024  # comments and empty events in a row: a stream that says nothing
DRAIN_AFTER_DONE_BYTES = 64 * 1024  # read past [DONE] to reuse the connection, no further
MAX_ANSWER_BYTES = 64 * 1024 * 1024  # one whole answer (an image as base64 is a few MiB); more is refused

POOL_MAX_IDLE_PER_HOST = 256
POOL_MAX_IDLE_SECONDS = 30.0
WORKER_IDLE_SECONDS = 2.0  # an async worker thread with nothing to do for this long exits
MAX_WORKERS_ENV = "GPUSTACK_MAX_WORKERS"
DEFAULT_MAX_WORKERS = 1000  # async calls in flight at once; the OpenAI SDK's default connection limit
ASYNC_STREAM_BACKLOG = 1024  # pieces a stream reader may run ahead of its async consumer

USER_AGENT = f"agno-gpustack/{__version__} (+python-urllib)"


def _server_root(base_url: Optional[str]) -> str:
    """The server's origin and path prefix, without a trailing ``/``, ``/v1`` or ``/v1-openai``."""
    url = (base_url or os.getenv(SERVER_URL_ENV) or DEFAULT_SERVER_URL).strip()
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"GPUStack server URL must look like http://host:port or https://host, got {_redact_url(url)!r}; "
            f"set base_url=... or {SERVER_URL_ENV}"
        )
    if "@" in parts.netloc:
        raise ValueError(
            f"GPUStack server URL must not carry user:password@ ({_redact_url(url)!r}); "
            f"pass the key as api_key=... or {API_KEY_ENV}"
        )
    path = parts.path.rstrip("/")
    for suffix in ("/v1-openai", "/v1"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")).rstrip("/")


def _size_text(size: int) -> str:
    return f"{size // 2**20} MiB" if size % 2**20 == 0 else f"{size} bytes"


def _redact_url(url: str) -> str:
    """The URL with any ``user:password@`` removed, for messages."""
    return re.sub(r"(?<=://)[^/@\s]*@", "", url)


def _redact(text: str, secret: Optional[str]) -> str:
    """``text`` with the API key cut out, wherever a server or library echoed it."""
    if secret and len(secret) >= 4 and secret in text:
        text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class _Settings:
    """Where and how to reach GPUStack; validated once, shared by every endpoint of a model."""

    root: str
    api_key: Optional[str] = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    verify: Union[bool, str] = True
    headers: Optional[Tuple[Tuple[str, str], ...]] = field(default=None, repr=False)
    model_name: Optional[str] = None
    model_id: Optional[str] = None


def _seconds(name: str, value: Any, default: float) -> float:
    """A timeout as a positive, finite number of seconds, or a ValueError that names the setting."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _checked_verify(verify: Any) -> Union[bool, str]:
    if verify is None:
        return True
    if isinstance(verify, bool):
        return verify
    if isinstance(verify, str) and os.path.exists(verify):
        return verify
    if isinstance(verify, str):
        raise ValueError(f"verify={verify!r}: no such CA bundle file or directory")
    raise ValueError(f"verify must be True, False or a CA bundle path, got {type(verify).__name__}")


def _settings(
    base_url: Optional[str],
    api_key: Optional[str],
    timeout: Optional[float],
    max_retries: Optional[int],
    verify: Union[bool, str, None],
    headers: Sequence[Tuple[str, Any]],
    model_name: Optional[str] = None,
    model_id: Optional[str] = None,
    connect_timeout: Optional[float] = None,
) -> _Settings:
    """Validate a model's client settings, once: every bad value is a ValueError before any request. ``headers``
    are the dicts of headers by the names they were given under, the later winning on the same header."""
    if max_retries is not None and (isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0):
        raise ValueError(f"max_retries must be a whole number >= 0, got {max_retries!r}")
    sent: Dict[str, str] = {}
    for name, given in headers:
        if given is not None and not isinstance(given, dict):
            raise ValueError(f"{name} must be a dict of header names to values, got {type(given).__name__}")
        sent.update(given or {})
    return _Settings(
        root=_server_root(base_url),
        api_key=(api_key if api_key is not None else os.getenv(API_KEY_ENV)) or None,
        timeout=_seconds("timeout", timeout, DEFAULT_TIMEOUT),
        connect_timeout=_seconds("connect_timeout", connect_timeout, DEFAULT_CONNECT_TIMEOUT),
        max_retries=max_retries if max_retries is not None else DEFAULT_MAX_RETRIES,
        verify=_checked_verify(verify),
        headers=tuple((str(k), str(v)) for k, v in sent.items()) or None,
        model_name=model_name,
        model_id=model_id,
    )


@dataclass
class _ClientOptions:
    """How to reach GPUStack: the one definition of the client options every class and function takes.

    The dataclass models inherit these fields; the others take the same names as keywords
    (``GPUStackRerank(id="bge-reranker", timeout=30)``, ``list_models(headers={...})``).
    """

    base_url: Optional[str] = None  # falls back to GPUSTACK_SERVER_URL, then http://localhost:9009
    api_key: Optional[str] = field(default=None, repr=False)  # falls back to GPUSTACK_API_KEY
    timeout: float = DEFAULT_TIMEOUT  # seconds to wait for data
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # seconds to open a connection
    max_retries: int = DEFAULT_MAX_RETRIES
    verify: Union[bool, str] = True  # False, or a CA bundle's path
    headers: Optional[Dict[str, str]] = field(default=None, repr=False)  # may carry credentials too

    def _resolve_client_options(self) -> None:
        """Settle the server and the key once, at construction (a later change of the environment is not read)."""
        self.base_url = _server_root(self.base_url)
        if self.api_key is None:
            self.api_key = os.getenv(API_KEY_ENV) or None

    def _client_settings(self, model_name: str, model_id: Optional[str] = None) -> _Settings:
        return _settings(self.base_url, self.api_key or "", self.timeout, self.max_retries, self.verify,
                         self._header_layers(), model_name=model_name, model_id=model_id,
                         connect_timeout=self.connect_timeout)

    def _header_layers(self) -> Tuple[Tuple[str, Any], ...]:
        """The headers sent, by the names they were given under, the weakest first."""
        return (("headers", self.headers),)

    def keywords(self) -> Dict[str, Any]:
        """The options as keywords for another client: ``GPUStackChat(id="qwen3", **options.keywords())``."""
        return {name: getattr(self, name) for name in CLIENT_OPTIONS}


CLIENT_OPTIONS = tuple(option.name for option in dataclasses.fields(_ClientOptions))


def _client_options(given: Dict[str, Any], **defaults: Any) -> _ClientOptions:
    """The client options among keyword arguments, taken out of ``given`` (what is left is the caller's); a default
    here replaces an option given as None."""
    options = {name: given.pop(name) for name in CLIENT_OPTIONS if name in given}
    for name, value in defaults.items():
        if options.get(name) is None:
            options[name] = value
    client = _ClientOptions(**options)
    client._resolve_client_options()
    return client


def _no_other_options(given: Dict[str, Any], function: str) -> None:
    if given:
        raise TypeError(f"{function}() got an unexpected keyword argument {next(iter(given))!r}; client options are: "
                        f"{', '.join(CLIENT_OPTIONS)}")


_WARNED: set = set()  # topics warned about, once a process


def _warn_once(topic: str, text: str) -> None:
    if topic not in _WARNED:
        _WARNED.add(topic)
        from agno.utils.log import log_warning

        log_warning(text)


def _checked_count(name: str, value: Any) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return value


def _error_text(body: bytes, content_type: str = "") -> Tuple[str, Optional[str]]:
    """The server's own words in an error body, and its error code, whichever of the five shapes it has.

    OpenAI ``{"error": {"message", "type", "code"}}``; GPUStack ``{"code", "reason", "message"}``;
    vLLM ``{"object": "error", "message"}``; FastAPI ``{"detail": ...}``; or text/HTML from a proxy.
    """
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text) if text[:1] in ("{", "[", '"') else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            code = error.get("code") if error.get("code") is not None else error.get("type")
            return str(error["message"]), None if code is None else str(code)
        if isinstance(error, str) and error:
            return error, None if data.get("code") is None else str(data.get("code"))
        if data.get("message"):
            code = data.get("code") if data.get("code") is not None else data.get("type")
            return str(data["message"]), None if code is None else str(code)
        detail = data.get("detail")
        if isinstance(detail, str) and detail:
            return detail, None
        if isinstance(detail, list) and detail:
            return "; ".join(_validation_item(item) for item in detail), None
    if isinstance(data, str) and data:
        return data, None
    if "html" in content_type.lower() or text[:1] == "<":
        text = re.sub(r"<[^>]*>", " ", text)
    text = " ".join(text.split())
    if len(text) > ERROR_SNIPPET_CHARS:
        text = text[:ERROR_SNIPPET_CHARS] + "..."
    return text, None


def _validation_item(item: Any) -> str:
    if isinstance(item, dict):
        loc = ".".join(str(part) for part in item.get("loc") or ())
        msg = str(item.get("msg") or item)
        return f"{loc}: {msg}" if loc else msg
    return str(item)


# Where each backend's context window is raised, in the model's Backend Parameters on GPUStack.
_CONTEXT_FLAGS = {"vLLM": "--max-model-len", "SGLang": "--context-length", "llama.cpp": "--ctx-size"}

# (backend, pattern, group of the limit, group of the prompt's tokens) for each known wording.
_CONTEXT_WORDINGS = [
    ("llama.cpp", re.compile(r"request \((\d+) tokens\) exceeds the available context size \((\d+) tokens\)"), 2, 1),
    ("llama.cpp", re.compile(r"exceeds the available context size"), 0, 0),
    ("SGLang", re.compile(r"The input \((\d+) tokens\) is longer than the model's context length \((\d+) tokens\)"), 2, 1),
    ("SGLang", re.compile(r"Input length \((\d+) tokens\) exceeds the maximum allowed length \((\d+) tokens\)"), 2, 1),
    ("SGLang", re.compile(r"Requested token count exceeds the model's maximum context length of (\d+) tokens"), 1, 0),
    ("vLLM", re.compile(r"The decoder prompt \(length (\d+)\) is longer than the maximum model length of (\d+)"), 2, 1),
    ("vLLM", re.compile(r"The prompt \(total length (\d+)\) is too long to fit into the model \(context length (\d+)\)"), 2, 1),
    ("vLLM", re.compile(r"maximum context length is (\d+) tokens"), 1, 0),
    # gpustack#4895: "max_tokens=131072cannot be greater than max_model_len=max_total_tokens=8192. ..."
    ("vLLM", re.compile(r"max_(?:completion_)?tokens=(\d+)\s*cannot be greater than max_model_len=(?:max_total_tokens=)?(\d+)"),
     2, 0),
    # llama-box, GPUStack's llama.cpp (gpustack#3685): a max_tokens larger than the window, without numbers.
    ("llama.cpp", re.compile(r'"max_tokens" must be less than or equal to the model\'s context length'), 0, 0),
]
_VLLM_PROMPT_TOKENS = re.compile(r"(\d+) in the messages|has (\d+) input tokens|contains at least (\d+) input tokens")


def _context_overflow(words: str, raw: str) -> Optional[Tuple[str, Optional[int], Optional[int]]]:
    """(backend, context limit, prompt tokens) when the server says the request doesn't fit the context window.

    ``raw`` is the whole error body: llama.cpp names the error by its ``type``, whatever its words.
    """
    if "exceed_context_size_error" in raw and "context size" not in words:
        return ("llama.cpp", None, None)
    for backend, pattern, limit_at, prompt_at in _CONTEXT_WORDINGS:
        found = pattern.search(words)
        if found is None:
            continue
        limit = int(found[limit_at]) if limit_at else None
        prompt = int(found[prompt_at]) if prompt_at else None
        if prompt is None and backend == "vLLM":
            more = _VLLM_PROMPT_TOKENS.search(words)
            prompt = int(next(group for group in more.groups() if group)) if more else None
        return (backend, limit, prompt)
    return None


def _context_hint(backend: str, limit: Optional[int], prompt: Optional[int]) -> str:
    sizes = ", ".join(part for part in (f"limit {limit} tokens" if limit else "", f"prompt {prompt} tokens" if prompt else "") if part)
    default = "; GPUStack starts vLLM at 8192 unless it is set" if backend == "vLLM" else ""
    return (
        f"The request is longer than the model's context window{f' ({sizes})' if sizes else ''}: shorten the input "
        f"or lower max_tokens, or raise the limit in the model's Backend Parameters on GPUStack "
        f"({_CONTEXT_FLAGS[backend]} for {backend}{default})."
    )


_OTHER_TASK_HINT = "The model is deployed for another task than this request's (see its category in GPUStack, or list_models())."

# Deployments that lack a backend parameter a request needs: (words, what to change). Never retried.
_DEPLOYMENT_FIXES = [
    ('"auto" tool choice requires --enable-auto-tool-choice',
     "The model was deployed without tool calling: add `--enable-auto-tool-choice --tool-call-parser=<parser>` to its "
     "Backend Parameters on GPUStack (e.g. `hermes` for Qwen)."),
    ("tools param requires --jinja",
     "The model was deployed without tool calling: add `--jinja` to its Backend Parameters on GPUStack."),
    ("Unsupported tool_call_parser: None",
     "The model was deployed without tool calling: add `--tool-call-parser=<parser>` to its Backend Parameters on "
     "GPUStack (e.g. `qwen25` for Qwen)."),
    ("not supported by xgrammar",
     "The schema uses features the backend's grammar engine lacks: simplify the schema or set strict_output=False."),
    ("Failed to transform json schema",
     "The schema uses features the backend's grammar engine lacks: simplify the schema or set strict_output=False."),
    ("The model does not support", _OTHER_TASK_HINT),
]


def _deployment_fix(words: str) -> Optional[str]:
    for needle, fix in _DEPLOYMENT_FIXES:
        if needle in words:
            return fix
    return None


_WRAPPED = re.compile(r"Worker request failed:.*? status=(\d{3}), error=(.*)", re.S)


def _unwrapped(status: int, words: str) -> Optional[Tuple[int, str, Optional[str], str]]:
    """GPUStack's 503 around a backend's error: the backend's (status, words, code, body); its words stay
    GPUStack's whole message when the backend's body is not a JSON object."""
    found = _WRAPPED.search(words) if status == 503 else None
    if found is None:
        return None
    inner = found[2].strip()
    try:
        parsed = json.loads(inner)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        return int(found[1]), words, None, inner
    inner_words, inner_code = _error_text(inner.encode())
    return int(found[1]), inner_words, inner_code, inner


# What a deployment lookup may explain in a failure (the layer above the transport asks the server, once).
UNKNOWN_MODEL, NOT_RUNNING, OTHER_TASK = "unknown model", "not running", "other task"


@dataclass
class _Failure:
    """What went wrong with one call, as data. The transport raises it inside a ModelProviderError
    (``error.failure``); the layers above may add to its words what the server can tell, once."""

    status: int  # the HTTP status, or 502 when no answer came
    words: str  # the server's own words, or what failed on the way
    where: str  # "HTTP 404 from POST http://host/v1/chat/completions", "in an answer", ...
    hint: str = ""  # what the user can do, as far as the words tell
    answered: bool = True  # whether any HTTP answer came
    backend_status: Optional[int] = None  # the backend's own status, when GPUStack relayed it in a 503
    code: Optional[str] = None
    path: str = ""  # the endpoint, without its query
    topic: Optional[str] = None  # UNKNOWN_MODEL, NOT_RUNNING, OTHER_TASK: what a lookup may explain
    window: Optional[int] = None  # the context window a context-window error named
    retry: Optional[bool] = None  # what the words say of a second try; None: the status decides
    kind: Type[ModelProviderError] = ModelProviderError

    def message(self, hint: Optional[str] = None) -> str:
        shown = f"{self.words} ({self.where}" + (f", code {self.code}" if self.code else "") + ")." if self.where else self.words
        return f"{shown} {self.hint if hint is None else hint}".rstrip()


def _error_hint(status: int, words: str, settings: _Settings, location: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """What the user can do about an HTTP error, in one sentence, and what a lookup may explain."""
    lowered = words.lower()
    if 300 <= status < 400:
        return (
            f"The server redirected to {_redact_url(location or '?')}; redirects are not followed, so the API key "
            f"never goes to another address. Set base_url or {SERVER_URL_ENV} to the new address "
            "(often http:// changed to https://)."
        ), None
    if status in (401, 403):
        state = "was sent" if settings.api_key else "is not set"
        return f"Check the API key: {API_KEY_ENV} (or api_key=...) {state}; create one in GPUStack's UI under API Keys.", None
    if status == 404 and "model" in lowered:
        return _check_model_name(settings.model_id), UNKNOWN_MODEL
    if status == 404:
        return f"Check base_url: {settings.root} should be the GPUStack server itself, without /v1.", None
    if status == 503 and ("no running instance" in lowered or "no healthy upstream" in lowered):
        return _NOT_RUNNING_HINT, NOT_RUNNING
    if status == 429:
        return "GPUStack is rate-limiting this key; slow down or raise the limit.", None
    return "", None


_NOT_RUNNING_HINT = "The model exists but has no running instance yet: wait for it to start, or check it in GPUStack."


def _check_model_name(model_id: Optional[str]) -> str:
    return (f"Check the model name {model_id!r}: list_models() or `python gpustack.py models` "
            "shows the models with a running instance.")


def _provider_error(
    message: str, status: int, settings: _Settings, kind: Type[ModelProviderError] = ModelProviderError,
    failure: Optional[_Failure] = None,
) -> ModelProviderError:
    """The one way this module builds an error: Agno's type, classified, key-free, with its failure as data."""
    error = kind(
        message=_redact(message, settings.api_key),
        status_code=status,
        model_name=settings.model_name,
        model_id=settings.model_id,
    )
    error = ModelProviderError.classify(error)
    error.failure = failure  # type: ignore[attr-defined]
    return error


def _no_answer(error: ModelProviderError) -> bool:
    """Whether a call got no HTTP answer at all (the command line's exit code tells these apart)."""
    failure = getattr(error, "failure", None)
    return failure is not None and not failure.answered


def _failed(failure: _Failure, settings: _Settings) -> ModelProviderError:
    return _provider_error(failure.message(), failure.status, settings, failure.kind, failure)


def _server_failure(status: int, words: str, code: Optional[str], where: str, settings: _Settings, raw: str = "",
                    location: Optional[str] = None, path: str = "") -> _Failure:
    """What a server said, with the fix when its words tell it. Used for HTTP answers and errors inside streams alike."""
    words = _redact(words, settings.api_key)  # a server may echo the key; the failure's words never carry it
    failure = _Failure(status, words, where, code=code, path=path)
    wrapped = _unwrapped(status, words)
    if wrapped is not None:
        failure.backend_status, failure.words, failure.code, raw = wrapped
        failure.where = f"HTTP {failure.backend_status} from the model's backend, relayed by GPUStack as {where}"
        if failure.words != words:  # the backend's own words: its status is the one that counts
            failure.status = status = failure.backend_status
    overflow = _context_overflow(failure.words, raw)
    if overflow is not None:
        failure.hint, failure.retry, failure.kind = _context_hint(*overflow), False, ContextWindowExceededError
        failure.window = overflow[1]
        return failure
    fix = _deployment_fix(failure.words)
    if fix is None and status == 404 and failure.words == "Not Found" and path in ("rerank", "embeddings"):
        fix = f"The model's backend has no /v1/{path} (or base_url is not the GPUStack server). {_OTHER_TASK_HINT}"
    if fix is not None:
        failure.hint, failure.retry = fix, False
        failure.topic = OTHER_TASK if fix.endswith(_OTHER_TASK_HINT) else None
        return failure
    failure.hint, failure.topic = _error_hint(status, failure.words, settings, location)
    if failure.backend_status is not None and failure.backend_status < 500 and status == 503:
        failure.hint = "The model's backend rejected the request itself; retrying cannot help."
    return failure


def _http_failure(status: int, reason: str, headers: Any, body: bytes, method: str, url: str, settings: _Settings,
                  path: str = "") -> _Failure:
    words, code = _error_text(body, headers.get("Content-Type", "") if headers is not None else "")
    words = words or f"HTTP {status} {reason}".strip()
    location = headers.get("Location") if headers is not None else None
    where = f"HTTP {status} from {method} {_redact_url(url)}"
    return _server_failure(status, words, code, where, settings, body.decode("utf-8", "replace"), location, path)


class _ConnectTimeout(socket.timeout):
    """Opening the connection (TCP, proxy tunnel, TLS) took longer than connect_timeout."""


def _address_text(where: Tuple[Any, ...]) -> str:
    host, port = where[0], where[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class _Unreachable(OSError):
    """No address of a host took the connection; ``tried`` names each, in order, with its failure."""

    def __init__(self, tried: List[Tuple[str, OSError]]) -> None:
        self.tried = tried
        self.timed_out = any(isinstance(error, socket.timeout) for _, error in tried)
        super().__init__(f"{tried[-1][1]} (tried {', '.join(address for address, _ in tried)})")


def _connection_failure(exc: BaseException, method: str, url: str, settings: _Settings) -> _Failure:
    """A call that got no HTTP answer (status 502, as Agno uses)."""
    reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    shown = _redact_url(url)
    if isinstance(reason, _ConnectTimeout) or isinstance(reason, _Unreachable) and reason.timed_out:
        tried = f" (tried {', '.join(address for address, _ in reason.tried)})" if isinstance(reason, _Unreachable) else ""
        words = (
            f"Could not connect to {shown}{tried} within connect_timeout={settings.connect_timeout:g}s: the host is "
            "unreachable or a firewall drops the packets. Check the address and the network path to GPUStack "
            "(VPN, firewall, proxy settings); raise connect_timeout=... only for a very slow network."
        )
    elif isinstance(reason, (socket.timeout, TimeoutError)):
        words = (
            f"No answer from {method} {shown} within timeout={settings.timeout:g}s; "
            "raise timeout=... if the model is slow (a cold start can take minutes)."
        )
    elif isinstance(reason, ssl.SSLCertVerificationError):
        words = (
            f"TLS certificate of {shown} could not be verified ({reason.verify_message or reason}); pass "
            "verify='/path/to/ca.pem' for a private CA, or verify=False for a self-signed certificate."
        )
    elif isinstance(reason, (ConnectionRefusedError, socket.gaierror, _Unreachable)) or (
        isinstance(reason, OSError) and not isinstance(reason, (ConnectionResetError, BrokenPipeError))
    ):
        words = (
            f"Cannot connect to GPUStack at {shown}: {reason}. Is the server running there? "
            f"Set base_url=... or {SERVER_URL_ENV}."
        )
    else:
        words = f"Connection to {shown} failed before an answer: {reason!r}."
    return _Failure(502, words, "", answered=False, retry=not isinstance(reason, ssl.SSLCertVerificationError))


def _should_retry(failure: _Failure, headers: Any = None) -> bool:
    """Whether a failed call can succeed on a second try: the server's ``x-should-retry`` first, then what its
    words told, then the status: never another 4xx, which fails the same way every time."""
    verdict = (headers.get("x-should-retry") or "").lower() if headers is not None else ""
    if verdict in ("true", "false"):
        return verdict == "true"
    if failure.retry is not None:
        return failure.retry
    if failure.backend_status is not None and failure.backend_status < 500:
        return False  # GPUStack wraps the backend's own 4xx into a 503; it fails the same way every time
    return failure.status in (408, 409, 429) or failure.status >= 500


def _retry_after(headers: Any) -> Optional[float]:
    """Seconds the server asked us to wait: ``retry-after-ms``, then seconds, then an HTTP date.

    A value that is not a finite number of seconds (``nan``, ``inf``, junk) counts as not given.
    """
    if headers is None:
        return None
    millis = _finite(headers.get("retry-after-ms"))
    if millis is not None:
        return millis / 1000.0
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return seconds
    when = email.utils.parsedate_tz(value)
    if when is None:
        return None
    try:
        return email.utils.mktime_tz(when) - time.time()
    except (OverflowError, ValueError):
        return None


def _finite(value: Optional[str]) -> Optional[float]:
    try:
        number = float(value) if value else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def _retry_delay(attempt: int, headers: Any = None) -> Optional[float]:
    """Seconds to wait before retry number ``attempt + 1``, or None when the server asks too much."""
    asked = _retry_after(headers)
    if asked is not None and asked > MAX_RETRY_AFTER:
        return None  # a server that asks for a long pause is better answered by an error now
    if asked is not None and asked >= 0:
        return asked
    delay = min(INITIAL_RETRY_DELAY * (2**attempt), MAX_RETRY_DELAY)
    return delay * (1 - 0.25 * random.random())


# Transport: connections ######################################################


class _Aborted(Exception):
    """The caller went away (task cancelled, stream closed); the request was torn down."""




class _CallGuard:
    """Lets another thread tear down the request a worker thread is blocked in.

    Async calls run in threads; when their task is cancelled, ``abort()`` shuts the current
    socket down, also one that is still connecting, so the worker returns at once and
    GPUStack sees the client leave.
    """

    __slots__ = ("aborted", "_sock", "_lock", "_wake")

    def __init__(self) -> None:
        self.aborted = False
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def attach(self, sock: Optional[socket.socket]) -> None:
        with self._lock:
            if self.aborted:
                raise _Aborted()
            self._sock = sock

    def detach(self, sock: Optional[socket.socket]) -> None:
        """The request on ``sock`` is over: a later abort must not touch it (it may serve another call)."""
        with self._lock:
            if self._sock is sock:
                self._sock = None

    def abort(self) -> None:
        with self._lock:
            self.aborted = True
            sock, self._sock = self._sock, None
        self._wake.set()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked connect, send or read in the worker
            except OSError:
                pass

    def sleep(self, seconds: float) -> None:
        if self._wake.wait(seconds):
            raise _Aborted()


_GUARD: "contextvars.ContextVar[Optional[_CallGuard]]" = contextvars.ContextVar("gpustack_guard", default=None)


class _ConnectionPool:
    """Idle keep-alive connections by (scheme, host, tunnel); one caller holds a connection at a time."""

    def __init__(self) -> None:
        self._idle: Dict[Tuple[str, str, Optional[str]], List[Tuple[http.client.HTTPConnection, float]]] = {}
        self._lock = threading.Lock()

    def take(self, key: Tuple[str, str, Optional[str]]) -> Optional[http.client.HTTPConnection]:
        now = time.monotonic()
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn, since = idle.pop()
            if now - since < POOL_MAX_IDLE_SECONDS and _still_open(conn):
                return conn
            conn.close()

    def give_back(self, key: Tuple[str, str, Optional[str]], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < POOL_MAX_IDLE_PER_HOST:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def close(self, host: Optional[str] = None) -> None:
        """Close the idle connections to ``host`` (``name:port`` as in the URL), directly or tunnelled; or all."""
        with self._lock:
            if host is None:
                idle, self._idle = self._idle, {}
            else:
                keys = [key for key in self._idle if key[2] == host or (key[2] is None and key[1] == host)]
                idle = {key: self._idle.pop(key) for key in keys}
        for conns in idle.values():
            for conn, _ in conns:
                conn.close()

    def forget(self) -> None:
        """In a forked child: drop the parent's idle connections without touching them.

        Closing our copy of the descriptor leaves the parent's connection up; ``shutdown()``
        would cut it. The lock may have been held by a parent thread at fork time: replace it.
        """
        idle, self._idle, self._lock = self._idle, {}, threading.Lock()
        for conns in idle.values():
            for conn, _ in conns:
                conn.close()


def _still_open(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive socket that is readable was closed by the server (or sent junk): unusable."""
    sock = conn.sock
    return sock is not None and not _readable(sock)


def _readable(sock: socket.socket) -> bool:
    """Whether a read would not block, as urllib3's ``wait_for_read`` asks it: with ``poll``, which, unlike
    ``select``, works for descriptors numbered 1024 and above."""
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            return bool(selector.select(0))
    except (OSError, ValueError):
        return True  # a socket we cannot even ask is not one to send on


class _Reply:
    """One HTTP answer on a pooled connection; the connection goes back only after a complete body."""

    __slots__ = ("status", "reason", "headers", "_resp", "_conn", "_pool", "_key", "_guard")

    def __init__(self, resp: http.client.HTTPResponse, conn: http.client.HTTPConnection, pool: _ConnectionPool, key, guard):
        self.status = resp.status
        self.reason = resp.reason
        self.headers = resp.headers
        self._resp = resp
        self._conn: Optional[http.client.HTTPConnection] = conn
        self._pool = pool
        self._key = key
        self._guard: Optional[_CallGuard] = guard

    def read(self, limit: Optional[int] = None) -> bytes:
        return self._resp.read(limit) if limit is not None else self._resp.read()

    def read_capped(self, cap: int) -> Optional[bytes]:
        """The whole body, or None when it is longer than ``cap`` (then no more of it is read).

        With a Content-Length, ``read()`` raises on a body cut short (a ``read(n)`` would return the
        part silently); a chunked body raises on a cut in any read.
        """
        resp = self._resp
        if resp.length is not None:
            return resp.read() if resp.length <= cap else None
        parts: List[bytes] = []
        size = 0
        while True:
            block = resp.read(READ_BLOCK_BYTES)
            if not block:
                return b"".join(parts)
            size += len(block)
            if size > cap:
                return None
            parts.append(block)

    def blocks(self) -> Iterator[bytes]:
        """The body as it arrives: each block is what one read of the socket returned."""
        read1 = self._resp.read1
        while True:
            block = read1(READ_BLOCK_BYTES)
            if not block:
                return
            yield block

    def drain(self) -> bool:
        """Read what follows ``[DONE]`` (normally just the end of the body) so the connection can be reused."""
        try:
            rest = self._resp.read(DRAIN_AFTER_DONE_BYTES)
        except (OSError, http.client.HTTPException, ValueError):
            return False
        return len(rest) < DRAIN_AFTER_DONE_BYTES and self._resp.isclosed()

    def finish(self) -> None:
        """Give the connection back if the body was read to its end; otherwise close it."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        resp = self._resp
        if resp.isclosed() and not resp.will_close and conn.sock is not None:
            if self._guard is not None:
                self._guard.detach(conn.sock)
            self._pool.give_back(self._key, conn)
        else:
            resp.close()
            conn.close()

    def close(self) -> None:
        """Drop the connection now, whatever is left unread (GPUStack then stops generating)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._resp.close()
        conn.close()


_STALE_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


def _no_delay(sock: socket.socket) -> None:
    """Turn Nagle off: http.client writes headers and body separately, and on a reused connection
    Nagle would hold the body back until the server's delayed ACK, 40 ms a call."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _open_socket(address: Tuple[str, int], timeout: Any = None, source_address: Any = None, *_: Any) -> socket.socket:
    """``socket.create_connection`` as urllib3 does it: each address the name resolves to, in turn, each
    within the connect timeout, so a host whose first address is unreachable (often its IPv6 one) still
    answers on the next. Each socket is handed to the call's guard before it connects, so that a
    cancelled task stops a connect that would otherwise wait out the whole connect timeout."""
    guard = _GUARD.get()
    host, port = address
    tried: List[Tuple[str, OSError]] = []
    for family, kind, proto, _name, where in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        sock = socket.socket(family, kind, proto)
        try:
            if guard is not None:
                guard.attach(sock)
            sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(where)
            _no_delay(sock)
            return sock
        except OSError as exc:
            sock.close()
            if guard is not None and guard.aborted:
                raise _Aborted() from None
            tried.append((_address_text(where), exc))
        except BaseException:
            sock.close()
            raise
    if not tried:
        raise OSError(f"cannot resolve {host}")
    raise _Unreachable(tried)


def _connect(conn: http.client.HTTPConnection, connect: Callable[[], None]) -> None:
    """Open ``conn`` within its connect timeout, then wait for data with its read timeout."""
    read_timeout = conn.timeout
    conn.timeout = conn.connect_timeout  # type: ignore[attr-defined]
    # The one private name of http.client used here: HTTPConnection.__init__ sets _create_connection as
    # its seam for opening the socket (CPython's own tests replace it). The alternative, a connect() of
    # our own, would have to call the private _tunnel() for proxies. Exercised by every test that connects.
    conn._create_connection = _open_socket  # type: ignore[attr-defined]
    try:
        connect()
    except socket.timeout as exc:
        conn.close()
        raise _ConnectTimeout(f"no connection within {conn.timeout:g}s") from exc
    except BaseException:
        conn.close()
        raise
    finally:
        conn.timeout = read_timeout
    conn.sock.settimeout(read_timeout)


ONE_WRITE_BYTES = 64 * 1024  # a request body up to this size goes out in one write with its head


class _OneWrite(http.client.HTTPConnection):
    """http.client sends a request's head and its body with two ``send()`` calls: two system calls a call.
    ``join_body()`` before ``request()`` holds the head back in the public ``send()`` and sends it with the
    body, which must be non-empty bytes (http.client skips an empty one, and the head would stay held)."""

    connect_timeout = DEFAULT_CONNECT_TIMEOUT
    _head: Optional[bytes] = None
    _join = False

    def join_body(self, body: Any) -> None:
        self._head = None
        self._join = isinstance(body, bytes) and 0 < len(body) <= ONE_WRITE_BYTES

    def send(self, data: Any) -> None:
        if self._join:
            self._join, self._head = False, data
            return
        if self._head is not None:
            data, self._head = self._head + data, None
        super().send(data)


class _HTTPConnection(_OneWrite):
    def connect(self) -> None:
        _connect(self, super().connect)


class _HTTPSConnection(_OneWrite, http.client.HTTPSConnection):
    tls_context: ssl.SSLContext
    tls_host: str  # the name the certificate must carry: the server's, also through a proxy's tunnel

    def connect(self) -> None:
        _connect(self, self._tcp_then_tls)

    def _tcp_then_tls(self) -> None:
        http.client.HTTPConnection.connect(self)  # TCP, and the proxy's CONNECT tunnel if any
        guard = _GUARD.get()
        self.sock = self.tls_context.wrap_socket(self.sock, server_hostname=self.tls_host, do_handshake_on_connect=False)
        if guard is not None:
            guard.attach(self.sock)  # the handshake, too, ends at once when the task is cancelled
        self.sock.do_handshake()


def _tunnel_target(req: urllib.request.Request) -> Optional[str]:
    """The ``host:port`` an HTTPS request reaches through a proxy's CONNECT tunnel, else None: urllib's
    ProxyHandler keeps such a request's type ``https`` and points its ``host`` at the proxy."""
    if req.type != "https":
        return None
    origin = urllib.parse.unquote(urllib.parse.urlsplit(req.full_url).netloc)
    return origin if req.host != origin else None


class _KeepAliveHandler(urllib.request.AbstractHTTPHandler):
    """urllib's HTTP(S) handler, keeping connections open between calls.

    urllib opens a new TCP (and TLS) connection per request; that costs more than
    everything else a call does. Proxies (``ProxyHandler`` before us) still work: the pool
    is keyed by the host urllib decided to talk to, and HTTPS tunnels by their target.
    A request is sent again on a fresh connection only when sending it on a reused idle
    connection failed, so none of it reached the server; any later failure is the retry
    policy's to judge, so a POST is never silently run twice.
    """

    def __init__(self, ssl_context: Optional[ssl.SSLContext]) -> None:
        super().__init__()
        self.tls_context = ssl_context or ssl.create_default_context()
        self.pool = _ConnectionPool()

    def http_open(self, req: urllib.request.Request) -> _Reply:
        return self._open(req, _HTTPConnection)

    def https_open(self, req: urllib.request.Request) -> _Reply:
        return self._open(req, _HTTPSConnection)

    http_request = urllib.request.AbstractHTTPHandler.do_request_
    https_request = urllib.request.AbstractHTTPHandler.do_request_

    def _open(self, req: urllib.request.Request, conn_class: Type[http.client.HTTPConnection]) -> _Reply:
        tunnel = _tunnel_target(req)
        key = (req.type, req.host, tunnel)
        headers = {name.title(): value for part in (req.headers, req.unredirected_hdrs) for name, value in part.items()}
        tunnel_headers = {}
        if tunnel and "Proxy-Authorization" in headers:
            # Through a CONNECT tunnel only the CONNECT is the proxy's to read; the server must not see it.
            # A plain-HTTP proxy reads the request itself, so there the header stays on it.
            tunnel_headers["Proxy-Authorization"] = headers.pop("Proxy-Authorization")
        guard = _GUARD.get()
        while True:
            conn = self.pool.take(key)
            reused = conn is not None
            if conn is None:
                conn = self._new_connection(conn_class, req, tunnel, tunnel_headers)
            else:
                conn.timeout = req.timeout
                conn.sock.settimeout(req.timeout)
            try:
                if conn.sock is None:
                    conn.connect()
                if guard is not None:
                    guard.attach(conn.sock)
                try:
                    conn.join_body(req.data)  # type: ignore[attr-defined]
                    conn.request(req.get_method(), req.selector, req.data, headers)
                except _STALE_ERRORS:
                    if not reused:
                        raise
                    conn.close()
                    continue  # the server had closed this idle connection: nothing of the request reached it
                resp = conn.getresponse()
            except _Aborted:
                conn.close()
                raise
            except OSError as exc:
                conn.close()
                if guard is not None and guard.aborted:
                    raise _Aborted() from exc
                raise urllib.error.URLError(exc) from exc
            except BaseException:
                conn.close()
                raise
            return _Reply(resp, conn, self.pool, key, guard)

    def _new_connection(self, conn_class: Type[http.client.HTTPConnection], req: urllib.request.Request,
                        tunnel: Optional[str], tunnel_headers: Dict[str, str]) -> http.client.HTTPConnection:
        # An HTTPSConnection given no context builds one, loading the CA store: ~20 ms a new connection.
        extra = {"context": self.tls_context} if conn_class is _HTTPSConnection else {}
        conn = conn_class(req.host, timeout=req.timeout, **extra)  # type: ignore[arg-type]
        conn.connect_timeout = getattr(req, "connect_timeout", DEFAULT_CONNECT_TIMEOUT)  # type: ignore[attr-defined]
        if isinstance(conn, _HTTPSConnection):
            conn.tls_context = self.tls_context
            conn.tls_host = urllib.parse.urlsplit("//" + (tunnel or req.host)).hostname or req.host
        if tunnel:
            conn.set_tunnel(tunnel, headers=tunnel_headers)
        return conn


_OPENERS: Dict[Any, Tuple[urllib.request.OpenerDirector, _KeepAliveHandler]] = {}
_OPENERS_LOCK = threading.Lock()


def _ssl_context(verify: Union[bool, str]) -> ssl.SSLContext:
    """TLS settings: the system trust store (honouring ``SSL_CERT_FILE``), a CA bundle, or none."""
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if isinstance(verify, str):
        if not os.path.exists(verify):
            raise ValueError(f"verify={verify!r}: no such CA bundle file or directory")
        if os.path.isdir(verify):
            return ssl.create_default_context(capath=verify)
        return ssl.create_default_context(cafile=verify)
    return ssl.create_default_context()


_PROXY_VARIABLES = tuple(
    name for base in ("http_proxy", "https_proxy", "all_proxy", "no_proxy") for name in (base, base.upper())
)


# One encoder: json.dumps with any non-default argument builds a new one per call.
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _proxy_environment() -> Tuple[Optional[str], ...]:
    """The proxy variables as they are now, read on every call as urllib reads them for a new opener."""
    return tuple(map(os.environ.get, _PROXY_VARIABLES))


def _opener(verify: Union[bool, str]) -> Tuple[urllib.request.OpenerDirector, _KeepAliveHandler]:
    """One opener per TLS setting and proxy environment, shared by every model, so connections are reused."""
    key = (verify if isinstance(verify, str) else bool(verify), _proxy_environment())
    found = _OPENERS.get(key)
    if found is not None:
        return found
    with _OPENERS_LOCK:
        found = _OPENERS.get(key)
        if found is None:
            handler = _KeepAliveHandler(_ssl_context(verify))
            # No redirect or error processors: a 3xx or 4xx comes back as a reply for us to map.
            opener = urllib.request.OpenerDirector()
            for part in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), handler):
                opener.add_handler(part)
            found = _OPENERS[key] = (opener, handler)
    return found


def close_connections(base_url: Optional[str] = None) -> None:
    """Close the idle keep-alive connections this module holds: every one, or only those to one server
    (``close_connections("http://gpustack:9009")``; through a proxy's tunnel too, not a plain proxy's,
    which other servers share)."""
    host = urllib.parse.unquote(urllib.parse.urlsplit(_server_root(base_url)).netloc) if base_url else None
    with _OPENERS_LOCK:
        handlers = [handler for _, handler in _OPENERS.values()]
    for handler in handlers:
        handler.pool.close(host)


# Transport: server-sent events ###############################################
# The rules are the WHATWG event-stream algorithm:
# https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation


class _SSETooLarge(Exception):
    pass


class _SSELines:
    """Bytes in, whole lines out (without their ending); no I/O, no event rules.

    Lines end in ``\\n``, ``\\r\\n`` or ``\\r``. A ``\\r`` at the end of a block may be the first
    half of ``\\r\\n``, so a ``\\n`` opening the next block is skipped. An unfinished line is
    held as a list of pieces, each counted once, so a long line arriving in many small reads
    costs its length, not its length squared.
    """

    __slots__ = ("_held", "_held_bytes", "_after_cr")

    def __init__(self) -> None:
        self._held: List[bytes] = []
        self._held_bytes = 0
        self._after_cr = False

    def feed(self, block: bytes) -> List[bytes]:
        if self._after_cr and block[:1] == b"\n":
            block = block[1:]
        self._after_cr = False
        if not block:
            return []
        lines = block.splitlines(True)
        unfinished = lines.pop() if not lines[-1].endswith((b"\n", b"\r")) else None
        if lines:
            self._after_cr = lines[-1].endswith(b"\r") and unfinished is None
            if self._held:
                lines[0] = b"".join(self._held) + lines[0]
                self._held, self._held_bytes = [], 0
        if unfinished is not None:
            self._held.append(unfinished)
            self._held_bytes += len(unfinished)
            if self._held_bytes > MAX_SSE_LINE_BYTES:
                raise _SSETooLarge(f"a line longer than {MAX_SSE_LINE_BYTES} bytes without a line end")
        return [line.rstrip(b"\r\n") for line in lines]

    def close(self) -> List[bytes]:
        """At end of stream, a last line without its ending still counts."""
        held, self._held, self._held_bytes = self._held, [], 0
        return [b"".join(held)] if held else []


class _SSEDecoder:
    """Bytes in, ``(event type, data)`` out, one event as soon as its closing blank line arrives.

    Comment lines are ignored, several ``data:`` lines are joined with ``\\n``, events without
    data are skipped. Tolerated gateway bug: a bare ``{...}`` line is an event of its own.
    Caps: one line (``_SSELines``), one event's data, and the bytes of complete lines in a row
    that carry no data (comments, empty events), which is a stream that says nothing.
    """

    __slots__ = ("_lines", "_data", "_size", "_event", "_silent", "last_event_id", "retry")

    def __init__(self) -> None:
        self._lines = _SSELines()
        self._data: List[str] = []
        self._size = 0
        self._event = ""
        self._silent = 0
        self.last_event_id = ""
        self.retry: Optional[int] = None

    def feed(self, block: bytes) -> List[Tuple[str, str]]:
        return self._decode(self._lines.feed(block))

    def close(self) -> List[Tuple[str, str]]:
        """At end of stream: a last unterminated line counts; an event without its blank line does not."""
        return self._decode(self._lines.close())

    def _decode(self, lines: List[bytes]) -> List[Tuple[str, str]]:
        events: List[Tuple[str, str]] = []
        for raw in lines:
            event = self._line(raw.decode("utf-8", "replace"), len(raw))
            if event is not None:
                events.append(event)
        return events

    def _line(self, line: str, size: int) -> Optional[Tuple[str, str]]:
        if line[:1] == "{" and not self._data:
            self._silent = 0
            return (self._event, line)
        name, _, value = line.partition(":")
        if name == "data" and line:
            if value[:1] == " ":
                value = value[1:]
            self._silent = 0
            self._size += len(value)
            if self._size > MAX_SSE_EVENT_BYTES:
                raise _SSETooLarge(f"an event larger than {MAX_SSE_EVENT_BYTES} bytes")
            self._data.append(value)
            return None
        self._silent += size + 1
        if self._silent > MAX_SSE_BYTES_WITHOUT_DATA:
            raise _SSETooLarge(f"more than {MAX_SSE_BYTES_WITHOUT_DATA} bytes of comments and empty events without any data")
        if not line:
            return self._dispatch()
        if value[:1] == " ":
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isdigit():
                self.retry = int(value)
        return None

    def _dispatch(self) -> Optional[Tuple[str, str]]:
        data, event = self._data, self._event
        self._data, self._event, self._size = [], "", 0
        if not data:
            return None
        return (event, "\n".join(data))


# Transport: the call, its retries, its answer ################################


class _Malformed(Exception):
    """Part of a 2xx answer is not what the endpoint promises; ``_Reading`` reports it."""


# What reading a server's JSON raises when a field has the wrong shape (a string for a list, ...).
_SHAPE_ERRORS = (_Malformed, AttributeError, TypeError, ValueError, KeyError, IndexError, struct.error)


class _Reading:
    """``with transport.reading(answer):`` a broken answer shape becomes the one malformed-answer error,
    never a raw AttributeError or binascii.Error from deep in the parsing."""

    __slots__ = ("_transport", "_answer")

    def __init__(self, transport: "_Transport", answer: Any) -> None:
        self._transport = transport
        self._answer = answer

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is not None and issubclass(kind, _SHAPE_ERRORS):
            problem = str(exc) if kind is _Malformed else f"a part this client cannot read ({kind.__name__}: {exc})"
            raise self._transport.malformed(problem, self._answer) from None


TransportT = TypeVar("TransportT", bound="_Transport")


class _Transport:
    """Every HTTP call of the module: request, status check, retry, error mapping, SSE."""

    __slots__ = ("settings", "_headers", "_origin")

    def __init__(self, settings: _Settings) -> None:
        self.settings = settings
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        for name, value in settings.headers or ():
            headers[name] = value
        # Built once, for plain and for streamed answers; urllib's Request copies them.
        self._headers = {False: {**headers, "Accept": "application/json"}, True: {**headers, "Accept": "text/event-stream"}}
        # Given to each Request, which would otherwise parse the URL again to learn it (for cookies, unused here).
        self._origin = urllib.request.Request(settings.root).origin_req_host

    def url(self, path: str) -> str:
        """``chat/completions`` is under /v1; a path from the root (``/v2/models``) is taken as it is."""
        return f"{self.settings.root}{path}" if path[:1] == "/" else f"{self.settings.root}/v1/{path}"

    def with_timeouts(self: "TransportT", timeout: Optional[float], connect_timeout: Optional[float] = None,
                      max_retries: Optional[int] = None) -> "TransportT":
        """This transport for one call with other limits (Agno's page store gives each embedding a deadline)."""
        settings = self.settings
        return type(self)(
            dataclasses.replace(
                settings,
                timeout=_seconds("timeout", timeout, settings.timeout),
                connect_timeout=_seconds("connect_timeout", connect_timeout, settings.connect_timeout),
                max_retries=settings.max_retries if max_retries is None else max_retries,
            )
        )

    def _encode(self, body: Optional[Dict[str, Any]]) -> Optional[bytes]:
        if body is None:
            return None
        try:
            return _JSON.encode(body).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise ValueError(f"Request body for GPUStack cannot be sent as JSON: {exc}") from None

    def open(self, method: str, path: str, body: Optional[Dict[str, Any]], stream: bool = False,
             form: Optional[Tuple[bytes, str]] = None, extra: Optional[Dict[str, str]] = None) -> _Reply:
        """Send one request, retrying what can succeed later; return a 2xx reply or raise.

        ``form`` is a multipart body and its content type, built once so a retry sends the same bytes;
        ``extra`` are headers of this request only.
        """
        settings = self.settings
        url = self.url(path)
        data = self._encode(body) if form is None else form[0]
        headers = self._headers[stream] if form is None else {**self._headers[stream], "Content-Type": form[1]}
        if extra:
            headers = {**headers, **extra}
        opener, _ = _opener(settings.verify)
        guard = _GUARD.get()
        attempt = 0
        while True:
            request = urllib.request.Request(url, data=data, headers=headers, origin_req_host=self._origin, method=method)
            request.connect_timeout = settings.connect_timeout  # type: ignore[attr-defined]  # read by _KeepAliveHandler
            headers_seen: Any = None
            try:
                reply = opener.open(request, timeout=settings.timeout)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                failure = _connection_failure(exc, method, url, settings)
            else:
                if 200 <= reply.status < 300:
                    return reply
                try:
                    raw = reply.read(ERROR_BODY_BYTES)
                except (OSError, http.client.HTTPException):
                    raw = b""
                reply.close()
                headers_seen = reply.headers
                failure = _http_failure(reply.status, reply.reason, reply.headers, raw, method, url, settings,
                                        path.split("?")[0])
            delay = _retry_delay(attempt, headers_seen) if _should_retry(failure, headers_seen) else None
            if attempt >= settings.max_retries or delay is None:
                raise _failed(failure, settings)
            attempt += 1
            from agno.utils.log import log_warning

            log_warning(_redact(f"GPUStack: {failure.message()} Retrying in {delay:.2f}s ({attempt}/{settings.max_retries}).",
                                settings.api_key))
            if guard is not None:
                guard.sleep(delay)
            else:
                time.sleep(delay)

    def call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None, expect: str = "",
             form: Optional[Tuple[bytes, str]] = None, extra: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """A whole JSON request (or multipart ``form``) and answer: an object whose ``expect`` field is a list.

        An error object inside a 200 (some gateways send one) raises like any other error.
        """
        answer = self.answer(method, path, body, form, extra)
        _raise_if_error_event(answer, "", self.settings)
        if expect and not isinstance(answer.get(expect), list):
            raise self.malformed(f"no {expect!r} list", answer)
        return answer

    def answer(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
               form: Optional[Tuple[bytes, str]] = None, extra: Optional[Dict[str, str]] = None) -> Any:
        """The whole answer as JSON of any shape (``/healthz`` says just ``"ok"``)."""
        reply = self.open(method, path, body, form=form, extra=extra)
        return self._decode(self.whole(reply, method, path), reply, self.url(path))

    def whole(self, reply: _Reply, method: str, path: str) -> bytes:
        """The whole body of a reply, up to MAX_ANSWER_BYTES: a larger answer is an error, not a memory spike."""
        try:
            raw = reply.read_capped(MAX_ANSWER_BYTES)
        except (OSError, http.client.HTTPException) as exc:
            reply.close()
            raise self._lost(exc, method, self.url(path)) from None
        if raw is None:
            reply.close()
            raise _provider_error(f"GPUStack's answer to {method} {_redact_url(self.url(path))} is larger than "
                                  f"{_size_text(MAX_ANSWER_BYTES)}; it was not read.", 502, self.settings)
        reply.finish()
        return raw

    def malformed(self, problem: str, answer: Any) -> ModelProviderError:
        """The one error for a 2xx answer that is not what the endpoint promises."""
        return _provider_error(f"GPUStack's answer has {problem}: {str(answer)[:ERROR_SNIPPET_CHARS]}", 502, self.settings)

    def reading(self, answer: Any) -> _Reading:
        return _Reading(self, answer)

    def _decode(self, raw: bytes, reply: _Reply, url: str) -> Any:
        try:
            if not raw or raw.isspace():  # not raw.strip(): that would copy a large answer
                raise ValueError("empty body")
            return json.loads(raw)
        except ValueError:
            content_type = reply.headers.get("Content-Type", "")
            words, _ = _error_text(raw, content_type)
            raise _provider_error(
                f"GPUStack answered HTTP {reply.status} from {_redact_url(url)} with a body that is not JSON "
                f"(Content-Type {content_type or 'missing'}): {words or 'empty body'}. "
                "Is base_url the GPUStack server, not a web page or a proxy's login?",
                502,
                self.settings,
            ) from None

    def _lost(self, exc: BaseException, method: str, url: str) -> ModelProviderError:
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return _failed(_connection_failure(exc, method, url, self.settings), self.settings)
        return _provider_error(
            f"Connection to {_redact_url(url)} broke while reading the answer ({exc!r}); the answer is incomplete.",
            502,
            self.settings,
        )

    def stream(self, path: str, body: Dict[str, Any], extra: Optional[Dict[str, str]] = None
               ) -> Generator[Dict[str, Any], None, None]:
        """The JSON objects of an event stream, each as soon as its line arrives.

        Raises ModelProviderError for an error event, a data line that is not JSON, and a
        stream that ends before ``[DONE]`` and before any ``finish_reason`` (a cut connection).
        Closing the generator early closes the connection, so GPUStack stops generating.
        """
        reply = self.open("POST", path, body, stream=True, extra=extra)
        url = self.url(path)
        clean = False
        try:
            content_type = reply.headers.get("Content-Type", "").lower()
            if "json" in content_type:
                # A gateway that ignored stream=true: one whole answer instead of events.
                whole = self._decode(self.whole(reply, "POST", path), reply, url)
                _raise_if_error_event(whole, "", self.settings)
                clean = True
                yield whole
                return
            if "html" in content_type:
                words, _ = _error_text(reply.read(ERROR_BODY_BYTES), content_type)
                raise _provider_error(
                    f"GPUStack answered a stream request from {_redact_url(url)} with {content_type}, not an event "
                    f"stream: {words}. Is base_url the GPUStack server?",
                    502,
                    self.settings,
                )
            finished = False
            decoder = _SSEDecoder()
            for event_type, data in self._events(reply, decoder, url):
                if data == "[DONE]":
                    clean = reply.drain()
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise _provider_error(
                        f"GPUStack sent a stream event that is not JSON: {data[:ERROR_SNIPPET_CHARS]!r}",
                        502,
                        self.settings,
                    ) from None
                _raise_if_error_event(chunk, event_type, self.settings)
                if not finished and _has_finish_reason(chunk):
                    finished = True
                yield chunk
            if not finished:
                raise _provider_error(
                    f"The stream from {_redact_url(url)} ended before [DONE] and before any finish_reason: "
                    "the connection was cut and the answer is incomplete.",
                    502,
                    self.settings,
                )
            clean = True
        finally:
            if clean:
                reply.finish()
            else:
                reply.close()

    def _events(self, reply: _Reply, decoder: "_SSEDecoder", url: str) -> Iterator[Tuple[str, str]]:
        try:
            for block in reply.blocks():
                yield from decoder.feed(block)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise self._lost(exc, "POST", url) from None
        except _SSETooLarge as exc:
            raise _provider_error(f"GPUStack's event stream is malformed: {exc}", 502, self.settings) from None
        yield from decoder.close()


def _raise_if_error_event(chunk: Any, event_type: str, settings: _Settings) -> None:
    """Raise for an error reported inside a stream: a top-level ``error`` or an ``event: error``."""
    if not isinstance(chunk, dict):
        raise _provider_error(f"GPUStack sent JSON that is not an object: {chunk!r:.200}", 502, settings)
    if "error" in chunk and chunk["error"] or event_type == "error":
        raw = json.dumps(chunk).encode()
        words, code = _error_text(raw)
        error = chunk.get("error")
        status = 500
        for candidate in (error.get("code") if isinstance(error, dict) else None, chunk.get("code")):
            if isinstance(candidate, int) and 400 <= candidate < 600:
                status = candidate
                break
        raise _failed(_server_failure(status, f"Error inside the stream: {words}", code, "in an answer", settings, raw.decode()),
                      settings)


def _has_finish_reason(chunk: Dict[str, Any]) -> bool:
    for choice in chunk.get("choices") or ():
        if isinstance(choice, dict) and choice.get("finish_reason"):
            return True
    return False


# Transport: async ############################################################


def _max_workers() -> int:
    raw = os.getenv(MAX_WORKERS_ENV)
    try:
        value = int(raw) if raw else DEFAULT_MAX_WORKERS
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"{MAX_WORKERS_ENV} must be a whole number >= 1, got {raw!r}")
    return value


class _ElasticExecutor(concurrent.futures.Executor):
    """Threads for blocking calls that grow with demand, up to a cap, and exit when idle.

    The event loop's default executor holds min(32, cpu + 4) threads: on a 2-core machine
    the 7th concurrent call would wait for one of the first six. Here every call that finds
    no idle thread gets a new one while there are fewer than ``max_workers``; beyond that,
    calls wait in order for a free thread. A thread idle for WORKER_IDLE_SECONDS exits.
    """

    def __init__(self, max_workers: int = DEFAULT_MAX_WORKERS) -> None:
        self.max_workers = max_workers
        self._queue: "collections.deque[Tuple[concurrent.futures.Future, Callable[[], Any]]]" = collections.deque()
        self._lock = threading.Condition(threading.Lock())
        self._idle = 0
        self.threads = 0

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[T]":
        future: concurrent.futures.Future = concurrent.futures.Future()
        call = (lambda: fn(*args, **kwargs)) if kwargs else (lambda: fn(*args))
        item = (future, call)
        with self._lock:
            self._queue.append(item)
            if self._idle >= len(self._queue) or self.threads >= self.max_workers:
                self._lock.notify()
                return future
            self.threads += 1
        try:
            threading.Thread(target=self._work, name="gpustack-worker", daemon=True).start()
        except BaseException:
            self._unstarted(item)
            raise
        return future

    def _unstarted(self, item: Tuple[concurrent.futures.Future, Callable[[], Any]]) -> None:
        """A thread failed to start: its caller is told so, and its call must never run later."""
        with self._lock:
            self.threads -= 1
            try:
                self._queue.remove(item)
            except ValueError:
                return  # another thread took it already; it runs, and the caller sees its result
        item[0].cancel()

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._idle += 1
                    self._lock.wait(WORKER_IDLE_SECONDS)
                    self._idle -= 1
                    if not self._queue:
                        self.threads -= 1
                        return
                future, call = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = call()
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)
            del future, call


_EXECUTOR = _ElasticExecutor(_max_workers())


def _start_clean_after_fork() -> None:
    """In a forked child (gunicorn --preload, Celery prefork): the parent's connections and threads are not ours.

    An inherited idle connection would be shared with the parent, each reading the other's
    answers; the executor would count threads that don't exist here and never run a call.
    """
    global _OPENERS_LOCK, _EXECUTOR
    _OPENERS_LOCK = threading.Lock()
    for _, handler in list(_OPENERS.values()):
        handler.pool.forget()
    _OPENERS.clear()
    _EXECUTOR = _ElasticExecutor(_EXECUTOR.max_workers)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_start_clean_after_fork)


async def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call in a worker thread; if the awaiting task is cancelled, tear its request down."""
    guard = _CallGuard()
    context = contextvars.copy_context()

    def run() -> T:
        _GUARD.set(guard)
        return fn(*args, **kwargs)

    future = _EXECUTOR.submit(context.run, run)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        guard.abort()
        raise


async def _iterate_in_thread(make: Callable[[], Iterator[T]]) -> AsyncGenerator[T, None]:
    """An async iterator over a blocking iterator that a worker thread drives.

    The thread runs ahead by at most ASYNC_STREAM_BACKLOG items and hands them over in
    batches, waking the event loop only when the consumer waits. Closing the iterator, or the
    end of the task that consumes it, aborts the request, which ends the thread: a task
    cancelled while it awaits something else (Agno handling a chunk) leaves this generator
    suspended until the garbage collector finds it, and GPUStack would generate until then.
    """
    loop = asyncio.get_running_loop()
    guard = _CallGuard()
    items: "collections.deque[Any]" = collections.deque()
    room = threading.Condition(threading.Lock())
    state: Dict[str, Any] = {"waiter": None, "closed": False}
    _END = object()

    def wake(waiter: "asyncio.Future[None]") -> None:
        if not waiter.done():
            waiter.set_result(None)

    def hand_over(item: Any) -> None:
        with room:
            while len(items) >= ASYNC_STREAM_BACKLOG and not state["closed"]:
                room.wait(0.5)
            if state["closed"]:
                raise _Aborted()
            items.append(item)
            waiter, state["waiter"] = state["waiter"], None
        if waiter is not None:
            loop.call_soon_threadsafe(wake, waiter)

    def produce() -> None:
        _GUARD.set(guard)
        iterator: Optional[Iterator[T]] = None
        try:
            iterator = make()
            for item in iterator:
                hand_over(item)
            hand_over(_END)
        except _Aborted:
            pass
        except BaseException as exc:
            try:
                hand_over(_Raised(exc))
            except _Aborted:
                pass
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    def stop(*_: Any) -> None:
        with room:
            state["closed"] = True
            room.notify_all()
        guard.abort()

    consumer = asyncio.current_task()
    if consumer is not None:
        consumer.add_done_callback(stop)
    context = contextvars.copy_context()
    _EXECUTOR.submit(context.run, produce)
    try:
        while True:
            with room:
                batch = list(items)
                items.clear()
                if not batch:
                    waiter = state["waiter"] = loop.create_future()
                else:
                    room.notify()
            if not batch:
                await waiter
                continue
            for item in batch:
                if item is _END:
                    return
                if isinstance(item, _Raised):
                    raise item.error
                yield item
    finally:
        if consumer is not None:
            consumer.remove_done_callback(stop)
        stop()


class _Raised:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


# The deployment ##############################################################
# What the module learns about a server and its models: which models run, under which categories,
# each one's meta (context window, voices, ...), how its server counts tokens, and what GPUStack's
# management API says of a model that isn't running. Learned lazily: after a call fails, when asked
# (list_models, doctor), and once per model where a call needs it (a window for max_tokens or
# truncate=True, a speech model's voices). Cached per server (and key: what a key may see differs)
# for DEPLOYMENT_TTL seconds; each lookup bounded in time and never retried. A lookup that fails
# tells nothing: the call's own error stays as it was.

DEPLOYMENT_TTL = 10.0  # seconds a lookup's answer is taken as still true
LOOKUP_SECONDS = 2.0  # what explaining a failed call may add to it, at most
WINDOW_RETRY_SECONDS = 300.0  # a window lookup that failed is asked again after this long
MAX_DEPLOYMENTS = 64  # servers (and keys) whose facts are kept; the least recently used go
MODEL_CATEGORIES = ("llm", "embedding", "image", "reranker", "speech_to_text", "text_to_speech", "unknown")
_CLASS_FOR = {"llm": "GPUStackChat", "embedding": "GPUStackEmbeddings", "reranker": "GPUStackRerank"}


# Token counts. Without tiktoken (no Agno dependency) Agno estimates len(text) // 4, a third of the real count for
# Chinese. The estimate here counts a CJK character as a token and four other characters as one, then each model's
# server corrects it: every answer reports the prompt's tokens (usage.prompt_tokens) for a request whose estimate is
# known, so a model's counts converge on its tokenizer's, at no request's cost.

_CJK = re.compile(r"[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]")
MESSAGE_OVERHEAD_TOKENS = 4  # a chat template's role markers around each message
CALIBRATION_SAMPLES = 3  # the answers a model's correction is taken from: the latest ones


def _text_tokens(text: str) -> int:
    cjk = len(_CJK.findall(text))
    return cjk + (len(text) - cjk + 3) // 4


def _message_text(message: Any) -> str:
    """The text of a message that a chat template puts in the prompt, as Agno's own count gathers it."""
    if isinstance(message, dict):
        content = message.get("content")
        return content if isinstance(content, str) else json.dumps(content, default=str) if content else ""
    parts: List[str] = []
    content = message.get_content(use_compressed_content=True)
    if isinstance(content, list):
        parts.extend(item.get("text", "") if isinstance(item, dict) and item.get("type") == "text" else
                     item if isinstance(item, str) else "" for item in content)
    elif content:
        parts.append(content if isinstance(content, str) else str(content))
    for call in message.tool_calls or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            parts.append(str(call["function"].get("arguments", "")))
    parts.extend(text for text in (message.tool_call_id, message.reasoning_content, message.name) if text)
    return " ".join(parts)


def _media_tokens(message: Any) -> int:
    """Images, audio and video counted apart, as Agno counts them (the server's count for them is its own)."""
    if isinstance(message, dict) or not (message.images or message.audio or message.videos):
        return 0
    from agno.utils.tokens import count_audio_tokens, count_image_tokens, count_video_tokens

    return (sum(count_image_tokens(image) for image in message.images or ())
            + sum(count_audio_tokens(audio) for audio in message.audio or ())
            + sum(count_video_tokens(video) for video in message.videos or ()))


def _definition_text(item: Any) -> str:
    """A tool definition or an output schema as the JSON a chat template renders."""
    if hasattr(item, "to_dict"):
        item = item.to_dict()
    elif isinstance(item, type) and hasattr(item, "model_json_schema"):
        item = item.model_json_schema()
    return json.dumps(item, default=str)


def _estimate(messages: Sequence[Any], tools: Optional[Sequence[Any]], schema: Any) -> Tuple[int, int]:
    """(text tokens, media tokens) of a request, estimated here: the text part is what a server corrects."""
    text = sum(_text_tokens(_message_text(message)) + MESSAGE_OVERHEAD_TOKENS for message in messages)
    text += sum(_text_tokens(_definition_text(tool)) for tool in tools or ())
    if schema is not None:
        text += _text_tokens(_definition_text(schema))
    return text, sum(_media_tokens(message) for message in messages)


class _TokenCalibration:
    """How a model's server counts against this module's estimate, from the usage of its latest answers.

    An answer is recorded as it comes (its messages, not yet estimated: that costs a pass over the history,
    paid only when a count is asked for); ``factor()`` estimates what is pending and divides what the server
    counted by what was estimated, over the last CALIBRATION_SAMPLES answers.
    """

    def __init__(self) -> None:
        self._pending: "collections.deque[Tuple[Tuple[Any, ...], Any, Any, int]]" = collections.deque(maxlen=CALIBRATION_SAMPLES)
        self._samples: "collections.deque[Tuple[int, int]]" = collections.deque(maxlen=CALIBRATION_SAMPLES)
        self._lock = threading.Lock()

    def record(self, messages: Sequence[Any], tools: Any, schema: Any, prompt_tokens: int) -> None:
        if prompt_tokens > 0:
            with self._lock:
                self._pending.append((tuple(messages), tools, schema, prompt_tokens))

    def factor(self) -> Optional[float]:
        """Server tokens per estimated token, or None before any answer told."""
        with self._lock:
            pending, self._pending = list(self._pending), collections.deque(maxlen=CALIBRATION_SAMPLES)
        for messages, tools, schema, counted in pending:
            text, media = _estimate(messages, tools, schema)
            if text > 0 and counted > media:
                with self._lock:
                    self._samples.append((text, counted - media))
        with self._lock:
            estimated = sum(text for text, _ in self._samples)
            return sum(counted for _, counted in self._samples) / estimated if estimated else None


class _Deployment:
    """One server as one key sees it: ``_deployment(settings).models(with_meta=True)``."""

    def __init__(self, settings: _Settings) -> None:
        self.settings = dataclasses.replace(settings, max_retries=0, model_name="GPUStack lookup", model_id=None)
        self._answers: Dict[str, Tuple[float, Any]] = {}  # by path: (when, the list or the error it gave)
        self._windows: Dict[str, Tuple[Optional[int], float]] = {}  # by model: (window, 0 or None; when asked)
        self._window_lock = threading.Lock()
        self._overflows: Dict[str, int] = {}  # by model: the window its first context-window error named
        self._calibrations: Dict[str, _TokenCalibration] = {}  # by model: how its server counts tokens
        self._lock = threading.Lock()

    def ask(self, path: str, expect: str, seconds: float = LOOKUP_SECONDS, fresh: bool = False,
            connect_timeout: Optional[float] = None) -> List[Any]:
        """The ``expect`` list of a GET, from the cache while it is fresh; one request within ``seconds`` otherwise.
        A failure is kept as long as an answer, so a server that can't tell costs one lookup per DEPLOYMENT_TTL."""
        with self._lock:
            known = self._answers.get(path)
        if known is not None and not fresh and time.monotonic() - known[0] < DEPLOYMENT_TTL:
            if isinstance(known[1], ModelProviderError):  # a new error each time: a raised one grows its traceback
                raise _provider_error(known[1].message, known[1].status_code, self.settings, type(known[1]),
                                      getattr(known[1], "failure", None))
            return known[1]
        seconds = max(0.1, seconds)
        connect = min(seconds, connect_timeout or self.settings.connect_timeout)
        settings = dataclasses.replace(self.settings, timeout=seconds, connect_timeout=connect)
        try:
            items: Any = _Transport(settings).call("GET", path, expect=expect)[expect]
        except ModelProviderError as error:
            if seconds < LOOKUP_SECONDS and _no_answer(error):
                raise  # a budget cut short tells nothing of the server: not kept
            items = error
        with self._lock:
            self._answers[path] = (time.monotonic(), items)
        if isinstance(items, ModelProviderError):
            raise items
        return items

    def models(self, categories: Sequence[str] = (), with_meta: bool = False, seconds: float = LOOKUP_SECONDS,
               fresh: bool = False, connect_timeout: Optional[float] = None) -> List[Dict[str, Any]]:
        """GPUStack's items for the running models (of these categories), with their ``meta`` when asked."""
        query = [("categories", category) for category in categories] + ([("with_meta", "true")] if with_meta else [])
        path = "models" + ("?" + urllib.parse.urlencode(query) if query else "")
        items = self.ask(path, "data", seconds, fresh, connect_timeout)
        return [item for item in items if isinstance(item, dict) and isinstance(item.get("id"), str)]

    def running(self, category: Optional[str] = None, seconds: float = LOOKUP_SECONDS) -> List[str]:
        return [item["id"] for item in self.models([category] if category else (), seconds=seconds)]

    def in_other_case(self, model: str) -> Optional[str]:
        """The one running model whose name is ``model``'s in another case, else None (a lookup that fails too)."""
        try:
            same = [name for name in self.running() if name.lower() == model.lower() and name != model]
        except ModelProviderError:
            return None
        return same[0] if len(same) == 1 else None

    def categories(self, seconds: float = LOOKUP_SECONDS, fresh: bool = False,
                   connect_timeout: Optional[float] = None) -> Dict[str, List[str]]:
        """Each running model's categories, asked one category at a time (GPUStack's items don't carry them)."""
        deadline = time.monotonic() + seconds
        found: Dict[str, List[str]] = {}
        for category in MODEL_CATEGORIES:
            for item in self.models([category], seconds=deadline - time.monotonic(), fresh=fresh,
                                    connect_timeout=connect_timeout):
                found.setdefault(item["id"], []).append(category)
        return found

    def meta(self, model: str, seconds: float = LOOKUP_SECONDS) -> Optional[Dict[str, Any]]:
        """A running model's ``meta`` (context window, voices, ...): empty when GPUStack gives none, None when the
        model is not among the running ones (yet)."""
        for item in self.models(with_meta=True, seconds=seconds):
            if item["id"] == model:
                return item["meta"] if isinstance(item.get("meta"), dict) else {}
        return None

    def voices(self, model: str, seconds: float = LOOKUP_SECONDS) -> List[str]:
        return [str(voice) for voice in (self.meta(model, seconds) or {}).get("voices") or ()]

    def window(self, model: str) -> Optional[int]:
        """A model's context window in tokens: what its meta names, else what its first context-window error
        named, else None. Learned once: a meta without one is kept as none; a lookup that fails is asked
        again only after WINDOW_RETRY_SECONDS. Never raises."""
        known = self._windows.get(model)
        if known is None or (known[0] is None and time.monotonic() - known[1] >= WINDOW_RETRY_SECONDS):
            with self._window_lock:  # one thread asks; those that waited find its answer in the lookup cache
                try:
                    meta = self.meta(model)
                except ModelProviderError:
                    meta = None
                # 0: the model is listed and its meta names no window, for good; None: asked again later
                known = (None, time.monotonic()) if meta is None else (_window_of(meta) or 0, 0.0)
                self._windows[model] = known
        with self._lock:
            return known[0] or self._overflows.get(model)

    def calibration(self, model: str) -> _TokenCalibration:
        with self._lock:
            return self._calibrations.setdefault(model, _TokenCalibration())

    # -- what a lookup adds to a failed call ---------------------------------------

    def explain(self, error: ModelProviderError, settings: _Settings) -> None:
        """Put into ``error``'s words what the server can tell about it, when it can: the running models
        whose names are near one it doesn't know, the category of a model asked for another task, or what
        the instances of a model that isn't running are doing."""
        failure: Optional[_Failure] = getattr(error, "failure", None)
        if failure is None or not settings.model_id:
            return
        model = settings.model_id
        if failure.window is not None:
            with self._lock:
                self._overflows.setdefault(model, failure.window)
        if failure.topic is None:
            return
        try:
            if failure.topic == UNKNOWN_MODEL:
                found = self._nearest(model, settings.model_name)
            elif failure.topic == NOT_RUNNING:
                found = self._readiness(model)
            else:
                found = self._category_note(model, settings.model_name, time.monotonic() + LOOKUP_SECONDS)
        except Exception:  # noqa: BLE001  # the lookup is a courtesy; the original error is what matters
            return
        if found:
            error.message = _redact(failure.message(found), settings.api_key)

    def _nearest(self, model: str, wanted: Optional[str]) -> str:
        """``Model 'qwen-3' not found ... Running models like it: qwen3.``, or the category the name is under."""
        deadline = time.monotonic() + LOOKUP_SECONDS
        running = self.running(seconds=LOOKUP_SECONDS)
        if model in running:
            return self._category_note(model, wanted, deadline)
        by_lower = {name.lower(): name for name in running}
        close = difflib.get_close_matches(model.lower(), list(by_lower), n=3, cutoff=0.6)
        if not close:
            return ""
        return (f"Model {model!r} not found on GPUStack at {self.settings.root}. "
                f"Running models like it: {', '.join(by_lower[name] for name in close)}.")

    def _category_note(self, model: str, wanted: Optional[str], deadline: float) -> str:
        """``GPUStack lists 'bge-m3' as a model of category embedding: use GPUStackEmbeddings.``"""
        for category in MODEL_CATEGORIES:
            if time.monotonic() >= deadline:
                return ""
            if model in self.running(category, deadline - time.monotonic()):
                use = _CLASS_FOR.get(category)
                if use is None:
                    return f"GPUStack lists {model!r} as a model of category {category}, which {wanted} can't use."
                return f"GPUStack lists {model!r} as a model of category {category}: use {use}." if use != wanted else ""
        return ""

    def _readiness(self, model: str) -> str:
        """What GPUStack's management API says about a model without a running instance, as far as this key may see."""
        deadline = time.monotonic() + LOOKUP_SECONDS
        query = urllib.parse.quote(model)
        unknown = f"{model} exists but has no running instance."
        try:
            items = self.ask(f"/v2/models?search={query}", "items", deadline - time.monotonic(), fresh=True)
        except ModelProviderError as error:
            if error.status_code != 403:
                return ""
            # Not an admin: /v2/my-models can't tell a stopped model from one still deploying.
            try:
                mine = self.ask(f"/v2/my-models?search={query}", "items", deadline - time.monotonic(), fresh=True)
            except ModelProviderError:
                return unknown
            return unknown if any(isinstance(item, dict) and item.get("name") == model for item in mine) else ""
        found = next((item for item in items if isinstance(item, dict) and item.get("name") == model), None)
        if found is None:
            return ""
        replicas, ready = found.get("replicas"), found.get("ready_replicas") or 0
        if replicas == 0:
            return f"{model} is stopped (0 replicas): start it in GPUStack."
        if not isinstance(replicas, int) or time.monotonic() >= deadline:
            return unknown
        try:
            instances = self.ask(f"/v2/models/{found.get('id')}/instances", "items", deadline - time.monotonic(), fresh=True)
        except ModelProviderError:
            instances = []
        doing = [_instance_state(item) for item in instances if isinstance(item, dict) and item.get("state") != "running"]
        return f"{model} exists but {ready} of {replicas} instances are ready" + (f": {'; '.join(doing)}." if doing else ".")


def _window_of(meta: Dict[str, Any]) -> Optional[int]:
    """The context window a model's ``meta`` names: vLLM's and SGLang's ``max_model_len``, else MindIE's
    ``max_total_tokens``. Never llama.cpp's ``n_ctx_train``: the window it was trained with, not the one it runs."""
    for key in ("max_model_len", "max_total_tokens"):
        value = meta.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _instance_state(instance: Dict[str, Any]) -> str:
    """One instance as the server describes it (states can get stuck: this is a report, not a promise)."""
    name, state, message = instance.get("name") or "an instance", instance.get("state"), instance.get("state_message")
    progress = instance.get("download_progress")
    if state == "downloading" and isinstance(progress, (int, float)):
        return f"{name} is downloading ({progress:g}%)"
    if state == "error":
        return f"{name} is in state error: {message or 'no message'}"
    return f"{name} is {state}" + (f": {message}" if message else "")


_DEPLOYMENTS: "collections.OrderedDict[Tuple[Any, ...], _Deployment]" = collections.OrderedDict()
_DEPLOYMENTS_LOCK = threading.Lock()


def _deployment(settings: _Settings) -> _Deployment:
    """The one ``_Deployment`` of a server and key, shared by every model, list_models, diagnose and the CLI;
    at most MAX_DEPLOYMENTS are kept (per-user keys or per-request headers would grow it without end)."""
    key = (settings.root, settings.api_key, settings.verify, settings.headers)
    with _DEPLOYMENTS_LOCK:
        found = _DEPLOYMENTS.get(key)
        if found is None:
            found = _DEPLOYMENTS[key] = _Deployment(settings)
            while len(_DEPLOYMENTS) > MAX_DEPLOYMENTS:
                _DEPLOYMENTS.popitem(last=False)
        else:
            _DEPLOYMENTS.move_to_end(key)
    return found


def _forget_deployments_after_fork() -> None:
    """In a forked child, a lock a parent thread held at fork time would never be released: start afresh."""
    global _DEPLOYMENTS_LOCK
    _DEPLOYMENTS_LOCK = threading.Lock()
    _DEPLOYMENTS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_deployments_after_fork)


class _Client(_Transport):
    """A model's transport: a failure, once its retries are spent, comes back with what the deployment can
    tell about it. Lookups go through the plain ``_Transport``, so they are never explained themselves."""

    __slots__ = ()

    def open(self, method: str, path: str, body: Optional[Dict[str, Any]], stream: bool = False,
             form: Optional[Tuple[bytes, str]] = None, extra: Optional[Dict[str, str]] = None) -> _Reply:
        try:
            return super().open(method, path, body, stream, form, extra)
        except ModelProviderError as error:
            _deployment(self.settings).explain(error, self.settings)
            raise


# What a model's client is built from, read in one C call: this runs on every call of a model.
_CLIENT_KEY = operator.attrgetter(*(name for name in CLIENT_OPTIONS if name != "headers"), "id")


def _client_of(owner: Any, model_name: str) -> _Client:
    """A model's client, validated and built once; built again only if a client option was changed since."""
    headers = owner.headers
    key = (_CLIENT_KEY(owner), tuple(headers.items()) if headers else None)  # a dict's contents, not its identity
    cached = owner._client_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    client = _Client(owner._client_settings(model_name, owner.id))
    owner._client_cache = (key, client)
    return client


def _taking_learned_names(init: Callable[..., None], kept_in: Dict[str, str], ignored: Dict[str, str]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **fields: Any) -> None:
        for name, field_name in kept_in.items():
            value = fields.pop(name, None)
            if value is not None:
                fields[field_name] = value
        for name in ignored:
            if fields.pop(name, None) is not None:
                _warn_once(f"ignored {name}", f"{type(self).__name__} ignores {name}=: {ignored[name]}.")
        init(self, *args, **fields)

    __init__.takes_learned_names = True  # type: ignore[attr-defined]
    return __init__


@dataclass
class _Windowed:
    """What the dataclass models share past their client options: their start, and ``context_window``
    (``context_window=N`` is kept in ``requested_context_window``; unset, it is learned from the deployment;
    a property, not a field, so copying a model never asks)."""

    requested_context_window: Optional[int] = field(default=None, repr=False)
    # Values that are properties learned from the server when not given: ``cls(name=value)`` fills the field
    # they are kept in. As properties, not fields, they stay out of dataclasses.asdict, replace, == and repr,
    # which must never touch the network.
    _KEPT_IN: ClassVar[Dict[str, str]] = {"context_window": "requested_context_window"}
    # Names other Agno providers take that mean nothing for GPUStack: accepted, so moved code runs, and
    # warned about once, with what to use instead.
    _IGNORED: ClassVar[Dict[str, str]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # @dataclass writes each (sub)class's __init__ after the class exists: it is taught the names here,
        # at the first instance of the class, before Python calls it.
        owner = next(klass for klass in cls.__mro__ if "__init__" in klass.__dict__)  # the __init__ Python will call
        if not getattr(owner.__dict__["__init__"], "takes_learned_names", False):
            fields = {each.name for each in dataclasses.fields(cls)}  # type: ignore[arg-type]
            ignored = {name: why for name, why in cls._IGNORED.items() if name not in fields}  # a subclass's field is its own
            owner.__init__ = _taking_learned_names(owner.__dict__["__init__"], cls._KEPT_IN, ignored)  # type: ignore[misc]
        return super().__new__(cls)

    def _start_client(self) -> None:
        """Every setting checked at construction, not at the first call; the client built once."""
        self.requested_context_window = _checked_count("context_window", self.requested_context_window)
        self._resolve_client_options()  # type: ignore[attr-defined]
        self._client_cache: Optional[Tuple[Any, _Client]] = None
        self._transport()  # type: ignore[attr-defined]

    @property
    def context_window(self) -> Optional[int]:
        """The deployment's context window in tokens: ``model.context_window``. ``context_window=N`` as given, else
        what GPUStack says of the model (``max_model_len``, ``max_total_tokens``), else the limit its first
        context-window error named, else None. Learned once per model and server; a lookup that fails is None."""
        if self.requested_context_window is not None:
            return self.requested_context_window
        return _deployment(self._transport().settings).window(self.id)  # type: ignore[attr-defined]

    @context_window.setter
    def context_window(self, value: Optional[int]) -> None:
        self.requested_context_window = _checked_count("context_window", value)


# The chat model ##############################################################

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool", "model": "assistant"}


class _ThinkSplitter:
    """Moves ``<think>...</think>`` in streamed content to reasoning, also when a tag is cut across chunks."""

    __slots__ = ("inside", "_held", "_strip_next")

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self) -> None:
        self.inside = False
        self._held = ""
        self._strip_next = False

    def feed(self, text: str) -> Tuple[str, str]:
        """(reasoning, content) of this piece; a possible start of a tag is held for the next piece."""
        if self._held:
            text, self._held = self._held + text, ""
        elif "<" not in text and not self.inside:
            return "", self._content(text)
        reasoning: List[str] = []
        content: List[str] = []
        while text:
            tag = self.CLOSE if self.inside else self.OPEN
            at = text.find(tag)
            if at >= 0:
                (reasoning if self.inside else content).append(text[:at])
                text = text[at + len(tag) :]
                self.inside = not self.inside
                self._strip_next = not self.inside
                continue
            held = _partial_tag_at_end(text, tag)
            if held:
                self._held, text = text[-held:], text[:-held]
            (reasoning if self.inside else content).append(text)
            break
        return "".join(reasoning), self._content("".join(content))

    def flush(self) -> Tuple[str, str]:
        held, self._held = self._held, ""
        return (held, "") if self.inside else ("", self._content(held))

    def _content(self, text: str) -> str:
        if self._strip_next and text:
            text = text.lstrip()
            self._strip_next = not text
        return text


def _partial_tag_at_end(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could begin ``tag``."""
    start = text.rfind("<", max(0, len(text) - len(tag) + 1))
    if start >= 0 and tag.startswith(text[start:]):
        return len(text) - start
    return 0


def _split_think(content: str) -> Tuple[Optional[str], str]:
    """Reasoning and answer from a whole ``<think>...</think>answer`` (the opening tag may be in the prompt)."""
    end = content.find("</think>")
    if end < 0:
        return None, content
    start = content.find("<think>")
    reasoning = content[start + len("<think>") : end] if 0 <= start < end else content[:end]
    return reasoning.strip(), content[end + len("</think>") :].strip()


def _usage_metrics(usage: Dict[str, Any]) -> MessageMetrics:
    """Agno metrics from an OpenAI-style ``usage`` object."""
    metrics = MessageMetrics()
    metrics.input_tokens = int(usage.get("prompt_tokens") or 0)
    metrics.output_tokens = int(usage.get("completion_tokens") or 0)
    metrics.total_tokens = int(usage.get("total_tokens") or (metrics.input_tokens + metrics.output_tokens))
    prompt_details = usage.get("prompt_tokens_details") or {}
    if isinstance(prompt_details, dict):
        metrics.cache_read_tokens = int(prompt_details.get("cached_tokens") or 0)
        metrics.audio_input_tokens = int(prompt_details.get("audio_tokens") or 0)
    completion_details = usage.get("completion_tokens_details") or {}
    if isinstance(completion_details, dict):
        metrics.reasoning_tokens = int(completion_details.get("reasoning_tokens") or 0)
        metrics.audio_output_tokens = int(completion_details.get("audio_tokens") or 0)
    metrics.audio_total_tokens = metrics.audio_input_tokens + metrics.audio_output_tokens
    extra = {key: value for key, value in usage.items() if _adds_up(key, value)}
    if extra:  # GPUStack adds time_to_first_token_ms, ...
        metrics.provider_metrics = extra
    return metrics


_KNOWN_USAGE = {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "completion_tokens_details"}
_RATE_WORDS = ("per_second", "_per_", "rate", "ratio", "throughput")


def _adds_up(key: str, value: Any) -> bool:
    """Whether a usage field may go into Agno's ``provider_metrics``, which Agno sums across calls: a count or
    a duration does; a rate (``tokens_per_second``, ``time_per_output_token_ms``) summed would be wrong."""
    if key in _KNOWN_USAGE or isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return not any(word in key for word in _RATE_WORDS)


def _tool_call(raw: Dict[str, Any]) -> Dict[str, Any]:
    """A complete tool call in the shape Agno runs: arguments as a JSON string."""
    function = dict(raw.get("function") or {})
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        function["arguments"] = json.dumps(arguments if arguments is not None else {})
    return {"id": raw.get("id"), "type": raw.get("type") or "function", "function": function}


class ThoughtTooLongError(ModelProviderError):
    """A reasoning model spent its whole output budget thinking and answered nothing: ``except ThoughtTooLongError:``.
    Never retried: the same request would do the same. (Its words avoid the ones Agno takes for a context-window
    error, which would have Agno fold the history for nothing.)"""


_AFFINITY_HEADERS = ("session-id", "x-client-request-id")  # GPUStack's keys, in its order: a user's own wins


def _has_text(value: Any) -> bool:
    return bool(value.strip()) if isinstance(value, str) else bool(value)


def _thinking_off(body: Dict[str, Any]) -> bool:
    kwargs = body.get("chat_template_kwargs")
    return isinstance(kwargs, dict) and kwargs.get("enable_thinking") is False


class _AnswerWatch:
    """What an answer (whole, or a stream piece by piece) said: content, reasoning, tool calls, why it ended.

    With thinking off for the request, reasoning is the answer: some reasoning parsers (vLLM's ``deepseek_r1``)
    put it all in the reasoning field and leave ``content`` empty. ``move()`` takes what the server sent in that
    field (not a ``<think>`` block of the content) as content, from its first words on, until content of the
    server's own arrives; a stream can't take back what it has moved.
    """

    __slots__ = ("thinking_off", "content", "said", "reasoning", "tool_calls", "finish", "output_tokens", "moved")

    def __init__(self, thinking_off: bool) -> None:
        self.thinking_off = thinking_off
        self.content = self.said = self.reasoning = self.tool_calls = self.moved = False
        self.finish: Optional[str] = None
        self.output_tokens = 0

    def move(self, piece: ModelResponse) -> None:
        """With thinking off, the server's reasoning field is the answer (call before ``<think>`` is split off)."""
        if _has_text(piece.content):
            self.said = True  # content from the server itself: from then on, reasoning stays reasoning
        elif self.thinking_off and not self.said and piece.reasoning_content and (self.moved or _has_text(piece.reasoning_content)):
            piece.content, piece.reasoning_content = (piece.content or "") + piece.reasoning_content, None
            self.moved = True

    def see(self, piece: ModelResponse) -> None:
        self.content = self.content or _has_text(piece.content)
        self.reasoning = self.reasoning or _has_text(piece.reasoning_content)
        self.tool_calls = self.tool_calls or bool(piece.tool_calls)
        self.finish = (piece.provider_data or {}).get("finish_reason") or self.finish
        if piece.response_usage is not None:
            self.output_tokens = piece.response_usage.output_tokens or self.output_tokens


# Tool calls a model writes as text when its deployment has no tool-call parser, by format: the markers that open
# them, and the parser each backend needs (vLLM's, SGLang's).
_CALL_MARKERS = ("<tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "{")
_PARSERS = {"Hermes": ("hermes", "qwen25"), "Llama 3": ("llama3_json", "llama3"), "Mistral": ("mistral", "mistral")}
_HERMES_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def _text_tool_calls(content: str, offered: "set") -> Optional[Tuple[List[Dict[str, Any]], str]]:
    """(tool calls, format) when ``content`` is, but for whitespace, nothing but tool calls written as text:
    Hermes/Qwen ``<tool_call>{...}</tool_call>`` (one or more), Llama 3 ``<|python_tag|>{...}`` or the bare object,
    Mistral ``[TOOL_CALLS][{...}, ...]``. Strict: valid JSON, a name among the tools offered, arguments that are an
    object; anything else around the calls (prose, a quote, a code fence) and they are not calls but text."""
    text = content.strip()
    if text.startswith("<tool_call>"):
        if _HERMES_CALL.sub("", text).strip():
            return None
        found, parser = [_json_or_none(part) for part in _HERMES_CALL.findall(text)], "Hermes"
    elif text.startswith("<|python_tag|>") or text.startswith("{"):
        found, parser = [_json_or_none(text[len("<|python_tag|>"):] if text.startswith("<") else text)], "Llama 3"
    elif text.startswith("[TOOL_CALLS]"):
        listed = _json_or_none(text[len("[TOOL_CALLS]"):])
        found, parser = (listed if isinstance(listed, list) and listed else [None]), "Mistral"
    else:
        return None
    calls = [_call_of(item, offered, parser) for item in found]
    return ([call for call in calls if call is not None], parser) if calls and None not in calls else None


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call_of(item: Any, offered: "set", parser: str) -> Optional[Dict[str, Any]]:
    """One call in Agno's shape, with a fresh id; None when it is not a call of an offered tool. A bare JSON object
    (Llama 3) is a call only when it has nothing but a name and its arguments: else it is an answer in JSON."""
    name = item.get("name") if isinstance(item, dict) else None
    if not isinstance(name, str) or name not in offered:
        return None
    keys = ("arguments", "parameters")
    if parser == "Llama 3" and (not any(key in item for key in keys) or set(item) - {"name", *keys}):
        return None
    arguments: Any = next((item[key] for key in keys if key in item), {})
    if isinstance(arguments, str):
        arguments = _json_or_none(arguments)
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{os.urandom(12).hex()}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}


class _CallHold:
    """In a stream that offered tools, content that may still be tool calls written as text is held back: what
    starts (but for whitespace) with a marker of one, a part of a marker, or ``{``. Anything else streams as it
    comes; once it does, nothing more is held."""

    __slots__ = ("held", "_deciding")

    def __init__(self) -> None:
        self.held = ""
        self._deciding = True

    def feed(self, text: str) -> str:
        if not self._deciding:
            return text
        self.held += text
        lead = self.held.lstrip()
        if lead[:1] == "{":  # a bare call opens with its name: any other JSON answer streams on
            rest = lead[1:].lstrip()
            return "" if rest.startswith('"name"') or '"name"'.startswith(rest) else self.release()
        if not lead or any(lead.startswith(marker) or marker.startswith(lead) for marker in _CALL_MARKERS):
            return ""
        return self.release()

    def release(self) -> str:
        """Nothing more is held; what was held goes out now."""
        self._deciding = False
        held, self.held = self.held, ""
        return held


COMPACTION_RESERVE = 0.05  # of the window: what a count may be off by
COMPACTION_ANSWER_SHARE = 0.125  # of the window: the answer's budget when max_tokens is not set
FIT_MARGIN_TOKENS = 16


def _message_list(messages: Any) -> List[Any]:
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, Iterable):
        raise TypeError("messages must be a list of agno Message objects or {'role': ..., 'content': ...} dicts")
    return messages if isinstance(messages, list) else list(messages)


# The request fields a chat model sends as they are, when set.
_REQUEST_FIELDS = ("temperature", "max_tokens", "max_completion_tokens", "top_p", "top_k", "frequency_penalty",
                   "presence_penalty", "stop", "seed", "logprobs", "top_logprobs", "logit_bias", "reasoning_effort", "user")

# What OpenAIChat, OpenAILike and VLLM take that has no meaning here, and what to do instead.
_OPENAI_ONLY = {
    "organization": "GPUStack has no organizations; the API key says who calls",
    "http_client": "this module has its own HTTP client; set timeout, connect_timeout, max_retries, verify or headers",
    "client_params": "set base_url, api_key, timeout, connect_timeout, max_retries, verify or headers directly",
    "store": "GPUStack keeps no completions",
    "metadata": "GPUStack keeps no completions to tag",
    "service_tier": "GPUStack has no service tiers",
    "modalities": "GPUStack's chat models answer in text; speech is GPUStackTools.speech()",
    "audio": "GPUStack's chat models answer in text; speech is GPUStackTools.speech()",
    "verbosity": "it is a parameter of OpenAI's own models; use request_params for a backend's own parameters",
    "collect_metrics_on_completion": "usage is collected from every answer, streamed or not",
    "client": "this module has its own HTTP client; set timeout, connect_timeout, max_retries, verify or headers",
    "async_client": "this module has its own HTTP client; set timeout, connect_timeout, max_retries, verify or headers",
}


@dataclass
class GPUStackChat(_ClientOptions, _Windowed, Model):
    """A chat model served by GPUStack, for Agno agents.

        from agno.agent import Agent
        from gpustack import GPUStackChat

        agent = Agent(model=GPUStackChat(id="qwen3", base_url="http://gpustack:9009"))
        agent.print_response("Hello!")

    ``base_url`` falls back to ``GPUSTACK_SERVER_URL``, ``api_key`` to ``GPUSTACK_API_KEY``.
    """

    name: str = "GPUStackChat"
    provider: str = "GPUStack"
    supports_native_structured_outputs: bool = True

    # Request parameters: sent only when set
    temperature: Optional[float] = None
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None  # OpenAI's newer name; vLLM takes either
    top_p: Optional[float] = None
    top_k: Optional[int] = None  # vLLM, SGLang and llama.cpp take it at the top of the body
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    logit_bias: Optional[Dict[str, float]] = None
    reasoning_effort: Optional[str] = None  # vLLM passes it to models that take it (gpt-oss)
    user: Optional[str] = None
    enable_thinking: Optional[bool] = None  # Qwen3-style chat_template_kwargs.enable_thinking
    session_affinity: bool = True  # an Agno session's requests carry a digest of its id (GPUStack's replica affinity)
    recover_tool_calls: bool = True  # tool calls a deployment without a tool parser leaves as text become tool calls
    strict_output: bool = True
    request_params: Optional[Dict[str, Any]] = None  # merged into every request body (e.g. a backend's own min_p)
    # Client parameters: base_url, api_key, timeout, connect_timeout, max_retries, verify, headers (_ClientOptions)

    # The names Agno's OpenAILike and VLLM take, for code moved from them
    extra_body: Optional[Dict[str, Any]] = None  # merged into every request body, after request_params
    extra_query: Optional[Dict[str, Any]] = None  # query parameters of every chat request
    default_query: Optional[Dict[str, Any]] = None  # as extra_query; extra_query wins
    extra_headers: Optional[Dict[str, str]] = field(default=None, repr=False)  # every request's; over headers
    default_headers: Optional[Dict[str, str]] = field(default=None, repr=False)  # as headers; headers win
    role_map: Optional[Dict[str, str]] = None  # an Agno role to the role sent, over the defaults

    _IGNORED: ClassVar[Dict[str, str]] = _OPENAI_ONLY
    _named_by_agno = False  # built by Agno from "gpustack:<id>" or a saved config; a plain attribute, not a field

    def __post_init__(self) -> None:
        super().__post_init__()
        self._check_openai_names()
        self._start_client()

    def _check_openai_names(self) -> None:
        """The OpenAI SDK's dictionaries checked now, not at the first call (the header ones with the client)."""
        for name in ("extra_body", "extra_query", "default_query", "role_map"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{name} must be a dict, got {type(value).__name__}")

    def _header_layers(self) -> Tuple[Tuple[str, Any], ...]:
        # Read when the client is built: at construction, and again when a client option (headers too) changes.
        return (("default_headers", self.default_headers), ("headers", self.headers), ("extra_headers", self.extra_headers))

    # -- transport --------------------------------------------------------------

    def _transport(self) -> _Client:
        return _client_of(self, self.name)

    def close(self) -> None:
        """Close the idle connections to this model's server, no other: ``model.close()``."""
        close_connections(self.base_url)

    # -- token counts that match the server, and a compaction sized for its window --

    def count_tokens(self, messages: List[Message], tools: Optional[Sequence[Any]] = None,
                     output_schema: Optional[Any] = None) -> int:
        """The prompt's tokens as this model's server counts them: ``model.count_tokens(messages)``. The local
        estimate, corrected by the usage its server reported for this model's latest answers (no request made)."""
        text, media = _estimate(messages, tools, output_schema)
        factor = self._calibration().factor()
        return round(text * (factor or 1.0)) + media

    async def acount_tokens(self, messages: List[Message], tools: Optional[Sequence[Any]] = None,
                            output_schema: Optional[Any] = None) -> int:
        """``await model.acount_tokens(messages)``: local, as count_tokens()."""
        return self.count_tokens(messages, tools, output_schema)

    def compaction(self, answer_tokens: Optional[int] = None, reserve: float = COMPACTION_RESERVE, **options: Any) -> Any:
        """An Agno ``Compaction`` sized for this deployment: ``Agent(model=m, compaction=m.compaction(), db=...)``.

        It folds the history before a request reaches the window: at the window, less the answer's budget
        (``answer_tokens``, else ``max_tokens``, else a share of the window; at most half of it), less a ``reserve``
        share; counted with this model's own count_tokens; with Agno's overflow recovery as the backstop. Any
        ``Compaction`` option given wins over these. With the window unknown, it says so once and gives Agno's
        reactive compaction.
        """
        from agno.compaction.compaction import Compaction

        window = self.context_window
        if window is None:
            _warn_once(f"window {self.id}", f"GPUStack model {self.id!r}: its context window is not known (GPUStack lists "
                       "no max_model_len for it), so history is folded only after a request is refused as too long. "
                       "Set context_window=N on GPUStackChat to fold before.")
            return Compaction(**{"compact_at_tokens": None, "on_context_overflow": True, **options})
        # A max_tokens above half the window is lowered to fit each request anyway (_fit_max_tokens).
        wanted = answer_tokens or self.max_tokens or self.max_completion_tokens
        answer = min(wanted or int(window * COMPACTION_ANSWER_SHARE), window // 2)
        at = max(1, window - answer - int(window * reserve))
        counted = {} if "token_counter" in options else {"use_model_token_count": True}
        return Compaction(**{"compact_at_tokens": at, "on_context_overflow": True, **counted, **options})

    def _calibration(self) -> _TokenCalibration:
        return _deployment(self._transport().settings).calibration(self.id)

    def _learn_count(self, messages: Sequence[Any], tools: Any, schema: Any, usage: Optional[MessageMetrics]) -> None:
        if usage is not None and usage.input_tokens:
            self._calibration().record(messages, tools, schema, usage.input_tokens)

    def _fit_max_tokens(self, body: Dict[str, Any], messages: Sequence[Any], tools: Any, schema: Any) -> None:
        """Lower a ``max_tokens`` that cannot fit the window beside the prompt, so the request is answered rather
        than refused. Only lowered, never a request held back: a prompt that alone exceeds the window goes as
        it is, and the server decides. The margin is wide until the model's counts are calibrated."""
        asked = {name: body[name] for name in ("max_tokens", "max_completion_tokens")
                 if isinstance(body.get(name), int) and not isinstance(body[name], bool)}
        if not asked:
            return
        window = self.context_window
        if window is None:
            return
        text, media = _estimate(messages, tools, schema)
        factor = self._calibration().factor()
        prompt = round(text * factor * 1.05 if factor else text * 1.5) + media + FIT_MARGIN_TOKENS
        room = window - prompt
        if room < 1:
            return
        for name, wanted in asked.items():  # both, when both are set: backends differ in which one they read
            if wanted <= room:
                continue
            body[name] = room
            _warn_once(f"fit {self.id}", f"GPUStack model {self.id!r} has a context window of {window} tokens: "
                       f"{name}={wanted} cannot fit beside the prompt, so it was lowered (to {room} for this request). "
                       f"A {name} that leaves room for the prompt is sent as it is.")

    def to_dict(self) -> Dict[str, Any]:
        """The model's settings without secrets: ``model.to_dict()``."""
        data = super().to_dict()
        data["base_url"] = _redact_url(self.base_url or "")
        shown = ("timeout", "connect_timeout", "max_retries") + _REQUEST_FIELDS + ("enable_thinking",)
        data.update({name: getattr(self, name) for name in shown if getattr(self, name) is not None})
        return data

    # -- request ----------------------------------------------------------------

    def get_request_params(
        self,
        response_format: Optional[Union[Dict, Type[Any]]] = None,
        tools: Optional[List[Dict[str, Any]]] = None,
        tool_choice: Optional[Union[str, Dict[str, Any]]] = None,
        **_: Any,
    ) -> Dict[str, Any]:
        """The request fields this model sends besides model and messages: ``model.get_request_params()``."""
        params: Dict[str, Any] = {name: value for name in _REQUEST_FIELDS if (value := getattr(self, name)) is not None}
        if response_format is not None:
            params["response_format"] = self._response_format(response_format)
        if tools:
            params["tools"] = [_plain_tool(tool) for tool in tools]
            if tool_choice is not None:
                params["tool_choice"] = tool_choice
        if self.enable_thinking is not None:
            params["chat_template_kwargs"] = {"enable_thinking": self.enable_thinking}
        for extra in (self.request_params, self.extra_body):
            for key, value in (extra or {}).items():
                if isinstance(value, dict) and isinstance(params.get(key), dict):
                    params[key] = {**params[key], **value}
                else:
                    params[key] = value
        return params

    def _path(self, path: str) -> str:
        """An endpoint with the query parameters of ``default_query`` and ``extra_query``."""
        if not (self.extra_query or self.default_query):
            return path
        query = {**(self.default_query or {}), **(self.extra_query or {})}
        return f"{path}?{urllib.parse.urlencode(query, doseq=True)}"

    def _response_format(self, response_format: Any) -> Any:
        if isinstance(response_format, type) and hasattr(response_format, "model_json_schema"):
            from agno.utils.models.schema_utils import get_response_schema_for_provider

            return {
                "type": "json_schema",
                "json_schema": {
                    "name": response_format.__name__,
                    "schema": get_response_schema_for_provider(response_format, "openai"),
                    "strict": self.strict_output,
                },
            }
        return response_format

    def _format_message(self, message: Union[Message, Dict[str, Any]], compress_tool_results: bool = False,
                        roles: Dict[str, str] = _ROLES) -> Dict[str, Any]:
        """One message in OpenAI chat format; the system role stays ``system``."""
        if isinstance(message, dict):
            plain = dict(message)
            plain["role"] = roles.get(str(plain.get("role")), plain.get("role"))
            return plain
        content = message.get_content(use_compressed_content=compress_tool_results)
        formatted: Dict[str, Any] = {"role": roles.get(message.role, message.role), "content": content}
        if message.name:
            formatted["name"] = message.name
        if message.tool_call_id:
            formatted["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            formatted["tool_calls"] = message.tool_calls
        media = _media_parts(message)
        if media:
            parts: List[Any] = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
            formatted["content"] = parts + media
        if formatted["content"] is None:
            formatted["content"] = ""
        elif not isinstance(formatted["content"], (str, list)):
            formatted["content"] = json.dumps(formatted["content"], default=str)
        return formatted

    def _body(self, messages: List[Any], stream: bool, compress_tool_results: bool = False, **kwargs: Any) -> Dict[str, Any]:
        """The request body; ``messages`` as _message_list() gave them."""
        if all(isinstance(message, Message) for message in messages):
            # Agno's own step for OpenAI-compatible servers: older sessions kept a turn's tool results in one message.
            messages = normalize_tool_messages(messages)
        roles = {**_ROLES, **self.role_map} if self.role_map else _ROLES
        body: Dict[str, Any] = {
            "model": self.id,
            "messages": [self._format_message(message, compress_tool_results, roles) for message in messages],
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        body.update(self.get_request_params(**kwargs))
        return body

    # -- Agno's four calls --------------------------------------------------------

    def invoke(
        self,
        messages: Sequence[Union[Message, Dict[str, Any]]],
        assistant_message: Optional[Message] = None,
        response_format: Optional[Union[Dict, Type[Any]]] = None,
        tools: Optional[List[Dict[str, Any]]] = None,
        tool_choice: Optional[Union[str, Dict[str, Any]]] = None,
        run_response: Any = None,
        compress_tool_results: bool = False,
        **_: Any,  # Agno's retry-with-guidance path adds keywords of its own
    ) -> ModelResponse:
        """One chat completion: ``model.invoke([Message(role="user", content="Hi")]).content``."""
        return self._invoke(messages, assistant_message, response_format, tools, tool_choice, run_response,
                            compress_tool_results)

    # The four public calls are what a tracer wraps (OpenInference's Agno instrumentor): the async ones run
    # these private bodies, so an async call is one traced call, not one inside another.
    def _invoke(self, messages: Sequence[Union[Message, Dict[str, Any]]], assistant_message: Optional[Message],
                response_format: Any, tools: Optional[List[Dict[str, Any]]], tool_choice: Any, run_response: Any,
                compress_tool_results: bool) -> ModelResponse:
        messages = _message_list(messages)  # checked, and read more than once below: an iterator too
        body = self._body(messages, False, compress_tool_results, response_format=response_format, tools=tools, tool_choice=tool_choice)
        self._fit_max_tokens(body, messages, tools, response_format)
        if assistant_message is not None:
            assistant_message.metrics.start_timer()
        answer = self._chat_call(body, self._affinity(run_response))
        if assistant_message is not None:
            assistant_message.metrics.stop_timer()
        result = self._parse_provider_response(answer, response_format=response_format)
        self._learn_count(messages, tools, response_format, result.response_usage)
        watch = _AnswerWatch(_thinking_off(body))
        message = answer["choices"][0].get("message") or {}
        if message.get("reasoning_content") or message.get("reasoning"):  # the field, not a <think> block
            watch.move(result)
        watch.see(result)
        if self._recoverable(body) and not result.tool_calls and isinstance(result.content, str):
            calls = self._calls_in(result.content, body)
            if calls:
                result.content, result.tool_calls = None, calls
                watch.tool_calls = True
        self._judge(watch, body)
        if tools and not result.tool_calls and isinstance(result.content, str) and "<tool_call>" in result.content:
            self._warn_tool_markup()
        return result

    async def ainvoke(
        self,
        messages: Sequence[Union[Message, Dict[str, Any]]],
        assistant_message: Optional[Message] = None,
        response_format: Optional[Union[Dict, Type[Any]]] = None,
        tools: Optional[List[Dict[str, Any]]] = None,
        tool_choice: Optional[Union[str, Dict[str, Any]]] = None,
        run_response: Any = None,
        compress_tool_results: bool = False,
        **_: Any,  # Agno's retry-with-guidance path adds keywords of its own
    ) -> ModelResponse:
        """``await model.ainvoke(messages)``: invoke() without blocking the event loop."""
        return await _in_thread(
            self._invoke, messages, assistant_message, response_format, tools, tool_choice, run_response, compress_tool_results
        )

    def invoke_stream(
        self,
        messages: Sequence[Union[Message, Dict[str, Any]]],
        assistant_message: Optional[Message] = None,
        response_format: Optional[Union[Dict, Type[Any]]] = None,
        tools: Optional[List[Dict[str, Any]]] = None,
        tool_choice: Optional[Union[str, Dict[str, Any]]] = None,
        run_response: Any = None,
        compress_tool_results: bool = False,
        **_: Any,  # Agno's retry-with-guidance path adds keywords of its own
    ) -> Iterator[ModelResponse]:
        """Stream a chat completion: ``for piece in model.invoke_stream(messages): print(piece.content or "", end="")``."""
        return self._invoke_stream(messages, assistant_message, response_format, tools, tool_choice, run_response,
                                   compress_tool_results)

    def _invoke_stream(self, messages: Sequence[Union[Message, Dict[str, Any]]], assistant_message: Optional[Message],
                       response_format: Any, tools: Optional[List[Dict[str, Any]]], tool_choice: Any, run_response: Any,
                       compress_tool_results: bool) -> Iterator[ModelResponse]:
        messages = _message_list(messages)
        body = self._body(messages, True, compress_tool_results, response_format=response_format, tools=tools, tool_choice=tool_choice)
        self._fit_max_tokens(body, messages, tools, response_format)
        if assistant_message is not None:
            assistant_message.metrics.start_timer()
        think = _ThinkSplitter()
        watch = _AnswerWatch(_thinking_off(body))
        hold = _CallHold() if self._recoverable(body) else None
        recent: Optional[str] = "" if tools else None  # the end of the text streamed so far, to spot markup in it

        def passing(piece: ModelResponse) -> ModelResponse:
            """A piece as it goes out: seen, held back while it may become a call, searched for markup."""
            nonlocal recent
            watch.see(piece)
            if hold is not None and piece.content:
                piece.content = hold.feed(piece.content) or None
            if recent is not None and piece.content:
                recent = self._spot_markup(recent, piece.content)
            return piece

        chunks = self._chat_stream(body, self._affinity(run_response))
        try:
            for chunk in chunks:
                piece = self._parse_provider_response_delta(chunk)
                watch.move(piece)  # before a <think> block is split off: only the server's reasoning field moves
                if piece.content:
                    reasoning, piece.content = think.feed(piece.content)
                    if reasoning:
                        piece.reasoning_content = (piece.reasoning_content or "") + reasoning
                if piece.tool_calls:  # the server parsed the calls: nothing is held from here on
                    recent = None
                    if hold is not None:
                        piece.content, hold = (hold.release() + (piece.content or "")) or None, None
                if piece.response_usage is not None:
                    self._learn_count(messages, tools, response_format, piece.response_usage)
                yield passing(piece)
        finally:
            chunks.close()
        reasoning, content = think.flush()
        if reasoning or content:
            yield passing(ModelResponse(content=content or None, reasoning_content=reasoning or None))
        if hold is not None and hold.held:
            yield self._held_answer(hold.held, body, watch)
        if assistant_message is not None:
            assistant_message.metrics.stop_timer()
        self._judge(watch, body)

    async def ainvoke_stream(
        self,
        messages: Sequence[Union[Message, Dict[str, Any]]],
        assistant_message: Optional[Message] = None,
        response_format: Optional[Union[Dict, Type[Any]]] = None,
        tools: Optional[List[Dict[str, Any]]] = None,
        tool_choice: Optional[Union[str, Dict[str, Any]]] = None,
        run_response: Any = None,
        compress_tool_results: bool = False,
        **_: Any,  # Agno's retry-with-guidance path adds keywords of its own
    ) -> AsyncIterator[ModelResponse]:
        """``async for piece in model.ainvoke_stream(messages): ...``, pieces as they arrive."""
        args = (messages, assistant_message, response_format, tools, tool_choice, run_response, compress_tool_results)
        pieces = _iterate_in_thread(lambda: self._invoke_stream(*args))
        try:
            async for piece in pieces:
                yield piece
        finally:
            await pieces.aclose()  # now, not whenever the garbage collector gets to it

    def _chat_call(self, body: Dict[str, Any], extra: Optional[Dict[str, str]]) -> Dict[str, Any]:
        return self._under_its_name(
            body, lambda: self._transport().call("POST", self._path("chat/completions"), body, expect="choices", extra=extra))

    def _chat_stream(self, body: Dict[str, Any], extra: Optional[Dict[str, str]]) -> Generator[Dict[str, Any], None, None]:
        def opened() -> Tuple[Generator[Dict[str, Any], None, None], Any]:
            chunks = self._transport().stream(self._path("chat/completions"), body, extra=extra)
            return chunks, next(chunks, None)  # the first event: a refusal is known before anything is yielded

        chunks, first = self._under_its_name(body, opened)
        if first is None:
            return
        try:
            yield first
            yield from chunks
        finally:
            chunks.close()

    def _under_its_name(self, body: Dict[str, Any], send: Callable[[], T]) -> T:
        """Send; once more if GPUStack knows no model of this name and this model's name came from Agno, which
        lowercases the id its eval router is given, and a running model has the same name in another case."""
        try:
            return send()
        except ModelProviderError as error:
            failure = getattr(error, "failure", None)
            if not self._named_by_agno or failure is None or failure.topic != UNKNOWN_MODEL:
                raise
            if body["model"] == self.id:  # not renamed by a call that failed alongside
                running = _deployment(self._transport().settings).in_other_case(self.id)
                if running is None:
                    raise
                _warn_once(f"case {self.id}", f"GPUStack has no model {self.id!r}; {running!r} is used, the running "
                           "model of that name in another case (Agno's evals lowercase the model id).")
                self.id = running
            body["model"] = self.id
        return send()

    def _spot_markup(self, recent: str, text: str) -> Optional[str]:
        """Tool-call markup in streamed text, also cut across pieces: warned about; what could still begin it, kept."""
        recent += text
        if "<tool_call>" in recent:
            self._warn_tool_markup()
            return None
        return recent[-10:]

    def _recoverable(self, body: Dict[str, Any]) -> bool:
        """Whether an answer to this request may hold tool calls written as text: tools were offered, and allowed."""
        return self.recover_tool_calls and bool(body.get("tools")) and body.get("tool_choice") != "none"

    def _calls_in(self, content: str, body: Dict[str, Any]) -> Optional[List[Dict[str, Any]]]:
        """The tool calls a model wrote as its whole answer, when its deployment has no (or the wrong) tool parser;
        warned about once per model, with the deployment's fix."""
        offered = {tool["function"]["name"] for tool in body["tools"] if isinstance(tool.get("function"), dict)}
        choice = body.get("tool_choice")
        if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
            offered &= {choice["function"].get("name")}  # a request that named its tool offered only that one
        found = _text_tool_calls(content, offered)
        if found is None:
            return None
        calls, parser = found
        _warn_once(f"tool text {self.id}", f"GPUStack model {self.id!r} wrote its tool calls as text ({parser} format) "
                   "and they were taken as tool calls: its deployment needs a tool-call parser. In its Backend "
                   f"Parameters on GPUStack: vLLM `--enable-auto-tool-choice --tool-call-parser={_PARSERS[parser][0]}`, "
                   f"SGLang `--tool-call-parser={_PARSERS[parser][1]}`, llama.cpp `--jinja`.")
        return calls

    def _held_answer(self, held: str, body: Dict[str, Any], watch: "_AnswerWatch") -> ModelResponse:
        """The end of a stream whose content was held back: its tool calls, as stream pieces; or the text, late."""
        calls = self._calls_in(held, body)
        if calls is None:
            if "<tool_call>" in held:
                self._warn_tool_markup()
            return ModelResponse(content=held)
        watch.tool_calls = True
        return ModelResponse(tool_calls=[{"index": index, **call} for index, call in enumerate(calls)])

    def _warn_tool_markup(self) -> None:
        """SGLang deployed without a tool parser answers 200 with the model's raw markup as text."""
        _warn_once(
            f"tool markup {self.id}",
            f"GPUStack model {self.id!r} answered a request with tools with <tool_call> markup in its text and no "
            "tool_calls: its deployment needs a tool-call parser (for SGLang, add `--tool-call-parser=<parser>` to its "
            "Backend Parameters on GPUStack, e.g. `qwen25`). The text is left as it came.",
        )

    def _affinity(self, run_response: Any) -> Optional[Dict[str, str]]:
        """GPUStack routes the requests of a multi-replica deployment that carry one ``session-id`` to one replica,
        the one that holds the conversation's KV cache. Agno hands the run, with its session, to each call; the
        header carries a digest of the session id, never the id itself (it may hold user data), the same in every
        process (several app workers may serve one session). A ``session-id`` among the model's headers wins."""
        session = getattr(run_response, "session_id", None)
        if not session or not self.session_affinity:
            return None
        if any(name.lower() in _AFFINITY_HEADERS for name, _ in self._transport().settings.headers or ()):
            return None
        return {"session-id": hashlib.sha256(f"agno-gpustack session\0{session}".encode()).hexdigest()[:32]}

    def _judge(self, watch: "_AnswerWatch", body: Dict[str, Any]) -> None:
        """An answer with no content, no tool call and some reasoning: the model thought and said nothing.
        With thinking off, ``watch`` has made the reasoning the answer already (and this warns once)."""
        if watch.moved and not watch.said:
            _warn_once(f"reasoning parser {self.id}", f"GPUStack model {self.id!r} answered with thinking off in its "
                       "reasoning field and left content empty: its deployment's reasoning parser ignores the switch "
                       "(for Qwen3 on vLLM, `--reasoning-parser qwen3` in its Backend Parameters on GPUStack honours "
                       "it). The reasoning is taken as the answer.")
        if watch.content or watch.tool_calls or not watch.reasoning:
            return
        if watch.finish == "length":
            budget = body.get("max_tokens") or body.get("max_completion_tokens") or watch.output_tokens
            raise _provider_error(
                f"GPUStack model {self.id!r} spent all {budget or 'the'} tokens it may write thinking, and gave no "
                "answer (finish_reason \"length\"). Give it room: a larger max tokens setting, thinking switched off "
                "(enable_thinking=False), or a smaller reasoning budget where the backend has one.",
                400, self._transport().settings, ThoughtTooLongError)
        words = (f"GPUStack model {self.id!r} stopped after its reasoning without an answer (finish_reason "
                 f"{watch.finish!r}, no content, no tool call).")
        raise RetryableModelProviderError(original_error=words, retry_guidance_message=(
            "You stopped after thinking, without writing an answer. Write your final answer to the last message now."))

    # -- parsing -----------------------------------------------------------------

    def _parse_provider_response(self, response: Dict[str, Any], **kwargs: Any) -> ModelResponse:
        """A whole chat completion as an Agno ModelResponse."""
        transport = self._transport()
        choices = response.get("choices") if isinstance(response, dict) else None
        if not choices or not isinstance(choices[0], dict):
            _raise_if_error_event(response, "", transport.settings)
            raise transport.malformed("no choices", response)
        with transport.reading(response):
            return self._completion(response, choices[0])

    def _completion(self, response: Dict[str, Any], choice: Dict[str, Any]) -> ModelResponse:
        message = choice.get("message") or choice.get("delta") or {}
        result = ModelResponse(role=message.get("role") or "assistant")
        content = message.get("content")
        if content is not None:
            result.content = content
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        if reasoning:
            result.reasoning_content = reasoning
        elif isinstance(content, str) and "</think>" in content:
            result.reasoning_content, result.content = _split_think(content)
        if message.get("tool_calls"):
            result.tool_calls = [_tool_call(call) for call in message["tool_calls"]]
        if response.get("usage"):
            result.response_usage = _usage_metrics(response["usage"])
        result.provider_data = {
            key: value
            for key, value in (
                ("id", response.get("id")),
                ("system_fingerprint", response.get("system_fingerprint")),
                ("finish_reason", choice.get("finish_reason")),
                ("logprobs", choice.get("logprobs")),
                ("served_by", self._served_by(response.get("model"))),
            )
            if value is not None
        }
        return result

    def _served_by(self, answered: Any) -> Optional[str]:
        """The model that answered, when it is not the one asked for: a GPUStack route's target or fallback."""
        if not answered or answered == self.id or not isinstance(answered, str):
            return None
        _warn_once(f"served {self.id}\0{answered}", f"GPUStack model {self.id!r}: the answer came from model {answered!r} "
                   "(a route's target or its fallback). provider_data['served_by'] names it on each answer.")
        return answered

    def _parse_provider_response_delta(self, response: Any) -> ModelResponse:
        """One stream chunk as an Agno ModelResponse (tool-call pieces stay pieces; parse_tool_calls merges them)."""
        if isinstance(response, ModelResponse):
            return response
        with self._transport().reading(response):
            return self._delta(response)

    def _delta(self, response: Dict[str, Any]) -> ModelResponse:
        result = ModelResponse()
        choices = response.get("choices")
        if choices:
            choice = choices[0]
            delta = choice.get("delta")
            if delta is None:  # a gateway that wraps a whole answer as one event
                delta = choice.get("message") or {}
            if delta.get("role"):
                result.role = delta["role"]
            if delta.get("content") is not None:
                result.content = delta["content"]
            reasoning = delta.get("reasoning_content")
            if reasoning is None:
                reasoning = delta.get("reasoning")
            if reasoning:
                result.reasoning_content = reasoning
            if delta.get("tool_calls"):
                result.tool_calls = delta["tool_calls"]
            if choice.get("finish_reason"):
                result.provider_data = {"finish_reason": choice["finish_reason"]}
        served = self._served_by(response.get("model"))
        if served is not None:
            result.provider_data = {**(result.provider_data or {}), "served_by": served}
        if response.get("usage"):
            result.response_usage = _usage_metrics(response["usage"])
        return result

    def parse_provider_response_delta(self, chunk: Any) -> ModelResponse:
        """A stream piece as a ModelResponse: ``model.parse_provider_response_delta(piece).content``."""
        return self._parse_provider_response_delta(chunk)

    def parse_tool_calls(self, tool_calls_data: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Merge streamed tool-call pieces (id and name first, arguments in parts) into whole calls by ``index``."""
        with self._transport().reading(tool_calls_data):
            return self._merged_tool_calls(tool_calls_data)

    def _merged_tool_calls(self, tool_calls_data: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        merged: Dict[int, Dict[str, Any]] = {}
        for piece in tool_calls_data:
            if not isinstance(piece, dict):
                continue
            index = piece.get("index")
            if index is None:
                index = len(merged) if piece.get("id") or not merged else max(merged)
            call = merged.setdefault(index, {"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
            if piece.get("id"):
                call["id"] = piece["id"]
            if piece.get("type"):
                call["type"] = piece["type"]
            function = piece.get("function") or {}
            if function.get("name"):
                call["function"]["name"] = function["name"]
            arguments = function.get("arguments")
            if isinstance(arguments, str):
                call["function"]["arguments"] += arguments
            elif arguments is not None:
                call["function"]["arguments"] += json.dumps(arguments)
        return [merged[index] for index in sorted(merged)]

    # -- text completions ----------------------------------------------------------

    def complete(self, prompt: str, stream: bool = False, **params: Any) -> Union[str, Iterator[str]]:
        """Text completion on /v1/completions: ``model.complete("Once upon", max_tokens=20)``.

        With ``stream=True`` it returns an iterator of text pieces.
        """
        if not isinstance(prompt, (str, list)):
            raise TypeError("prompt must be a string")
        body = {"model": self.id, "prompt": prompt, **self._completion_params(), **params}
        if stream:
            body["stream"] = True
            return self._complete_stream(body)
        transport = self._transport()
        answer = transport.call("POST", self._path("completions"), body, expect="choices")
        with transport.reading(answer):
            if not answer["choices"] or not isinstance(answer["choices"][0], dict):
                raise _Malformed("no choices")
            return str(answer["choices"][0].get("text") or "")

    def _completion_params(self) -> Dict[str, Any]:
        params = self.get_request_params()
        params.pop("chat_template_kwargs", None)
        newer = params.pop("max_completion_tokens", None)  # a chat name: /v1/completions reads max_tokens
        if newer is not None:
            params.setdefault("max_tokens", newer)
        return params

    def _complete_stream(self, body: Dict[str, Any]) -> Iterator[str]:
        for chunk in self._transport().stream(self._path("completions"), body):
            for choice in chunk.get("choices") or ():
                text = choice.get("text")
                if text:
                    yield text

    async def acomplete(self, prompt: str, stream: bool = False, **params: Any) -> Union[str, AsyncIterator[str]]:
        """``await model.acomplete("Once upon")``; with ``stream=True``, ``async for piece in await ...``."""
        if stream:
            body_iter = self.complete(prompt, stream=True, **params)
            return _iterate_in_thread(lambda: iter(body_iter))  # type: ignore[arg-type]
        return await _in_thread(self.complete, prompt, False, **params)  # type: ignore[arg-type]


def _media_parts(message: Message) -> List[Dict[str, Any]]:
    """A message's images, audio and video as OpenAI-compatible content parts; files can't be sent, and say so."""
    parts: List[Dict[str, Any]] = []
    if message.images:
        from agno.utils.openai import images_to_message

        parts.extend(images_to_message(images=message.images))
    if message.audio:
        from agno.utils.openai import audio_to_message

        parts.extend(audio_to_message(message.audio))  # ``input_audio``: vLLM's audio models, llama.cpp with mmproj
    for video in message.videos or ():
        parts.append(_video_part(video))
    if message.files:
        _warn_once(
            "files",
            f"GPUStack's chat endpoint takes no file parts: {len(message.files)} file(s) attached to a message were "
            "not sent. Give the model their text instead (an Agno reader or knowledge base).",
        )
    return parts


def _video_part(video: Any) -> Dict[str, Any]:
    """vLLM's ``video_url`` part: a URL as it is, bytes or a file as a data URL."""
    if video.url:
        return {"type": "video_url", "video_url": {"url": video.url}}
    data = video.content
    if data is None and video.filepath:
        try:
            with open(video.filepath, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ValueError(f"Cannot read the video {video.filepath}: {exc.strerror}") from None
    if not data:
        raise ValueError("A video attached to a message has no url, content or filepath")
    mime = video.mime_type or (mimetypes.guess_type(f"video.{video.format}")[0] if video.format else None)
    if mime is None and video.filepath:
        mime = mimetypes.guess_type(str(video.filepath))[0]
    encoded = base64.b64encode(data).decode("ascii")
    return {"type": "video_url", "video_url": {"url": f"data:{mime or 'video/mp4'};base64,{encoded}"}}


def _plain_tool(tool: Dict[str, Any]) -> Dict[str, Any]:
    """A tool definition without Agno's own bookkeeping fields, which strict servers reject."""
    if tool.get("type") == "function" and isinstance(tool.get("function"), dict):
        function = {
            key: value
            for key, value in tool["function"].items()
            if key not in ("requires_confirmation", "external_execution", "approval_type")
        }
        return {**tool, "function": function}
    return tool


# Embeddings ##################################################################

EMBED_BATCH_CONCURRENCY = 4  # batches in flight at once when embedding many texts
_PROBE_LOCK = threading.Lock()


def _new_probe_lock_after_fork() -> None:
    global _PROBE_LOCK
    _PROBE_LOCK = threading.Lock()  # one a parent thread held at fork time would never be released here


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_probe_lock_after_fork)


def _check_texts(texts: Any) -> List[str]:
    """The input as a list of non-empty strings, or a ValueError before any request."""
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)) or not texts:
        raise ValueError("Nothing to embed: pass a non-empty string or a non-empty list of strings")
    for position, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"Text {position} to embed is {type(text).__name__}, not a string")
        if not text.strip():
            raise ValueError(f"Text {position} to embed is empty; embedding servers reject or mis-embed empty strings")
    return list(texts)


def _vector(raw: Any) -> List[float]:
    """One embedding: a list of numbers, or base64 of little-endian float32."""
    if isinstance(raw, str):
        try:
            data = base64.b64decode(raw, validate=True)
        except ValueError:
            raise _Malformed("an embedding that is not valid base64") from None
        if not data or len(data) % 4:
            raise _Malformed(f"a base64 embedding of {len(data)} bytes, not a whole number of float32")
        return list(struct.unpack(f"<{len(data) // 4}f", data))
    if not isinstance(raw, list) or not raw:
        raise _Malformed(f"an embedding that is {type(raw).__name__}, not a list of numbers")
    try:
        sum(raw)  # in C: a whole vector checked for ~1 us, where a Python loop costs ~1 us per 20 values
    except TypeError:
        wrong = next(value for value in raw if not isinstance(value, (int, float)))
        raise _Malformed(f"an embedding holding {wrong!r}, not a number") from None
    return raw


@dataclass
class GPUStackEmbeddings(_ClientOptions, _Windowed, Embedder):
    """Embeddings from a GPUStack model, also an Agno ``Embedder`` for knowledge bases.

        embeddings = GPUStackEmbeddings(id="bge-m3")
        vectors = embeddings.parse_embeddings_response(embeddings.embed(["a", "b"]))
        PgVector(table_name="docs", db_url=..., embedder=embeddings)

    ``dimensions=N`` is sent to the server (Matryoshka models honour it) and kept as
    ``requested_dimensions``; when not set, reading ``dimensions`` learns the size with one probe
    embedding, once. ``dimensions`` is not a dataclass field, so ``dataclasses.asdict``, ``replace``,
    ``==``, ``repr`` and ``copy.deepcopy`` never touch the network.
    """

    id: str = ""
    dimensions: ClassVar[Any]  # type: ignore[misc]  # a property (below), not the field Embedder declares: reading it may probe
    requested_dimensions: Optional[int] = field(default=None, repr=False)  # what dimensions=N asked for
    _KEPT_IN: ClassVar[Dict[str, str]] = {"context_window": "requested_context_window", "dimensions": "requested_dimensions"}
    encoding_format: str = "float"  # or "base64"
    user: Optional[str] = None
    request_params: Optional[Dict[str, Any]] = None
    batch_concurrency: int = EMBED_BATCH_CONCURRENCY
    truncate: bool = False  # vLLM's truncate_prompt_tokens: the server cuts a text at the window; the rest is not embedded
    # Client parameters: base_url, api_key, timeout, connect_timeout, max_retries, verify, headers (_ClientOptions)

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError("GPUStackEmbeddings needs the model name on GPUStack: GPUStackEmbeddings(id='bge-m3')")
        if self.encoding_format not in ("float", "base64"):
            raise ValueError(f"encoding_format must be 'float' or 'base64', got {self.encoding_format!r}")
        self.requested_dimensions = _checked_count("dimensions", self.requested_dimensions)
        self._learned_dimensions: Optional[int] = None
        self._start_client()

    @property  # type: ignore[no-redef]
    def dimensions(self) -> int:
        """The vectors' size: ``dimensions=N`` as given, else learned from the server with one probe, once."""
        if self.requested_dimensions is not None:
            return self.requested_dimensions
        if self._learned_dimensions is None:
            with _PROBE_LOCK:  # threads reading it at once make one probe (a module lock: deepcopy can't copy a lock)
                if self._learned_dimensions is None:
                    self._learned_dimensions = self._probe_dimensions()
        return self._learned_dimensions

    @dimensions.setter
    def dimensions(self, value: Optional[int]) -> None:
        self.requested_dimensions = _checked_count("dimensions", value)

    def _probe_dimensions(self) -> int:
        """Vector databases size their tables from ``dimensions``, often as they are constructed: learn it with
        one short embedding, with the model's timeouts and without retries."""
        try:
            answer = self._embed(["dimension probe"], self._transport().with_timeouts(None, max_retries=0))
        except ModelProviderError as error:
            error.message = (
                f"Cannot learn the embedding size of {self.id!r} from GPUStack: {error.message} "
                f"Set dimensions=N on GPUStackEmbeddings to skip this probe."
            )
            raise
        return len(self.parse_embeddings_response(answer)[0])

    def _transport(self) -> _Client:
        return _client_of(self, "GPUStackEmbeddings")

    def _body(self, texts: List[str]) -> Dict[str, Any]:
        body: Dict[str, Any] = {"model": self.id, "input": texts[0] if len(texts) == 1 else texts}
        if self.encoding_format != "float":
            body["encoding_format"] = self.encoding_format
        if self.requested_dimensions is not None:
            body["dimensions"] = self.requested_dimensions
        if self.user is not None:
            body["user"] = self.user
        if self.truncate:
            body["truncate_prompt_tokens"] = self._truncation()
        body.update(self.request_params or {})
        return body

    def _truncation(self) -> int:
        """Where the server cuts a text: at the window (-1, vLLM's own window, when it is not known)."""
        window = self.context_window
        size = f"{window} tokens" if window else "the window the server knows"
        _warn_once(f"truncate {self.id}", f"GPUStack model {self.id!r} embeds each text only up to its context window "
                   f"({size}): text past it is not embedded (truncate=True).")
        return window or -1

    def embed(self, input: Union[str, List[str]], timeout: Optional[float] = None) -> Dict[str, Any]:
        """The server's JSON for one text or a batch in one request: ``embeddings.embed(["a", "b"])``.

        ``timeout`` is a deadline for this call only: it replaces the read timeout and there are no
        retries, as Agno's page store expects of a per-call timeout.
        """
        transport = self._transport()
        if timeout is not None:
            transport = transport.with_timeouts(timeout, min(timeout, transport.settings.connect_timeout), max_retries=0)
        return self._embed(_check_texts(input), transport)

    def _embed(self, texts: List[str], transport: _Transport) -> Dict[str, Any]:
        try:
            answer = transport.call("POST", "embeddings", self._body(texts), expect="data")
        except ContextWindowExceededError as error:
            self._say_which_text(error, texts)
            raise
        vectors = self.parse_embeddings_response(answer)
        if len(vectors) != len(texts):
            raise transport.malformed(f"{len(vectors)} embeddings for {len(texts)} texts", answer)
        wanted = self.requested_dimensions
        if wanted is not None and vectors and len(vectors[0]) != wanted:
            raise _provider_error(
                f"GPUStack returned {len(vectors[0])}-dimensional vectors but dimensions={wanted}; "
                "the model may not support shortened embeddings: leave dimensions unset to use its own size",
                502,
                transport.settings,
            )
        return answer

    def _say_which_text(self, error: ContextWindowExceededError, texts: List[str]) -> None:
        """A text longer than the window: its size against the window, and the two ways out."""
        failure: Optional[_Failure] = getattr(error, "failure", None)
        if failure is None:
            return
        window = failure.window or self.context_window
        position, longest = max(enumerate(texts), key=lambda item: len(item[1]))
        where = f"; the longest of these {len(texts)} texts, at position {position}, is" if len(texts) > 1 else ": it is"
        error.message = _redact(failure.message(
            f"A text is longer than {self.id!r} can embed{f' ({window} tokens)' if window else ''}{where} about "
            f"{_text_tokens(longest)} tokens ({len(longest)} characters, starting {longest[:30]!r}). "
            "Split documents into smaller chunks "
            "(a smaller chunk_size in Agno's chunking), or set truncate=True on GPUStackEmbeddings to embed each "
            "text up to the window."), self.api_key)

    async def aembed(self, input: Union[str, List[str]]) -> Dict[str, Any]:
        """``await embeddings.aembed(["a", "b"])``: embed() without blocking the event loop."""
        _check_texts(input)
        return await _in_thread(self.embed, input)

    def parse_embeddings_response(self, result: Dict[str, Any]) -> List[List[float]]:
        """The vectors of an embeddings answer, in input order (servers may answer out of order):
        ``embeddings.parse_embeddings_response(embeddings.embed(["a", "b"]))``."""
        data = result.get("data") if isinstance(result, dict) else None
        with self._transport().reading(result):
            if not isinstance(data, list):
                raise _Malformed("no 'data' list")
            if not all(isinstance(item, dict) and isinstance(item.get("index", 0), int) for item in data):
                raise _Malformed("an embedding item that is not an object with a whole-number index")
            items = sorted(data, key=lambda item: item.get("index", 0))
            return [_vector(item.get("embedding")) for item in items]

    # -- Agno's Embedder interface: errors become EmbeddingError ------------------------

    # ``timeout`` bounds that one call: Agno's page store gives each embedding its own deadline.

    def _one(self, text: str, timeout: Optional[float] = None) -> Tuple[List[float], Optional[Dict]]:
        try:
            answer = self.embed(text, timeout=timeout)
            return self.parse_embeddings_response(answer)[0], answer.get("usage")
        except ModelProviderError as error:
            raise_embedding_error(error, model_id=self.id, provider="GPUStack")

    def get_embedding(self, text: str, timeout: Optional[float] = None) -> List[float]:
        """``embedder.get_embedding("text")`` -> one vector."""
        return self._one(text, timeout)[0]

    def get_embedding_and_usage(self, text: str, timeout: Optional[float] = None) -> Tuple[List[float], Optional[Dict]]:
        """``embedder.get_embedding_and_usage("text")`` -> (vector, usage)."""
        return self._one(text, timeout)

    async def async_get_embedding(self, text: str, timeout: Optional[float] = None) -> List[float]:
        """``await embedder.async_get_embedding("text")``."""
        return (await self.async_get_embedding_and_usage(text, timeout))[0]

    async def async_get_embedding_and_usage(self, text: str, timeout: Optional[float] = None) -> Tuple[List[float], Optional[Dict]]:
        """``await embedder.async_get_embedding_and_usage("text")``."""
        _check_texts(text)
        return await _in_thread(self._one, text, timeout)

    def _batch(self, texts: List[str]) -> Tuple[List[List[float]], List[Optional[Dict]]]:
        """One batch in one request; its failure raised as the server's (ModelProviderError)."""
        answer = self.embed(texts)
        vectors = pad_batch_embeddings(self.parse_embeddings_response(answer), texts, "GPUStack")
        return vectors, [answer.get("usage")] * len(vectors)

    def _batches(self, texts: List[str]) -> List[List[str]]:
        texts = _check_texts(texts)
        size = max(1, int(self.batch_size or 1))
        return [texts[start : start + size] for start in range(0, len(texts), size)]

    def get_embeddings_batch_and_usage(self, texts: List[str]) -> Tuple[List[List[float]], List[Optional[Dict]]]:
        """Embed many texts in ``batch_size`` requests, a few at once, in input order.

        A batch that failed for what may be one of its texts (``_about_one_text``) is tried text by text,
        so one bad chunk does not lose the others; any other failure is raised, and batches not yet sent
        are not sent.
        """
        batches = self._batches(texts)
        stop = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(max(1, min(self.batch_concurrency, len(batches)))) as pool:
            futures = [pool.submit(self._batch_unless, batch, stop) for batch in batches]
            return _joined([future.result() for future in futures])

    async def async_get_embeddings_batch_and_usage(self, texts: List[str]) -> Tuple[List[List[float]], List[Optional[Dict]]]:
        """``await embedder.async_get_embeddings_batch_and_usage(texts)``: the same, batches in worker threads."""
        batches = self._batches(texts)
        stop = threading.Event()
        limit = asyncio.Semaphore(max(1, self.batch_concurrency))

        async def one(batch: List[str]) -> Any:
            async with limit:
                return await _in_thread(self._batch_unless, batch, stop)

        results: List[Any] = await asyncio.gather(*(one(batch) for batch in batches), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return _joined(results)

    def _batch_unless(self, texts: List[str], stop: threading.Event) -> Any:
        """One batch, unless another already failed for the server: then it is not sent."""
        if stop.is_set():
            return None
        try:
            return self._batch_or_each(texts)
        except BaseException:
            stop.set()
            raise

    def _batch_or_each(self, texts: List[str]) -> Tuple[List[List[float]], List[Optional[Dict]]]:
        try:
            return self._batch(texts)
        except ModelProviderError as error:
            if not _about_one_text(error):
                raise_embedding_error(error, model_id=self.id, provider="GPUStack")
            _warn_batch_failed(texts, error)
        return _each(self, texts)


def _about_one_text(error: Optional[BaseException]) -> bool:
    """Whether a failed batch may have failed for one of its texts (too long, rejected): then the others are
    worth a request each. Not for a key, a model, a server or a network that fails every text alike (401,
    403, 404, 408, 429, 5xx, no running instance, no connection, a timeout): as Agno's own rule for rate
    limits says, that would multiply the load on a server that is already failing."""
    if isinstance(error, ContextWindowExceededError):
        return True
    failure: Optional[_Failure] = getattr(error, "failure", None)
    if failure is not None and failure.retry is False:
        return False  # the words named a deployment to fix (a model for another task, a missing parameter)
    status = failure.backend_status or failure.status if failure is not None else getattr(error, "status_code", None)
    return status in (400, 413, 422)


def _warn_batch_failed(texts: List[str], error: ModelProviderError) -> None:
    from agno.utils.log import log_warning

    log_warning(f"GPUStack batch of {len(texts)} texts failed ({error}); embedding them one by one")


def _each(embedder: GPUStackEmbeddings, texts: List[str]) -> Tuple[List[List[float]], List[Optional[Dict]]]:
    """Text by text, keeping successes, as Agno's ``aembed_texts_individually`` does (and with its words); but a
    failure that is not about its text ends the loop at once, as it ends a batch."""
    vectors: List[List[float]] = []
    usages: List[Optional[Dict]] = []
    failures: List[Tuple[int, EmbeddingError]] = []
    for position, text in enumerate(texts):
        try:
            vector, usage = embedder.get_embedding_and_usage(text)
        except EmbeddingError as error:
            if not _about_one_text(error.__cause__):
                raise
            failures.append((position, error))
            vector, usage = [], None
        vectors.append(vector)
        usages.append(usage)
    if failures and len(failures) == len(texts):
        first = failures[0][1]
        raise EmbeddingError(f"All {len(texts)} chunks failed to embed: {first}", status_code=first.provider_status_code,
                             model_id=first.model_id, provider=first.provider)
    if failures:
        from agno.utils.log import log_warning

        log_warning(f"{len(failures)} of {len(texts)} chunks failed to embed at position(s) "
                    f"{', '.join(str(p) for p, _ in failures[:5])}: {failures[0][1]}")
    return vectors, usages


def _joined(results: Iterable[Tuple[List[List[float]], List[Optional[Dict]]]]) -> Tuple[List[List[float]], List[Optional[Dict]]]:
    vectors: List[List[float]] = []
    usages: List[Optional[Dict]] = []
    for batch_vectors, batch_usages in results:
        vectors.extend(batch_vectors)
        usages.extend(batch_usages)
    return vectors, usages


# Rerank ######################################################################


def _document_text(document: Union[str, Document]) -> str:
    if isinstance(document, str):
        return document
    if isinstance(document, Document):
        return document.content
    raise TypeError(f"documents must be strings or agno Document objects, got {type(document).__name__}")


def _result_text(result: Dict[str, Any], texts: List[str]) -> str:
    """A result's document text: given as a string, as ``{"text": ...}``, or missing (found by index)."""
    document = result.get("document")
    if isinstance(document, str):
        return document
    if isinstance(document, dict) and isinstance(document.get("text"), str):
        return document["text"]
    return texts[result["index"]]


class GPUStackRerank(Reranker):
    """Reranking on a GPUStack model, also an Agno ``Reranker`` for vector databases.

        reranker = GPUStackRerank(id="bge-reranker-v2-m3")
        best = reranker.rerank(query="capital of France?", documents=["Paris ...", "Bananas ..."], top_n=1)
        PgVector(table_name="docs", db_url=..., reranker=reranker)
    """

    id: str
    top_n: Optional[int] = None
    return_documents: bool = True
    request_params: Optional[Dict[str, Any]] = None
    # Agno's Reranker is a pydantic model: the client options (_ClientOptions) live in a private
    # attribute, so the key and headers stay out of repr() and model_dump(); each is read as a property.
    _client: Any = None
    _client_cache: Optional[Tuple[Any, Any]] = None

    def __init__(self, **fields: Any) -> None:
        client = _client_options(fields)
        super().__init__(**fields)
        self._client = client
        self._transport()  # every setting is checked now, not at the first call

    def _client_settings(self, model_name: str, model_id: Optional[str] = None) -> _Settings:
        return self._client._client_settings(model_name, model_id)

    def _transport(self) -> _Client:
        return _client_of(self, "GPUStackRerank")

    def _results(self, query: str, texts: List[str], top_n: Optional[int]) -> List[Dict[str, Any]]:
        if not isinstance(query, str) or not query.strip():
            raise ValueError("rerank needs a non-empty query string")
        if not texts:
            return []
        body: Dict[str, Any] = {"model": self.id, "query": query, "documents": texts, "return_documents": self.return_documents}
        if top_n is not None:
            if not isinstance(top_n, int) or top_n <= 0:
                raise ValueError(f"top_n must be a positive whole number, got {top_n!r}")
            body["top_n"] = min(top_n, len(texts))
        body.update(self.request_params or {})
        transport = self._transport()
        answer = transport.call("POST", "rerank", body, expect="results")
        ranked: List[Dict[str, Any]] = []
        with transport.reading(answer):
            for result in answer["results"]:
                index = result.get("index") if isinstance(result, dict) else None
                if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(texts):
                    raise _Malformed(f"a result for document {index!r} of {len(texts)}")
                score = result.get("relevance_score", result.get("score"))
                if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                    raise _Malformed(f"a result for document {index} with score {score!r}")
                ranked.append({"index": index, "relevance_score": float(score), "document": _result_text(result, texts)})
        ranked.sort(key=lambda item: item["relevance_score"], reverse=True)
        return ranked[:top_n] if top_n else ranked

    def rerank(  # type: ignore[override]
        self,
        query: str,
        documents: Sequence[Union[str, Document]],
        limit: Optional[int] = None,
        top_n: Optional[int] = None,
    ) -> List[Any]:
        """Documents best first: ``reranker.rerank("capital of France?", ["Paris ...", "Bananas ..."], top_n=1)``.

        At most ``top_n`` (else the reranker's ``top_n``) and at most ``limit``, whatever is given.
        Strings in: ``[{"index", "relevance_score", "document"}, ...]``, whatever the server sent back, errors raised.
        Agno Documents in: the Documents reordered with ``reranking_score`` set; on a server
        error a warning is logged and they come back in their original order (Agno's convention).
        """
        documents = list(documents)
        texts = [_document_text(document) for document in documents]
        keep = top_n or self.top_n
        limit = _checked_count("limit", limit)
        if limit is not None:
            keep = min(keep, limit) if keep else limit
        if not all(isinstance(document, Document) for document in documents) or not documents:
            return self._results(query, texts, keep)
        try:
            results = self._results(query, texts, keep)
        except ModelProviderError as error:
            from agno.utils.log import log_warning

            log_warning(f"GPUStack rerank failed, keeping the original order: {error}")
            return documents[:keep] if keep else documents
        reordered = []
        for result in results:
            document = documents[result["index"]]
            document.reranking_score = result["relevance_score"]
            reordered.append(document)
        return reordered

    async def arerank(  # type: ignore[override]
        self,
        query: str,
        documents: Sequence[Union[str, Document]],
        limit: Optional[int] = None,
        top_n: Optional[int] = None,
    ) -> List[Any]:
        """``await reranker.arerank(query, documents, top_n=3)``: rerank() without blocking the event loop."""
        return await _in_thread(self.rerank, query, documents, limit, top_n)


def _client_option(name: str) -> property:
    """A client option of GPUStackRerank as a property: ``reranker.timeout = 30`` rebuilds its client, checked."""

    def change(self: Any, value: Any) -> None:
        client = _client_options({**self._client.keywords(), name: value})
        client._client_settings("GPUStackRerank")  # checked before it replaces the one in use
        self._client = client

    return property(lambda self: getattr(self._client, name), change, doc=f"The client option {name}: ``reranker.{name}``.")


for _name in CLIENT_OPTIONS:
    setattr(GPUStackRerank, _name, _client_option(_name))
del _name


# Tools: images, speech, transcription #########################################
# GPUStack's image, text-to-speech and speech-to-text models as Agno tools. Same transport,
# retries, error mapping and key handling as the models above.

DEFAULT_MEDIA_TIMEOUT = 900.0  # seconds to wait for data: an image can take minutes, and 2.3 streams no progress
_IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"))
_AUDIO_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav",
                "pcm": "audio/pcm"}


def _image_type(data: bytes) -> str:
    """The image's MIME type from its first bytes; backends say PNG but may send JPEG or WebP."""
    for magic, mime in _IMAGE_SIGNATURES:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def _multipart(fields: Sequence[Tuple[str, Any]]) -> Tuple[bytes, str]:
    """A multipart/form-data body and its content type. A field's value is a string, or
    (filename, bytes, content type) for a file. Never a ``stream`` field: GPUStack reads any value as true."""
    def quoted(text: str) -> str:
        return text.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")  # as browsers do (WHATWG)

    contents = [value[1] if isinstance(value, tuple) else str(value).encode() for _, value in fields]
    boundary = "gpustack-" + os.urandom(12).hex()
    while any(boundary.encode() in content for content in contents):
        boundary = "gpustack-" + os.urandom(12).hex()
    parts = []
    for (name, value), content in zip(fields, contents):
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{quoted(name)}"'
        if isinstance(value, tuple):
            head += f'; filename="{quoted(value[0])}"\r\nContent-Type: {value[2]}'
        parts.append(head.encode() + b"\r\n\r\n" + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _raise_if_status_body(answer: Any, settings: _Settings) -> None:
    """VoxBox answers its errors with HTTP 200 and ``{"status_code": 500, "detail": ...}``."""
    if isinstance(answer, dict) and isinstance(answer.get("status_code"), int) and answer["status_code"] >= 400:
        raise _provider_error(f"{answer.get('detail') or 'error'} (HTTP 200 carrying status {answer['status_code']}).",
                              answer["status_code"], settings)


class GPUStackTools(Toolkit):
    """GPUStack's image, speech and transcription models as tools for an Agno agent.

        agent = Agent(model=GPUStackChat(id="qwen3"), tools=[GPUStackTools(image_model="flux.1-schnell")])
        agent.run("Draw a lighthouse at dusk").images

    Each ``*_model`` left unset is the one running model of its category on the server, found the
    first time it is needed. Plain methods for scripts: ``image()``, ``speech()``, ``transcribe()``.
    """

    def __init__(
        self,
        image_model: Optional[str] = None,
        speech_model: Optional[str] = None,
        transcription_model: Optional[str] = None,
        *,
        image_size: str = "1024x1024",
        speech_format: str = "mp3",
        enable_generate_image: bool = True,
        enable_edit_image: bool = True,
        enable_generate_speech: bool = True,
        enable_transcribe_audio: bool = True,
        **kwargs: Any,
    ) -> None:
        if speech_format not in _AUDIO_TYPES:
            raise ValueError(f"speech_format must be one of {', '.join(_AUDIO_TYPES)}, got {speech_format!r}")
        client = _client_options(kwargs, timeout=DEFAULT_MEDIA_TIMEOUT)  # the key is kept only inside the settings
        self.base_url = client.base_url
        self._settings = client._client_settings("GPUStackTools")
        self.models: Dict[str, Optional[str]] = {"image": image_model, "text_to_speech": speech_model,
                                                 "speech_to_text": transcription_model}
        self.image_size, self.speech_format = image_size, speech_format
        chosen: List[Tuple[bool, Callable[..., Any], Callable[..., Any], str]] = [
                  (enable_generate_image, self.generate_image, self.agenerate_image, "generate_image"),
                  (enable_edit_image, self.edit_image, self.aedit_image, "edit_image"),
                  (enable_generate_speech, self.generate_speech, self.agenerate_speech, "generate_speech"),
                  (enable_transcribe_audio, self.transcribe_audio, self.atranscribe_audio, "transcribe_audio")]
        super().__init__(name=kwargs.pop("name", "gpustack_tools"), tools=[sync for on, sync, _, _ in chosen if on],
                         async_tools=[(asynchronous, name) for on, _, asynchronous, name in chosen if on], **kwargs)

    def __repr__(self) -> str:
        return f"GPUStackTools(base_url={self.base_url!r}, models={self.models!r})"

    def _transport(self, category: str) -> _Client:
        return _Client(dataclasses.replace(self._settings, model_id=self._model(category)))

    def _model(self, category: str) -> str:
        """The model for a category: the one set, or the only running model of that category."""
        chosen = self.models[category]
        if chosen:
            return chosen
        running = _deployment(self._settings).running(category, min(self._settings.timeout, 30.0))
        if len(running) != 1:
            setting = {"image": "image_model", "text_to_speech": "speech_model", "speech_to_text": "transcription_model"}
            found = f"running: {', '.join(running)}" if running else "none is running"
            raise ValueError(f"GPUStackTools needs {setting[category]}=...: GPUStack has {len(running)} {category} "
                             f"models ({found}).")
        self.models[category] = running[0]
        return running[0]

    # -- for scripts: plain methods that raise ---------------------------------------

    def image(self, prompt: str, size: Optional[str] = None, negative_prompt: Optional[str] = None,
              seed: Optional[int] = None, n: int = 1) -> List[Image]:
        """Generate images: ``GPUStackTools(image_model="flux").image("a lighthouse")[0].content``."""
        transport = self._transport("image")
        body: Dict[str, Any] = {"model": transport.settings.model_id, "prompt": prompt, "n": n,
                                "size": size or self.image_size, "response_format": "b64_json"}
        if negative_prompt:
            body["negative_prompt"] = negative_prompt
        if seed is not None:
            body["seed"] = seed
        return self._images(transport, transport.call("POST", "images/generations", body, expect="data"))

    def edit(self, prompt: str, image: bytes, size: Optional[str] = None) -> List[Image]:
        """Edit an image: ``tools.edit("make it night", open("day.png", "rb").read())``."""
        transport = self._transport("image")
        form = _multipart([("model", transport.settings.model_id), ("prompt", prompt),
                           ("image", (f"image.{_image_type(image).split('/')[-1]}", image, _image_type(image))),
                           ("size", size or self.image_size), ("response_format", "b64_json")])
        return self._images(transport, transport.call("POST", "images/edits", form=form))

    def _images(self, transport: _Transport, answer: Dict[str, Any]) -> List[Image]:
        _raise_if_status_body(answer, transport.settings)
        with transport.reading(answer):
            items = answer.get("data")
            if not isinstance(items, list) or not items:
                raise _Malformed("no images")
            images = []
            for item in items:
                data = base64.b64decode(item["b64_json"], validate=True)
                images.append(Image(content=data, mime_type=_image_type(data)))
            return images

    def voices(self) -> List[str]:
        """The speech model's voices, as GPUStack lists them in its ``meta`` (empty when it lists none):
        ``tools.voices()``. Learned with the deployment's other facts, not before every speech request."""
        settings = self._transport("text_to_speech").settings
        return _deployment(settings).voices(str(settings.model_id), settings.connect_timeout + LOOKUP_SECONDS)

    def speech(self, text: str, voice: Optional[str] = None, response_format: Optional[str] = None) -> Audio:
        """Speak ``text``: ``GPUStackTools(speech_model="cosyvoice").speech("Hello").content`` (mp3 bytes)."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("generate_speech needs some text to speak")
        transport = self._transport("text_to_speech")
        try:
            known = self.voices()
        except ModelProviderError:
            known = []  # the lookup is advisory: the server judges the voice
        if voice is not None and known and voice not in known:
            raise ValueError(f"Unknown voice {voice!r} for {transport.settings.model_id}; its voices: {', '.join(known)}")
        chosen_format = response_format or self.speech_format
        body = {"model": transport.settings.model_id, "input": text, "voice": voice or (known[0] if known else None),
                "response_format": chosen_format}
        if body["voice"] is None:
            del body["voice"]
        reply = transport.open("POST", "audio/speech", body)
        data = transport.whole(reply, "POST", "audio/speech")
        content_type = reply.headers.get("Content-Type", "")
        if "json" in content_type or data[:1] == b"{":
            answer = transport._decode(data, reply, transport.url("audio/speech"))
            _raise_if_status_body(answer, transport.settings)
            _raise_if_error_event(answer, "", transport.settings)
            raise transport.malformed("JSON where audio was expected", answer)
        mime = content_type.split(";")[0].strip() or _AUDIO_TYPES[chosen_format]
        return Audio(content=data, mime_type=mime, format=chosen_format)

    def transcribe(self, audio: bytes, filename: str = "audio.wav", language: Optional[str] = None) -> str:
        """The text of some audio: ``tools.transcribe(open("note.wav", "rb").read())``."""
        transport = self._transport("speech_to_text")
        extension = os.path.splitext(filename)[1].lstrip(".").lower()
        mime = _AUDIO_TYPES.get(extension) or mimetypes.guess_type(filename)[0] or "application/octet-stream"
        fields: List[Tuple[str, Any]] = [("model", transport.settings.model_id), ("file", (filename, audio, mime)),
                                         ("response_format", "json")]
        if language:
            fields.append(("language", language))
        answer = transport.call("POST", "audio/transcriptions", form=_multipart(fields))
        _raise_if_status_body(answer, transport.settings)
        if not isinstance(answer.get("text"), str):
            raise transport.malformed("no 'text'", answer)
        return answer["text"]

    def transcribe_file(self, path: str, language: Optional[str] = None) -> str:
        """The text of an audio file, for scripts and the command line (not a tool: a model must not pick files):
        ``tools.transcribe_file("note.wav")``."""
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise ValueError(f"Cannot read the audio file {path}: {exc.strerror}") from None
        return self.transcribe(data, os.path.basename(path) or "audio.wav", language)

    # -- the tools an agent calls: errors go back to the model as text --------------------

    def generate_image(self, prompt: str, size: Optional[str] = None, negative_prompt: Optional[str] = None,
                       seed: Optional[int] = None) -> ToolResult:
        """Generate an image from a text description.

        Args:
            prompt: What the image shows, in detail.
            size: Width x height in pixels, such as "1024x1024" (optional).
            negative_prompt: What the image must not show (optional).
            seed: A number that makes the result repeatable (optional).
        """
        return self._tool(lambda: self._made(self.image(prompt, size, negative_prompt, seed), prompt))

    def edit_image(self, prompt: str, images: Optional[Sequence[Image]] = None) -> ToolResult:
        """Edit the image the user attached, as the prompt describes.

        Args:
            prompt: The change to make.
        """
        def edit() -> ToolResult:
            if not images:
                return ToolResult(content="No image is attached to this conversation to edit.")
            data = images[0].get_content_bytes()
            if not data:
                return ToolResult(content="The attached image could not be read.")
            return self._made(self.edit(prompt, data), prompt)

        return self._tool(edit)

    def generate_speech(self, text: str, voice: Optional[str] = None) -> ToolResult:
        """Turn text into spoken audio.

        Args:
            text: The words to speak.
            voice: The voice to use (optional; the model's first voice when not given).
        """
        def speak() -> ToolResult:
            audio = self.speech(text, voice)
            return ToolResult(content=f"Spoke {len(text)} characters as {audio.mime_type} audio.", audios=[audio])

        return self._tool(speak)

    def transcribe_audio(self, audios: Optional[Sequence[Audio]] = None) -> str:
        """Transcribe the audio the user attached to this conversation into text."""
        if not audios:
            return "No audio is attached to this conversation to transcribe."
        try:
            texts = [self.transcribe(audio.get_content_bytes() or b"", f"audio.{audio.format or 'wav'}") for audio in audios]
        except (ModelProviderError, ValueError) as error:
            return f"Error: {error}"
        return "\n".join(texts)

    async def agenerate_image(self, prompt: str, size: Optional[str] = None, negative_prompt: Optional[str] = None,
                              seed: Optional[int] = None) -> ToolResult:
        """Generate an image from a text description (async)."""
        return await _in_thread(self.generate_image, prompt, size, negative_prompt, seed)

    async def aedit_image(self, prompt: str, images: Optional[Sequence[Image]] = None) -> ToolResult:
        """Edit the image the user attached, as the prompt describes (async)."""
        return await _in_thread(self.edit_image, prompt, images)

    async def agenerate_speech(self, text: str, voice: Optional[str] = None) -> ToolResult:
        """Turn text into spoken audio (async)."""
        return await _in_thread(self.generate_speech, text, voice)

    async def atranscribe_audio(self, audios: Optional[Sequence[Audio]] = None) -> str:
        """Transcribe the audio the user attached to this conversation into text (async)."""
        return await _in_thread(self.transcribe_audio, audios)

    @staticmethod
    def _made(images: List[Image], prompt: str) -> ToolResult:
        kinds = ", ".join(sorted({image.mime_type or "image" for image in images}))
        return ToolResult(content=f"Generated {len(images)} image(s) ({kinds}) for: {prompt[:200]}", images=images)

    @staticmethod
    def _tool(run: Callable[[], ToolResult]) -> ToolResult:
        """A tool's errors go back to the model as text, so it can tell the user or try otherwise."""
        try:
            return run()
        except (ModelProviderError, ValueError) as error:
            return ToolResult(content=f"Error: {error}")


# The factory and model discovery ##############################################

_MODEL_TYPES: Dict[str, Any] = {
    "chat": GPUStackChat,
    "llm": GPUStackChat,
    "embeddings": GPUStackEmbeddings,
    "embedding": GPUStackEmbeddings,
    "embedder": GPUStackEmbeddings,
    "rerank": GPUStackRerank,
    "reranker": GPUStackRerank,
}

def GPUStack(model_type: str = "chat", **kwargs: Any) -> Union[GPUStackChat, GPUStackEmbeddings, GPUStackRerank]:
    """The GPUStack class for a kind of model: ``GPUStack(model_type="embeddings", id="bge-m3")``.

    ``model_type`` is ``"chat"`` (or ``"llm"``), ``"embeddings"`` (``"embedding"``) or ``"rerank"`` (``"reranker"``).
    """
    cls = _MODEL_TYPES.get(str(model_type).lower().strip())
    if cls is None:
        raise ValueError(f"Unknown model_type {model_type!r}; use one of: {', '.join(sorted(_MODEL_TYPES))}")
    return cls(**kwargs)


def list_models(
    base_url: Optional[str] = None,
    api_key: Optional[str] = None,
    categories: Optional[Sequence[str]] = None,
    *,
    with_meta: bool = False,
    **client: Any,
) -> List[Dict[str, Any]]:
    """The models with a running instance, with their categories: ``list_models(categories=["embedding"])``.

    Each item is GPUStack's own (``id``, ``owned_by``, ``meta``, ...) plus ``categories``, learned by
    asking the server once per category (its items don't say). ``with_meta=True`` fills ``meta``
    (context window, voices, ...), which GPUStack leaves null otherwise. Takes the models' client
    options (``timeout``, ``verify``, ``headers``, ...); asks afresh, never retries.
    """
    if isinstance(categories, str):
        categories = [categories]
    for category in categories or ():
        if category not in MODEL_CATEGORIES:
            raise ValueError(f"Unknown category {category!r}; use one of: {', '.join(MODEL_CATEGORIES)}")
    given = {"base_url": base_url, "api_key": api_key, **client}
    settings = _client_options(given)._client_settings("list_models")
    _no_other_options(given, "list_models")
    deployment = _deployment(settings)
    models = deployment.models(list(categories or ()), with_meta, settings.timeout, True, settings.connect_timeout)
    found = deployment.categories(settings.timeout, True, settings.connect_timeout)
    return [{**model, "categories": found.get(model["id"], [])} for model in models]


async def alist_models(
    base_url: Optional[str] = None,
    api_key: Optional[str] = None,
    categories: Optional[Sequence[str]] = None,
    **options: Any,
) -> List[Dict[str, Any]]:
    """``await alist_models()``: list_models() without blocking the event loop."""
    return await _in_thread(list_models, base_url, api_key, categories, **options)


# Agno's entry points: its names, model strings, the registry, traces ###########
# A GPUStack model wherever Agno takes a model. Nothing here runs on a call of a model.

# Agno's names for these classes, for code written against its other providers.
GPUStackEmbedder = GPUStackEmbeddings
GPUStackReranker = GPUStackRerank


def registry(base_url: Optional[str] = None, api_key: Optional[str] = None, **client: Any) -> Any:
    """An Agno ``Registry`` with a GPUStackChat for each running chat model, for AgentOS Studio:
    ``AgentOS(agents=[...], registry=gpustack.registry())``. Takes the client options, as list_models() does."""
    from agno.registry import Registry

    given = {"base_url": base_url, "api_key": api_key, **client}
    options = _client_options(given)
    _no_other_options(given, "registry")
    settings = options._client_settings("registry")
    running = _deployment(settings).models(["llm"], seconds=settings.timeout, fresh=True,
                                           connect_timeout=settings.connect_timeout)
    return Registry(name="GPUStack", models=[GPUStackChat(id=model["id"], **options.keywords()) for model in running])


# Agno builds a model from "gpustack:<id>" (Agent(model=...), Compaction, FallbackConfig, evals, memory
# optimisation) and rebuilds a saved one from its id alone: it finds the class through its table of providers.

AGNO_PROVIDER_KEY = "gpustack"


def _model_from_agno(id: str) -> GPUStackChat:
    """What Agno builds for ``"gpustack:<id>"``: the server and key from GPUSTACK_SERVER_URL and GPUSTACK_API_KEY,
    as for every provider Agno rebuilds."""
    model = GPUStackChat(id=id)
    model._named_by_agno = True
    return model


def _join_agno_model_strings() -> None:
    """Register the ``gpustack`` provider with Agno's string resolution: ``Agent(model="gpustack:qwen3")``.
    Feature-detected: Agno's own entry, or a table that has moved, is left alone (and said, in the debug log)."""
    from agno.utils.log import log_debug

    try:
        from agno.models import utils
    except ImportError:
        log_debug("gpustack: agno.models.utils is gone; 'gpustack:<model>' strings are not registered")
        return
    table = getattr(utils, "MODEL_PROVIDER_CLASSES", None)
    if not isinstance(table, dict):
        log_debug("gpustack: Agno's MODEL_PROVIDER_CLASSES has moved; 'gpustack:<model>' strings are not registered")
    elif AGNO_PROVIDER_KEY in table and table[AGNO_PROVIDER_KEY][1] != _model_from_agno.__name__:
        log_debug(f"gpustack: Agno has its own {AGNO_PROVIDER_KEY!r} provider {table[AGNO_PROVIDER_KEY]}; it is kept")
    else:
        table[AGNO_PROVIDER_KEY] = (__name__, _model_from_agno.__name__)


_join_agno_model_strings()


# AgentOS traces: OpenInference's Agno instrumentor wraps the model classes it finds as members of the modules
# of the agno.models package, when it starts. GPUStackChat is named there, so each instrument() wraps it as it
# wraps Agno's own (and uninstrument() unwraps it). Nothing of OpenTelemetry or OpenInference is imported or
# touched here: tracing started before this module was imported wraps GPUStackChat when it starts again.


def _join_agno_traces(cls: type) -> None:
    import agno.models.base

    setattr(agno.models.base, f"_gpustack_{cls.__qualname__}", cls)


_join_agno_traces(GPUStackChat)


# Diagnosis ###################################################################
# `doctor`: is this GPUStack ready for Agno agents? What a failed call's error can add comes from the
# deployment layer above; here, a run of tiny requests that each check one thing an agent needs.

DOCTOR_TIMEOUT = 30.0
_DOCTOR_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
_DOCTOR_SCHEMA = {"type": "json_schema", "json_schema": {"name": "answer", "strict": True, "schema": {
    "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}}}


class _Report:
    """The checks of one ``diagnose()`` run, each a dict: check, model, ok, detail, fix, seconds."""

    def __init__(self) -> None:
        self.checks: List[Dict[str, Any]] = []
        self.no_answer = False  # the last failed check got no HTTP answer at all

    def run(self, check: str, probe: Callable[[], Tuple[bool, str, str]], model: Optional[str] = None) -> bool:
        """Run one probe, which returns (ok, detail, fix); an error it raises is a failed check with the error's words."""
        started = time.monotonic()
        try:
            ok, detail, fix = probe()
        except ThoughtTooLongError:  # doctor's few tokens: a reasoning model answers, given room
            ok, detail, fix = True, "answered with reasoning only: the check's few tokens are too few to finish thinking", ""
        except ModelProviderError as error:
            ok, detail, fix = False, error.message, ""
            self.no_answer = _no_answer(error)
            if self.no_answer and "certificate" in error.message:
                fix = "use --ca-bundle FILE for a private CA, or --insecure for a self-signed certificate"
        except (ValueError, TypeError, EmbeddingError) as error:
            ok, detail, fix = False, str(error), ""
        except RetryableModelProviderError as error:  # what Agno would ask again about; here, a failed check
            ok, detail, fix = False, str(error.original_error), ""
        self.checks.append({"check": check, "model": model, "ok": ok, "detail": detail, "fix": fix or None,
                            "seconds": round(time.monotonic() - started, 3)})
        return ok


def diagnose(
    base_url: Optional[str] = None,
    api_key: Optional[str] = None,
    models: Optional[Sequence[str]] = None,
    all_models: bool = False,
    timeout: float = DOCTOR_TIMEOUT,
    verify: Union[bool, str] = True,
    **client: Any,
) -> Dict[str, Any]:
    """Check a GPUStack server and its models for Agno agents: ``diagnose(models=["qwen3"])["ok"]``.

    Returns ``{"server", "version", "reachable", "ok", "checks": [{"check", "model", "ok", "detail", "fix",
    "seconds"}, ...]}``. Tiny requests only (a few tokens), each bounded by ``timeout``, not retried
    unless ``max_retries`` says so; takes the models' other client options (``headers``, ...) too.
    """
    client.setdefault("max_retries", 0)
    given = {"base_url": base_url, "api_key": api_key, "timeout": timeout, "verify": verify, **client}
    options = _client_options(given)
    _no_other_options(given, "diagnose")
    settings = options._client_settings("diagnose")
    transport = _Transport(settings)
    report = _Report()
    found: Dict[str, Any] = {"server": settings.root, "version": None, "reachable": True}

    def server() -> Tuple[bool, str, str]:
        transport.answer("GET", "/healthz")
        try:
            version = transport.answer("GET", "/version")
        except ModelProviderError:
            return False, f"{settings.root} answers /healthz but not /version", "set --server to the GPUStack server itself"
        found["version"] = version.get("version") if isinstance(version, dict) else None
        return True, f"GPUStack {found['version'] or '(unknown version)'} at {settings.root}", ""

    if not report.run("server", server):
        found.update(reachable=not report.no_answer, ok=False, checks=report.checks)
        return found
    key_ok = report.run("API key", lambda: _key_scopes(transport, settings))
    running: List[Dict[str, Any]] = []

    def catalog() -> Tuple[bool, str, str]:
        running.extend(list_models(with_meta=True, **model_client))
        if not running:
            return True, "no running models", "deploy a model in GPUStack, or wait for one to start"
        return True, "; ".join(_model_line(item) for item in running), ""

    model_client = options.keywords()
    model_client["api_key"] = options.api_key or ""
    if key_ok:
        report.run("running models", catalog)
    categories = {item["id"]: item.get("categories") or [] for item in running}
    wanted = list(models or ()) + ([item["id"] for item in running if item["id"] not in (models or ())] if all_models else [])
    for name in wanted:
        _check_model(report, name, categories.get(name, []), model_client)
    found.update(ok=all(check["ok"] for check in report.checks), checks=report.checks)
    return found


def _key_scopes(transport: _Transport, settings: _Settings) -> Tuple[bool, str, str]:
    if not settings.api_key:
        return False, "no API key set", f"set {API_KEY_ENV} (or --api-key-file) to a key from GPUStack's UI, API Keys"
    _deployment(settings).models(seconds=settings.timeout, fresh=True)  # the inference scope
    try:
        transport.call("GET", "/v2/my-models?perPage=1", expect="items")
    except ModelProviderError as error:
        if error.status_code != 403:
            raise
        return True, "accepted; scopes: inference (no management scope: model states can't be looked up)", ""
    return True, "accepted; scopes: inference, management", ""


def _model_line(item: Dict[str, Any]) -> str:
    meta: Dict[str, Any] = item["meta"] if isinstance(item.get("meta"), dict) else {}
    extra = [",".join(item.get("categories") or []) or "no category"]
    window = _window_of(meta)
    if window:
        extra.append(f"context {window}")
    if meta.get("voices"):
        extra.append(f"voices {', '.join(map(str, meta['voices'][:5]))}")
    return f"{item['id']} ({', '.join(extra)})"


def _check_model(report: _Report, name: str, categories: List[str], client: Dict[str, Any]) -> None:
    """The checks a model of its category needs; a model that isn't running gets a chat call, whose error says why."""
    if "embedding" in categories:
        embedder = GPUStackEmbeddings(id=name, **client)
        report.run("embedding", lambda: (True, f"{len(embedder.parse_embeddings_response(embedder.embed('doctor'))[0])} "
                                               "dimensions", ""), name)
        return
    if "reranker" in categories:
        reranker = GPUStackRerank(id=name, **client)
        documents = ["GPUStack runs models on GPUs.", "Bananas are yellow.", "Agno builds agents."]
        report.run("rerank", lambda: (True, f"best: {reranker.rerank('What runs models?', documents)[0]['document']!r}", ""), name)
        return
    if categories and "llm" not in categories:
        report.checks.append({"check": "skipped", "model": name, "ok": True, "detail": f"{','.join(categories)} model: not "
                              "checked here", "fix": None, "seconds": 0.0})
        return
    chat = GPUStackChat(id=name, max_tokens=16, recover_tool_calls=False, **client)  # doctor reports the deployment
    if not report.run("chat", lambda: _chat_check(chat), name):
        return
    report.run("stream", lambda: _stream_check(chat), name)
    report.run("tools", lambda: _tools_check(chat), name)
    report.run("json_schema", lambda: _schema_check(chat), name)


def _doctor_prompt() -> List[Message]:
    return [Message(role="user", content="Reply with one word: OK")]


def _chat_check(chat: GPUStackChat) -> Tuple[bool, str, str]:
    answer = chat.invoke(_doctor_prompt())
    said = f"answered {(answer.content or '').strip()[:40]!r}"
    return True, said + (", with reasoning output" if answer.reasoning_content else ""), ""


def _stream_check(chat: GPUStackChat) -> Tuple[bool, str, str]:
    pieces = list(chat.invoke_stream(_doctor_prompt()))
    usage = any(piece.response_usage is not None for piece in pieces)
    return True, f"{len(pieces)} pieces" + (", usage reported" if usage else ", no usage chunk"), ""


def _schema_check(chat: GPUStackChat) -> Tuple[bool, str, str]:
    answer = chat.invoke(_doctor_prompt(), response_format=_DOCTOR_SCHEMA)
    return True, f"accepted, answered {(answer.content or '').strip()[:40]!r}", ""


def _tools_check(chat: GPUStackChat) -> Tuple[bool, str, str]:
    answer = chat.invoke([Message(role="user", content="What time is it in Paris? Use the tool.")], tools=[_DOCTOR_TOOL],
                         tool_choice="auto")
    if answer.tool_calls:
        return True, "tool_calls returned", ""
    if "<tool_call>" in (answer.content or ""):
        return False, "answered with <tool_call> markup as text, no tool_calls", (
            "add a tool-call parser to the model's Backend Parameters on GPUStack (SGLang: --tool-call-parser=<parser>)")
    return True, "accepted, but the model answered with text (no tool_calls)", ""


# Command line ################################################################

EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_SERVER = 3  # GPUStack (or a proxy in front of it) answered with an error
EXIT_CONNECTION = 4  # no answer at all: refused, DNS, TLS, timeout
EXIT_CHECK_FAILED = 1  # doctor: the server answered, and a check failed
EXIT_INTERRUPTED = 130

_EPILOG = """examples:
  export GPUSTACK_SERVER_URL=http://gpustack:9009 GPUSTACK_API_KEY=...
  python gpustack.py models --category llm
  python gpustack.py chat -m qwen3 "Write a haiku about GPUs"
  echo "Summarise: ..." | python gpustack.py chat -m qwen3 -
  python gpustack.py embed -m bge-m3 "first text" "second text"
  python gpustack.py rerank -m bge-reranker-v2-m3 "capital of France?" "Paris ..." "Berlin ..."
  python gpustack.py image -m flux.1-schnell "a lighthouse at dusk" -o lighthouse.png
  python gpustack.py speak -m cosyvoice "Hello there" -o hello.mp3
  python gpustack.py transcribe -m whisper note.wav
  python gpustack.py doctor -m qwen3 -m bge-m3

exit codes: 0 ok, 1 a doctor check failed, 2 usage, 3 server error, 4 no connection, 130 interrupted.
The API key is read from GPUSTACK_API_KEY or --api-key-file, never from the command line."""


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=argparse.SUPPRESS, help=f"GPUStack URL (default: ${SERVER_URL_ENV} or {DEFAULT_SERVER_URL})")
    common.add_argument("--api-key-file", default=argparse.SUPPRESS, metavar="FILE", help=f"file holding the API key (default: ${API_KEY_ENV})")
    common.add_argument("--timeout", type=float, default=argparse.SUPPRESS, help="seconds to wait for the server (default: 600; doctor 30; image, speak, transcribe 900)")
    common.add_argument("--insecure", action="store_true", default=argparse.SUPPRESS, help="accept any TLS certificate")
    common.add_argument("--ca-bundle", default=argparse.SUPPRESS, metavar="FILE", help="CA bundle for a private certificate authority")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable JSON output")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("-m", "--model", required=True, help="model name on GPUStack")

    parser = argparse.ArgumentParser(
        prog="gpustack.py", description="Talk to a GPUStack server from the shell.", parents=[common],
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[common, *parents],
                                   epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)

    chat = command("chat", "chat with a model, streaming the answer", model)
    chat.add_argument("prompt", help="the prompt, or - to read it from stdin")
    chat.add_argument("--system", help="a system prompt")
    chat.add_argument("--no-stream", action="store_true", help="print the answer in one piece")
    chat.add_argument("--temperature", type=float)
    chat.add_argument("--max-tokens", type=int)

    complete = command("complete", "complete a text prompt (/v1/completions)", model)
    complete.add_argument("prompt", help="the prompt, or - to read it from stdin")
    complete.add_argument("--no-stream", action="store_true", help="print the answer in one piece")
    complete.add_argument("--temperature", type=float)
    complete.add_argument("--max-tokens", type=int)

    embed = command("embed", "embed texts, one JSON vector per line", model)
    embed.add_argument("texts", nargs="+", metavar="TEXT", help="texts to embed, or - to read one per line from stdin")
    embed.add_argument("--dims", action="store_true", help="print only each vector's dimensions")

    rerank = command("rerank", "rank documents against a query", model)
    rerank.add_argument("query")
    rerank.add_argument("documents", nargs="+", metavar="DOC", help="documents, or - to read one per line from stdin")
    rerank.add_argument("--top-n", type=int)

    models = command("models", "list models with a running instance and their categories")
    models.add_argument("--category", action="append", choices=MODEL_CATEGORIES, help="only this category (repeatable)")

    optional_model = argparse.ArgumentParser(add_help=False)
    optional_model.add_argument("-m", "--model", help="model name on GPUStack (default: the one running model of its kind)")
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the bytes (- for stdout)")

    image = command("image", "generate an image", optional_model, output)
    image.add_argument("prompt")
    image.add_argument("--size", default="1024x1024")
    image.add_argument("-n", type=int, default=1, help="how many images (the 2nd goes to FILE-2.ext, ...)")
    image.add_argument("--seed", type=int)

    speak = command("speak", "turn text into speech", optional_model, output)
    speak.add_argument("text", help="the text, or - to read it from stdin")
    speak.add_argument("--voice")
    speak.add_argument("--format", default="mp3", choices=sorted(_AUDIO_TYPES))

    transcribe = command("transcribe", "print the text of an audio file", optional_model)
    transcribe.add_argument("audio", help="the audio file, or - to read it from stdin")
    transcribe.add_argument("--language")

    doctor = command("doctor", "check that the server, the key and the models are ready for Agno agents")
    doctor.add_argument("-m", "--model", action="append", default=[], help="a model to check (repeatable)")
    doctor.add_argument("--all", action="store_true", help="check every running model")
    return parser


def _stdin_or(values: List[str]) -> List[str]:
    if values == ["-"]:
        return [line for line in sys.stdin.read().splitlines() if line.strip()]
    return values


def _cli_options(args: argparse.Namespace) -> Dict[str, Any]:
    options: Dict[str, Any] = {"base_url": getattr(args, "server", None)}
    key_file = getattr(args, "api_key_file", None)
    if key_file:
        try:
            with open(key_file, encoding="utf-8") as handle:
                options["api_key"] = handle.read().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --api-key-file {key_file}: {exc.strerror}") from None
    if getattr(args, "timeout", None) is not None:
        options["timeout"] = args.timeout
    if getattr(args, "insecure", False):
        options["verify"] = False
    elif getattr(args, "ca_bundle", None):
        options["verify"] = args.ca_bundle
    return options


def _run(args: argparse.Namespace, out: Any) -> Optional[int]:
    options = _cli_options(args)
    as_json = getattr(args, "json", False)
    if args.command == "doctor":
        report = diagnose(options.get("base_url"), options.get("api_key"), args.model, args.all,
                          options.get("timeout", DOCTOR_TIMEOUT), options.get("verify", True))
        out.write(json.dumps(report) + "\n" if as_json else _report_text(report))
        if not report["reachable"]:
            return EXIT_CONNECTION
        if not report["checks"][0]["ok"]:
            return EXIT_SERVER
        return 0 if report["ok"] else EXIT_CHECK_FAILED
    if args.command in ("image", "speak", "transcribe"):
        _run_media(args, options, out)
        return None
    if args.command == "models":
        models = list_models(categories=args.category, with_meta=as_json, **options)
        if as_json:
            out.write(json.dumps(models) + "\n")
        for item in [] if as_json else models:
            out.write(f"{item['id']}\t{','.join(item['categories']) or '-'}\n")
    elif args.command in ("chat", "complete"):
        prompt = _stdin_or([args.prompt])
        text = "\n".join(prompt) if args.prompt == "-" else args.prompt
        model = GPUStackChat(id=args.model, temperature=args.temperature, max_tokens=args.max_tokens, **options)
        stream = not args.no_stream and not as_json
        if args.command == "complete":
            answer = model.complete(text, stream=stream)
            if stream:
                _print_stream(answer, out)  # type: ignore[arg-type]
            else:
                out.write(json.dumps({"content": answer}) + "\n" if as_json else f"{answer}\n")
            return None
        messages = ([Message(role="system", content=args.system)] if args.system else []) + [Message(role="user", content=text)]
        if stream:
            _print_stream((piece.content for piece in model.invoke_stream(messages) if piece.content), out)
            return None
        response = model.invoke(messages)
        if as_json:
            usage = response.response_usage
            out.write(json.dumps({
                "content": response.content,
                "reasoning_content": response.reasoning_content,
                "tool_calls": response.tool_calls or None,
                "usage": None if usage is None else {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens, "total_tokens": usage.total_tokens},
            }) + "\n")
        else:
            out.write(f"{response.content or ''}\n")
    elif args.command == "embed":
        embedder = GPUStackEmbeddings(id=args.model, **options)
        vectors = embedder.parse_embeddings_response(embedder.embed(_stdin_or(args.texts)))
        for vector in vectors:
            out.write(f"{len(vector)}\n" if args.dims else json.dumps(vector) + "\n")
    elif args.command == "rerank":
        reranker = GPUStackRerank(id=args.model, **{k: v for k, v in options.items() if v is not None})
        results = reranker.rerank(args.query, _stdin_or(args.documents), top_n=args.top_n)
        if as_json:
            out.write(json.dumps(results) + "\n")
        for result in [] if as_json else results:
            out.write(f"{result['relevance_score']:.4f}\t{result['document']}\n")
    return None


def _run_media(args: argparse.Namespace, options: Dict[str, Any], out: Any) -> None:
    model = args.model
    tools = GPUStackTools(image_model=model, speech_model=model, transcription_model=model,
                          **{k: v for k, v in options.items() if v is not None})
    if args.command == "image":
        images = tools.image(args.prompt, args.size, seed=args.seed, n=args.n)
        for number, image in enumerate(images, 1):
            _write(args.output, image.content or b"", number)
    elif args.command == "speak":
        text = sys.stdin.read() if args.text == "-" else args.text
        _write(args.output, tools.speech(text, args.voice, args.format).content or b"", 1)
    else:
        if args.audio == "-":
            text = tools.transcribe(sys.stdin.buffer.read(), "audio.wav", args.language)
        else:
            text = tools.transcribe_file(args.audio, args.language)
        out.write(json.dumps({"text": text}) + "\n" if getattr(args, "json", False) else text + "\n")


def _write(path: str, data: bytes, number: int) -> None:
    """Write bytes to a file (the n-th of several as FILE-n.ext) or, for ``-``, to stdout."""
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    if number > 1:
        stem, ext = os.path.splitext(path)
        path = f"{stem}-{number}{ext}"
    try:
        with open(path, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise ValueError(f"cannot write {path}: {exc.strerror}") from None


def _report_text(report: Dict[str, Any]) -> str:
    lines = []
    for check in report["checks"]:
        name = f"{check['model']} {check['check']}" if check["model"] else check["check"]
        lines.append(f"{'✓' if check['ok'] else '✗'} {name}: {check['detail']} ({check['seconds']:.2f} s)")
        if check["fix"]:
            lines.append(f"  fix: {check['fix']}")
    lines.append("ready for Agno agents" if report["ok"] else "not ready: see the ✗ lines")
    return "\n".join(lines) + "\n"


def _print_stream(pieces: Iterator[str], out: Any) -> None:
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # on Ctrl-C too: the connection closes and GPUStack stops generating


def main(argv: Optional[List[str]] = None) -> int:
    """The command line: ``python gpustack.py chat -m qwen3 "Hello"``; returns the exit code."""
    args = _parser().parse_args(argv)
    import logging

    logging.getLogger("agno").setLevel(logging.ERROR)  # one line on stderr: ours, not each retry's warning
    try:
        code = _run(args, sys.stdout)
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_INTERRUPTED
    except ModelProviderError as error:
        sys.stderr.write(f"gpustack: error: {error.message}\n")
        return EXIT_CONNECTION if _no_answer(error) else EXIT_SERVER
    except RetryableModelProviderError as error:  # an Agno agent would ask once more; the command line reports it
        sys.stderr.write(f"gpustack: error: {error.original_error}\n")
        return EXIT_SERVER
    except ValueError as error:
        sys.stderr.write(f"gpustack: usage error: {error}\n")
        return EXIT_USAGE
    except BrokenPipeError:
        return 0  # the reader of our output went away (e.g. `| head`)
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
