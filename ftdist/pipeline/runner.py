"""Run a pipeline: its stages in order, each by the same entry point as ``ftdist train``
(:func:`ftdist.launcher.run_training`), then the forgetting matrix after every stage.

Resume is the run folder's: a finished stage's run is reported, not retrained (its files are left as
they are), and an interrupted stage resumes from its latest checkpoint. Matrix entries are kept in
``evaluations/`` as they are measured, so a rerun measures only what is missing. After every stage
``pipeline_summary.json`` and the heatmap are rewritten with the rows so far.

Entries measured after stage ``i``: the new model on every set declared so far (row ``i``), and, for
the sets stage ``i`` declares when ``i`` is not the first stage, the previous model (``R[i-1][j]``) and
the starting model (``b[j]``): the two terms of forward transfer, which no summary takes for the first
stage's sets (:func:`ftdist.pipeline.forgetting.fwt_uses`), so those are not scored (the matrix shows
them as such). Only the CLI imports this module.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ftdist import run_folder, storage
from ftdist.uri import join_uri
from ftdist.launcher import run_training
from ftdist.preflight import prepare_data_if_needed
from ftdist.pipeline import layout
from ftdist.pipeline.evaluate import entry_key, evaluate_entries
from ftdist.pipeline.forgetting import NOT_SCORED, Column, format_matrix, fwt_uses, heatmap_png, summaries
from ftdist.pipeline.spec import Pipeline, dump_pipeline


def _read_row(p: Pipeline, row: int) -> dict[str, Any]:
    uri = layout.evaluation_uri(p.uri, None if row < 0 else p.stages[row].name)
    return json.loads(storage.read_text(uri, p.storage)) if storage.exists(uri, p.storage) else {}


def wanted_after(p: Pipeline, i: int) -> dict[int, list[int]]:
    """The entries measured after stage ``i``: {row: set indices} (row -1: the starting model)."""
    sets = p.sets
    own = [j for j, s in enumerate(sets) if s.stage == i and fwt_uses(s.stage)]
    wanted = {i: [j for j, s in enumerate(sets) if s.stage <= i]}
    if own:
        wanted.update({i - 1: own, -1: own})
    return wanted


def _measure(p: Pipeline, wanted: dict[int, list[int]]) -> float:
    """Measure the entries of ``wanted`` ({row: set indices}; kept in ``evaluations/``) that are missing
    or were measured on other models or data (their key differs), all together (:func:`evaluate_entries`);
    seconds spent."""
    t0 = time.time()
    sets = p.sets
    rows = {row: _read_row(p, row) for row in wanted}
    fingerprints: dict[str, str] = {}
    todo = [(row, sets[j]) for row, js in wanted.items() for j in js
            if (rows[row].get(sets[j].name) or {}).get("key") != entry_key(p, row, sets[j], fingerprints)]
    for (row, name), entry in evaluate_entries(p, todo).items():
        rows[row][name] = entry
    for row in dict.fromkeys(row for row, _ in todo):
        uri = layout.evaluation_uri(p.uri, None if row < 0 else p.stages[row].name)
        storage.write_text(uri, json.dumps(rows[row], indent=1), p.storage)
    return time.time() - t0


def run_pipeline(p: Pipeline) -> dict[str, Any]:
    """Run (or resume) every stage; returns the pipeline summary."""
    started = time.time()
    storage.write_text(join_uri(p.uri, layout.SPEC), dump_pipeline(p), p.storage)
    sets = p.sets
    records: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    before = _previous_records(p)
    for i, st in enumerate(p.stages):
        print(f"[ftdist] pipeline '{p.name}': stage {i + 1}/{len(p.stages)} '{st.name}'", flush=True)
        done = storage.exists(join_uri(st.config.resolved().run_uri(), run_folder.SUMMARY), p.storage)
        t0 = time.time()
        run = run_training(st.config, started_at=t0)
        t1 = time.time()
        own = [j for j, s in enumerate(sets) if s.stage == i]
        for j in own:  # a held-out set with prepare: is built on first use (the stage's own data already is)
            prepare_data_if_needed(sets[j].data_config(st.config).resolved())
        seconds = _measure(p, wanted_after(p, i))
        record = {"name": st.name, "task": st.config.model.task, "run_dir": run["run_dir"],
                  "model_uri": run.get("model_uri"), "resumed": run.get("resumed", False), "skipped": done,
                  "stage_s": t1 - t0, "evaluation_s": seconds, "between_s": time.time() - t1,
                  "test": run.get("test"), "best_epoch": run.get("best_epoch")}
        if done and st.name in before:  # the times of the run that trained it, not of this report
            record.update({k: before[st.name][k] for k in ("stage_s", "evaluation_s", "between_s", "resumed")})
        records.append(record)
        t2 = time.time()
        summary = write_summary(p, records, time.time() - started)
        if not done:  # writing the summary and heatmap is part of what the pipeline adds between stages
            record["between_s"] += time.time() - t2
            summary = write_summary(p, records, time.time() - started, heatmap=False)
    return summary


def _previous_records(p: Pipeline) -> dict[str, dict[str, Any]]:
    """The stage records of an earlier run of this pipeline (a rerun reports a kept stage's times)."""
    uri = join_uri(p.uri, layout.SUMMARY)
    if not storage.exists(uri, p.storage):
        return {}
    try:
        old = json.loads(storage.read_text(uri, p.storage))
        return {r["name"]: r for r in old.get("stages") or [] if "between_s" in r}
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        return {}  # a damaged summary is rewritten below; only the times of kept stages are lost


def write_summary(p: Pipeline, records: list[dict[str, Any]], wall: float, heatmap: bool = True) -> dict[str, Any]:
    """The pipeline summary and heatmap for the stages done so far."""
    sets = p.sets
    columns = [Column(s.name, s.stage, s.metric, s.mode) for s in sets]
    rows = [_read_row(p, i) for i in range(len(records))]
    start = _read_row(p, -1)
    R = [[(r.get(s.name) or {}).get("value") for s in sets] for r in rows]
    scored = [[s.name in r for s in sets] for r in [start, *rows]]  # absent: not scored (no summary uses it)
    baseline = [(start.get(s.name) or {}).get("value") for s in sets]
    stage_s = sum(r["stage_s"] for r in records)
    between = sum(r["between_s"] for r in records)  # what the pipeline adds: evaluations, summaries, the heatmap
    row_names = [str(r["name"]) for r in records]
    summary: dict[str, Any] = {
        "pipeline": p.name, "status": "completed" if len(records) == len(p.stages) else "running",
        "pipeline_dir": p.uri, "stages": records,
        "sets": [{"name": s.name, "stage": p.stages[s.stage].name, "task": s.task, "data": s.data, "split": s.split,
                  "metric": s.metric, "mode": s.mode,
                  "start_head_trained": (start.get(s.name) or {}).get("head_trained")} for s in sets],
        "rows": row_names, "matrix": R, "start": baseline, "scored": scored,
        "summaries": summaries(R, baseline, columns) if R else {},
        "heatmap": join_uri(p.uri, layout.MATRIX_PNG),
        "wall_time_s": wall, "overhead": {"stages_s": stage_s, "between_stages_s": between,
                                          "ratio": between / stage_s if stage_s else None},
    }
    if heatmap:
        storage.write_bytes(join_uri(p.uri, layout.MATRIX_PNG), heatmap_png(R, baseline, row_names, columns, scored),
                            p.storage)
    storage.write_text(join_uri(p.uri, layout.SUMMARY), json.dumps(summary, indent=1), p.storage)
    return summary


def format_pipeline(summary: dict[str, Any]) -> str:
    """The human-readable end of a pipeline: the stages, the matrix and its summaries."""
    sets = summary["sets"]
    columns = [Column(s["name"], 0, s["metric"], s["mode"], s.get("split", "")) for s in sets]
    lines = [f"pipeline '{summary['pipeline']}' ({summary['status']}, {len(summary['stages'])} stage(s)):"]
    for r in summary["stages"]:
        test = "  ".join(f"{k} {v:.4f}" for k, v in (r.get("test") or {}).items())
        how = "kept (already completed)" if r["skipped"] else ("resumed" if r["resumed"] else "trained")
        lines.append(f"  stage '{r['name']}' ({r['task']}): {how} in {r['stage_s']:.0f}s, evaluation "
                     f"{r['evaluation_s']:.1f}s; its run's test split: {test}")
    # the matrix's sets are measured on their own split (validation unless eval: says otherwise): the
    # numbers differ from the stage lines' test split, and each column says which split it is
    lines.append("  R[after stage][on set (metric, split)]:")
    lines += ["  " + x for x in format_matrix(summary["matrix"], summary["start"], summary["rows"], columns,
                                                summary.get("scored"))]
    if not all(all(r) for r in summary.get("scored") or []):
        lines.append(f"  ({NOT_SCORED}: no summary uses the entry, so the pipeline did not measure it)")
    for metric, m in summary["summaries"].items():
        def f(v: float | None) -> str:
            return "n/a" if v is None else f"{v:+.4f}"
        lines.append(f"  {metric} ({m['direction']}): ACC {m['acc']:.4f}  BWT {f(m['bwt'])}  FWT {f(m['fwt'])}"
                     if m["acc"] is not None else f"  {metric}: no final values")
    o = summary["overhead"]
    if o["ratio"] is not None:
        lines.append(f"  overhead between stages: {o['between_stages_s']:.1f}s = {o['ratio']:.1%} of the stages' "
                     f"{o['stages_s']:.0f}s")
    lines.append(f"  heatmap: {summary['heatmap']}")
    lines.append(f"  summary: {join_uri(summary['pipeline_dir'], layout.SUMMARY)}")
    return "\n".join(lines)
