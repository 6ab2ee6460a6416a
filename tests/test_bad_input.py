"""The bad-input catalogue: one table, each row a mistake a user makes for real.

Every row must exit 2 with exactly one stderr line naming what is wrong (no traceback), and leave
existing runs, data sets and exports byte-for-byte untouched. Rows run the real CLI entry point
in-process (`ftdist.cli.main`), so they are fast; tests/test_cli.py covers the subprocess path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import base_config, prepare_local, synthetic_rows, write_jsonl
from exports import export_tiny
from ftdist.cli import main


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert, tiny_gpt, cls_data, clm_data, s3_server):
    """A workspace with a healthy data set, an existing run folder and an existing export, and an
    empty bucket on a reachable S3 server (for URIs that name nothing)."""
    root = tmp_path_factory.mktemp("bad-input")
    bucket = "bad-input-empty"
    s3_server.fs().mkdir(bucket)
    ds = root / "ds"
    shutil.copytree(cls_data, ds)
    run = root / "runs" / "existing"
    (run / "model").mkdir(parents=True)
    (run / "model" / "model.safetensors").write_bytes(b"weights")
    (run / "ftdist_run.json").write_text(json.dumps({"fingerprint": "feedbeef", "config": {}}))
    raw = write_jsonl(root / "raw.jsonl", synthetic_rows(50))
    (root / "raw.csv").write_text("body,label\nhello,1\n")
    (root / "int-labels.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 5}\n')
    (root / "fraction-labels.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1.5}\n')
    gpt_ds = prepare_local(raw, root / "gpt-tok-ds", tiny_gpt, label_names=["negative", "neutral", "positive"])
    deployed = root / "runs" / "deployed"  # a finished run to predict with: ftdist_run.json and model/
    export_tiny(tiny_bert, deployed / "model")
    (deployed / "ftdist_run.json").write_text(json.dumps({"fingerprint": "0ddba11", "config": {}}))
    export_tiny(tiny_bert, root / "adapter-run" / "model", lora_adapter=True)
    (root / "inputs").mkdir()
    write_jsonl(root / "inputs" / "a.jsonl", synthetic_rows(5))
    write_jsonl(root / "inputs" / "b.jsonl", [{**r, "id": f"s{r['id']}"} for r in synthetic_rows(5)])
    (root / "garbage.parquet").write_bytes(bytes(range(256)) * 12)
    (root / "empty.jsonl").write_bytes(b"")
    four = prepare_local(raw, root / "four-labels-ds", tiny_bert, label_names=["negative", "neutral", "positive", "mixed"])
    return {"root": root, "ds": str(ds), "bert": tiny_bert, "gpt": tiny_gpt, "clm": clm_data, "raw": str(raw),
            "gpt_ds": gpt_ds, "four": four, "s3": s3_server.endpoint, "bucket": f"s3://{bucket}"}


def _cfg(w, **sections) -> dict:
    return base_config(w["bert"], w["ds"], str(w["root"] / "runs"), **sections)


def _write(w, cfg: dict, name: str = "job.yaml") -> str:
    p = w["root"] / name
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def _damage_copy(w, what: str) -> str:
    """A damaged copy of the healthy data set."""
    dst = w["root"] / f"ds-{what}"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(w["ds"], dst)
    man_path = dst / "validation" / "manifest.json"
    man = json.loads(man_path.read_text())
    if what == "truncated":
        shard = dst / "validation" / man["shards"][0]["file"]
        shard.write_bytes(shard.read_bytes()[:-50])
    elif what == "no-manifest":
        man_path.unlink()
    elif what == "version":
        man["version"] = 7
        man_path.write_text(json.dumps(man))
    elif what == "schema":
        man["columns"].pop("input_ids")
        man_path.write_text(json.dumps(man))
    elif what == "empty-split":
        shutil.rmtree(dst / "test")
        (dst / "test").mkdir()
    return str(dst)


def train(w, **sections):
    return ["train", _write(w, _cfg(w, **sections))]


def _multitask(w, **sections) -> dict:
    cfg = _cfg(w, **sections)
    del cfg["data"]["path"]
    cfg["tasks"] = [{"name": "a", "data": {"path": w["ds"]}}, {"name": "b", "data": {"path": w["ds"]}}]
    return cfg


def prep(w, *extra: str, out: str = "new-ds"):
    return ["data", "prepare", "--input", w["raw"], "--output", str(w["root"] / out), "--model", w["bert"], *extra]


CASES = {
    # --- CLI arguments
    "cli-unknown-command": (lambda w: ["trian", "x.yaml"], "invalid choice: 'trian'"),
    "cli-missing-config-arg": (lambda w: ["train"], "required: config"),
    "cli-bad-set": (lambda w: ["train", _write(w, _cfg(w)), "--set", "train.epochs"], "must look like dotted.key=value"),
    "cli-set-unknown-key": (lambda w: ["train", _write(w, _cfg(w)), "--set", "train.epocs=2"], "did you mean 'train.epochs'"),
    "cli-bad-split": (lambda w: prep(w, "--split", "0.5,0.5"), "must be three fractions"),
    "cli-split-not-numbers": (lambda w: prep(w, "--split", "a,b,c"), "must be three numbers"),
    "cli-split-nan": (lambda w: prep(w, "--split", "nan,nan,nan"), "must be three fractions"),
    "cli-limit-zero": (lambda w: prep(w, "--limit", "0"), "--limit 0 must be"),
    "cli-limit-negative": (lambda w: prep(w, "--limit", "-3"), "--limit -3 must be"),
    "cli-seed-negative": (lambda w: prep(w, "--seed", "-1"), "--seed -1 must be"),
    "cli-unknown-encoding": (lambda w: prep(w, "--encoding", "nope"), "encoding 'nope' is unknown"),
    "cli-binary-codec-as-encoding": (lambda w: prep(w, "--encoding", "base64"), "encoding 'base64' is not a text"),
    # --- config
    "lora-unknown-target": (lambda w: ["train", _write(w, _cfg(w, model={"lora": {"target_modules": ["qkv"]}}))],
                            "model.lora.target_modules: 'qkv' is not a module of model"),
    "lora-rank-zero": (lambda w: ["train", _write(w, _cfg(w, model={"lora": {"r": 0}}))], "'model.lora.r'"),
    "freeze-unknown-part": (lambda w: train(w, train={"freeze": ["encoder"]}), "train.freeze: 'encoder' is not a part name"),
    "freeze-block-beyond-model": (lambda w: train(w, train={"freeze": ["layers:1-5"]}),
                                  "train.freeze: 'layers:1-5' asks for block 5 but the model has 2 blocks"),
    "freeze-with-lora": (lambda w: train(w, train={"freeze": ["embeddings"]}, model={"lora": {}}),
                         "LoRA already keeps every base weight frozen"),
    "l2sp-too-strong": (lambda w: train(w, train={"l2sp": 500}), "train.l2sp 500.0 x train.learning_rate 0.01 must be below 1"),
    "l2sp-negative": (lambda w: train(w, train={"l2sp": -1}), "'train.l2sp'"),
    "replay-other-labels": (lambda w: train(w, data={"replay": {"paths": [w["four"]]}}, model={"num_labels": 4}),
                            "replaying other labels needs a head per task: list both data sets under tasks:"),
    "replay-missing-data-set": (lambda w: train(w, data={"replay": {"paths": [str(w["root"] / "nope")]}}),
                                "does not exist or is empty"),
    "replay-fraction-one": (lambda w: train(w, data={"replay": {"paths": [w["ds"]], "fraction": 1}}),
                            "'data.replay.fraction'"),
    "config-missing-file": (lambda w: ["train", str(w["root"] / "nope.yaml")], "not found"),
    "config-is-directory": (lambda w: ["train", str(w["root"])], "is a directory"),
    "config-invalid-yaml": (lambda w: ["train", _raw(w, "model: [oops\n")], "not valid YAML"),
    "config-not-mapping": (lambda w: ["train", _raw(w, "- a\n- b\n")], "must hold a mapping"),
    "config-unknown-section": (lambda w: ["train", _write(w, {**_cfg(w), "trainer": {}})], "did you mean 'train'"),
    "config-wrong-type": (lambda w: train(w, train={"batch_size": "big"}), "'train.batch_size'"),
    "config-out-of-range": (lambda w: train(w, train={"learning_rate": 5}), "'train.learning_rate'"),
    "config-bad-zero-stage": (lambda w: train(w, deepspeed={"zero_stage": 4}), "'deepspeed.zero_stage'"),
    "config-offload-params-stage": (lambda w: train(w, deepspeed={"offload_params": True}), "needs deepspeed.zero_stage: 3"),
    "config-min-workers-above-max": (lambda w: train(w, scaling={"min_workers": 3}),
                                     "scaling.min_workers (3) is more than scaling.num_workers (2"),
    "config-memory-limit-without-size": (lambda w: train(w, scaling={"enforce_memory_limit": True}),
                                         "scaling.enforce_memory_limit needs scaling.memory_per_worker_gb"),
    "config-elastic-multitask": (lambda w: ["train", _write(w, _multitask(w, scaling={"min_workers": 1}))],
                                 "scaling.min_workers: a multi-task run resumes only on the number"),
    "config-metric-not-reported": (lambda w: train(w, train={"eval_metric": "perplexity"}), "not reported for task"),
    "config-class-weights-vs-data": (lambda w: train(w, train={"class_weights": [1.0, 2.0]}),
                                     "train.class_weights has 2 weight(s) but there are 3 classes"),
    "config-class-weights-vs-labels": (lambda w: train(w, model={"num_labels": 4}, train={"class_weights": [1, 2]}),
                                       "train.class_weights has 2 weight(s) but there are 4 classes"),
    "config-class-weights-negative": (lambda w: train(w, train={"class_weights": [1, 0, 2]}), "must be positive"),
    "config-class-weights-word": (lambda w: train(w, train={"class_weights": "inverse"}), "'train.class_weights"),
    "config-mlflow-credentials-in-uri": (
        lambda w: train(w, tracking={"mlflow": {"tracking_uri": "http://bob:hunter2@127.0.0.1:5000"}}),
        "must not hold credentials: set MLFLOW_TRACKING_USERNAME"),
    "config-unset-env-ref": (lambda w: train(w, storage={"options": {"token": "${env:FTDIST_NOT_SET}"}},
                                             data={"path": "s3://bucket/ds"}), "FTDIST_NOT_SET is not set"),
    # --- models
    "model-path-missing": (lambda w: train(w, model={"path": str(w["root"] / "no-model")}), "model path"),
    "model-num-labels-too-small": (lambda w: train(w, model={"num_labels": 2}), "set model.num_labels: 3"),
    "model-label-names-mismatch": (lambda w: train(w, model={"num_labels": 3, "label_names": ["a", "b"]}),
                                   "model.label_names has 2 names"),
    "model-task-vs-data": (lambda w: train(w, model={"task": "causal-lm", "path": w["gpt"]}, data={"path": w["ds"]}),
                           "prepared for task sequence-classification"),
    "model-other-tokenizer": (lambda w: train(w, data={"path": w["gpt_ds"]}), "tokenized with"),
    # --- data sets
    "data-path-missing": (lambda w: train(w, data={"path": str(w["root"] / "no-data")}), "does not exist or is empty"),
    "data-truncated-shard": (lambda w: train(w, data={"path": _damage_copy(w, "truncated")}), "truncated or corrupt"),
    "data-no-manifest": (lambda w: train(w, data={"path": _damage_copy(w, "no-manifest")}), "manifest.json' is missing"),
    "data-unknown-version": (lambda w: train(w, data={"path": _damage_copy(w, "version")}), "manifest version 7"),
    "data-schema-mismatch": (lambda w: train(w, data={"path": _damage_copy(w, "schema")}), "lacks column(s) ['input_ids']"),
    "data-empty-split": (lambda w: train(w, data={"path": _damage_copy(w, "empty-split")}), "does not exist or is empty"),
    "prepare-input-missing": (lambda w: ["data", "prepare", "--input", str(w["root"] / "none.jsonl"), "--output",
                                         str(w["root"] / "x"), "--model", w["bert"]], "does not exist"),
    "prepare-text-field-missing": (lambda w: ["data", "prepare", "--input", str(w["root"] / "raw.csv"), "--output",
                                              str(w["root"] / "y"), "--model", w["bert"]],
                                   "has no column 'text' (columns: body, label); set --text-field/--label-field"),
    # the same mistakes in a run config's data.prepare: the error names the keys the user wrote, not flags
    "config-prepare-text-field-missing": (
        lambda w: train(w, data={"path": str(w["root"] / "prep-cfg"), "prepare": {"input": str(w["root"] / "raw.csv")}}),
        "has no column 'text' (columns: body, label); set data.prepare.text_field/data.prepare.label_field"),
    "config-prepare-input-missing": (
        lambda w: train(w, data={"path": str(w["root"] / "prep-cfg"), "prepare": {"input": str(w["root"] / "no.csv")}}),
        "does not exist; check data.prepare.input"),
    "prepare-label-out-of-range": (lambda w: ["data", "prepare", "--input", str(w["root"] / "int-labels.jsonl"),
                                              "--output", str(w["root"] / "z"), "--model", w["bert"],
                                              "--label-names", "a,b"], "has label 5"),
    "prepare-fraction-label": (lambda w: ["data", "prepare", "--input", str(w["root"] / "fraction-labels.jsonl"),
                                          "--output", str(w["root"] / "z"), "--model", w["bert"]],
                               "label 1.5 is not a whole number"),
    "prepare-no-tokenizer": (lambda w: ["data", "prepare", "--input", w["raw"], "--output", str(w["root"] / "t")],
                             "set --model (or --raw-text"),
    "prepare-pack-classification": (lambda w: prep(w, "--pack"), "--pack packs unlabelled text of --task causal-lm"),
    "prepare-output-exists": (lambda w: ["data", "prepare", "--input", w["raw"], "--output", w["ds"], "--model", w["bert"]],
                              "already holds a data set"),
    # --- storage
    "storage-unreachable-endpoint": (lambda w: train(w, data={"path": "s3://bucket/ds"},
                                                     storage={"endpoint_url": "http://127.0.0.1:9", "retries": 0}),
                                     "storage unreachable"),
    # A reachable S3 server, an existing bucket, no object under the prefix (not an outage).
    "storage-model-uri-missing": (lambda w: train(w, model={"path": f"{w['bucket']}/no-model"},
                                                  storage={"endpoint_url": w["s3"], "retries": 0}),
                                  "model 's3://bad-input-empty/no-model' does not exist"),
    # --- runs
    "run-folder-other-config": (lambda w: train(w, run={"name": "existing"}), "was made by a different config"),
    # --- pipelines (ftdist pipeline): refused before any stage trains
    "pipeline-missing-file": (lambda w: ["pipeline", str(w["root"] / "nope.yaml")], "pipeline file"),
    "pipeline-unknown-stage-ref": (lambda w: pipe(w, "${stage:dap}"), "names no stage; did you mean 'dapt'?"),
    "pipeline-later-stage-ref": (lambda w: pipe(w, "${stage:later}"), "names stage 'later', which runs after it"),
    "pipeline-self-ref": (lambda w: pipe(w, "${stage:task}"), "names itself"),
    "pipeline-set-unknown-stage": (lambda w: pipe(w, "${stage:dapt}") + ["--set", "tsk:train.epochs=2"],
                                   "has no stage 'tsk'; did you mean 'task'?"),
    "pipeline-stage-bad-key": (lambda w: pipe(w, "${stage:dapt}") + ["--set", "task:train.epocs=2"],
                               "did you mean 'train.epochs'"),
    "pipeline-print-unknown-stage": (lambda w: pipe(w, "${stage:dapt}") + ["--print-config", "dapp"],
                                     "no stage 'dapp'; did you mean 'dapt'?"),
    # --- predict: --overwrite never removes what it must not (checked before anything is touched)
    "predict-overwrite-model-run": (lambda w: predict(w, str(w["root"] / "runs" / "deployed"), "--overwrite"),
                                    "runs/deployed' is the model '"),
    "predict-overwrite-export": (lambda w: predict(w, str(w["root"] / "runs" / "deployed" / "model"), "--overwrite"),
                                 "runs/deployed/model' lies inside the model '"),
    "predict-overwrite-input": (lambda w: predict(w, w["raw"], "--overwrite"), "raw.jsonl' is the input '"),
    "predict-overwrite-input-parent": (lambda w: predict(w, str(w["root"] / "inputs"), "--overwrite",
                                                         inp=str(w["root"] / "inputs" / "a.jsonl")),
                                       "inputs' holds the input '"),
    "predict-overwrite-inside-run": (lambda w: predict(w, str(w["root"] / "runs" / "existing" / "scored"), "--overwrite"),
                                     "existing/scored' lies inside the ftdist run folder '"),
    "predict-overwrite-runs-parent": (lambda w: predict(w, str(w["root"] / "runs"), "--overwrite"),
                                      "runs' holds the model '"),
    "predict-overwrite-other-files": (lambda w: predict(w, w["ds"], "--overwrite"),
                                      "holds files ftdist predict did not write ('test'"),
    "predict-output-bucket-root": (lambda w: predict(w, w["bucket"], "--overwrite", "--endpoint-url", w["s3"]),
                                   "is a bucket root"),
    # --- predict: inputs and flags
    "predict-corrupt-parquet": (lambda w: predict(w, str(w["root"] / "p"), inp=str(w["root"] / "garbage.parquet")),
                                "is not a readable Parquet file"),
    "predict-empty-file": (lambda w: predict(w, str(w["root"] / "p"), inp=str(w["root"] / "empty.jsonl")), "is empty"),
    "predict-mixed-id-types": (lambda w: predict(w, str(w["root"] / "p"), inp=str(w["root"] / "inputs")),
                               "'b.jsonl' has text ids but 'a.jsonl' has integer ids"),
    "predict-cpus-nan": (lambda w: predict(w, str(w["root"] / "p"), "--cpus-per-worker", "nan"),
                         "--cpus-per-worker: 'nan' is not a positive number"),
    "predict-cpus-negative": (lambda w: predict(w, str(w["root"] / "p"), "--cpus-per-worker", "-1"),
                              "--cpus-per-worker: '-1' is not a positive number"),
    "predict-cpus-inf": (lambda w: predict(w, str(w["root"] / "p"), "--cpus-per-worker", "inf"),
                         "--cpus-per-worker: 'inf' is not a positive number"),
    "predict-gpus-negative": (lambda w: predict(w, str(w["root"] / "p"), "--gpus-per-worker", "-1"),
                              "--gpus-per-worker: '-1' is not a number >= 0"),
    "predict-lora-adapter-export": (lambda w: predict(w, str(w["root"] / "p"), model=str(w["root"] / "adapter-run")),
                                    "export it merged (model.lora.export: merged)"),
    "serve-lora-adapter-export": (lambda w: ["serve", str(w["root"] / "adapter-run")],
                                  "export it merged (model.lora.export: merged)"),
    # --- rows longer than the model's positions (the tiny BERT has max_position_embeddings 128)
    "max-length-above-model-positions": (
        lambda w: train(w, data={"path": str(w["root"] / "prep-512"), "max_length": 512, "prepare": {"input": w["raw"]}}),
        "data.max_length 512 is more than model"),
    "prepare-max-length-above-model-positions": (lambda w: prep(w, "--max-length", "512"),
                                                 "--max-length 512 is more than model"),
    "data-set-longer-than-model-positions": (lambda w: train(w, data={"path": _long_copy(w)}),
                                             "holds rows of up to 512 tokens"),
    # --- ftdist init --csv: nothing written, an existing config never replaced without --force
    "init-missing-csv": (lambda w: ["init", "--csv", str(w["root"] / "nope.csv"), "--output", str(w["root"] / "i.yaml")],
                         "does not exist"),
    "init-one-class": (lambda w: ["init", "--csv", str(w["root"] / "raw.csv"), "--output", str(w["root"] / "i.yaml")],
                       "label column 'label' has 1 distinct value(s)"),
    "init-output-exists": (lambda w: ["init", "--csv", str(w["root"] / "raw.csv"), "--label", "label", "--output",
                                      str(w["root"] / "raw.jsonl")], "exists; pass another --output, or --force"),
}


def predict(w, output: str, *extra: str, model: str | None = None, inp: str | None = None) -> list[str]:
    """``ftdist predict`` with the deployed run's export on a small JSONL file unless told otherwise."""
    return ["predict", model or str(w["root"] / "runs" / "deployed"), "--input", inp or w["raw"], "--output", output,
            *extra]


