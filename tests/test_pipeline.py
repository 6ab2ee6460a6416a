"""Pipelines (ftdist/pipeline/): the file's references and checks, the forgetting summaries on
hand-computed matrices, and (slow) a masked-LM stage then a classification stage end to end, with
the matrix checked against direct evaluations of each export and a resume after a failure."""

from __future__ import annotations

import json
import math
import os
import struct
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import base_config, synthetic_rows, worker_pids, write_jsonl
from ftdist.errors import UserError
from ftdist.pipeline import layout
from ftdist.pipeline.forgetting import Column, format_matrix, heatmap_png, summaries
from ftdist.pipeline.spec import load_pipeline


def _stage(name: str, model: str, data: str, task: str = "sequence-classification", **extra) -> dict:
    cfg = base_config(model, data, "/ignored", model={"task": task}, train={"epochs": 1})
    cfg.pop("storage")
    cfg.pop("run")
    return {"name": name, "config": cfg, **extra}


def _pipeline(tmp_path: Path, stages: list[dict]) -> dict:
    return {"name": "p", "storage": {"path": str(tmp_path / "runs")}, "stages": stages}


# ---------------------------------------------------------------------------------------------
# The spec: references, managed keys, checks


def test_a_stage_reference_becomes_the_earlier_stage_export_and_the_pipeline_names_runs(tmp_path, tiny_bert):
    raw = _pipeline(tmp_path, [_stage("dapt", tiny_bert, "/d/mlm", "masked-lm"),
                               _stage("task", "${stage:dapt}", "/d/cls", set=["train.learning_rate=3e-5"])])
    p = load_pipeline("p.yaml", ["task:train.epochs=3", "storage.path=" + str(tmp_path / "other")], data=raw)
    uri = str(tmp_path / "other" / "p")
    assert p.uri == uri
    task = p.stage("task").config
    assert task.model.path == layout.stage_export_uri(uri, "dapt") == f"{uri}/stages/dapt/model"
    assert task.run.name == "task" and task.storage.path == f"{uri}/stages" and task.run_uri() == f"{uri}/stages/task"
    assert task.train.learning_rate == 3e-5 and task.train.epochs == 3
    assert p.stage("dapt").config.train.epochs == 1
    # default evaluation sets: each stage's own validation split, scored by its task's metric
    assert [(s.name, s.stage, s.metric, s.mode, s.split) for s in p.sets] == [
        ("dapt", 0, "perplexity", "min", "validation"), ("task", 1, "accuracy", "max", "validation")]


@pytest.mark.parametrize("ref, fragment", [
    ("${stage:dap}", "names no stage; did you mean 'dapt'?"),
    ("${stage:task}", "names itself"),
    ("${stage:later}", "names stage 'later', which runs after it"),
    ("${stage:dapt", "malformed stage reference"),
])
def test_bad_stage_references_are_one_line_before_anything_runs(tmp_path, tiny_bert, ref, fragment):
    raw = _pipeline(tmp_path, [_stage("dapt", tiny_bert, "/d/mlm", "masked-lm"), _stage("task", ref, "/d/cls"),
                               _stage("later", tiny_bert, "/d/cls")])
    with pytest.raises(UserError, match="stage 'task'") as e:
        load_pipeline("p.yaml", data=raw)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists()


def test_stage_checks(tmp_path, tiny_bert):
    dup = _pipeline(tmp_path, [_stage("a", tiny_bert, "/d"), _stage("a", tiny_bert, "/d")])
    with pytest.raises(UserError, match="stage name 'a' is used twice"):
        load_pipeline("p.yaml", data=dup)
    clm = _pipeline(tmp_path, [_stage("a", tiny_bert, "/d", "causal-lm")])
    with pytest.raises(UserError, match="causal-lm is not supported in a pipeline"):
        load_pipeline("p.yaml", data=clm)
    both = _pipeline(tmp_path, [{**_stage("a", tiny_bert, "/d"), "path": "x.yaml"}])
    with pytest.raises(UserError, match="exactly one of path"):
        load_pipeline("p.yaml", data=both)
    sets = _pipeline(tmp_path, [_stage("a", tiny_bert, "/d", eval=[{"name": "x"}]),
                                _stage("b", tiny_bert, "/d", eval=[{"name": "x"}])])
    with pytest.raises(UserError, match="evaluation set name 'x' is used twice"):
        load_pipeline("p.yaml", data=sets)
    with pytest.raises(UserError, match=r"has no stage 'tsk'; did you mean 'task'\? \(stages: task\)"):
        load_pipeline("p.yaml", ["tsk:train.epochs=2"], data=_pipeline(tmp_path, [_stage("task", tiny_bert, "/d")]))
    bad_key = _pipeline(tmp_path, [_stage("a", tiny_bert, "/d", set=["train.epocs=2"])])
    with pytest.raises(UserError, match="did you mean 'train.epochs'"):
        load_pipeline("p.yaml", data=bad_key)


