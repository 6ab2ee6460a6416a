"""The benchmark harness: ftdist's path, a plain loop and the HF Trainer run side by side without Ray."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_harness_imports_no_ray():
    code = "import sys, bench.throughput; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


@pytest.mark.slow
def test_tiny_cpu_run_has_every_contender_and_never_imports_ray(tmp_path):
    # A `ray` package that fails on import, first on the path: any import of Ray by the harness fails the run.
    fake = tmp_path / "hide" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the benchmark harness must not import ray')\n")
    out = tmp_path / "tiny.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hide"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, "-m", "bench.throughput", "--model", "tiny", "--device", "cpu",
                        "--contenders", "ftdist", "plain", "hf", "--rounds", "2", "--steps", "2", "--warmup", "1",
                        "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["ray_imported"] is False
    assert rep["suite"] == "fixed" and rep["meta"]["versions"]["torch"]
    by = {r["name"]: r for r in rep["results"]}
    import statistics

    per_window = rep["batch"] * rep["grad_accum"] * rep["steps_per_window"]
    for name in ("ftdist", "plain"):
        r = by[name]
        assert r["status"] == "ok" and len(r["windows_s"]) == 2
        # The figures are what the timed windows say, not placeholders: samples/s and tokens/s from the
        # median window, and each ratio the median of the paired per-round ratios against the plain loop.
        assert r["samples_per_s"] == pytest.approx(per_window / statistics.median(r["windows_s"]))
        assert r["tokens_per_s"] == pytest.approx(r["samples_per_s"] * rep["seq"])
        paired = [p / w for w, p in zip(r["windows_s"], by["plain"]["windows_s"])]
        assert r["vs_plain"]["paired_median"] == pytest.approx(statistics.median(paired))
    assert by["plain"]["vs_plain"]["paired_median"] == 1.0
    assert "ZeRO-0" in by["ftdist"]["describe"]
    assert "contender" in p.stdout and "JSON:" in p.stdout  # the printed table
    if importlib.util.find_spec("accelerate") is None:
        assert by["hf"]["status"] == "skipped" and "accelerate" in by["hf"]["reason"]
        pytest.skip("accelerate is not installed: the HF Trainer contender was skipped (pip install -e '.[test]')")
    assert by["hf"]["status"] == "ok"
    assert by["hf"]["samples_per_s"] == pytest.approx(per_window / statistics.median(by["hf"]["windows_s"]))
    paired_hf = [h / f for f, h in zip(by["ftdist"]["windows_s"], by["hf"]["windows_s"])]
    assert by["ftdist"]["vs_hf"]["paired_median"] == pytest.approx(statistics.median(paired_hf))


def _sweep_summary(scheduler: str, lrs: list[float], epochs: list[int], best: list[float]) -> dict:
    trials = [{"trial": f"trial_{scheduler}_{i:05d}", "config": {"train.learning_rate": lr}, "epochs_run": e,
               "status": "completed" if e == 6 else "stopped", "best_metric": b, "test": {"accuracy": b}}
              for i, (lr, e, b) in enumerate(zip(lrs, epochs, best))]
    top = max(trials, key=lambda t: t["best_metric"])
    return {"scheduler": {"type": scheduler}, "sweep_dir": "/x", "metric": "val_accuracy", "num_trials": len(trials),
            "concurrency": 2, "trials": trials[::-1], "epochs_trained": sum(epochs), "full_budget_epochs": 6 * len(epochs),
            "best": {"trial": top["trial"], "best_metric": top["best_metric"], "config": top["config"], "test": top["test"]},
            "wall_time_s": 10.0}


def test_asha_vs_fifo_compares_only_sweeps_that_drew_the_same_trials():
    from bench.sweep_asha_vs_fifo import check_same_trials, compare, result_of, table
    from ftdist.errors import UserError

    asha = result_of(_sweep_summary("asha", [1e-4, 3e-5, 2e-5], [6, 1, 1], [0.70, 0.50, 0.40]), "a")
    fifo = result_of(_sweep_summary("fifo", [1e-4, 3e-5, 2e-5], [6, 6, 6], [0.705, 0.60, 0.55]), "f")
    assert [t["config"] for t in asha["per_trial"]] == [{"train.learning_rate": v} for v in (1e-4, 3e-5, 2e-5)]
    check_same_trials(asha, fifo)  # same draws, listed in any order
    cmp = compare(asha, fifo)
    assert cmp["epochs_ratio"] == pytest.approx(8 / 18) and cmp["best_val_gap"] == pytest.approx(0.005)
    assert not cmp["goal"]["met"]  # 44% of the epochs is over the 40% goal
    assert "NOT met" in table(asha, fifo, cmp)
    other = result_of(_sweep_summary("fifo", [1e-4, 3e-5, 9e-5], [6, 6, 6], [0.7, 0.6, 0.5]), "g")
    with pytest.raises(UserError, match="different trials .first difference at trial 2"):
        check_same_trials(asha, other)


def test_asha_replay_runs_rays_rung_rule_over_fifo_curves(tmp_path):
    """A late bloomer (worst after epoch 1, best at the end) is stopped when drawn after a trial that
    sets the first rung's bar, and kept when drawn first: replayed through Ray's own scheduler."""
    from bench.asha_replay import Curve, replay

    a = Curve("t_00000", {"train.batch_size": 32}, [0.5, 0.6, 0.7, 0.8])
    late = Curve("t_00001", {"train.batch_size": 32}, [0.4, 0.5, 0.6, 0.9])
    c = Curve("t_00002", {"train.batch_size": 32}, [0.6, 0.7, 0.8, 0.85])
    assert replay([a, late, c], reduction_factor=2, grace_period=1, concurrency=1) == (9, 0.85)
    assert replay([late, a, c], reduction_factor=2, grace_period=1, concurrency=1) == (12, 0.9)

    sweep = tmp_path / "fifo"
    sweep.mkdir()
    trials = [{"trial": t.trial, "config": t.config, "curve": [[e + 1, v] for e, v in enumerate(t.values)]}
              for t in (a, late, c)]
    summary = {"scheduler": {"type": "fifo"}, "metric": "val_accuracy", "mode": "max", "trials": trials}
    (sweep / "sweep_summary.json").write_text(json.dumps(summary))
    p = subprocess.run([sys.executable, "-m", "bench.asha_replay", str(sweep), "--rf", "2", "--concurrency", "1",
                        "--orders", "20"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "best val_accuracy 0.9000" in p.stdout and "rf 2, grace 1: draw order 9/12 epochs (75%), gap 5.00 pt" in p.stdout
    summary["scheduler"]["type"] = "asha"
    (sweep / "sweep_summary.json").write_text(json.dumps(summary))
    p = subprocess.run([sys.executable, "-m", "bench.asha_replay", str(sweep)], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "needs a fifo one" in p.stderr and "Traceback" not in p.stderr


def test_forgetting_scores_an_encoder_under_another_exports_head(tiny_bert, cls_data, tmp_path):
    """bench/forgetting.py's "A after B": the encoder of one export under the head and pooler of another.
    An export whose encoder is A's (only its head and pooler differ) scores exactly as A; moving the
    encoder changes the score."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bench.forgetting import logits, score

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
        with torch.no_grad():
            a.classifier.weight.normal_(0, 2.0)  # a head that predicts more than one class
        b = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
        b.bert.load_state_dict(a.bert.state_dict())
        with torch.no_grad():
            b.bert.pooler.dense.weight.add_(1.0)  # the pooler belongs to the head: A's is used
    for m, d in ((a, "a"), (b, "b")):
        m.save_pretrained(tmp_path / d)
        tok.save_pretrained(tmp_path / d)
    own, _ = logits(str(tmp_path / "a"), str(tmp_path / "a"), cls_data)
    assert torch.equal(logits(str(tmp_path / "b"), str(tmp_path / "a"), cls_data)[0], own)
    assert score(str(tmp_path / "b"), str(tmp_path / "a"), cls_data) == score(str(tmp_path / "a"), str(tmp_path / "a"),
                                                                              cls_data)
    with torch.no_grad():
        b.bert.encoder.layer[1].output.dense.weight.mul_(-3.0)
    b.save_pretrained(tmp_path / "b")
    moved, _ = logits(str(tmp_path / "b"), str(tmp_path / "a"), cls_data)
    assert moved.shape == own.shape and not torch.allclose(moved, own)
