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

Headers come before any of that, and Serve's proxy parses them with uvicorn's default HTTP parser,
which has no limit on their size or on how long they may take: a 64 MiB header was accepted
(before authentication, which only the replica checks) and stalled the proxy's other connections
while it was parsed, and clients sending header lines slowly were never cut off. The proxy callback
therefore also makes `GuardedH11Protocol` the proxy's HTTP parser (uvicorn's h11 parser, which stops
buffering at `MAX_HEADER_BYTES`, as h11 and nginx's 8 KiB lines do): request line plus headers past
16 KiB get 431, headers not complete within `HEADER_TIMEOUT_S` of their first byte get 408, and a
request h11 cannot parse (a bad Content-Length, Content-Length with Transfer-Encoding) gets 400; each
as JSON, and the connection is closed. Ray does not expose uvicorn's parser choice, so the callback
points uvicorn's "auto" parser at it; it runs in the proxy process only.

It is installed through Serve's proxy callback, an environment variable the proxy reads when it
starts: `serve/config.yaml` sets it under `controller_options.runtime_env.env_vars` (the Serve
controller starts the proxies, and they inherit its environment), which `serve run`, `lmadda
serve` and the RayService all apply when they start Serve. A Serve instance that was already
running keeps its proxies as they were; the replica's own limits hold either way.
"""

from __future__ import annotations

import functools
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


MAX_HEADER_BYTES = 16 * 2**10  # request line + headers; h11's own default, twice nginx's 8 KiB per line
HEADER_TIMEOUT_S = 10.0  # from a request's first byte to its last header line (nginx client_header_timeout: 60 s)
LINGER_S = 2.0  # after a refusal, how long what the client still sends is read and dropped
GUARDED_PARSER = "lmadda_serve.proxy:GuardedH11Protocol"


def middlewares() -> list:
    """The proxy callback: Serve calls it in each proxy, before the proxy's HTTP server starts, and wraps its ASGI
    app in what it returns. It also installs the guarded header parser (module docstring)."""
    from starlette.middleware import Middleware
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = GUARDED_PARSER  # Serve's proxy builds its uvicorn.Config with http="auto"

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
                    headers = list(start.get("headers") or [])
                    if start["status"] in (500, 503) and not any(k.lower() == b"retry-after" for k, _ in headers):
                        headers.append((b"retry-after", b"1"))  # both tell the client to retry: say when
                    for rewritten in json_error(start["status"], SERVE_ERRORS[start["status"]] + (f" (Serve: {text})" if text else ""),
                                                headers):
                        await send(rewritten)
                return
            await send(message)

        return rewriting


@functools.cache
def _guarded_h11():
    """GuardedH11Protocol's class, built on first use: uvicorn and h11 are imported in the proxy only."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class RememberingConnection(h11.Connection):
        """h11's connection, keeping the parse error that uvicorn swallows (for the status it hints: 431, 400)."""

        last_error: h11.RemoteProtocolError | None = None

        def next_event(self):
            try:
                return super().next_event()
            except h11.RemoteProtocolError as error:
                self.last_error = error
                raise

    class GuardedH11Protocol(H11Protocol):
        """uvicorn's h11 parser with bounded headers: at most MAX_HEADER_BYTES, complete within HEADER_TIMEOUT_S;
        the parse errors as JSON."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.conn = RememberingConnection(h11.SERVER, MAX_HEADER_BYTES)
            self.header_deadline = None  # asyncio.TimerHandle while a request's headers are arriving
            self.refused = False

        def waiting_for_headers(self) -> bool:
            # The client has not begun its next request (h11 IDLE). Not "no response pending": after an early answer
            # (413) the client may still be sending the old body, which is no header.
            return self.conn.their_state is h11.IDLE

        def connection_made(self, transport) -> None:  # a connection that sends nothing is cut off too
            super().connection_made(transport)
            self.arm_deadline()

        def data_received(self, data: bytes) -> None:
            if self.refused:  # lingering after a refusal: read and drop, so the client gets the answer, not a reset
                return
            self.arm_deadline()
            if self.waiting_for_headers():
                # h11 bounds only a header section still incomplete when a read ends; one that arrives whole in one
                # read (64 KiB does) it parses whatever its size. So the size is checked here, on what is buffered.
                pending = self.conn.trailing_data[0] + data
                end = pending.find(b"\r\n\r\n")
                if (end + 4 if end >= 0 else len(pending)) > MAX_HEADER_BYTES:
                    self.refuse(431, f"request line and headers exceed {MAX_HEADER_BYTES // 2**10} KiB")
                    return
                head = pending[:end].lower() if end >= 0 else b""
                if b"\ncontent-length:" in head and b"\ntransfer-encoding:" in head:  # h11 lets Transfer-Encoding win;
                    # a front proxy may have let Content-Length win: the way to request smuggling (RFC 9112 6.1)
                    self.refuse(400, "malformed HTTP request (Content-Length together with Transfer-Encoding): send one")
                    return
            super().data_received(data)
            if not self.waiting_for_headers():
                self.cancel_deadline()

        def connection_lost(self, exc) -> None:
            self.cancel_deadline()
            super().connection_lost(exc)

        def arm_deadline(self) -> None:
            if self.header_deadline is None and self.waiting_for_headers():
                self.header_deadline = self.loop.call_later(HEADER_TIMEOUT_S, self.headers_too_slow)

        def cancel_deadline(self) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None

        def headers_too_slow(self) -> None:
            self.header_deadline = None
            if self.waiting_for_headers() and not self.transport.is_closing():
                self.refuse(408, f"the request headers did not arrive within {HEADER_TIMEOUT_S:g} s")

        def send_400_response(self, msg: str) -> None:  # uvicorn's answer to a request h11 cannot parse
            error = self.conn.last_error
            if error is not None and error.error_status_hint == 431:
                self.refuse(431, f"request line and headers exceed {MAX_HEADER_BYTES // 2**10} KiB")
            else:
                self.refuse(400, f"malformed HTTP request ({error or msg})")

        def refuse(self, status: int, message: str) -> None:
            """Answer with raw bytes (h11 may be in any state here) and end the connection. A plain close with the
            client's bytes unread makes the kernel reset it, and the client may lose the answer; so the answer is
            followed by our end of the stream, what still arrives is dropped unparsed, and the socket is closed
            LINGER_S later (nginx's lingering close)."""
            self.cancel_deadline()
            self.refused = True
            body = json.dumps({"error": message}).encode()
            reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
            self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                                 % (status, reason, len(body)) + body)
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)

    return GuardedH11Protocol


def __getattr__(name: str):
    if name == "GuardedH11Protocol":  # what uvicorn imports by GUARDED_PARSER
        return _guarded_h11()
    raise AttributeError(name)
