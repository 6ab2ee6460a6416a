"""What a run folder or a prepared data set says about itself is checked before anything trains:
corrupt markers, a multi-task run resumed on another worker count, and a data set that cannot prove
how it was built are refused with one line (exit 2), before Ray starts and without touching the
folder; a single-task run resumed on another worker count is accepted (the workers re-plan it)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import base_config
from ftdist.cli import main


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run_cli(tmp_path: Path, cfg: dict, capsys, *extra: str) -> tuple[int, str]:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["train", str(path), *extra])
    err = capsys.readouterr().err
    return code, err


@pytest.fixture()
def started_run(tmp_path, tiny_bert, cls_data) -> tuple[dict, Path]:
    """A run folder as an interrupted 2-worker run leaves it (marker and config, no summary).

    The marker is written by the launcher's own code, so the test follows its format."""
    from ftdist.config import validate
    from ftdist.preflight import write_run_marker

    cfg = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "resize"})
    write_run_marker(validate(cfg))
    return cfg, tmp_path / "runs" / "resize"


def test_a_run_resumed_on_another_worker_count_is_accepted_and_said(started_run, capsys):
    from ftdist.config import validate
    from ftdist.preflight import check_run_folder

    cfg, _ = started_run
    cfg["scaling"]["num_workers"] = 1
    assert check_run_folder(validate(cfg)) == "resume"
    out = capsys.readouterr().out
    assert "started on 2 worker(s), resuming on 1" in out and "re-partitioned" in out, out


@pytest.mark.parametrize("kind, says", [("multi-task", "a multi-task run"), ("replay", "data.replay")])
def test_runs_whose_positions_are_not_re_planned_refuse_another_worker_count(kind, says, tmp_path, tiny_bert,
                                                                              cls_data, capsys):
    """A multi-task run keeps a stream position per task, a run with data.replay one per replay
    source; the resize re-plan covers neither, so both resume only on their own worker count."""
    from ftdist.config import validate
    from ftdist.preflight import write_run_marker

    cfg = base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "r"})
    if kind == "multi-task":
        del cfg["data"]["path"]
        cfg["tasks"] = [{"name": "a", "data": {"path": cls_data}}, {"name": "b", "data": {"path": cls_data}}]
    else:
        cfg["data"]["replay"] = {"paths": [cls_data], "fraction": 0.2}
    write_run_marker(validate(cfg))
    run = tmp_path / "runs" / "r"
    before = _snapshot(run)
    cfg["scaling"]["num_workers"] = 1
    code, err = _run_cli(tmp_path, cfg, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert says in err and "2 worker" in err and "1 worker" in err and "scaling.num_workers=2" in err, err
    assert _snapshot(run) == before


@pytest.mark.parametrize("name", ["ftdist_run.json", "summary.json"])
def test_corrupt_run_files_are_one_line(tmp_path, started_run, capsys, name):
    cfg, run = started_run
    (run / name).write_text('{"fingerprint": "abc", ')  # cut off mid-write
    before = _snapshot(run)
    code, err = _run_cli(tmp_path, cfg, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert name in err and "corrupt" in err, err
    assert _snapshot(run) == before


def test_data_set_without_a_recorded_spec_is_not_reused(tmp_path, tiny_bert, cls_data, capsys):
    """A data set whose manifest does not record how it was built (by hand, or an older ftdist)
    cannot be checked against ``data.prepare``: reusing it silently trained on stale data."""
    ds = tmp_path / "ds"
    shutil.copytree(cls_data, ds)
    for man in ds.glob("*/manifest.json"):
        d = json.loads(man.read_text())
        d.pop("prepare", None)
        man.write_text(json.dumps(d))
    before = _snapshot(ds)
    cfg = base_config(tiny_bert, str(ds), str(tmp_path / "runs"),
                      data={"prepare": {"input": str(tmp_path / "raw.jsonl"), "text_field": "text"}})
    code, err = _run_cli(tmp_path, cfg, capsys)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(ds) in err and "data.prepare" in err, err
    assert _snapshot(ds) == before
    assert not (tmp_path / "runs").exists()


def test_checkpoint_names_round_trip_and_sort_by_progress():
    from ftdist.checkpoint import TrainState, checkpoint_name
    from ftdist.run_folder import CheckpointName, epoch_end_prefix, is_checkpoint

    name = checkpoint_name(TrainState(epoch=3, batch=0, global_step=90))
    assert name == "epoch003-batch000000-step00000090" and name.startswith(epoch_end_prefix(3))
    assert CheckpointName.parse(f"s3://b/runs/t/{name}/") == CheckpointName(3, 0, 90)
    assert CheckpointName.parse("epoch003-batch000000") is None and not is_checkpoint("model")
    names = [str(CheckpointName(e, b, s)) for e, b, s in [(1, 0, 150), (0, 40, 40), (10, 0, 1500), (2, 7, 307)]]
    assert sorted(names) == [str(CheckpointName(e, b, s)) for e, b, s in
                             [(0, 40, 40), (1, 0, 150), (2, 7, 307), (10, 0, 1500)]]


def test_no_module_types_a_run_folder_name_itself():
    """Layout names live in ftdist/run_folder.py only (issue 12): a second spelling drifts."""
    import re as _re

    root = Path(__file__).resolve().parents[1] / "ftdist"
    names = ["config.yaml", "ftdist_run.json", "summary.json", "train_result.json", "test_predictions.jsonl",
             "checkpoint_manager_snapshot.json", "epoch{", "tensorboard\"", "plots/learning_curves.png",
             "plots/confusion_matrix.png"]
    offenders = [f"{p.relative_to(root)}: {n}" for p in root.rglob("*.py") if p.name != "run_folder.py"
                 for n in names if _re.search(r"[\"']" + _re.escape(n), p.read_text())]
    assert not offenders, offenders
