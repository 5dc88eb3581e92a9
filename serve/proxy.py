"""What Serve's HTTP proxy itself enforces, before a request reaches a replica (no Ray import; testable alone).

Serve hands a request to a replica as soon as its headers arrive and then streams the body: the
proxy reads it as fast as the client sends it and queues it, and the replica pulls that queue in
the background, whatever the route reads. So a replica that refuses a body at `max_body_mb`
cannot stop the bytes already on their way (a chunked 250 MiB stream against the 80 MiB limit cost
the replica about 250 MiB and the proxy about 440 MiB), and a client that stalls mid-body holds
one of the replica's `max_ongoing_requests` until `body_timeout_s`.

`ProxyGuard` runs in the proxy and reads the whole body first, with the replica's own routine
(`lmadda_serve.codec.read_body`: the byte limit kept while streaming, the time limit), and only then
hands the request to Serve. A body over the limit gets 413 and is read no further; a stalled one
gets 408; neither ever reaches Serve's router, so they hold no replica and count against no limit
of Serve's. It also gives Serve's own refusals, which are plain text (503 when every replica and
the queue are full, 408 at `request_timeout_s`, 500 when a replica dies mid-request), the
endpoint's error shape `{"error": ...}`, keeping their headers (Retry-After).

It is installed through Serve's proxy callback, an environment variable the proxy reads when it
starts: `serve/config.yaml` sets it under `controller_options.runtime_env.env_vars` (the Serve
controller starts the proxies, and they inherit its environment), which `serve run`, `lmadda
serve` and the RayService all apply when they start Serve. A Serve instance that was already
running keeps its proxies as they were; the replica's own limits hold either way.
"""

from __future__ import annotations

import json
import os

PROXY_CALLBACK = "lmadda_serve.proxy:middlewares"
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"  # read by Serve's proxy at start-up
MAX_BODY_ENV = "LMADDA_PROXY_MAX_BODY_MB"  # the application's max_body_mb
BODY_TIMEOUT_ENV = "LMADDA_PROXY_BODY_TIMEOUT_S"  # the application's body_timeout_s
# The statuses Serve's proxy answers itself, as text, and what they mean to a client of this endpoint.
SERVE_ERRORS = {
    408: "the request took longer than the endpoint's request_timeout_s",
    429: "too many requests: retry after the Retry-After delay",
    500: "a replica failed while answering; retry the request",
    503: "the endpoint is busy (every replica is full and so is the queue) or has no replica running; retry after the Retry-After delay",
}


def middlewares() -> list:
    """The proxy callback: Serve calls it in each proxy and wraps its ASGI app in what it returns."""
    from starlette.middleware import Middleware

    mib, seconds = os.environ.get(MAX_BODY_ENV), os.environ.get(BODY_TIMEOUT_ENV)
    return [Middleware(ProxyGuard, max_bytes=int(float(mib) * 2**20) if mib else None,
                       body_timeout_s=float(seconds) if seconds else None)]


def proxy_env(max_body_mb: float, body_timeout_s: float) -> dict[str, str]:
    """The environment that installs ProxyGuard in Serve's proxies with the application's body limits."""
    return {CALLBACK_ENV: PROXY_CALLBACK, MAX_BODY_ENV: f"{max_body_mb:g}", BODY_TIMEOUT_ENV: f"{body_timeout_s:g}"}


def json_error(status: int, message: str, headers: list | None = None) -> list[dict]:
    body = json.dumps({"error": message}).encode()
    kept = [(k, v) for k, v in headers or [] if k.lower() not in (b"content-type", b"content-length")]
    return [{"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *kept]},
            {"type": "http.response.body", "body": body}]


class ClientGone(Exception):
    """The client disconnected before its body was in: nobody to answer."""


class ProxyGuard:
    """ASGI middleware in Serve's proxy: bodies read whole under the application's limits before
    Serve routes the request, and Serve's own errors as JSON."""

    def __init__(self, app, max_bytes: int | None = None, body_timeout_s: float | None = None):
        self.app, self.max_bytes, self.body_timeout_s = app, max_bytes, body_timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.max_bytes is not None and self.body_timeout_s is not None:
            from lmadda_serve.codec import RequestError, read_body

            try:
                body = await read_body(self.body_chunks(receive), declared_length=dict(scope["headers"]).get(b"content-length", b"").decode(),
                                       max_bytes=self.max_bytes, timeout_s=self.body_timeout_s)
            except RequestError as error:  # Serve never sees the request
                for message in json_error(error.status, error.message):
                    await send(message)
                return
            except ClientGone:
                return
            receive = self.replay(body, receive)
        await self.app(scope, receive, self.json_errors(send))

    @staticmethod
    async def body_chunks(receive):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    @staticmethod
    def replay(body: bytes, receive):
        """`receive` for Serve: the body in one message, then the client's own (which reports its disconnect)."""
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replayed():
            return pending.pop() if pending else await receive()

        return replayed

    @staticmethod
    def json_errors(send):
        """`send` for Serve: its own text errors rewritten as {"error": ...}; everything else as it is."""
        held: list = []  # [start message, body parts] of a text error being rewritten

        async def rewriting(message) -> None:
            if message["type"] == "http.response.start":
                content_type = dict(message.get("headers") or []).get(b"content-type", b"")
                if message["status"] in SERVE_ERRORS and content_type.startswith(b"text/plain"):
                    held[:] = [message, []]
                    return
            if held and message["type"] == "http.response.body":
                held[1].append(message.get("body", b""))
                if not message.get("more_body", False):
                    start, text = held[0], b"".join(held[1]).decode("utf-8", "replace").strip()
                    for rewritten in json_error(start["status"], SERVE_ERRORS[start["status"]] + (f" (Serve: {text})" if text else ""),
                                                list(start.get("headers") or [])):
                        await send(rewritten)
                return
            await send(message)

        return rewriting
