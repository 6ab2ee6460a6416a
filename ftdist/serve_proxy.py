"""The request-body limit in Ray Serve's HTTP proxy, before anything reaches a replica.

Why here and not only in the replica: the proxy reads a request's body from the socket as fast as
the client sends it and queues it, unbounded, until the replica asks for it. A chunked body declares
no length, so by the time the replica's own limit (``ftdist.serve.read_body``) answers 413, the proxy
has read tens of MB that nobody will use; freed, that memory mostly stays with the process
(the allocator keeps it), and an adversarial client grows the proxy request by request.

Ray Serve applies the Starlette middlewares that the function named by the environment variable
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` returns, in every proxy it starts. ``ftdist serve``
sets it (and the limit) in the environment of the local Ray cluster it starts; on a cluster started
elsewhere (``ray start``, KubeRay) the same two variables go into the nodes' environment
(k8s/base/rayservice.yaml sets them). Without them the replica's limit still holds; only the
proxy's read-ahead is unbounded.

This module is imported by the proxy process: it imports nothing from ftdist and nothing heavy.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from typing import Any, Awaitable, Callable

#: Ray Serve's hook (ray.serve._private.constants): an import path of a function returning middlewares.
CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "ftdist.serve_proxy.proxy_middlewares"
#: the largest request body, in bytes, the proxy reads (the replica's limit; unset or 0: no limit here)
LIMIT_VARIABLE = "FTDIST_SERVE_MAX_BODY_BYTES"

#: ``ftdist serve``'s DrainBoard actor (ftdist/serve.py), which its driver, proxies and replicas share
DRAIN_BOARD = "ftdist-serve-drain"
DRAIN_NAMESPACE = "ftdist"
DRAIN_POLL_S = 0.1
#: set by the proxy on each request it admitted before a drain (a client's own is dropped): the
#: replica answers it even when it has seen the drain flag first
ADMITTED_HEADER = b"x-ftdist-admitted"
DRAINING_ERROR = "the service is draining (shutting down); send the request to another instance or retry later"

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def proxy_environment(max_body_bytes: int) -> dict[str, str]:
    """The variables a Ray cluster's processes need for its proxies to enforce ``max_body_bytes``."""
    return {CALLBACK_VARIABLE: CALLBACK, LIMIT_VARIABLE: str(max_body_bytes)}


def proxy_middlewares() -> list[Any]:
    """Called by each Ray Serve proxy at its start (the callback named by ``CALLBACK_VARIABLE``)."""
    from starlette.middleware import Middleware

    limit = int(os.environ.get(LIMIT_VARIABLE) or 0)
    # Serve wraps its app in each middleware of the list in turn: the last is outermost, so a request
    # that arrives while draining is answered 503 before its body is read.
    return [*([Middleware(BodyLimit, limit=limit)] if limit > 0 else []), Middleware(Drain)]


class Drain:
    """ASGI middleware: while ``ftdist serve`` drains, the proxy answers new requests 503 and counts
    those it admitted before, until their answer's last byte has left it.

    Why at the proxy: the replicas' own count starts when a request reaches them and ends when their
    handler returns; a request admitted before the drain but still in Serve's router, or an answer
    still on its way through the proxy, is in neither, and ``serve.shutdown`` cut such requests under
    load (12 and 45 in bench/serve_load runs). The count is reported to the DrainBoard like a
    replica's, and the driver shuts Serve down only when every count is 0. Without a DrainBoard (a
    cluster or RayService not run by ``ftdist serve``) requests pass untouched."""

    def __init__(self, app: Callable[[Message, Receive, Send], Awaitable[None]]) -> None:
        self.app = app
        self.board: Any = None
        self.looked_up = False
        self.draining = False
        self.in_flight = 0
        self.watcher: asyncio.Task[None] | None = None

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http" or str(scope.get("path", "")).startswith("/-/") or not self.follow_board():
            await self.app(scope, receive, send)  # Serve's own routes (/-/healthz) and no drain to follow
            return
        if self.draining:
            await answer(send, 503, DRAINING_ERROR)
            return
        self.in_flight += 1
        try:
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != ADMITTED_HEADER]
            await self.app({**scope, "headers": [*headers, (ADMITTED_HEADER, b"1")]}, receive, send)
        finally:
            self.in_flight -= 1

    def follow_board(self) -> bool:
        """Find the DrainBoard once (it exists before Serve starts its proxies) and start reporting."""
        if not self.looked_up:
            self.looked_up = True
            import ray

            if not ray.is_initialized():  # not in a Ray process (tests): never start a cluster from here
                return False
            try:
                self.board = ray.get_actor(DRAIN_BOARD, namespace=DRAIN_NAMESPACE)
            except ValueError:
                return False
            self.watcher = asyncio.get_running_loop().create_task(self.report())
        return self.board is not None

    async def report(self) -> None:
        await report_to_board(self.board, f"proxy-{uuid.uuid4().hex}", self)


