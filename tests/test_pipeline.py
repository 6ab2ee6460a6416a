"""Pipelines (ftdist/pipeline/): the file's references and checks, the forgetting summaries on
hand-computed matrices, and (slow) a masked-LM stage then a classification stage end to end, with
the matrix checked against direct evaluations of each export and a resume after a failure."""

from __future__ import annotations

import json
import math
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
# Which head scores a set after a later stage; the encoder swap


def test_each_set_is_scored_with_the_head_of_the_latest_stage_that_trained_it(tmp_path, tiny_bert):
    from ftdist.pipeline.evaluate import head_row

    p = load_pipeline("p.yaml", data=_pipeline(tmp_path, [
        _stage("mlm", tiny_bert, "/d/text", "masked-lm"), _stage("a", "${stage:mlm}", "/d/a"),
        _stage("b", "${stage:a}", "/d/b"), _stage("a2", "${stage:b}", "/d/a", eval=[])]))
    mlm, a, b = p.sets
    assert [head_row(p, r, mlm) for r in (-1, 0, 1, 2, 3)] == [-1, 0, 0, 0, 0]  # the masked-LM stage's head
    assert [head_row(p, r, a) for r in (0, 1, 2, 3)] == [None, 1, 1, 3]  # a's head until a2 retrains it
    assert [head_row(p, r, b) for r in (1, 2, 3)] == [None, 2, 2]


