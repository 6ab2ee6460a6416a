"""Multi-task vs single-task, measured (issue 15's goals).

``runs`` (default): the multi-task example (``cluster/jobs/multitask.yaml``) and, from the same
config, one single-task run per task (the task's view: same encoder, data set, hyper-parameters
and workers; so the multi-task run's steps = the single-task runs' steps added up). One table:
per-task test accuracy (multi vs single), their mean, wall time (multi vs the singles' sum).

``step``: the time of one training step of the multi-task model against the single-task model on
the same batch (the first task's real batch), one process, world size 1, no Ray: both engines are
built by ftdist's own setup functions and stepped with ``ftdist.loop.train_step``, in alternating
windows; the ratio is the median of per-round ratios (same round: shared-machine noise cancels).

Examples::

    python cluster/jobs/multitask_data.py
    python -m bench.multitask --suite runs
    python -m bench.multitask --suite step --threads 1

Prints a table and writes JSON (``--out``, default ``bench/out/multitask-<suite>.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIG = "cluster/jobs/multitask.yaml"


def single_task_configs(cfg: Any) -> dict[str, Any]:
    """Each task's single-task run: the task's view of the multi-task config under its own run name."""
    from ftdist.multitask.spec import task_views

    return {t.name: v.model_copy(update={"run": v.run.model_copy(update={"name": f"{cfg.run.name}-single-{t.name}"})})
            for t, v in task_views(cfg)}


def run_suite_runs(args: argparse.Namespace) -> dict[str, Any]:
    from ftdist.config import load_config
    from ftdist.launcher import run_training

    cfg = load_config(args.config, args.set)
    out: dict[str, Any] = {"config": args.config, "overrides": args.set}
    t0 = time.time()
    multi = run_training(cfg)
    out["multi"] = {"wall_s": time.time() - t0, "global_step": multi["global_step"],
                    "tasks": {n: t["test"]["accuracy"] for n, t in multi["tasks"].items()},
                    "mean": multi["test"]["accuracy"],
                    "baselines": {n: t["baseline"]["majority_class_accuracy"] for n, t in multi["tasks"].items()}}
    out["single"] = {}
    for name, scfg in single_task_configs(cfg).items():
        t0 = time.time()
        s = run_training(scfg)
        out["single"][name] = {"wall_s": time.time() - t0, "global_step": s["global_step"],
                               "accuracy": s["test"]["accuracy"]}
    singles = out["single"]
    out["single_mean"] = statistics.mean(v["accuracy"] for v in singles.values())
    out["single_wall_sum_s"] = sum(v["wall_s"] for v in singles.values())
    out["single_steps_sum"] = sum(v["global_step"] for v in singles.values())
    return out


def run_suite_step(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from ftdist import loop
    from ftdist.config import load_config
    from ftdist.data.collate import collate
    from ftdist.multitask import loop as mt_loop
    from ftdist.session import LocalSession, init_single_process_group

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set + ["scaling.num_workers=1"])
    init_single_process_group("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ms = mt_loop.setup(cfg, LocalSession(os.path.join(tmp, "m")))
        first = ms.tasks[0]
        single = loop.setup(first.view.cfg, LocalSession(os.path.join(tmp, "s")))
        rows = next(iter(first.view.train_reader.batches(0)))
        batch = collate(rows, ms.s.tokenizer.pad_token_id, "sequence-classification")
        ms.s.engine.module.active_task = first.name

        def window(s: Any) -> float:
            for _ in range(args.warmup):
                loop.train_step(s, batch)
            t = time.perf_counter()
            for _ in range(args.steps):
                loop.train_step(s, batch)
            return (time.perf_counter() - t) / args.steps

        rounds = []
        for r in range(args.rounds):
            order = [("multi", first.view), ("single", single)][:: 1 if r % 2 == 0 else -1]
            times = {name: window(s) for name, s in order}
            rounds.append(times)
            print(f"round {r + 1}: multi {times['multi'] * 1e3:.1f} ms, single {times['single'] * 1e3:.1f} ms, "
                  f"ratio {times['multi'] / times['single']:.3f}", flush=True)
    ratios = [t["multi"] / t["single"] for t in rounds]
    return {"batch": list(batch["input_ids"].shape), "threads": args.threads, "rounds": rounds,
            "median_ratio": statistics.median(ratios),
            "multi_ms": statistics.median(t["multi"] for t in rounds) * 1e3,
            "single_ms": statistics.median(t["single"] for t in rounds) * 1e3}


def report(suite: str, rep: dict[str, Any]) -> str:
    if suite == "step":
        return (f"step time, batch {rep['batch'][0]}x{rep['batch'][1]}: multi-task {rep['multi_ms']:.1f} ms, "
                f"single-task {rep['single_ms']:.1f} ms, median ratio {rep['median_ratio']:.3f}")
    m, s = rep["multi"], rep["single"]
    lines = ["| task | single-task accuracy | multi-task accuracy | majority baseline |", "|---|---|---|---|"]
    for name, acc in m["tasks"].items():
        lines.append(f"| {name} | {s[name]['accuracy']:.4f} | {acc:.4f} | {m['baselines'][name]:.4f} |")
    lines.append(f"| mean | {rep['single_mean']:.4f} | {m['mean']:.4f} | |")
    lines.append(f"| optimizer steps | {rep['single_steps_sum']} (sum) | {m['global_step']} | |")
    lines.append(f"| wall time (s) | {rep['single_wall_sum_s']:.0f} (sum: "
                 + " + ".join(f"{v['wall_s']:.0f}" for v in s.values()) + f") | {m['wall_s']:.0f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=["runs", "step"], default="runs")
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--set", action="append", default=[], help="config override, as ftdist train --set")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args(argv)
    rep = run_suite_runs(args) if args.suite == "runs" else run_suite_step(args)
    rep["command"] = " ".join(["python -m bench.multitask", *(argv if argv is not None else sys.argv[1:])])
    out = Path(args.out or f"bench/out/multitask-{args.suite}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1))
    print(report(args.suite, rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