async def report_to_board(board: Any, me: str, reporter: Any) -> None:
    """Every ``DRAIN_POLL_S``, report ``reporter.in_flight`` and ``reporter.draining`` to the DrainBoard
    and set ``reporter.draining`` once the board says so: a count sent with ``draining`` True was taken
    after the flag was seen, so nothing admitted later is missing from it. The proxy's ``Drain`` and
    each replica follow the board this way. Ends when the board is gone (Serve is shutting down)."""
    while True:
        try:
            reporter.draining = await board.report.remote(me, reporter.in_flight, reporter.draining) or reporter.draining
        except Exception:  # the driver is gone: Serve is being shut down anyway
            return
        await asyncio.sleep(DRAIN_POLL_S)


#: What a refused client may still send: read and dropped (never kept), so that the client, still
#: sending, reads the 413 instead of a connection reset (a server that closes with unread input makes
#: the kernel reset the connection, and the client loses the answer). Past it the connection is cut.
DRAIN_BYTES = 64 << 20


class BodyLimit:
    """ASGI middleware: a request whose body passes ``limit`` bytes gets a one-line 413 from the
    proxy, and nothing past the limit is kept.

    A chunked body is counted as the proxy reads it: at the chunk that passes the limit, the rest of
    the body is read and dropped (up to ``DRAIN_BYTES``), the 413 is sent, the app (the proxy's
    routing) is told the client disconnected, so it cancels the replica's request, and whatever the
    app sends afterwards is dropped. A declared ``Content-Length`` over the limit is answered before
    the app runs, after dropping the body if it is within ``DRAIN_BYTES``."""

    def __init__(self, app: Callable[[Message, Receive, Send], Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= DRAIN_BYTES:
                await drain(receive, DRAIN_BYTES)
            await answer(send, 413, f"request body of {int(declared)} bytes exceeds {self.limit} bytes (refused by the "
                               f"HTTP proxy)")
            return
        state = {"read": 0, "started": False, "refused": False, "cut": False}

        async def limited_receive() -> Message:
            if state["cut"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message.get("type") == "http.request":
                state["read"] += len(message.get("body", b""))
                if state["read"] > self.limit:
                    state["cut"] = True  # nothing more goes to the app
                    if not state["started"]:  # (an answer already under way is left to finish)
                        state["refused"] = True
                        if message.get("more_body", False):
                            await drain(receive, DRAIN_BYTES)
                        await answer(send, 413, f"request body exceeds {self.limit} bytes (refused by the HTTP proxy "
                                           f"at {state['read']} bytes)")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["refused"]:
                return  # the 413 went out: the app's own answer to the cut-off request is dropped
            if message.get("type") == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def drain(receive: Receive, budget: int) -> bool:
    """Read and drop the rest of a request body, at most ``budget`` bytes; True when it ended."""
    while budget > 0:
        message = await receive()
        if message.get("type") != "http.request":
            return False
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


async def answer(send: Send, status: int, error: str) -> None:
    """A one-line JSON error that closes the connection (the request's body may be unread)."""
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
