"""Batch-inference benchmark: ``ftdist predict`` (Ray Data, one worker) against a plain single-process
batched loop over the same JSONL, model (the demo export), batch size and torch threads, and
``ftdist predict``'s peak memory (driver + Ray processes + worker) at two input sizes.

    python -m bench.predict [--sizes 4000 16000] [--batch-size 64] [--threads 1]

Both contenders run as fresh processes and their times include loading the model; ftdist's also
include starting a local Ray cluster (reported separately as wall time). Memory is the resident
size of the process tree, sampled every 0.25 s. Results: a table on stdout and bench/out/predict.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.demo_export import bench_env, demo_export, demo_texts, rss_tree

OUT = Path(__file__).resolve().parent / "out"


def write_input(path: Path, rows: int) -> None:
    with open(path, "w") as f:
        for i, t in enumerate(demo_texts(rows)):
            f.write(json.dumps({"id": i, "text": t}) + "\n")


def measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """(completed process, wall seconds, peak RSS of its process tree)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, rss_tree(proc.pid))
        time.sleep(0.25)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {err[-2000:]}")
    return done, wall, peak


def run_ftdist(model: str, inp: Path, out: Path, batch: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "ftdist", "predict", model, "--input", str(inp), "--output", str(out), "--overwrite",
           "--batch-size", str(batch), "--workers", "1", "--cpus-per-worker", str(threads)]
    p, wall, peak = measured(cmd)
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    return {"rows": rec["rows"], "seconds": rec["seconds"], "rows_per_s": rec["rows"] / rec["seconds"],
            "wall_s": wall, "peak_rss_mib": peak / 2**20}


def run_plain(model: str, inp: Path, out: Path, batch: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "bench.predict", "--plain", model, "--input", str(inp), "--output", str(out),
           "--batch-size", str(batch), "--threads", str(threads)]
    p, wall, peak = measured(cmd)
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    return {**rec, "wall_s": wall, "peak_rss_mib": peak / 2**20}


def plain(model: str, inp: str, out: str, batch: int, threads: int) -> None:
    """The plain loop: read the JSONL in batches, predict with ftdist's inference core, write Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ftdist.inference import Predictor

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    p = Predictor(model)
    writer, rows = None, 0

    def flush(ids: list, texts: list) -> None:
        nonlocal writer, rows
        res = p.predict_texts(texts)
        t = pa.table({"id": ids, "label": [r["label"] for r in res], "label_id": [r["label_id"] for r in res],
                      "scores": pa.array([r["scores"] for r in res], pa.list_(pa.float32()))})
        writer = writer or pq.ParquetWriter(out, t.schema)
        writer.write_table(t)
        rows += len(ids)

    ids: list = []
    texts: list = []
    with open(inp) as f:
        for line in f:
            r = json.loads(line)
            ids.append(r["id"])
            texts.append(r["text"])
            if len(ids) == batch:
                flush(ids, texts)
                ids, texts = [], []
    if ids:
        flush(ids, texts)
    writer.close()
    seconds = time.perf_counter() - t0
    print(json.dumps({"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[4000, 16000])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plain", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--output", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(OUT / "predict.json"))
    args = ap.parse_args()
    if args.plain:
        plain(args.plain, args.input, args.output, args.batch_size, args.threads)
        return
    model = demo_export(OUT / "demo-export")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-predict-") as tmp:
        for n in args.sizes:
            inp = Path(tmp) / f"in-{n}.jsonl"
            write_input(inp, n)
            f = run_ftdist(model, inp, Path(tmp) / f"out-{n}", args.batch_size, args.threads)
            print(f"ftdist predict {n:7d} rows: {f['rows_per_s']:7.1f} rows/s (wall {f['wall_s']:.1f} s), "
                  f"peak RSS {f['peak_rss_mib']:.0f} MiB", flush=True)
            results.append({"contender": "ftdist predict (1 worker)", "size": n, **f})
        n = args.sizes[1]
        pl = run_plain(model, Path(tmp) / f"in-{n}.jsonl", Path(tmp) / "plain.parquet", args.batch_size, args.threads)
        print(f"plain loop     {n:7d} rows: {pl['rows_per_s']:7.1f} rows/s (wall {pl['wall_s']:.1f} s), "
              f"peak RSS {pl['peak_rss_mib']:.0f} MiB", flush=True)
        results.append({"contender": "plain loop", "size": n, **pl})
    rep = {"batch_size": args.batch_size, "threads": args.threads, "results": results,
           "plain_over_ftdist": pl["rows_per_s"] / results[1]["rows_per_s"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=1))
    print("| contender | rows | rows/s | wall s | peak RSS MiB |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['contender']} | {r['size']} | {r['rows_per_s']:.1f} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    print(f"plain / ftdist rows/s at {n} rows: {rep['plain_over_ftdist']:.2f}x")


if __name__ == "__main__":
    main()
