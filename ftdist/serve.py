"""``ftdist serve MODEL``: the exported model behind an HTTP JSON API, on Ray Serve.

Routes (JSON in, JSON out):

- ``POST /predict`` with ``{"text": "..."}`` -> ``{"prediction": {...}, "version": ...}`` or with
  ``{"texts": ["...", ...]}`` -> ``{"predictions": [...], "version": ...}``; a prediction is what
  ``ftdist.inference`` returns (``label``, ``label_id``, ``scores`` in ``label_names`` order; or
  ``loss``, ``perplexity``, ``tokens`` for a causal LM: null loss and perplexity for 0-1 tokens);
- ``GET /healthz`` -> ``{"status": "ok"}`` once the replica has loaded the model (503 while draining);
- ``GET /metadata`` -> label names, task, version and test metrics from ``ftdist_export.json``, and
  the request limits.

Requests from many clients are batched dynamically (``@serve.batch``): a replica runs one forward
for every request that arrived while the previous forward ran (up to ``max_batch_size`` texts).
Bad requests get a 4xx with a one-line ``{"error": ...}``: 400 malformed JSON, 413 too many texts,
a text longer than ``max_text_chars`` or a body too large (a chunked body is refused as soon as it
passes the limit), 422 wrong shape or types (an empty list, a text with a lone surrogate or an
integer past Python's digit limit included). A request that fails in the batched forward fails
alone: the requests batched with it are answered. Texts within the limit are truncated to the
training ``max_length`` in tokens, as in training. An error inside the replica is a 500 with one line, never a traceback.
"""

# No `from __future__ import annotations` here: FastAPI reads the route handlers' annotations
# (`request: Request`) at runtime, and as strings they would not resolve (Request is imported
# inside build_app, so that importing this module needs neither Ray nor FastAPI).

import asyncio
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ftdist.config import StorageSection
from ftdist.errors import UserError
from ftdist.inference import ExportInfo, Predictor, locate_export
from ftdist.redaction import redact_uri
from ftdist.serve_proxy import (
    ADMITTED_HEADER,
    DRAIN_BOARD,
    DRAIN_NAMESPACE,
    DRAIN_POLL_S,
    DRAINING_ERROR,
    proxy_environment,
    report_to_board,
)

APP_NAME = "ftdist"
log = logging.getLogger("ftdist.serve")


@dataclass(frozen=True)
class Limits:
    """What one request may carry (checked before any tokenization)."""

    max_texts: int = 64
    max_text_chars: int = 10_000

    @property
    def max_body_bytes(self) -> int:
        # Every text at its limit, plus framing. 12 bytes per character at worst: one character
        # outside the BMP is one str character, written as a surrogate-pair escape ("\ud83d\ude00",
        # json.dumps' default) it is 12 bytes (UTF-8 takes at most 4, a BMP escape 6).
        return self.max_texts * (self.max_text_chars * 12 + 16) + 1024


@dataclass(frozen=True)
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1  # the minimum with autoscaling
    max_replicas: int | None = None  # > replicas: autoscale between the two on ongoing requests
    cpus_per_replica: float = 1.0
    gpus_per_replica: float | None = None  # None: 1 where the cluster has GPUs, else 0
    max_batch_size: int = 32  # texts per forward; 1 turns dynamic batching off
    batch_wait_timeout_s: float = 0.005
    limits: Limits = field(default_factory=Limits)
    graceful_shutdown_timeout_s: float = 20.0
    address: str | None = None
    storage: StorageSection = field(default_factory=StorageSection)


