"""The HTTP proxy's body limit (ftdist/serve_proxy.py) on a real uvicorn server and real sockets.

The middleware wraps an app that reads every body to the end (as Ray Serve's proxy does, queueing it
for the replica): a body past the limit, declared or chunked, gets a one-line 413 from the
middleware; the rest is read and dropped up to a cap (so the client reads its 413, not a reset),
nothing is kept, and past the cap the connection is cut. The same middleware inside a real Ray Serve proxy is
tests/test_serve_http.py's chunked-body test.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from collections.abc import Iterator


from conftest import free_port
from exports import send_chunked
from ftdist.serve_proxy import DRAIN_BYTES, BodyLimit, Drain, proxy_environment, proxy_middlewares

LIMIT = 1 << 20


async def read_everything(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    """Reads the whole body (like Ray Serve's proxy), then answers with its length."""
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"read": size}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def running(app) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """``app`` served by uvicorn on a free loopback port (in a thread) while the block runs."""
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield port
    finally:
        srv.should_exit = True
        thread.join(10)


def test_a_chunked_body_past_the_limit_gets_the_413_and_nothing_is_kept():
    total = 32 << 20
    with running(read_everything) as port:  # the app alone reads all of it: the proxy without the middleware
        status, _, _, sent = send_chunked(port, total)
        assert (status, sent) == (200, total)
    with running(BodyLimit(read_everything, LIMIT)) as port:
        status, body, _, sent = send_chunked(port, total)
    assert status == 413, (status, body[:300])
    error = json.loads(body)["error"]
    assert error.startswith(f"request body exceeds {LIMIT} bytes (refused by the HTTP proxy at ") and "\n" not in error
    assert sent == total  # the rest was read (and dropped) while the client sent it: it got its answer


def test_past_the_drain_cap_the_connection_is_cut():
    total = DRAIN_BYTES + (256 << 20)
    with running(BodyLimit(read_everything, LIMIT)) as port:
        status, _, _, sent = send_chunked(port, total)
    # what the client could still push into the two sockets' buffers past the cap, never the whole body
    assert sent < LIMIT + DRAIN_BYTES + (32 << 20), f"{sent} of {total} bytes were taken"
    assert status in (413, "ConnectionResetError", "BrokenPipeError"), status


def test_a_declared_length_past_the_limit_is_refused():
    with running(BodyLimit(read_everything, LIMIT)) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/predict", body=b"x" * (LIMIT + 1))  # read and dropped, then the 413
        r = conn.getresponse()
        assert r.status == 413
        assert json.loads(r.read())["error"] == (f"request body of {LIMIT + 1} bytes exceeds {LIMIT} bytes "
                                                 f"(refused by the HTTP proxy)")
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Length", str(DRAIN_BYTES + 1))
        conn.endheaders()  # no body sent: past the drain cap the answer comes from the header alone
        r = conn.getresponse()
        assert r.status == 413 and "exceeds" in json.loads(r.read())["error"]
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/predict", body=b"x" * LIMIT)  # at the limit: read whole
        r = conn.getresponse()
        assert (r.status, json.loads(r.read())) == (200, {"read": LIMIT})
        conn.close()


def test_the_callback_reads_the_limit_from_the_environment(monkeypatch):
    env = proxy_environment(12345)
    assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] == "ftdist.serve_proxy.proxy_middlewares"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    limit, drain = proxy_middlewares()  # Serve wraps in list order: the last, Drain, is outermost
    assert limit.cls is BodyLimit and limit.kwargs == {"limit": 12345} and drain.cls is Drain
    monkeypatch.delenv("FTDIST_SERVE_MAX_BODY_BYTES")
    assert [m.cls for m in proxy_middlewares()] == [Drain]
