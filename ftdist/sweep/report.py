"""What a sweep leaves behind: per-trial records, ``sweep_summary.json``, ``trials.csv``, two plots,
the best trial's model in ``best_model/``, checkpoint pruning, and the printed report.

Everything is derived from two sources written during the sweep: Tune's experiment state and
per-trial result logs (status, config, every epoch report) and each trial's Train run folders
(``train_result.json`` with test metrics, checkpoints, ``model/``). ``classify`` and
``choose_best`` are pure so the rules (what "stopped" means, which trial wins) are unit-tested.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from ftdist import run_folder as layout
from ftdist import storage
from ftdist.uri import join_uri
from ftdist.sweep.layout import (
    BEST_MODEL,
    CURVES_PNG,
    INIT_CHECKPOINT,
    PARAMS_PNG,
    SEGMENT_MARKER,
    SUMMARY,
    TRIALS_CSV,
    existing_segments,
    trial_name,
)
from ftdist.sweep.spec import ResolvedSweep


@dataclass
class TrialRecord:
    trial: str
    tune_status: str  # TERMINATED, ERROR, RUNNING, PENDING, PAUSED
    config: dict[str, Any]  # the swept keys (after PBT perturbations: the last values)
    rows: list[dict[str, Any]] = field(default_factory=list)  # one per epoch trained, in order
    runs: list[str] = field(default_factory=list)  # Train run names (PBT: one per segment)
    exploits: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None  # train_result.json of the last run, if it finished
    error: str | None = None
    epochs_trained: int | None = None  # from the runs' own checkpoints (None: unknown, count the rows)


# ---------------------------------------------------------------------------------------------
# Rules


def classify(rec: TrialRecord, epochs: int, scheduler: str) -> tuple[str, str]:
    """(status, why it stopped) of one trial."""
    if rec.tune_status == "ERROR":
        return "error", f"error: {rec.error or 'see the trial folder'}"
    last = rec.rows[-1]["epoch"] if rec.rows else 0
    if rec.tune_status == "TERMINATED":
        if rec.result is not None:
            if rec.result.get("stopped_early"):
                return "completed", f"early stopping (train.early_stopping_patience) after epoch {last}"
            return "completed", f"completed all {epochs} epochs"
        return "stopped", f"stopped by {scheduler} after epoch {last} of {epochs}"
    return "unfinished", ("interrupted after epoch " + str(last)) if rec.rows else "not started"


def best_of(values: list[float], mode: str) -> float | None:
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return None
    return max(vals) if mode == "max" else min(vals)


def choose_best(trials: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The winner among trials that completed (tested and exported), by their best epoch's metric.
    A trial a scheduler stopped has no test metrics or export, so it cannot be the winner."""
    done = [t for t in trials if t["status"] == "completed" and t["best_metric"] is not None]
    if not done:
        return None
    sign = 1 if mode == "max" else -1
    return max(done, key=lambda t: sign * t["best_metric"])


