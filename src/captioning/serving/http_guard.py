"""The served model's HTTP guard: bounded requests and short error replies in `mlflow models serve`.

MLflow's scoring server (a FastAPI app that uvicorn imports from
`mlflow.pyfunc.scoring_server.app`) reads any body into memory, answers a
missing Content-Type with a 500, and prefixes every prediction error with the
whole request ("Failed to predict data '<input>'"). `RequestGuard` is a plain
ASGI middleware in front of its `/invocations` route that
- refuses a missing or non-JSON Content-Type with 415 and a body over
  `max_request_bytes` with 413, from the headers, before reading it (and a
  chunked body as soon as it passes the limit);
- lets `max_concurrent_requests` requests in at a time; the others wait with
  their bodies unread (uvicorn stops reading a socket whose body is not
  consumed), so memory holds at most that many bodies and their parsed copies;
- answers every error of the route as `{"error_code", "message"}`, with any
  echo of the request (long quoted or unbroken runs) cut and the message capped,
  never a stack trace, and a body MLflow's parser fails on unhandled as a 400
  rather than a 500;
- hands freed memory back to the OS: glibc serves every allocation over
  4 MiB (a body, a decoded photo) from its own mapping, returned when freed,
  instead of from per-thread heaps that keep it, and `malloc_trim` runs when
  the last request in flight finishes, so the server's RSS returns near its
  baseline.
MLflow has no option to add middleware, so `install_in_scoring_server`, called
from the model's `load_context`, adds it to the one FastAPI app the scoring
server builds right after loading the model; anywhere else (a notebook,
`spark_udf`, MLflow's stdin server) it does nothing. tests/test_serving_limits.py
checks every case over real HTTP against `mlflow models serve`.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from typing import Any

SCORING_APP_MODULE = "mlflow.pyfunc.scoring_server.app"
INVOCATIONS_PATH = "/invocations"
ACCEPTED_CONTENT_TYPE = "application/json"
MAX_MESSAGE_CHARS = 600  # an error names the image and the problem in a line or two
# MLflow's prefix on prediction errors: f"Failed to predict data '{data}'. \nError: {message}".
_PREDICT_PREFIX = re.compile(r"^Failed to predict data '.*'\. \nError: ", re.DOTALL)
# ... and the suffix of its invalid-JSON error: "... \nInput: \n<the body>".
_INPUT_SUFFIX = re.compile(r"\s*\nInput: .*$", re.DOTALL)
# What is left of an echoed request: a long quoted value, or a long run without spaces (base64).
_ECHO = re.compile(r"'[^']{80,}'|\"[^\"]{80,}\"|\S{80,}")
_BUFFERED_ERROR_BYTES = 1 << 20  # more of an error body than this is not kept

_logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def short_message(raw: str) -> str:
    """An error message without the echoed request or anything past MAX_MESSAGE_CHARS."""
    message = _INPUT_SUFFIX.sub("", _PREDICT_PREFIX.sub("", raw))
    message = _ECHO.sub("<request data omitted>", message).strip()
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS].rstrip() + " ... (message cut)"
    return message


def error_body(status: int, body: bytes) -> bytes:
    """The reply for an error of the route: `{"error_code", "message"}` from MLflow's JSON or text."""
    text = body.decode("utf-8", "replace")
    code, message = _DEFAULT_CODES.get(status, "BAD_REQUEST"), text
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("message"), str):
        code, message = str(parsed.get("error_code", code)), parsed["message"]
    return json.dumps({"error_code": code, "message": short_message(message)}).encode()


_DEFAULT_CODES = {
    413: "REQUEST_LIMIT_EXCEEDED",
    415: "UNSUPPORTED_MEDIA_TYPE",
    500: "INTERNAL_ERROR",
    504: "DEADLINE_EXCEEDED",
}