class RequestError(Exception):
    """A bad request: HTTP ``status`` and a one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


SHAPE = 'the body must be a JSON object {"text": "..."} or {"texts": ["...", ...]}'


def parse_request(body: bytes, limits: Limits) -> tuple[list[str], bool]:
    """(texts, whether one text was sent) from a /predict body, or a RequestError. Pure."""
    if len(body) > limits.max_body_bytes:
        raise RequestError(413, f"request body of {len(body)} bytes exceeds {limits.max_body_bytes} bytes")
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise RequestError(400, f"malformed JSON{where}; {SHAPE}") from None
    except ValueError:  # valid JSON, but an integer past Python's digit limit (4,300 digits)
        raise RequestError(422, f"a number too long to read; {SHAPE}") from None
    if not isinstance(payload, dict) or len(payload) != 1 or not {"text", "texts"} & set(payload):
        raise RequestError(422, SHAPE)
    single = "text" in payload
    texts = [payload["text"]] if single else payload["texts"]
    if not isinstance(texts, list):
        raise RequestError(422, f"'texts' must be a list of strings, got {type(texts).__name__}")
    if not texts:
        raise RequestError(422, "'texts' is empty; send at least one text")
    if len(texts) > limits.max_texts:
        raise RequestError(413, f"{len(texts)} texts in one request; at most {limits.max_texts} (split the request)")
    for i, t in enumerate(texts):
        where = "'text'" if single else f"texts[{i}]"
        if not isinstance(t, str):
            raise RequestError(422, f"{where} must be a string, got {type(t).__name__}")
        if len(t) > limits.max_text_chars:
            raise RequestError(413, f"{where} has {len(t)} characters; at most {limits.max_text_chars}")
        try:  # a lone surrogate ("\ud800") is legal JSON but no text: the tokenizer would raise on it
            t.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RequestError(422, f"{where} cannot be encoded as UTF-8 (a lone surrogate at character "
                                    f"{e.start}); send Unicode text") from None
    return texts, single


async def read_body(declared: str | None, chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The request body, or a 413 as soon as it passes ``limit`` bytes.

    Why while reading: a chunked body declares no length, and reading it whole before comparing
    let one client make the proxy and the replica hold hundreds of MB per request. Past the limit
    nothing more is read (the connection is closed after the 413)."""
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes exceeds {limit} bytes")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds {limit} bytes (stopped reading at {size})")
        parts.append(chunk)
    return b"".join(parts)


def predict_each(predict: Callable[[list[str]], list[dict[str, Any]]], requests: list[list[str]],
                 chunk: int) -> list[list[dict[str, Any]] | Exception]:
    """Each request's rows, or the exception that request alone raised.

    Why: dynamic batching runs many clients' requests in one call, and an exception there would
    fail all of them. The batch runs whole first (one forward per ``chunk`` texts); if it raises,
    each request runs by itself, so a request that fails (whatever the cause) fails alone."""
    def rows_of(texts: list[str]) -> list[dict[str, Any]]:
        return [row for i in range(0, len(texts), chunk) for row in predict(texts[i:i + chunk])]

    try:
        rows = rows_of([t for texts in requests for t in texts])
    except Exception as e:
        if len(requests) == 1:
            return [e]
        out: list[list[dict[str, Any]] | Exception] = []
        for texts in requests:
            try:
                out.append(rows_of(texts))
            except Exception as one:
                out.append(one)
        return out
    at, split = 0, list[list[dict[str, Any]] | Exception]()
    for texts in requests:
        split.append(rows[at:at + len(texts)])
        at += len(texts)
    return split


class DrainBoard:
    """What ``ftdist serve``'s driver and its replicas share while draining (a named Ray actor).

    Why: ``serve.shutdown`` kills the HTTP proxies at once, dropping every request in flight (36
    of 40 were). So on SIGTERM the driver first raises the flag here; each proxy (ftdist/serve_proxy.py)
    and replica polls it every ``DRAIN_POLL_S``, then answers new requests 503 and reports its requests
    still running; the driver shuts Serve down once every one reports none (or the drain timeout
    passes). A request the proxy admitted before the flag is answered by the replica even when the
    replica saw the flag first."""

    def __init__(self) -> None:
        self.draining = False
        self.replicas: dict[str, tuple[int, bool, float]] = {}  # id -> (in flight, draining, when)

    def report(self, replica: str, in_flight: int, draining: bool) -> bool:
        """A replica's count (taken after it set ``draining``); returns whether to drain."""
        import time

        self.replicas[replica] = (in_flight, draining, time.monotonic())
        return self.draining

    def drain(self) -> None:
        self.draining = True

    def drained(self) -> bool:
        """Every replica heard recently has seen the flag and has nothing running (one that stopped
        reporting, e.g. scaled down, is not waited for)."""
        import time

        now = time.monotonic()
        return all(seen and n == 0 for n, seen, at in self.replicas.values() if now - at < DRAIN_STALE_S)


