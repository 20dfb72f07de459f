"""The API's two ASGI middlewares. Both are pure ASGI (not ``BaseHTTPMiddleware``) so that neither buffers
a streaming response such as the job events.

- :class:`BodyLimitMiddleware`: a request body over its route's limit is answered 413 before the app has
  read it, so an oversized upload never fills the disk.
- :class:`LatencyMiddleware`: the request latency histogram of ``api.metrics``.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from api.metrics import Metrics
from core.settings import Settings

JSON_BODY_LIMIT = 1 << 20
DETECT_BODY_LIMIT = 50 << 20
# After a refusal, up to this much more of the body is read and dropped so that ordinary clients, which
# send the whole body before reading the answer, see the 413 instead of a connection reset.
_DRAIN_BYTES = 4 << 20


def body_limit(path: str, settings: Settings) -> int:
    """Uploads may be as large as ``max_upload_bytes``; an image to detect 50 MiB at most; JSON 1 MiB."""
    if path in ("/v1/datasets", "/v1/checkpoints"):
        return settings.max_upload_bytes
    if path == "/detect" or path.endswith("/detect"):
        return min(settings.max_upload_bytes, DETECT_BODY_LIMIT)
    return min(settings.max_upload_bytes, JSON_BODY_LIMIT)


class BodyLimitMiddleware:
    """Answers 413 as soon as a request body goes over its route's limit.

    With a ``Content-Length`` over the limit nothing is read into the app; otherwise bytes are counted
    as they stream in and the app's own (partial) response is replaced by the 413.
    """

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope["path"], self.settings)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(receive, send, limit, 0)
            return
        received, over, started = 0, False, False

        async def _receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _TooLarge()
            return message

        async def _send(message: Message) -> None:
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        except _TooLarge:
            pass
        except Exception:
            # The app may turn _TooLarge into its own error (a form parser does); once over, it is a 413.
            if not over:
                raise
        if over and not started:
            await self._refuse(receive, send, limit, received)

    @staticmethod
    async def _refuse(receive: Receive, send: Send, limit: int, already: int) -> None:
        drained, more = already, True
        while more and drained < limit + _DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        response = error_response(413, "payload_too_large", f"the request body is over the limit of {limit} bytes")
        await response({"type": "http"}, receive, send)


class _TooLarge(Exception):
    pass


def route_template(scope: Scope) -> str:
    """The matched route's path template (set in the scope by the router), or ``<unmatched>``.

    Templates keep the label cardinality bounded: one series per endpoint, not one per job id.
    """
    return getattr(scope.get("route"), "path", None) or "<unmatched>"


class LatencyMiddleware:
    """Observes ``ldd_http_request_duration_seconds{method, route, status}`` for every HTTP request."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def _send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            route = route_template(scope)
            self.metrics.latency.labels(scope["method"], route, str(status)).observe(time.perf_counter() - start)
