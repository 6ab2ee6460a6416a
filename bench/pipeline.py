"""Domain adaptation, measured (issue 14's goals) on the shipped pipeline example.

1. The example (``cluster/jobs/pipeline-dapt.yaml``: masked-LM on unlabelled in-domain tweets, then the
   sentiment task from its export) through ``ftdist.pipeline.runner.run_pipeline``: the forgetting
   matrix, and the pipeline's overhead between stages against the stages' own time.
2. In-domain perplexity after adaptation against the pre-trained model's. all-MiniLM-L6-v2 ships no
   masked-LM head, so the starting model is the pre-trained encoder under an *initialised* head (a
   strawman; the pipeline does not score it on the first stage's sets, no summary uses it: this bench
   does, after the pipeline). The fair reference fitted here: the pre-trained encoder frozen, its masked-LM head
   trained on the same in-domain train split for the same number of examples as the dapt stage (one
   process, plain PyTorch), scored by the same evaluation (``ftdist.pipeline.evaluate.score``) on the
   same held-out set with the same masking.
3. The task from the adapted encoder against the task from the pre-trained one, same config and budget,
   for each of ``--seeds`` seeds (``run.seed``: head initialisation, data order, dropout; the data split
   is the same): test accuracy and macro-F1 per seed, the paired differences, and how many seeds a
   difference of this size needs before a 95% interval excludes zero.

Run from the repository root after ``python cluster/jobs/pipeline_data.py``::

    python -m bench.pipeline --seeds 3

Prints a table and writes JSON (``--out``, default ``bench/out/pipeline.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from typing import Any

CONFIG = "cluster/jobs/pipeline-dapt.yaml"


def fitted_head_perplexity(p: Any, examples: int, lr: float) -> dict[str, Any]:
    """The pre-trained encoder (frozen) with a masked-LM head fitted on the dapt stage's train split."""
    import torch
    from transformers import AutoModelForMaskedLM

    from ftdist.uri import join_uri
    from ftdist.data.collate import collate
    from ftdist.data.masking import Masker
    from ftdist.data.reader import ShardReader
    from ftdist.modeling import load_tokenizer, resolve_model_path
    from ftdist.pipeline.evaluate import score

    stage = p.stages[0].config
    in_domain = p.stages[0].sets[0]
    local = resolve_model_path(stage.model.path, stage.storage)
    tok = load_tokenizer(local)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(local, dtype=torch.float32)
    head = [p_ for n, p_ in model.named_parameters() if n.startswith("cls.") and "decoder.weight" not in n]
    for p_ in model.parameters():
        p_.requires_grad_(False)
    for p_ in head:
        p_.requires_grad_(True)
    opt = torch.optim.AdamW(head, lr=lr)
    reader = ShardReader(join_uri(stage.data.path, "train"), stage.storage, 0, 1, 64, stage.run.seed, shuffle=True,
                         tokenizer=tok, max_length=stage.data.max_length)
    masker = Masker(tok, stage.train.mlm_probability, stage.run.seed, local)
    seen, t0 = 0, time.time()
    model.train()
    for i, rows in enumerate(reader.batches(0)):
        batch = masker(collate(rows, tok.pad_token_id, "masked-lm"), (0, 0, i))
        loss = model(**{k: v for k, v in batch.items() if k != "sample_id"}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += len(rows)
        if seen >= examples:
            break
    model.eval()
    return {"perplexity": score(model, tok, in_domain, stage.storage), "examples": seen, "lr": lr,
            "seconds": time.time() - t0}


def task_runs(p: Any, seeds: list[int], root: str, stage_summary: dict[str, Any],
              progress: Any = None) -> dict[str, list[dict[str, Any]]]:
    """The task stage's config from the adapted export and from the pre-trained model, per seed (the
    adapted arm at the stage's own seed is the pipeline's task stage: ``stage_summary``)."""
    from ftdist.launcher import run_training

    task = p.stages[1].config
    arms = {"adapted": task.model.path, "pretrained": p.stages[0].config.model.path}
    out: dict[str, list[dict[str, Any]]] = {a: [] for a in arms}
    for seed in seeds:
        for arm, model in arms.items():
            if arm == "adapted" and seed == task.run.seed:
                out[arm].append({"seed": seed, "test": stage_summary["test"], "wall_s": stage_summary["wall_time_s"],
                                 "best_epoch": stage_summary["best_epoch"], "run": "the pipeline's task stage"})
                continue
            cfg = task.model_copy(update={
                "run": task.run.model_copy(update={"name": f"{arm}-seed{seed}", "seed": seed}),
                # the split the stage prepared, as it is (prepare records run.seed: another seed would refuse it)
                "data": task.data.model_copy(update={"prepare": None}),
                "model": task.model.model_copy(update={"path": model}),
                "storage": task.storage.model_copy(update={"path": root})})
            t0 = time.time()
            s = run_training(cfg)
            out[arm].append({"seed": seed, "test": s["test"], "wall_s": time.time() - t0,
                             "best_epoch": s["best_epoch"]})
            if progress is not None:
                progress(out)  # a long comparison leaves its finished runs on disk
    return out


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Mean and sd of the paired differences a - b, and the seeds a 95% interval (normal, 1.96) needs
    to exclude zero at this effect size and spread."""
    d = [x - y for x, y in zip(a, b)]
    mean = statistics.fmean(d)
    sd = statistics.stdev(d) if len(d) > 1 else float("nan")
    need = math.ceil((1.96 * sd / abs(mean)) ** 2) if len(d) > 1 and mean and sd == sd else None
    return {"diffs": d, "mean": mean, "sd": sd, "seeds_needed": need}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=CONFIG)
    ap.add_argument("--set", action="append", default=[], help="pipeline --set overrides")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm of the task comparison (0: skip it)")
    ap.add_argument("--head-lr", type=float, default=1e-3, help="learning rate of the fitted-head reference")
    ap.add_argument("--out", default="bench/out/pipeline.json")
    args = ap.parse_args(argv)
    from ftdist.uri import join_uri
    from ftdist.pipeline.evaluate import evaluate_entry
    from ftdist.pipeline.runner import format_pipeline, run_pipeline
    from ftdist.pipeline.spec import load_pipeline

    p = load_pipeline(args.config, args.set)
    t0 = time.time()
    summary = run_pipeline(p)
    print(format_pipeline(summary), flush=True)
    result: dict[str, Any] = {"config": args.config, "overrides": args.set, "pipeline_s": time.time() - t0,
                              "matrix": summary["matrix"], "start": summary["start"], "sets": summary["sets"],
                              "summaries": summary["summaries"], "overhead": summary["overhead"],
                              "stages": summary["stages"]}
    from ftdist import run_folder, storage

    stage_summaries = [json.loads(storage.read_text(join_uri(r["run_dir"], run_folder.SUMMARY), p.storage))
                       for r in summary["stages"]]
    ref = fitted_head_perplexity(p, stage_summaries[0]["rows"]["train"] * p.stages[0].config.train.epochs,
                                 args.head_lr)
    adapted = summary["matrix"][0][0]
    # the starting model on the first stage's set: no summary uses it, so the pipeline does not score it
    start = summary["start"][0] if summary["scored"][0][0] else evaluate_entry(p, -1, p.sets[0])["value"]
    result["perplexity"] = {"adapted": adapted, "start_initialised_head": start,
                            "pretrained_fitted_head": ref, "ratio_vs_fitted_head": adapted / ref["perplexity"],
                            "ratio_vs_initialised_head": adapted / start}
    print(f"in-domain perplexity: adapted {adapted:.2f}; pre-trained encoder + fitted head {ref['perplexity']:.2f} "
          f"(ratio {adapted / ref['perplexity']:.3f}); + initialised head {start:.1f}", flush=True)
    if args.seeds:
        seeds = [p.stages[1].config.run.seed] + list(range(1, args.seeds))
        def save(partial: dict[str, Any]) -> None:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({**result, "task_partial": partial}, f, indent=1)

        runs = task_runs(p, seeds, join_uri(p.uri, "compare"), stage_summaries[1], save)
        result["task"] = runs
        for metric in ("accuracy", "macro_f1"):
            a = [r["test"][metric] for r in runs["adapted"]]
            b = [r["test"][metric] for r in runs["pretrained"]]
            result[f"task_{metric}"] = {"adapted": a, "pretrained": b, "paired": paired(a, b)}
            pr = result[f"task_{metric}"]["paired"]
            print(f"test {metric}: adapted {statistics.fmean(a):.4f} vs pre-trained {statistics.fmean(b):.4f} over "
                  f"{len(a)} seeds; paired difference {pr['mean']:+.4f} (sd {pr['sd']:.4f}); seeds for a 95% interval "
                  f"to exclude 0: {pr['seeds_needed']}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