DRAIN_STALE_S = 5.0  # a reporter silent this long has stopped (a loaded event loop may be late by seconds)
DRAIN_GRACE_S = 0.5  # after the last handler returned: its response still crosses the proxy


# ---------------------------------------------------------------------------------------------
# The Serve application (Ray and FastAPI are imported only here, when serving)


def build_app(opts: ServeOptions, info: ExportInfo, gpus: float = 0.0) -> Any:
    """The Ray Serve application for ``opts`` (not yet running)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(title="ftdist", docs_url=None, redoc_url=None, openapi_url=None)

    @api.exception_handler(Exception)
    async def internal(_: Request, exc: Exception) -> JSONResponse:  # one line, never a traceback
        log.exception("internal error")
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); see the replica's log"}, 500)

    @serve.ingress(api)
    class ModelServer:
        def __init__(self, model: str, storage_json: str, limits: Limits, max_batch_size: int, wait_s: float,
                     threads: int) -> None:
            import torch

            torch.set_num_threads(threads)
            self.predictor = Predictor(model, StorageSection.model_validate_json(storage_json))
            self.limits, self.max_batch_size = limits, max_batch_size
            batched: Any = self.infer  # Serve's @serve.batch wrapper; its setters are not in the stubs
            batched.set_max_batch_size(max_batch_size)
            batched.set_batch_wait_timeout_s(wait_s)
            self.draining, self.in_flight = False, 0
            self.watcher: asyncio.Task[None] | None = None
            self.watch()

        def watch(self) -> None:
            """Start the drain poller once, on the replica's event loop (the constructor runs on it)."""
            if self.watcher is None:
                try:
                    self.watcher = asyncio.get_running_loop().create_task(self.watch_drain())
                except RuntimeError:  # no loop here: the first request starts it
                    pass

        async def watch_drain(self) -> None:
            """Follow ftdist serve's DrainBoard (see there); served without one (a RayService), never drains here."""
            import uuid

            import ray

            try:
                board = ray.get_actor(DRAIN_BOARD, namespace=DRAIN_NAMESPACE)
            except ValueError:
                return
            await report_to_board(board, uuid.uuid4().hex, self)

        @api.post("/predict")
        async def predict(self, request: Request) -> JSONResponse:
            self.watch()
            if self.draining and ADMITTED_HEADER.decode() not in request.headers:
                return JSONResponse({"error": DRAINING_ERROR}, 503)
            self.in_flight += 1
            try:
                return await self.answer(request)
            finally:
                self.in_flight -= 1

        async def answer(self, request: Request) -> JSONResponse:
            try:
                body = await read_body(request.headers.get("content-length"), request.stream(),
                                       self.limits.max_body_bytes)
                texts, single = parse_request(body, self.limits)
            except RequestError as e:
                return JSONResponse({"error": str(e)}, e.status)
            rows = await self.infer(texts)
            if isinstance(rows, Exception):  # this request's own failure (its batch's others were answered)
                raise rows
            version = self.predictor.info.version
            return JSONResponse({"prediction": rows[0], "version": version} if single
                                else {"predictions": rows, "version": version})

        @api.get("/healthz")
        async def healthz(self) -> JSONResponse:
            return JSONResponse({"status": "draining"}, 503) if self.draining else JSONResponse({"status": "ok"})

        @api.get("/metadata")
        async def metadata(self) -> dict[str, Any]:
            return {**self.predictor.info.metadata(), "max_length": self.predictor.max_length,
                    "label_names": self.predictor.label_names, "limits": asdict(self.limits),
                    "max_batch_size": self.max_batch_size}

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def infer(self, requests: list[list[str]]) -> list[list[dict[str, Any]] | Exception]:
            """One call per request; the texts of all requests in the batch go through forwards of
            at most max_batch_size texts, in a thread so /healthz stays responsive meanwhile."""
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(None, predict_each, self.predictor.predict_texts, requests,
                                              self.max_batch_size)

    scaling: dict[str, Any] = {"num_replicas": opts.replicas}
    if opts.max_replicas and opts.max_replicas > opts.replicas:
        scaling = {"autoscaling_config": {"min_replicas": opts.replicas, "max_replicas": opts.max_replicas,
                                          "target_ongoing_requests": max(2, opts.max_batch_size)}}
    deployment: Any = serve.deployment(  # called with the class: a Deployment (the stubs type the decorator form)
        ModelServer, name="model", ray_actor_options={"num_cpus": opts.cpus_per_replica, "num_gpus": gpus},
        # Requests beyond this wait in Serve's router with backoff (measured: at 32 clients and a
        # bound of 8, p99 4.5 s); a generous bound keeps the queue in the replica, where batches form.
        max_ongoing_requests=max(64, 2 * opts.max_batch_size),
        graceful_shutdown_timeout_s=opts.graceful_shutdown_timeout_s, **scaling)
    threads = max(1, math.floor(opts.cpus_per_replica))
    return deployment.bind(info.uri, opts.storage.model_dump_json(), opts.limits, opts.max_batch_size,
                           opts.batch_wait_timeout_s, threads)