def dedupe_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (run, epoch): an interrupted sweep may log an epoch of a run twice on resume."""
    out: dict[tuple[Any, Any], dict[str, Any]] = {}
    for r in rows:
        out[(r.get("ftdist_run"), r.get("epoch"))] = r
    return list(out.values())


# ---------------------------------------------------------------------------------------------
# Collecting


def collect_trials(rs: ResolvedSweep) -> list[TrialRecord]:
    """Every trial of the sweep, from Tune's experiment state and the trials' run folders."""
    from ray.tune import ExperimentAnalysis


    st = rs.base_config.resolved().storage  # ${env:...} in storage keys resolved where used
    fs, path = storage.pyarrow_filesystem(rs.storage_path, st)
    ea = ExperimentAnalysis(f"{path.rstrip('/')}/{rs.spec.name}", storage_filesystem=fs)
    frames = ea.trial_dataframes
    records = []
    for t in sorted(ea.trials, key=lambda t: t.trial_id):
        name = trial_name(t)
        df = frames.get(t.trial_id)
        rows = [] if df is None or df.empty else [
            {k: _plain(v) for k, v in r.items()} for r in df.to_dict("records") if _plain(r.get("epoch")) is not None]
        rows = dedupe_rows(rows)
        segs = existing_segments(rs.trials_uri, st, name)
        runs = _ordered_runs(segs)
        exploits = []
        for run in runs[1:]:
            marker = join_uri(rs.trials_uri, run, SEGMENT_MARKER)
            if storage.exists(marker, st):
                exploits.append({"run": run, **json.loads(storage.read_text(marker, st))})
        last_run = (rows[-1].get("ftdist_run") if rows else None) or (runs[-1] if runs else name)
        res_uri = join_uri(rs.trials_uri, last_run, layout.RESULT)
        result = json.loads(storage.read_text(res_uri, st)) if storage.exists(res_uri, st) else None
        err = None
        if t.status == "ERROR":
            err = _error_line(str(t.get_error() or ""))
        inherited = {e["run"]: checkpoint_epoch(e.get("copied") or e.get("source") or "") for e in exploits}
        trained = [epochs_reached(join_uri(rs.trials_uri, run), st) for run in runs]
        counted = [n for n in trained if n is not None]
        total = (sum(max(0, n - (inherited.get(run) or 0)) for run, n in zip(runs, counted))
                 if runs and len(counted) == len(trained) else None)
        records.append(TrialRecord(name, t.status, {k: _plain(t.config.get(k)) for k in rs.spec.space}, rows,
                                   runs or [name], exploits, result, err, total))
    return records


def checkpoint_epoch(uri: str) -> int:
    """Epochs done in a checkpoint, from its name (``epoch003-batch000000-...``, see checkpoint.py)."""
    name = layout.CheckpointName.parse(uri)
    return name.epoch if name else 0


def epochs_reached(run_uri: str, st: Any) -> int | None:
    """The last whole epoch a Train run finished: from its ``train_result.json`` or the newest
    checkpoint in its snapshot file. Unlike Tune's result log, this counts epochs a killed driver
    never passed on to Tune. None if the run left neither."""
    reached = []
    res = join_uri(run_uri, layout.RESULT)
    if storage.exists(res, st):
        epochs = json.loads(storage.read_text(res, st)).get("epochs") or []
        reached.append(int(epochs[-1]["epoch"]) if epochs else 0)
    epoch = (layout.latest_registered(run_uri, st).get("metrics") or {}).get("epoch")
    if isinstance(epoch, (int, float)):
        reached.append(int(math.floor(epoch)))
    return max(reached) if reached else None


def _ordered_runs(segs: dict[str, Any]) -> list[str]:
    """A trial's runs in the order they were started: the trial's own name, then -pbt1, -pbt2, ..."""

    def key(run: str) -> int:
        m = re.search(r"-pbt(\d+)$", run)
        return int(m.group(1)) if m else 0

    return sorted(segs, key=key)


def _plain(v: Any) -> Any:
    """numpy/pandas scalars -> Python; NaN -> None."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


def _error_line(text: str) -> str:
    m = re.search(r"UserError: (.+)", text)
    if m:
        return m.group(1).strip()
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else "unknown error"


# ---------------------------------------------------------------------------------------------
# Outputs


def trial_entry(rs: ResolvedSweep, rec: TrialRecord) -> dict[str, Any]:
    base_epochs = rs.base["train"]["epochs"]
    epochs = int(rec.config.get("train.epochs", base_epochs))
    status, reason = classify(rec, epochs, rs.spec.scheduler_type)
    curve = [(r["epoch"], r.get(rs.metric)) for r in rec.rows]
    values = [v for _, v in curve if v is not None]
    best = best_of(values, rs.mode)
    best_epoch = next((e for e, v in curve if v == best), None) if best is not None else None
    result = rec.result or {}
    if status == "completed" and result.get("best_metric") is not None:
        best, best_epoch = result["best_metric"], result.get("best_epoch")
    last_run = (rec.rows[-1].get("ftdist_run") if rec.rows else None) or rec.runs[-1]
    return {
        "trial": rec.trial, "config": rec.config, "status": status, "stop_reason": reason,
        "epochs_run": max(len(rec.rows), rec.epochs_trained or 0), "max_epochs": epochs,
        "best_metric": best, "best_epoch": best_epoch,
        "last_metric": values[-1] if values else None, "curve": curve,
        "test": result.get("test") if status == "completed" else None,
        "run_dir": join_uri(rs.trials_uri, last_run), "runs": rec.runs, "exploits": rec.exploits,
        "checkpoint": None, "error": rec.error,
    }


