"""serve/proxy.py's guard in Serve's HTTP proxy, driven through ASGI without Ray: the app behind it
reads the body as Serve's proxy does (every message as soon as it arrives, whatever the replica
reads), so what reaches it is what Serve would route to a replica and queue for it."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from lmadda_serve.proxy import ProxyGuard, middlewares, proxy_env

MIB = 2**20


def eager_proxy(seen: list, answer: list | None = None):
    """An ASGI app that pulls the body like Serve's proxy (into its queue, until a disconnect) and,
    with `answer`, replies with those messages once the body is in."""

    async def app(scope, receive, send):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # Serve cancels the request and says nothing the client would read (499)
            seen.append(len(message.get("body", b"")))
            if not message.get("more_body") and answer is not None:
                for reply in answer:
                    await send(reply)
                return

    return app


def guard(app, max_mib: float = 1, body_timeout_s: float = 5.0) -> ProxyGuard:
    return ProxyGuard(app, max_bytes=int(max_mib * MIB), body_timeout_s=body_timeout_s)


async def call(app, chunks, headers=(), pulled=None, stall=False):
    """One request; (status, headers, body). With `stall`, the client sends `chunks` and then nothing."""
    scope = {"type": "http", "method": "POST", "path": "/v1/stain", "headers": [(k.encode(), v.encode()) for k, v in headers]}
    queue, sent = list(chunks), []

    async def receive():
        if not queue:
            await asyncio.sleep(3600)  # a client that would go on sending, or stalls
        chunk = queue.pop(0)
        if pulled is not None:
            pulled.append(len(chunk))
        return {"type": "http.request", "body": chunk, "more_body": bool(queue) or stall}

    async def send(message):
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, body


def test_a_chunked_body_past_the_limit_gets_413_in_the_proxy_and_never_reaches_serve():
    seen, pulled = [], []
    chunks = [b"\x00" * 2**16] * 4800  # 300 MiB, no Content-Length, from a client that never pauses
    status, headers, body = asyncio.run(call(guard(eager_proxy(seen)), chunks, pulled=pulled))
    assert status == 413 and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert "limit of 1 MiB while streaming" in error and "max_body_mb" in error
    assert sum(pulled) == MIB + 2**16  # read up to the first chunk past the limit, then no more
    assert seen == []  # Serve never got the request: no replica, no queue


def test_a_declared_length_over_the_limit_is_refused_before_a_byte_is_read():
    seen, pulled = [], []
    status, _, body = asyncio.run(call(guard(eager_proxy(seen)), [b"\x00" * 10], headers=[("content-length", str(2**30))], pulled=pulled))
    assert status == 413 and "exceeds the limit of 1 MiB" in json.loads(body)["error"]
    assert pulled == [] and seen == []


def test_a_stalled_body_gets_408_from_the_proxy_and_never_takes_a_replica():
    seen = []
    started = time.perf_counter()
    status, _, body = asyncio.run(call(guard(eager_proxy(seen), body_timeout_s=0.3), [b"\x00" * 1024], stall=True))
    assert status == 408 and "body_timeout_s" in json.loads(body)["error"] and seen == []
    assert time.perf_counter() - started < 5


def test_a_whole_body_reaches_serve_in_one_message_and_the_answer_comes_back_unchanged():
    seen = []
    tiff = [{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"image/tiff")]},
            {"type": "http.response.body", "body": b"II*\x00pixels"}]
    answer = asyncio.run(call(guard(eager_proxy(seen, tiff)), [b"\x00" * 1000] * 5))
    assert answer == (200, {"content-type": "image/tiff"}, b"II*\x00pixels") and seen == [5000]


def test_serves_own_text_errors_reach_the_client_as_json_and_keep_their_retry_after():
    from ray.serve._private.http_util import convert_object_to_asgi_messages

    # what Serve's proxy sends when every replica is full and so is the queue (backpressure_config retry_after_s: 1)
    refusal = convert_object_to_asgi_messages("Request dropped due to backpressure (num_queued_requests=64, max_queued_requests=64).",
                                              status_code=503, extra_headers=[(b"retry-after", b"1")])
    status, headers, body = asyncio.run(call(guard(eager_proxy([], refusal)), [b"image"]))
    error = json.loads(body)["error"]
    assert status == 503 and headers["retry-after"] == "1" and headers["content-length"] == str(len(body))
    assert error.startswith("the endpoint is busy") and "max_queued_requests=64" in error


def test_serves_500_while_a_replica_dies_becomes_json_with_a_retry_after():
    from ray.serve._private.http_util import convert_object_to_asgi_messages

    died = convert_object_to_asgi_messages("Internal Server Error", status_code=500)
    status, headers, body = asyncio.run(call(guard(eager_proxy([], died)), [b"image"]))
    assert status == 500 and headers["content-type"] == "application/json" and headers["retry-after"] == "1"
    assert json.loads(body)["error"].startswith("a replica failed while answering; retry")


def test_the_apps_own_errors_pass_through_unchanged():
    app_error = [{"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]},
                 {"type": "http.response.body", "body": b'{"error": "model cannot be loaded"}'}]
    assert asyncio.run(call(guard(eager_proxy([], app_error)), [b"image"]))[2] == b'{"error": "model cannot be loaded"}'


def test_the_proxy_callback_takes_its_limit_from_the_environment_the_controller_hands_the_proxies(monkeypatch):
    for name, value in proxy_env(2.5, 7).items():
        monkeypatch.setenv(name, value)
    [middleware] = middlewares()
    assert middleware.cls is ProxyGuard and middleware.kwargs == {"max_bytes": int(2.5 * MIB), "body_timeout_s": 7.0}


@pytest.mark.parametrize("overrides", [{}, {"max_body_mb": 12, "body_timeout_s": 3}])
def test_lmadda_serve_installs_the_guard_with_the_applications_body_limit(overrides):
    from lmadda_serve.local import controller_options, read_serve_config

    config = read_serve_config()
    env = controller_options(config, {**config["args"], **overrides})["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "lmadda_serve.proxy:middlewares"
    assert float(env["LMADDA_PROXY_MAX_BODY_MB"]) == overrides.get("max_body_mb", config["args"]["max_body_mb"])
    assert float(env["LMADDA_PROXY_BODY_TIMEOUT_S"]) == overrides.get("body_timeout_s", config["args"]["body_timeout_s"])


def test_serve_config_yaml_installs_the_guard_with_the_same_body_limit_for_serve_run():
    from lmadda_serve.local import read_serve_config

    config = read_serve_config()
    env = config["controller_options"]["runtime_env"]["env_vars"]
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "lmadda_serve.proxy:middlewares"
    assert float(env["LMADDA_PROXY_MAX_BODY_MB"]) == config["args"]["max_body_mb"]
    assert float(env["LMADDA_PROXY_BODY_TIMEOUT_S"]) == config["args"]["body_timeout_s"]


# -- the header guard: Serve's proxy parses headers with uvicorn before any ASGI code runs ----------------

@pytest.fixture
def http_server(monkeypatch, free_port):
    """A uvicorn server with the proxies' parser (the parser the proxy callback installs), on a free loopback
    port in a thread; yields its port. The app answers 200 {"ok": true}."""
    import threading

    import uvicorn

    from lmadda_serve import proxy

    monkeypatch.setattr(proxy, "HEADER_TIMEOUT_S", 1.0)

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json"), (b"content-length", b"12")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http=proxy.GuardedH11Protocol, lifespan="off",
                                           log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(10)


def exchange(port: int, request: bytes, pause_s: float = 0.0, pieces: int = 1) -> tuple[int | None, dict, float]:
    """Send `request` (in `pieces`, `pause_s` apart, until the server answers); (status, JSON body or {}, seconds
    until the answer was in)."""
    import select
    import socket

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        size = -(-len(request) // pieces)
        try:
            for start in range(0, len(request), size):
                sock.sendall(request[start:start + size])
                if select.select([sock], [], [], pause_s)[0]:  # the server answered: stop sending
                    break
        except OSError:  # the server closed while we were still sending: what it answered is still in our buffer
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                break
    seconds = time.monotonic() - started
    if not answer:
        return None, {}, seconds
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}"), seconds


def test_a_64_kib_header_gets_431_json_and_the_connection_closed_at_once(http_server):
    status, body, seconds = exchange(http_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2**16 + b"\r\n\r\n")
    assert status == 431 and "exceed 16 KiB" in body["error"] and seconds < 2


def test_a_200_kb_query_string_gets_431_json(http_server):
    status, body, _ = exchange(http_server, b"GET /v1/models?q=" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 431 and "error" in body


def test_header_lines_sent_slowly_are_cut_off_with_408_after_the_header_timeout(http_server):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(40)) + b"\r\n"
    status, body, seconds = exchange(http_server, request, pause_s=0.1, pieces=40)  # 4 s of header lines
    assert status == 408 and "did not arrive within 1 s" in body["error"] and seconds < 3


@pytest.mark.parametrize("headers", [b"Content-Length: abc\r\n", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"])
def test_unparseable_framing_gets_a_json_400(http_server, headers):
    status, body, _ = exchange(http_server, b"POST /v1/stain HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\nhello")
    assert status == 400 and "malformed HTTP request" in body["error"]


def test_a_normal_request_is_answered_and_the_callback_installs_the_parser(http_server, monkeypatch):
    from uvicorn import config

    status, body, _ = exchange(http_server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200 and body == {"ok": True}
    monkeypatch.setitem(config.HTTP_PROTOCOLS, "auto", config.HTTP_PROTOCOLS["auto"])  # restored after the test
    middlewares()
    assert config.HTTP_PROTOCOLS["auto"] == "lmadda_serve.proxy:GuardedH11Protocol"