def app_builder(args: dict[str, Any]) -> Any:
    """The application for a Serve config (``import_path: ftdist.serve:app_builder``), as KubeRay's
    RayService runs it (k8s/rayservice.yaml): ``args`` holds ``model`` and optionally ``replicas``,
    ``max_replicas``, ``cpus_per_replica``, ``gpus_per_replica``, ``max_batch_size``,
    ``batch_wait_ms``, ``max_texts``, ``max_text_chars``. An incomplete model folder fails the
    deploy with the same one line as ``ftdist serve``."""
    known = {"model", "replicas", "max_replicas", "cpus_per_replica", "gpus_per_replica", "max_batch_size",
             "batch_wait_ms", "max_texts", "max_text_chars"}
    unknown = sorted(set(args) - known)
    if unknown or "model" not in args:
        raise UserError(f"serve config args: {'unknown ' + repr(unknown[0]) if unknown else 'model is missing'}; "
                        f"known args: {', '.join(sorted(known))}")
    num = {k: float(v) for k, v in args.items() if k != "model"}
    opts = ServeOptions(model=str(args["model"]), replicas=int(num.get("replicas", 1)),
                        max_replicas=int(num["max_replicas"]) if "max_replicas" in num else None,
                        cpus_per_replica=num.get("cpus_per_replica", 1.0), max_batch_size=int(num.get("max_batch_size", 32)),
                        batch_wait_timeout_s=num.get("batch_wait_ms", 5.0) / 1000,
                        limits=Limits(int(num.get("max_texts", 64)), int(num.get("max_text_chars", 10_000))))
    check_options(opts)
    return build_app(opts, locate_export(opts.model, opts.storage), num.get("gpus_per_replica", 0.0))


def check_options(opts: ServeOptions) -> None:
    """Numbers that must be positive, refused by flag name before Ray starts."""
    for flag, value, low in (("--replicas", opts.replicas, 1), ("--max-batch-size", opts.max_batch_size, 1),
                             ("--max-texts", opts.limits.max_texts, 1),
                             ("--max-text-chars", opts.limits.max_text_chars, 1), ("--port", opts.port, 1)):
        if value < low:
            raise UserError(f"{flag} {value} must be >= {low}")
    if opts.max_replicas is not None and opts.max_replicas < opts.replicas:
        raise UserError(f"--max-replicas {opts.max_replicas} is below --replicas {opts.replicas}; "
                        f"it is the autoscaling upper bound")
    if opts.port > 65535:
        raise UserError(f"--port {opts.port} must be <= 65535")
    if not opts.cpus_per_replica > 0 or not math.isfinite(opts.cpus_per_replica):  # NaN fails every comparison
        raise UserError(f"--cpus-per-replica {opts.cpus_per_replica} must be > 0 (fractions such as 0.5 are fine)")
    if not opts.batch_wait_timeout_s >= 0 or not math.isfinite(opts.batch_wait_timeout_s):
        raise UserError(f"--batch-wait-ms {opts.batch_wait_timeout_s * 1000} must be >= 0")