def _long_copy(w) -> str:
    """A copy of the healthy data set as a preparation with max_length 512 records it."""
    dst = w["root"] / "ds-long"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(w["ds"], dst)
    for split in ("train", "validation", "test"):
        path = dst / split / "manifest.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "max_length": 512}))
    return str(dst)


def pipe(w, task_model: str) -> list[str]:
    """``ftdist pipeline`` over dapt -> task -> later, the task stage's model.path being ``task_model``."""
    stages = []
    for name, model in (("dapt", w["bert"]), ("task", task_model), ("later", w["bert"])):
        cfg = _cfg(w)
        cfg.pop("run"), cfg.pop("storage")
        cfg["model"]["path"] = model
        stages.append({"name": name, "config": cfg})
    p = w["root"] / "pipeline-job.yaml"
    p.write_text(yaml.safe_dump({"name": "pipe", "storage": {"path": str(w["root"] / "runs")}, "stages": stages}))
    return ["pipeline", str(p)]


def _raw(w, text: str) -> str:
    p = w["root"] / "raw.yaml"
    p.write_text(text)
    return str(p)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and "job.yaml" not in p.name and "raw.yaml" not in p.name and not p.parent.name.startswith("ds-"):
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_catalogue_is_large_enough():
    """The README states the catalogue's exact size: a case added or removed is a decision, not an accident."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    stated = re.search(r"bad input \((\d+) cases", readme)
    assert stated and len(CASES) == int(stated[1]) == 94


@pytest.mark.parametrize("labels, names, ids", [
    ([1.0, 0.0, 2.0, 1.0], ["0", "1", "2"], [1, 0, 2, 1]),  # integral floats are their integer class
    ([True, False, True, False], ["false", "true"], [1, 0, 1, 0]),  # booleans are the classes "false"/"true"
])
def test_float_and_boolean_labels_prepare_consistently(labels, names, ids, tiny_bert, tmp_path):
    """JSON gives floats and booleans their own types; README (Data sets) says what they become."""
    import pyarrow.parquet as pq

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps({"text": f"row {i}", "label": v}) + "\n" for i, v in enumerate(labels)))
    out = tmp_path / "ds"
    assert main(["data", "prepare", "--input", str(raw), "--output", str(out), "--model", tiny_bert,
                 "--split", "1,0,0"]) == 0
    man = json.loads((out / "train" / "manifest.json").read_text())
    assert man["label_names"] == names
    table = pq.read_table([out / "train" / s["file"] for s in man["shards"]][0])
    got = dict(zip(table.column("sample_id").to_pylist(), table.column("label").to_pylist()))
    assert got == dict(enumerate(ids))


def test_flash_attention_2_without_flash_attn_falls_back_to_sdpa(tiny_bert, caplog):
    """README: attn_implementation flash_attention_2 falls back when unsupported (here: no flash-attn)."""
    import importlib.util
    import logging

    from ftdist.config import ModelSection
    from ftdist.modeling import load_model

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with caplog.at_level(logging.WARNING, logger="ftdist.modeling"):
        model = load_model(ModelSection(path=tiny_bert, attn_implementation="flash_attention_2"), 3, None, 0)
    assert model.config._attn_implementation == "sdpa"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "flash_attention_2" in warnings[0] and "sdpa" in warnings[0], warnings
    assert "\n" not in warnings[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, world, capsys):
    args_fn, fragment = CASES[name]
    args = args_fn(world)
    before = _tree_digest(world["root"])
    try:
        code = main(args)
    except SystemExit as e:  # argparse usage errors exit directly
        code = e.code
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("ftdist: error:"), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err
    assert _tree_digest(world["root"]) == before, "a bad input changed existing files"