class RequestGuard:
    """ASGI middleware bounding `/invocations` requests and shortening their error replies."""

    def __init__(self, app, max_request_bytes: int, max_concurrent_requests: int):
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.max_concurrent_requests = max_concurrent_requests
        self._slots: asyncio.Semaphore | None = None  # made in the server's event loop
        self._in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != INVOCATIONS_PATH:
            await self.app(scope, receive, send)
            return
        headers = {key.lower(): value for key, value in scope["headers"]}
        refusal = self._refusal(headers)
        if refusal is not None:
            await reply(send, *refusal)
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrent_requests)
        self._in_flight += 1
        try:
            async with self._slots:
                await self._handle(scope, receive, send)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                await asyncio.to_thread(release_free_memory)

    def _refusal(self, headers: dict[bytes, bytes]) -> tuple[int, str, str] | None:
        """(status, error code, message) when the headers alone refuse the request."""
        content_type = headers.get(b"content-type")
        accepted = f"send the JSON body with 'Content-Type: {ACCEPTED_CONTENT_TYPE}'"
        if content_type is None:
            return 415, "UNSUPPORTED_MEDIA_TYPE", f"missing Content-Type header: {accepted}"
        mime = content_type.decode("latin-1").split(";")[0].strip().lower()
        if mime != ACCEPTED_CONTENT_TYPE:
            shown = content_type.decode("latin-1")[:80]
            return (
                415,
                "UNSUPPORTED_MEDIA_TYPE",
                f"Content-Type {shown!r} is not accepted: {accepted}",
            )
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return 400, "BAD_REQUEST", "the Content-Length header is not a number"
            if int(length) > self.max_request_bytes:
                return 413, "REQUEST_LIMIT_EXCEEDED", self._too_large(int(length))
        return None

    def _too_large(self, size: int | None) -> str:
        body = "the request body" + (f" of {size} bytes" if size is not None else "")
        return (
            f"{body} exceeds the limit of {self.max_request_bytes} bytes; "
            "send fewer or smaller images per request"
        )

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left while waiting: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:  # a chunked body with no Content-Length
                await reply(send, 413, "REQUEST_LIMIT_EXCEEDED", self._too_large(None))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = [b"".join(chunks)]
        del chunks

        async def replay() -> Message:
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            return await receive()  # after the body: wait for the disconnect

        short_errors = ShortErrors(send)
        try:
            await self.app(scope, replay, short_errors)
        except Exception as err:
            # MLflow turns model errors into 400s itself; what escapes is its parsing of
            # the body failing in a way it does not catch (a JSON number of 5000 digits
            # raises ValueError): the request's fault, so a 400, not a 500.
            if short_errors.started:
                raise
            _logger.warning("an /invocations request failed to parse", exc_info=True)
            message = short_message(
                f"the request body could not be read: {type(err).__name__}: {err}"
            )
            await reply(send, 400, "BAD_REQUEST", message)


class ShortErrors:
    """A `send` that passes successes through and turns error replies into short JSON."""

    def __init__(self, send: Send):
        self.send = send
        self.start: Message | None = None
        self.body = bytearray()
        self.started = False  # whether a response began

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if message["status"] < 400:
                await self.send(message)
            else:
                self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        room = _BUFFERED_ERROR_BYTES - len(self.body)
        self.body += message.get("body", b"")[: max(room, 0)]
        if not message.get("more_body", False):
            await _send_json(
                self.send, self.start["status"], error_body(self.start["status"], bytes(self.body))
            )


async def reply(send: Send, status: int, code: str, message: str) -> None:
    """Answer with `{"error_code": code, "message": message}`."""
    await _send_json(send, status, json.dumps({"error_code": code, "message": message}).encode())


async def _send_json(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# glibc mallopt parameters (malloc.h): a fixed threshold also stops glibc raising it
# after each large free, which is what parks freed photos in the heap.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def map_large_allocations() -> None:
    """Have glibc map allocations over MMAP_THRESHOLD_BYTES on their own (freed at once)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Return freed heap memory to the OS (glibc's `malloc_trim`); does nothing elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    """glibc, or None (another OS or C library: the tuning is skipped)."""
    # By its soname: `ctypes.util.find_library` would fork `ldconfig` from a 1 GB server.
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both exist in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def install_in_scoring_server(max_request_bytes: int, max_concurrent_requests: int) -> bool:
    """Put `RequestGuard` in front of the scoring server's app, when the scoring server is loading us.

    `mlflow.pyfunc.scoring_server.app` loads the model and then builds its
    FastAPI app with `scoring_server.init(model)`, which looks `fastapi.FastAPI`
    up as it runs. While that module is still importing (no `app` yet), this
    swaps in a subclass that adds the middleware to the next app made and puts
    the original back at once. Returns whether it was installed.
    """
    module = sys.modules.get(SCORING_APP_MODULE)
    if module is None or hasattr(module, "app"):
        return False
    import fastapi

    original = fastapi.FastAPI

    class GuardedFastAPI(original):
        def __init__(self, *args, **kwargs):
            fastapi.FastAPI = original  # one app only
            super().__init__(*args, **kwargs)
            self.add_middleware(
                RequestGuard,
                max_request_bytes=max_request_bytes,
                max_concurrent_requests=max_concurrent_requests,
            )

    fastapi.FastAPI = GuardedFastAPI
    map_large_allocations()
    _logger.info(
        "request guard: bodies up to %d bytes, %d requests at once",
        max_request_bytes,
        max_concurrent_requests,
    )
    return True