def write_outputs(rs: ResolvedSweep, records: list[TrialRecord], started_at: float, concurrency: int,
                  resumed: bool) -> dict[str, Any]:
    """Write every output of the sweep into its folder and return the summary."""
    from ftdist.launcher import library_versions

    st = rs.base_config.resolved().storage  # ${env:...} in storage keys resolved where used
    trials = [trial_entry(rs, r) for r in records]
    complete = bool(trials) and all(t["status"] in ("completed", "stopped", "error") for t in trials)
    best = choose_best(trials, rs.mode)
    uri = rs.sweep_uri
    best_model = None
    if best is not None:
        best_model = join_uri(uri, BEST_MODEL)
        copy_model(join_uri(best["run_dir"], "model"), best_model, st)
    removed = prune_checkpoints(rs, trials, best) if complete and not rs.spec.checkpoints.keep_losing_trials else 0
    for t in trials:
        t["checkpoint"] = surviving_checkpoint(t, st)
    trained = sum(t["epochs_run"] for t in trials)
    budget = sum(t["max_epochs"] for t in trials)
    outputs = {"summary": join_uri(uri, SUMMARY), "trials_csv": join_uri(uri, TRIALS_CSV),
               "learning_curves": join_uri(uri, CURVES_PNG), "hyperparameters": join_uri(uri, PARAMS_PNG),
               "best_model": best_model}
    summary = {
        "sweep": rs.spec.name, "status": "completed" if complete else "interrupted", "resumed": resumed,
        "sweep_dir": uri, "metric": rs.metric, "mode": rs.mode,
        "scheduler": rs.spec.scheduler.model_dump(mode="json"), "search": rs.spec.search.model_dump(mode="json"),
        "space": {k: d.to_yaml() for k, d in rs.spec.space.items()}, "num_trials": len(trials),
        "concurrency": concurrency,
        "trials": trials,
        "best": None if best is None else {
            "trial": best["trial"], "config": best["config"], "best_metric": best["best_metric"],
            "best_epoch": best["best_epoch"], "test": best["test"], "run_dir": best["run_dir"],
            "model_uri": best_model},
        "epochs_trained": trained, "full_budget_epochs": budget,
        "budget_fraction": trained / budget if budget else None,
        "pbt_exploits": sum(len(t["exploits"]) for t in trials),
        "checkpoints_removed": removed, "outputs": outputs,
        "wall_time_s": time.time() - started_at, "versions": library_versions(),
    }
    storage.write_text(join_uri(uri, TRIALS_CSV), trials_csv(rs, trials), st)
    storage.write_bytes(join_uri(uri, CURVES_PNG), plot_learning_curves(rs, trials, best), st)
    storage.write_bytes(join_uri(uri, PARAMS_PNG), plot_hyperparameters(rs, trials, best), st)
    storage.write_text(join_uri(uri, SUMMARY), json.dumps(summary, indent=1, default=str), st)
    return summary


def copy_model(src: str, dest: str, st: Any) -> None:
    """``model/`` of the best trial -> ``best_model/`` (works for s3:// too; marker file last)."""
    with tempfile.TemporaryDirectory(prefix="ftdist-best-model-") as tmp:
        storage.download_dir(src, tmp, st)
        storage.upload_dir(tmp, dest, st, last="ftdist_export.json")


def _checkpoint_dirs(run_uri: str, st: Any) -> list[str]:

    return [n for n in storage.listdir(run_uri, st) if layout.is_checkpoint(n) or n == INIT_CHECKPOINT]