def test_swap_encoder_keeps_the_head_and_takes_every_encoder_weight(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from ftdist.pipeline.evaluate import swap_encoder

    cfg = AutoConfig.for_model("bert", vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(1)
    head_model = AutoModelForSequenceClassification.from_config(cfg)
    torch.manual_seed(2)
    encoder_model = AutoModelForSequenceClassification.from_config(cfg)
    encoder_model.save_pretrained(tmp_path / "enc")
    head_before = {k: v.clone() for k, v in head_model.classifier.state_dict().items()}
    swap_encoder(head_model, str(tmp_path / "enc"))
    for k, v in encoder_model.bert.state_dict().items():
        assert torch.equal(head_model.bert.state_dict()[k], v), k
    for k, v in head_model.classifier.state_dict().items():
        assert torch.equal(v, head_before[k]), k


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


# ---------------------------------------------------------------------------------------------
# What is measured between stages: only entries a summary or the matrix uses, each model loaded once


def _export(folder: str, auto_cls, tiny_bert: str, seed: int, **config) -> None:
    """A stage's export without training it: the tiny BERT's shape with the stage's head, seeded."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(tiny_bert, **config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        auto_cls.from_config(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(folder)


def test_between_stages_only_used_entries_are_scored_and_the_summaries_equal_scoring_everything(
        tmp_path, tiny_bert, cls_data, monkeypatch):
    """Three stages (masked LM, classification, masked LM on other text; each export faked): after each,
    what the runner measures. The starting model is not scored on the first stage's sets (no summary
    uses b[j] there) but is on the third's (FWT), each model is loaded once for all the sets it scores,
    and the summaries equal those of the full matrix, every entry scored one at a time."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from conftest import NAMES
    from ftdist.config import PrepareSection, StorageSection
    from ftdist.data.prepare import prepare
    from ftdist.pipeline import evaluate, runner
    from ftdist.pipeline.forgetting import NOT_SCORED, Column

    texts = {name: write_jsonl(tmp_path / f"{name}.jsonl", [{"text": r["text"] + extra} for r in synthetic_rows(60, i)])
             for i, (name, extra) in enumerate([("mlm", ""), ("gen", " of the year"), ("mlm2", " on the road")])}
    for name, raw in texts.items():
        prepare(PrepareSection(input=str(raw), label_field=None), str(tmp_path / f"ds-{name}"), tiny_bert, 64,
                "masked-lm", StorageSection())
    p = load_pipeline("p.yaml", data=_pipeline(tmp_path, [
        _stage("mlm", tiny_bert, str(tmp_path / "ds-mlm"), "masked-lm",
               eval=[{"name": "in-domain"}, {"name": "general", "data": str(tmp_path / "ds-gen")}]),
        _stage("task", "${stage:mlm}", cls_data),
        _stage("mlm2", "${stage:task}", str(tmp_path / "ds-mlm2"), "masked-lm")]))
    _export(layout.stage_export_uri(p.uri, "mlm"), AutoModelForMaskedLM, tiny_bert, 1)
    _export(layout.stage_export_uri(p.uri, "task"), AutoModelForSequenceClassification, tiny_bert, 2,
            num_labels=len(NAMES))
    _export(layout.stage_export_uri(p.uri, "mlm2"), AutoModelForMaskedLM, tiny_bert, 3)

    loads: list[tuple[int, str]] = []
    real_load = evaluate.load_for_set

    def counted(p_, row, s):
        loads.append((row, s.name))
        return real_load(p_, row, s)

    monkeypatch.setattr(evaluate, "load_for_set", counted)
    records, per_stage = [], []
    for i, st in enumerate(p.stages):  # what run_pipeline does after stage i has trained
        loads.clear()
        seconds = runner._measure(p, runner.wanted_after(p, i))
        per_stage.append(len(loads))
        records.append({"name": st.name, "task": st.config.model.task, "stage_s": 10.0, "evaluation_s": seconds,
                        "between_s": seconds, "skipped": False, "resumed": False, "test": None})
        summary = runner.write_summary(p, records, 0.0)
    # the reference: every entry of the matrix and the start row, one at a time as before
    monkeypatch.setattr(evaluate, "load_for_set", real_load)
    from ftdist.modeling import load_tokenizer

    def one(row: int, s) -> float | None:
        loaded = real_load(p, row, s)
        if loaded is None:
            return None
        return evaluate.score(loaded[0], load_tokenizer(evaluate.model_uri(p, row), cfg=p.storage), s, p.storage)

    full = [[one(row, s) for s in p.sets] for row in (-1, 0, 1, 2)]
    assert all(v is not None for v in full[0][:2] + full[0][3:])  # the skipped entries exist and are finite
    scored = summary["scored"]
    for r, (got, want, done) in enumerate(zip([summary["start"], *summary["matrix"]], full, scored)):
        for g, w, d in zip(got, want, done):
            assert (g is None and not d) or (g is None if w is None else g == pytest.approx(w, rel=1e-6)), (r, got)
    cols = [Column(s.name, s.stage, s.metric, s.mode) for s in p.sets]
    expected = summaries(full[1:], full[0], cols)
    assert summary["summaries"].keys() == expected.keys()
    # Each entry agrees to rel 1e-6, not exactly: the runner scores with one thread per set, the reference
    # with the process's threads (another reduction order). A summary is a difference of entries (BWT of
    # perplexities near 7,000 is a few hundred), so it agrees to 1e-6 of the entries, not of itself.
    for metric, want in expected.items():
        largest = max(abs(row[j]) for row in full for j, c in enumerate(cols) if c.metric == metric and row[j] is not None)
        got = summary["summaries"][metric]
        assert got["terms"] == want["terms"] and got["sets"] == want["sets"], metric
        for k in ("acc", "bwt", "fwt"):
            assert (got[k] is None) == (want[k] is None) and (
                want[k] is None or got[k] == pytest.approx(want[k], rel=1e-6, abs=4e-6 * largest)), k
    assert expected["perplexity"]["terms"]["fwt"] == 1  # mlm2's R[1][j] - b[j]: the one start entry FWT uses
    assert scored == [[False, False, True, True], [True, True, True, False], [True, True, True, True],
                      [True, True, True, True]]
    lines = runner.format_pipeline(summary).splitlines()
    start_line = next(x for x in lines if x.split()[:1] == ["start"])
    assert start_line.count(NOT_SCORED) == 2 and start_line.split()[-2] == "-"  # task: measured, no head
    start = json.loads((Path(p.uri) / "evaluations" / layout.START_EVALUATION).read_text())
    assert sorted(start) == ["mlm2", "task"]  # in-domain, general: never used, never scored
    # one load per model: after stage 1 the two sets share it; after stage 3: the new model with its
    # masked-LM head and with the task's head, the previous model (FWT), the starting model (b for mlm2)
    assert per_stage == [1, 2, 4], per_stage


def test_an_entry_is_measured_again_when_its_model_or_its_data_changed(tmp_path, tiny_bert, cls_data, monkeypatch):
    """A stored matrix entry is reused only for the same model version and data (audit D13): after a
    stage is retrained (a new export under the same name) or a set's data is rebuilt under the same
    name, the matrix shows the new values, equal to scoring afresh; with nothing changed nothing is
    loaded again."""
    import shutil

    from transformers import AutoModelForSequenceClassification

    from conftest import NAMES, prepare_local
    from ftdist.pipeline import evaluate, runner

    def other_data(seed: int, n: int) -> str:
        shutil.rmtree(tmp_path / "other", ignore_errors=True)
        return prepare_local(write_jsonl(tmp_path / f"other{seed}.jsonl", synthetic_rows(n, seed)),
                             tmp_path / "other", tiny_bert)

    other = other_data(7, 120)
    p = load_pipeline("p.yaml", data=_pipeline(tmp_path, [_stage(
        "task", tiny_bert, cls_data, eval=[{"name": "own"}, {"name": "other", "data": other, "split": "test"}])]))
    export = layout.stage_export_uri(p.uri, "task")
    loads: list[int] = []
    real_load = evaluate.load_for_set
    monkeypatch.setattr(evaluate, "load_for_set", lambda p_, row, s: loads.append(row) or real_load(p_, row, s))

    def matrix() -> list[float]:
        runner._measure(p, {0: [0, 1]})
        stored = json.loads(Path(layout.evaluation_uri(p.uri, "task")).read_text())
        return [stored["own"]["value"], stored["other"]["value"]]

    def afresh() -> list[float]:
        return [evaluate.evaluate_entries(p, [(0, s)])[(0, s.name)]["value"] for s in p.sets]

    _export(export, AutoModelForSequenceClassification, tiny_bert, 1, num_labels=len(NAMES))
    first = matrix()
    loads.clear()
    assert matrix() == first and loads == []  # unchanged: reused, nothing loaded
    _export(export, AutoModelForSequenceClassification, tiny_bert, 5, num_labels=len(NAMES))  # retrained
    retrained = afresh()
    assert retrained != first  # the two exports score differently, so a stale entry would show
    assert matrix() == retrained
    other_data(11, 400)  # the "other" set's data rebuilt under the same name
    rebuilt = afresh()
    assert rebuilt[1] != retrained[1]
    assert matrix() == rebuilt


# ---------------------------------------------------------------------------------------------
# End to end: masked-LM stage, then the task from its export; a failure in stage 2, then a rerun


def _files(root: Path) -> dict[str, tuple[float, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime, p.stat().st_size) for p in root.rglob("*") if p.is_file()}


def _direct_accuracy(export: Path, split: Path) -> float:
    """Accuracy of an export on a prepared split, with plain transformers, one row at a time."""
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    right = n = 0
    for f in sorted(split.glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([row["input_ids"]])).logits
            right += int(logits.argmax(-1).item() == row["label"])
            n += 1
    return right / n


@pytest.mark.slow
def test_pipeline_end_to_end_matrix_heatmap_and_resume(tmp_path, tiny_bert, ray_local, s3_server, s3_bucket,
                                                       monkeypatch):
    import psutil

    from ftdist.errors import RunFailed
    from ftdist.pipeline.runner import run_pipeline

    rows = synthetic_rows(300, seed=3)
    mlm = write_jsonl(tmp_path / "mlm.jsonl", [{"text": r["text"]} for r in rows[:150]])
    gen = write_jsonl(tmp_path / "general.jsonl", [{"text": f"{r['text']} of the year"} for r in rows[150:210]])
    cls = write_jsonl(tmp_path / "cls.jsonl", synthetic_rows(150, seed=4))
    small = {"deepspeed": {"zero_stage": 0}, "scaling": {"num_workers": 1, "cpus_per_worker": 1}}
    dapt = _stage("dapt", tiny_bert, str(tmp_path / "ds-mlm"), "masked-lm",
                  eval=[{"name": "in-domain"},
                        {"name": "general", "data": str(tmp_path / "ds-gen"),
                         "prepare": {"input": str(gen), "label_field": None, "rows_per_shard": 50}}])
    dapt["config"]["data"]["prepare"] = {"input": str(mlm), "label_field": None, "rows_per_shard": 50}
    task = _stage("task", "${stage:dapt}", str(tmp_path / "ds-cls"))
    task["config"]["data"]["prepare"] = {"input": str(cls), "rows_per_shard": 50}
    for st in (dapt, task):
        st["config"].update(small)
    task["config"]["train"]["epochs"] = 2
    p = load_pipeline("p.yaml", data=_pipeline(tmp_path, [dapt, task]))
    root = tmp_path / "runs" / "p"

    # 1) stage 2 fails after its first epoch's checkpoint (a worker is killed): the pipeline stops there
    failed: dict = {}
    t = threading.Thread(target=lambda: failed.setdefault("error", _raises(run_pipeline, p)))
    t.start()
    snap = root / "stages" / "task" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 240
    while time.time() < deadline and t.is_alive():
        if snap.exists() and "epoch001" in snap.read_text() and worker_pids():
            psutil.Process(worker_pids()[0]).kill()
            break
        time.sleep(0.05)
    t.join(timeout=300)
    assert isinstance(failed.get("error"), RunFailed), failed
    partial = json.loads((root / layout.SUMMARY).read_text())
    assert partial["status"] == "running" and partial["rows"] == ["dapt"]
    stage1 = _files(root / "stages" / "dapt")
    assert any(k.startswith("model/") for k in stage1)
    # the masked-LM export keeps the base model's pre-trained pooler (its model class has none), so the
    # task stage starts from it as a task fine-tuned on the base model directly would
    import torch
    from safetensors.torch import load_file

    base = {k: v for k, v in load_file(str(Path(tiny_bert) / "model.safetensors")).items() if k.startswith("pooler.")}
    exported = load_file(str(root / "stages" / "dapt" / "model" / "model.safetensors"))
    assert base and all(torch.equal(exported[f"bert.{k}"], v) for k, v in base.items()), sorted(exported)[:5]

    # 2) rerun: stage 1 is kept as it is, stage 2 resumes from its checkpoint and finishes
    summary = run_pipeline(p)
    assert _files(root / "stages" / "dapt") == stage1, "a finished stage was touched by the rerun"
    assert [r["skipped"] for r in summary["stages"]] == [True, False] and summary["stages"][1]["resumed"] is True
    assert summary["status"] == "completed" and summary == json.loads((root / layout.SUMMARY).read_text())

    # the matrix: 2 stages x 3 sets, R[i][i] = the stage's own validation figure (same evaluation code,
    # same masking) and the task's column = a direct, independent evaluation of its export
    R, start = summary["matrix"], summary["start"]
    assert [s["name"] for s in summary["sets"]] == ["in-domain", "general", "task"]
    assert len(R) == 2 and all(len(r) == 3 for r in R)
    d = json.loads((root / "stages" / "dapt" / "summary.json").read_text())
    tk = json.loads((root / "stages" / "task" / "summary.json").read_text())
    assert R[0][0] == pytest.approx(d["epochs"][-1]["val_perplexity"], rel=1e-6)
    best = next(e for e in tk["epochs"] if e["epoch"] == tk["best_epoch"])
    assert R[1][2] == pytest.approx(best["val_accuracy"], abs=1e-9)
    assert R[1][2] == pytest.approx(_direct_accuracy(root / "stages" / "task" / "model",
                                                     tmp_path / "ds-cls" / "validation"), abs=1e-9)
    assert R[0][2] is None and start[2] is None  # no head for the task before its stage
    assert all(v is not None and math.isfinite(v) for v in (R[0][0], R[0][1], R[1][0], R[1][1]))
    assert start[:2] == [None, None] and summary["scored"][0] == [False, False, True]  # no summary uses them
    assert R[1][0] != R[0][0]  # the task's encoder under the masked-LM stage's head: another model
    from ftdist.pipeline.evaluate import evaluate_entry

    assert R[0][0] < evaluate_entry(p, -1, p.sets[0])["value"]  # masked-LM training lowered in-domain perplexity
    ppl = summary["summaries"]["perplexity"]
    assert ppl["bwt"] == pytest.approx(((R[1][0] - R[0][0]) + (R[1][1] - R[0][1])) / 2)
    assert ppl["acc"] == pytest.approx((R[1][0] + R[1][1]) / 2) and summary["summaries"]["accuracy"]["fwt"] is None
    png = (root / layout.MATRIX_PNG).read_bytes()
    assert png[:4] == b"\x89PNG" and summary["heatmap"] == str(root / layout.MATRIX_PNG)
    assert summary["overhead"]["ratio"] is not None and summary["overhead"]["between_stages_s"] >= 0

    # the same pipeline folder in S3 (moto's server): an entry measured from the exports there is the same
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    fs = s3_server.fs()
    for f in (f for f in root.rglob("*") if f.is_file()):
        fs.put_file(str(f), f"{s3_bucket[5:]}/pipes/p/{f.relative_to(root)}")
    remote = load_pipeline("p.yaml", [f"storage.path={s3_bucket}/pipes"], data=_pipeline(tmp_path, [dapt, task]))
    assert remote.stage("task").config.model.path == f"{s3_bucket}/pipes/p/stages/dapt/model"
    assert evaluate_entry(remote, 1, remote.sets[0])["value"] == pytest.approx(R[1][0], rel=1e-9)


def _raises(fn, *args):
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 - the test inspects it
        return e
    return None