def test_a_stage_config_file_is_read_from_its_path(tmp_path, tiny_bert):
    cfg = _stage("x", tiny_bert, str(tmp_path / "ds"))["config"]
    (tmp_path / "stage.yaml").write_text(yaml.safe_dump(cfg))
    p = load_pipeline("p.yaml", data=_pipeline(tmp_path, [{"name": "a", "path": str(tmp_path / "stage.yaml")}]))
    assert p.stage("a").config.data.path == str(tmp_path / "ds")


def test_print_config_shows_a_stage_with_its_reference_resolved(tmp_path, tiny_bert, capsys):
    from ftdist.cli import main

    f = tmp_path / "pipe.yaml"
    f.write_text(yaml.safe_dump(_pipeline(tmp_path, [_stage("dapt", tiny_bert, "/d/mlm", "masked-lm"),
                                                    _stage("task", "${stage:dapt}", "/d/cls")])))
    assert main(["pipeline", str(f), "--print-config", "task"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["path"] == str(tmp_path / "runs" / "p" / "stages" / "dapt" / "model")
    assert printed["run"]["name"] == "task"
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# Summaries on hand-computed matrices


def test_summaries_follow_the_gem_definitions():
    # 3 stages, one accuracy set each; values chosen so every term is distinct.
    cols = [Column("a", 0, "accuracy", "max"), Column("b", 1, "accuracy", "max"), Column("c", 2, "accuracy", "max")]
    R = [[0.80, 0.30, 0.20],
         [0.70, 0.90, 0.40],
         [0.60, 0.85, 0.95]]
    b = [0.10, 0.25, 0.35]
    s = summaries(R, b, cols)["accuracy"]
    assert s["acc"] == pytest.approx((0.60 + 0.85 + 0.95) / 3)
    assert s["bwt"] == pytest.approx(((0.60 - 0.80) + (0.85 - 0.90)) / 2)  # j < T only
    assert s["fwt"] == pytest.approx(((0.30 - 0.25) + (0.40 - 0.35)) / 2)  # R[j-1][j] - b_j, j > 1
    assert s["terms"] == {"acc": 3, "bwt": 2, "fwt": 2} and s["direction"] == "higher is better"


def test_summaries_group_metrics_and_skip_unmeasurable_entries():
    # stage 0 declares two perplexity sets, stage 1 one accuracy set (no head before it: None)
    cols = [Column("in", 0, "perplexity", "min"), Column("gen", 0, "perplexity", "min"),
            Column("task", 1, "accuracy", "max")]
    R = [[20.0, 50.0, None],
         [24.0, 45.0, 0.7]]
    b = [100.0, 40.0, None]
    out = summaries(R, b, cols)
    ppl, acc = out["perplexity"], out["accuracy"]
    assert ppl["acc"] == pytest.approx(34.5) and ppl["bwt"] == pytest.approx(((24 - 20) + (45 - 50)) / 2)
    assert ppl["fwt"] is None and ppl["terms"]["fwt"] == 0  # both sets belong to the first stage
    assert ppl["mode"] == "min" and ppl["direction"] == "lower is better"
    assert acc["acc"] == pytest.approx(0.7) and acc["bwt"] is None and acc["fwt"] is None
    lines = format_matrix(R, b, ["s0", "s1"], cols)
    assert len(lines) == 4 and lines[1].split()[0] == "start" and lines[1].split()[-1] == "-"


def test_heatmap_is_a_png_with_one_cell_row_per_model():
    cols = [Column("in", 0, "perplexity", "min"), Column("task", 1, "accuracy", "max")]
    png = heatmap_png([[20.0, None], [24.0, 0.7]], [100.0, None], ["s0", "s1"], cols)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", png[16:24])
    assert (w, h) == (2 * 100 + 2 * 160, int(1.2 * 100 + 3 * 60))  # (2 + 1.6 * sets) x (1.2 + 0.6 * rows) in