def prune_checkpoints(rs: ResolvedSweep, trials: list[dict[str, Any]], best: dict[str, Any] | None) -> int:
    """After a finished sweep, remove every checkpoint except the best trial's (its last run keeps
    what Train's retention kept: the best and the latest). Exports (``model/``) and results stay."""
    st = rs.base_config.resolved().storage  # ${env:...} in storage keys resolved where used
    keep_run = best["run_dir"] if best else None
    removed = 0
    for t in trials:
        for run in t["runs"]:
            run_uri = join_uri(rs.trials_uri, run)
            for name in _checkpoint_dirs(run_uri, st):
                if run_uri == keep_run and not name.startswith("pbt_init"):
                    continue
                storage.remove(join_uri(run_uri, name), st)
                removed += 1
    return removed


def surviving_checkpoint(t: dict[str, Any], st: Any) -> str | None:
    """The trial's best checkpoint if it still exists (else its newest remaining one, else None)."""
    run_uri = t["run_dir"]
    names = [n for n in storage.listdir(run_uri, st) if layout.is_checkpoint(n)]
    if not names:
        return None
    if t["best_epoch"] is not None:
        tag = layout.epoch_end_prefix(int(t["best_epoch"]))
        exact = [n for n in names if n.startswith(tag)]
        if exact:
            return join_uri(run_uri, exact[-1])
    return join_uri(run_uri, sorted(names)[-1])


def trials_csv(rs: ResolvedSweep, trials: list[dict[str, Any]]) -> str:
    keys = list(rs.spec.space)
    test_keys = sorted({k for t in trials for k in (t["test"] or {})})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "status", "stop_reason", "epochs_run", "max_epochs", f"best_{rs.metric}", "best_epoch",
                *keys, *[f"test_{k}" for k in test_keys], "exploits", "checkpoint"])
    for t in trials:
        w.writerow([t["trial"], t["status"], t["stop_reason"], t["epochs_run"], t["max_epochs"], t["best_metric"],
                    t["best_epoch"], *[t["config"].get(k) for k in keys],
                    *[(t["test"] or {}).get(k) for k in test_keys], len(t["exploits"]), t["checkpoint"] or ""])
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg: no display needed)


def _figure(width: float, height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=(width, height), dpi=100)