def start(opts: ServeOptions, say: Callable[[str], None] | None = None,
          on_connected: Callable[[], None] | None = None) -> tuple[ExportInfo, bool]:
    """Check the model and options, connect Ray (a local cluster unless one is connected or
    addressed) and run the application; returns (export info, whether Ray was started here).
    ``on_connected`` runs right after ``ray.init`` (which installs its own SIGTERM handler)."""
    check_options(opts)
    info = locate_export(opts.model, opts.storage)  # before Ray: an incomplete folder is never served
    import ray
    from ray import serve

    started = False
    address = opts.address or os.environ.get("RAY_ADDRESS")
    if not address:  # the proxy binds on this machine (a cluster started here or already running in-process)
        check_port_free(opts.host, opts.port)  # refuse before starting Ray
    if not ray.is_initialized():
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        from ftdist.ray_cluster import init_ray  # the one ray.init: local mode never joins a recorded cluster

        # Inherited by every process of the cluster started here: its HTTP proxy refuses a body past the
        # limit while reading it, not after queueing it for the replica (ftdist/serve_proxy.py).
        os.environ.update(proxy_environment(opts.limits.max_body_bytes))
        init_ray(address, {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
                 logging_level=logging.WARNING)
        started = True
    try:
        if on_connected:
            on_connected()
        global _board
        _board = ray.remote(num_cpus=0)(DrainBoard).options(name=DRAIN_BOARD, namespace=DRAIN_NAMESPACE,
                                                               get_if_exists=True).remote()
        gpus = opts.gpus_per_replica if opts.gpus_per_replica is not None else (
            1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0)
        serve.start(http_options={"host": opts.host, "port": opts.port})
        serve.run(build_app(opts, info, gpus), name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        stop(started)  # never leave a half-started local cluster behind
        raise
    (say or _stderr)(f"serving {redact_uri(info.uri)} (version {info.version}) on http://{opts.host}:{opts.port}: "
                     f"POST /predict, GET /healthz, GET /metadata; Ctrl-C or SIGTERM stops")
    return info, started


def check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port/--host "
                            f"or stop what uses it") from None


_board: Any = None  # the DrainBoard actor start() made; kept referenced so that it lives


def drain(timeout_s: float) -> None:
    """Replicas answer new requests 503 and finish those they run; returns when none runs any more
    (or after ``timeout_s``)."""
    import ray

    if _board is None:
        return
    ray.get(_board.drain.remote())
    deadline = time.monotonic() + timeout_s
    time.sleep(2 * DRAIN_POLL_S)  # every replica polls once, sees the flag and reports after it
    while not ray.get(_board.drained.remote()) and time.monotonic() < deadline:
        time.sleep(DRAIN_POLL_S)
    time.sleep(DRAIN_GRACE_S)


def stop(started_ray: bool) -> None:
    """Stop Serve, then Ray when started here. Serve kills its proxies at once, dropping requests in
    flight: ``ftdist serve`` calls ``drain`` first."""
    import ray
    from ray import serve

    global _board
    serve.shutdown()
    if _board is not None:
        ray.kill(_board)
        _board = None
    if started_ray:
        ray.shutdown()


def run_until_signalled(opts: ServeOptions) -> int:
    """``ftdist serve``: serve until SIGINT/SIGTERM, then shut down gracefully."""
    stop_event = threading.Event()

    def drain_on_signal() -> None:
        # Right after ray.init, whose SIGTERM handler exits at once (code 15): a signal that arrives
        # while the application is still deploying must drain too.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop_event.set())

    drain_on_signal()
    _, started = start(opts, on_connected=drain_on_signal)
    try:
        stop_event.wait()
    finally:
        _stderr("stopping: draining requests, then shutting down")
        try:
            drain(opts.graceful_shutdown_timeout_s)
        finally:
            stop(started)
    _stderr("stopped")
    return 0


def _stderr(line: str) -> None:
    sys.stderr.write(f"[ftdist] {line}\n")
    sys.stderr.flush()
