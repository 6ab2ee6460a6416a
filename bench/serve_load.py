"""Adversarial load on ``ftdist serve``, then SIGTERM under load (issue 24, item 14).

A closed loop on loopback: ``--concurrency`` clients, each sends its next request when the previous
one is answered, for ``--seconds``; ``--bad-fraction`` of the requests (10%) are adversarial: a lone
surrogate, a 5,000-digit integer, malformed JSON, too many texts, a non-string text, and a chunked
body far past the body limit. Then SIGTERM while the clients keep sending.

    python -m bench.serve_load [--model DIR] [--concurrency 64] [--seconds 60] [--cpus 2] [--json OUT]

Prints (and writes to ``--json``): good requests that failed, bad requests not answered with a 4xx,
the RSS growth of the serve process tree over the load, and the requests started before SIGTERM
that got no answer within the drain timeout (dropped). What each should be: 0, 0, small, 0. A
request still unanswered when the drain timeout (20 s) has passed is cut by design and counted apart
(on a loaded machine a request may wait in the replica's queue longer than that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.demo_export import bench_env, demo_export, demo_texts, rss_by_role, rss_tree
from bench.serve import OUT, free_port, wait_healthy
from ftdist.serve import ServeOptions

CHUNKED = "chunked oversized body"
BAD: dict[str, bytes] = {
    "lone surrogate": b'{"text": "\\ud800 hello"}',
    "5000-digit integer": b'{"texts": [' + b"7" * 5000 + b"]}",
    "malformed JSON": b'{"texts": ["a", ',
    "too many texts": json.dumps({"texts": ["a"] * 65}).encode(),
    "not a string": b'{"texts": ["ok", 3]}',
    CHUNKED: b"",  # 64 MiB sent chunked, see send_chunked
}


async def send_chunked(port: int, total: int = 64 << 20, piece: int = 64 << 10) -> int:
    """A chunked POST of ``total`` bytes, written while the answer is awaited; the status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def pump() -> None:
        writer.write(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk, sent = b"%x\r\n" % piece + b"x" * piece + b"\r\n", 0
        while sent < total:
            writer.write(chunk)
            await writer.drain()
            sent += piece
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    task = asyncio.create_task(pump())
    try:
        line = await asyncio.wait_for(reader.readline(), 120)
        if not line:
            raise ConnectionResetError("closed without an answer")
        return int(line.split()[1])
    finally:
        task.cancel()
        writer.close()


async def load(url: str, port: int, proc: subprocess.Popen, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    texts = demo_texts(500) if args.texts is None else [args.texts]
    out: dict[str, Any] = {"good": 0, "bad": 0, "good_failed": Counter(), "bad_not_4xx": Counter(),
                           "dropped": Counter(), "past_drain_timeout": Counter(), "after_sigterm": Counter()}
    drain_timeout = ServeOptions(model="").graceful_shutdown_timeout_s
    sigterm_at: list[float] = []
    rss: dict[str, int] = {}
    roles: dict[str, dict[str, int]] = {}

    async def one(session: Any, rng: random.Random) -> None:
        bad = rng.random() < args.bad_fraction
        name = rng.choice(sorted(BAD)) if bad else "good"
        started = time.monotonic()
        try:
            if name == CHUNKED:
                status: int | str = await send_chunked(port)
            else:
                body = BAD[name] if bad else json.dumps({"text": rng.choice(texts)}).encode()
                async with session.post(f"{url}/predict", data=body,
                                        headers={"content-type": "application/json"}) as r:
                    await r.read()
                    status = r.status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as e:
            status = type(e).__name__
        ok = status == 200 if not bad else isinstance(status, int) and 400 <= status < 500
        if sigterm_at and started >= sigterm_at[0]:  # sent while draining or after: 503 or refused is right
            out["after_sigterm"][f"{name}: {status}"] += 1
            if not isinstance(status, int):
                await asyncio.sleep(0.05)  # the server is gone; do not spin
            return
        out["bad" if bad else "good"] += 1
        if not ok:  # in flight at SIGTERM: its answer is due within the drain timeout
            where = ("bad_not_4xx" if bad else "good_failed") if not sigterm_at else (
                "dropped" if time.monotonic() - sigterm_at[0] < drain_timeout else "past_drain_timeout")
            out[where][f"{name}: {status}"] += 1

    async def client(i: int, session: Any, until: list[float]) -> None:
        rng = random.Random(i)
        while time.monotonic() < until[0]:
            await one(session, rng)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        until = [float("inf")]
        clients = [asyncio.create_task(client(i, session, until)) for i in range(args.concurrency)]
        await asyncio.sleep(min(5.0, args.seconds / 4))  # warm: the replica's buffers and caches are filled
        rss["start"], roles["start"] = rss_tree(proc.pid), rss_by_role(proc.pid)
        await asyncio.sleep(args.seconds - min(5.0, args.seconds / 4))
        rss["end"], roles["end"] = rss_tree(proc.pid), rss_by_role(proc.pid)
        sigterm_at.append(time.monotonic())
        proc.send_signal(signal.SIGTERM)
        while proc.poll() is None and time.monotonic() - sigterm_at[0] < 90:
            await asyncio.sleep(0.2)
        until[0] = 0.0
        await asyncio.gather(*clients)
    return {"concurrency": args.concurrency, "seconds": args.seconds, "bad_fraction": args.bad_fraction,
            "good": out["good"], "bad": out["bad"], "good_failed": dict(out["good_failed"]),
            "bad_not_4xx": dict(out["bad_not_4xx"]), "dropped_at_sigterm": dict(out["dropped"]),
            "cut_past_drain_timeout": dict(out["past_drain_timeout"]), "drain_timeout_s": drain_timeout,
            "after_sigterm": dict(out["after_sigterm"]), "rss_start_mib": rss["start"] >> 20,
            "rss_end_mib": rss["end"] >> 20, "rss_growth_mib": (rss["end"] - rss["start"]) >> 20,
            "rss_growth_mib_by_role": {k: (roles["end"].get(k, 0) - roles["start"].get(k, 0)) >> 20
                                       for k in sorted({*roles["start"], *roles["end"]})},
            "exit_code": proc.returncode, "stop_s": round(time.monotonic() - sigterm_at[0], 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="an ftdist export (default: the demo model, exported once into bench/out)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--cpus", type=float, default=2.0, help="--cpus-per-replica")
    p.add_argument("--texts", help="one text for every good request (default: demo tweets)")
    p.add_argument("--json", type=Path, default=OUT / "serve_load.json")
    args = p.parse_args(argv)
    model = args.model or demo_export(OUT / "demo-model")
    port = free_port()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    log = args.json.with_suffix(".stderr")  # a file, not a pipe: Ray forwards every request's log line
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ftdist", "serve", model, "--port", str(port),
                                 "--cpus-per-replica", str(args.cpus)], env=bench_env(),
                                stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc)
            result = asyncio.run(load(f"http://127.0.0.1:{port}", port, proc, args))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    result["stderr_tail"] = log.read_text()[-1500:]
    args.json.write_text(json.dumps(result, indent=1))
    print(f"good {result['good']}, failed {sum(result['good_failed'].values())}; bad {result['bad']}, "
          f"not 4xx {sum(result['bad_not_4xx'].values())}; RSS {result['rss_start_mib']} -> "
          f"{result['rss_end_mib']} MiB ({result['rss_growth_mib']:+d}); dropped at SIGTERM "
          f"{sum(result['dropped_at_sigterm'].values())}, past the {result['drain_timeout_s']:g} s drain timeout "
          f"{sum(result['cut_past_drain_timeout'].values())}; exit {result['exit_code']} in {result['stop_s']} s")
    print(json.dumps({k: v for k, v in result.items() if k != "stderr_tail"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