def _png(plt: Any, fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def plot_learning_curves(rs: ResolvedSweep, trials: list[dict[str, Any]], best: dict[str, Any] | None) -> bytes:
    """Metric vs epoch, one line per trial: solid = completed, dashed + x = stopped early by the scheduler."""
    plt, fig = _figure(8, 5)
    ax = fig.add_subplot(1, 1, 1)
    for t in trials:
        if not t["curve"]:
            continue
        xs, ys = zip(*t["curve"])
        stopped = t["status"] != "completed"
        is_best = best is not None and t["trial"] == best["trial"]
        line, = ax.plot(xs, ys, linestyle="--" if stopped else "-", marker="o", markersize=3,
                        linewidth=2.5 if is_best else 1.2, alpha=0.9 if is_best or not stopped else 0.6,
                        label=f"{t['trial']}{' (best)' if is_best else ''}{' (stopped)' if stopped else ''}")
        if stopped:
            ax.plot([xs[-1]], [ys[-1]], marker="x", markersize=9, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel(rs.metric)
    ax.set_title(f"sweep '{rs.spec.name}': {rs.metric} per epoch ({rs.spec.scheduler_type}; x = stopped early)")
    ax.grid(alpha=0.3)
    if len(trials) <= 16:
        ax.legend(fontsize=7, loc="best")
    return _png(plt, fig)


def plot_hyperparameters(rs: ResolvedSweep, trials: list[dict[str, Any]], best: dict[str, Any] | None) -> bytes:
    """Each swept key against the trial's best metric (o completed, x stopped, * the winner)."""
    keys = list(rs.spec.space)
    plt, fig = _figure(4.2 * len(keys), 3.8)
    for i, key in enumerate(keys, start=1):
        ax = fig.add_subplot(1, len(keys), i)
        dim = rs.spec.space[key]
        cats = [] if dim.is_range else [json.dumps(v) for v in dim.values]
        numeric_cats = not dim.is_range and all(isinstance(v, (int, float)) for v in dim.values)
        for t in trials:
            if t["best_metric"] is None:
                continue
            v = t["config"].get(key)
            x = v if dim.is_range or numeric_cats else (cats.index(json.dumps(v)) if json.dumps(v) in cats else -1)
            is_best = best is not None and t["trial"] == best["trial"]
            ax.scatter([x], [t["best_metric"]], marker="*" if is_best else ("o" if t["status"] == "completed" else "x"),
                       s=160 if is_best else 40, color="tab:red" if is_best else (
                           "tab:blue" if t["status"] == "completed" else "tab:gray"))
        if dim.kind == "loguniform":
            ax.set_xscale("log")
        if not dim.is_range and not numeric_cats:
            ax.set_xticks(range(len(cats)), cats)
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {rs.metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep '{rs.spec.name}': hyperparameters vs best {rs.metric}")
    return _png(plt, fig)


# ---------------------------------------------------------------------------------------------
# The printed report


def format_report(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    sched = summary["scheduler"]["type"]
    lines = [f"sweep '{summary['sweep']}' ({sched} scheduler, {summary['search']['type']} search, "
             f"{summary['num_trials']} trials, {summary['concurrency']} at a time): {summary['status']}"]
    keys = list(summary["space"])
    best_trial = (summary.get("best") or {}).get("trial")
    for t in summary["trials"]:
        params = ", ".join(f"{k.split('.')[-1]}={_fmt(t['config'].get(k))}" for k in keys)
        star = "  <- best" if t["trial"] == best_trial else ""
        lines.append(f"  {t['trial']}: {params}; {t['epochs_run']}/{t['max_epochs']} epochs, "
                     f"best {metric} {_fmt(t['best_metric'])}; {t['stop_reason']}{star}")
    best = summary.get("best")
    if best:
        lines.append("  best config: " + ", ".join(f"{k}={_fmt(v)}" for k, v in best["config"].items()))
        lines.append(f"  best {metric}: {_fmt(best['best_metric'])} (epoch {best['best_epoch']})")
        if best.get("test"):
            lines.append("  test (best checkpoint): " + ", ".join(f"{k} {_fmt(v)}" for k, v in best["test"].items()))
    else:
        lines.append("  no trial completed, so there is no best model")
    frac = summary.get("budget_fraction")
    lines.append(f"  epochs trained: {summary['epochs_trained']} of {summary['full_budget_epochs']} for the full "
                 f"budget (every trial to its last epoch)" + (f": {frac:.0%}" if frac is not None else ""))
    if summary.get("pbt_exploits"):
        lines.append(f"  PBT exploits: {summary['pbt_exploits']}")
    if summary.get("checkpoints_removed"):
        lines.append(f"  removed {summary['checkpoints_removed']} checkpoint(s) of losing trials")
    if best and best.get("model_uri"):
        lines.append(f"  best model: {best['model_uri']}")
    lines.append(f"  summary: {summary['outputs']['summary']}  (trials.csv, learning_curves.png, "
                 f"hyperparameters.png alongside)")
    lines.append(f"  wall time {summary['wall_time_s']:.0f}s")
    if summary["status"] != "completed":
        lines.append("  interrupted: rerun the same command with --resume to continue (finished trials are kept)")
    return "\n".join(lines)


def every_trial_failed(summary: dict[str, Any]) -> str | None:
    """The one line for a finished sweep in which no trial got anywhere (all errored), else None.

    Why: such a sweep "completes" in Tune's eyes, but it produced no model; exiting 0 would let a
    pipeline or a CI job carry on as if it had."""
    trials = sorted(summary.get("trials") or [], key=lambda t: t["trial"])
    if summary.get("status") != "completed" or not trials or any(t["status"] != "error" for t in trials):
        return None
    first = trials[0]
    return (f"every trial of sweep '{summary['sweep']}' failed ({len(trials)} of {len(trials)}); the first, "
            f"{first['trial']}: {first.get('error') or 'unknown error'}; details in {summary['sweep_dir']}")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
