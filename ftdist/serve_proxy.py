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

import json
import os
from typing import Any, Awaitable, Callable

#: Ray Serve's hook (ray.serve._private.constants): an import path of a function returning middlewares.
CALLBACK_VARIABLE = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "ftdist.serve_proxy.proxy_middlewares"
#: the largest request body, in bytes, the proxy reads (the replica's limit; unset or 0: no limit here)
LIMIT_VARIABLE = "FTDIST_SERVE_MAX_BODY_BYTES"

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
    return [Middleware(BodyLimit, limit=limit)] if limit > 0 else []


class BodyLimit:
    """ASGI middleware: a request whose body passes ``limit`` bytes gets a one-line 413 from the
    proxy, and nothing past the limit is read.

    A ``Content-Length`` over the limit is answered before the app (the proxy's routing) runs. A
    chunked body is counted as the proxy reads it: at the chunk that passes the limit the 413 is
    sent, the app is told the client disconnected (the proxy stops reading and cancels the
    replica's request), and whatever the app sends afterwards is dropped."""

    def __init__(self, app: Callable[[Message, Receive, Send], Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            await refuse(send, f"request body of {int(declared)} bytes exceeds {self.limit} bytes (refused by the "
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
                    state["cut"] = True  # nothing more is read from this client
                    if not state["started"]:  # (an answer already under way is left to finish)
                        state["refused"] = True
                        await refuse(send, f"request body exceeds {self.limit} bytes (the HTTP proxy stopped "
                                           f"reading at {state['read']})")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["refused"]:
                return  # the 413 went out: the app's own answer to the cut-off request is dropped
            if message.get("type") == "http.response.start":
                state["started"] = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def refuse(send: Send, error: str) -> None:
    """A one-line JSON 413 that closes the connection (the rest of the body is never read)."""
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
