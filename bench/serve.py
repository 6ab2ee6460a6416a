"""Serving benchmark: ``ftdist serve`` with dynamic batching vs one request per forward, and an anchor
(a transformers ``pipeline`` called once per request behind a plain ``http.server``), on the demo
model, on loopback. Throughput and p50/p99 latency at each concurrency (closed loop: ``c`` clients,
each sends its next request when the previous one is answered; one text per request).

    python -m bench.serve [--seconds 10] [--concurrency 1 8 32] [--cpus 2]

Every server is a separate process given the same CPUs (torch threads = --cpus); the load generator
(aiohttp) runs here. Results: a table on stdout and bench/out/serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.demo_export import bench_env, demo_export, demo_texts

OUT = Path(__file__).resolve().parent / "out"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(kind: str, model: str, port: int, cpus: int) -> list[str]:
    if kind == "anchor":
        return [sys.executable, "-m", "bench.serve", "--anchor", model, "--port", str(port), "--cpus", str(cpus)]
    batch = "32" if kind == "ftdist-batched" else "1"
    return [sys.executable, "-m", "ftdist", "serve", model, "--port", str(port), "--cpus-per-replica", str(cpus),
            "--max-batch-size", batch, "--max-texts", "64"]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


async def load(url: str, texts: list[str], concurrency: int, seconds: float, warmup: float) -> dict:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        k = i
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            async with session.post(f"{url}/predict", json={"text": texts[k % len(texts)]}) as r:
                await r.read()
                ok = r.status == 200
            t1 = time.perf_counter()
            if t0 >= measure_from and t1 <= stop_at:
                if ok:
                    latencies.append(t1 - t0)
                else:
                    errors += 1
            k += concurrency

    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else lat * 99
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "req_per_s": len(lat) / seconds,
            "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000}


def run(args: argparse.Namespace) -> dict:
    model = demo_export(OUT / "demo-export")
    texts = demo_texts(4000)
    results: dict[str, list[dict]] = {}
    for kind in args.contenders:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen(server_command(kind, model, port, args.cpus), env=bench_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            wait_healthy(url, proc)
            results[kind] = []
            for c in args.concurrency:
                r = asyncio.run(load(url, texts, c, args.seconds, args.warmup))
                print(f"{kind:22s} c={c:3d}: {r['req_per_s']:8.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                      f"p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}", flush=True)
                results[kind].append(r)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {"model": "all-MiniLM-L6-v2 + 3-class head (demo export)", "cpus": args.cpus, "seconds": args.seconds,
            "warmup_s": args.warmup, "results": results}


def table(rep: dict) -> str:
    rows = ["| server | concurrency | requests/s | p50 ms | p99 ms | errors | vs one-at-a-time |", "|---|---|---|---|---|---|---|"]
    base = {r["concurrency"]: r["req_per_s"] for r in rep["results"].get("ftdist-one-at-a-time", [])}
    for kind, rs in rep["results"].items():
        for r in rs:
            ratio = f"{r['req_per_s'] / base[r['concurrency']]:.2f}x" if base.get(r["concurrency"]) else "-"
            rows.append(f"| {kind} | {r['concurrency']} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} | "
                        f"{r['p99_ms']:.1f} | {r['errors']} | {ratio} |")
    return "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# The anchor: one pipeline call per request in a plain http.server (threads, no batching)


def anchor(model: str, port: int, cpus: int) -> None:
    import torch
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from transformers import pipeline

    torch.set_num_threads(cpus)
    pipe = pipeline("text-classification", model=model, device="cpu", truncation=True, max_length=64, top_k=None)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"status": "ok"})

        def do_POST(self) -> None:
            text = json.loads(self.rfile.read(int(self.headers["content-length"])))["text"]
            scores = pipe([text])[0]  # top_k=None: every class, as a list of {label, score}
            best = max(scores, key=lambda s: s["score"])
            self._send(200, {"prediction": {"label": best["label"], "scores": scores}})

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--contenders", nargs="+", default=["ftdist-batched", "ftdist-one-at-a-time", "anchor"])
    ap.add_argument("--anchor", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(OUT / "serve.json"))
    args = ap.parse_args()
    if args.anchor:
        anchor(args.anchor, args.port, args.cpus)
        return
    rep = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=1))
    print(table(rep))


if __name__ == "__main__":
    main()
