"""``ftdist submit`` without a cluster: which environment variables may travel in job metadata."""

from __future__ import annotations

import pytest

from ftdist.errors import UserError
from ftdist.submit import job_env


@pytest.mark.parametrize("name", ["DB_PASS", "MY_APIKEY", "X_CONNECTION_STRING", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN",
                                  "GITHUB_TOKEN", "MY_PRIVATE_KEY", "AZURE_CREDENTIALS", "PGPASSWORD", "DB_PASSWORD",
                                  "AWS_SESSION_TOKEN", "API_KEY", "SAS_TOKEN", "AWS_ACCESS_KEY_ID", "BASIC_AUTH"])
def test_secret_looking_env_names_are_refused(name):
    with pytest.raises(UserError) as e:
        job_env([f"{name}=value-must-not-show"])
    msg = str(e.value)
    assert name in msg and "looks like a secret" in msg and "value-must-not-show" not in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "FTDIST_TEST_MARK", "MAX_TOKENS", "PASSTHROUGH_MODE",
                                  "AWS_ENDPOINT_URL", "HF_HUB_OFFLINE", "NCCL_SOCKET_IFNAME", "KEYBOARD_LAYOUT"])
def test_ordinary_env_names_travel(name):
    assert job_env([f"{name}=1"])[name] == "1"


def _pipeline_files(tmp_path, tiny_bert, storage_options=None):
    import yaml

    from conftest import base_config

    stage = base_config(tiny_bert, str(tmp_path / "ds"), "/ignored")
    stage.pop("run"), stage.pop("storage")
    (tmp_path / "task.yaml").write_text(yaml.safe_dump(stage))
    dapt = {**stage, "model": {"path": tiny_bert, "task": "masked-lm"}}
    pipe = {"name": "p", "storage": {"path": "s3://bucket/pipelines", "options": storage_options or {}},
            "stages": [{"name": "dapt", "config": dapt},
                       {"name": "task", "path": str(tmp_path / "task.yaml"), "set": ["model.path=${stage:dapt}"]}]}
    (tmp_path / "pipe.yaml").write_text(yaml.safe_dump(pipe))
    return str(tmp_path / "pipe.yaml")


def test_a_pipeline_travels_as_one_file_with_every_stage_inline(tmp_path, tiny_bert, monkeypatch):
    from ftdist.pipeline.spec import load_pipeline
    from ftdist.submit import job_payload

    path = _pipeline_files(tmp_path, tiny_bert)
    raw, command, name = job_payload(path, ["task:train.epochs=5"])
    assert (command, name) == ("pipeline", "p")
    task = raw["stages"][1]
    assert "path" not in task and task["config"]["model"]["path"] == str(tiny_bert)  # inline; set: kept
    assert task["set"] == ["model.path=${stage:dapt}", "train.epochs=5"]
    monkeypatch.chdir(tmp_path / "..")  # the job's working directory holds only this file
    p = load_pipeline("job.yaml", data=raw)
    assert p.stage("task").config.model.path == "s3://bucket/pipelines/p/stages/dapt/model"
    assert p.stage("task").config.train.epochs == 5


def test_a_pipeline_with_a_literal_secret_does_not_travel(tmp_path, tiny_bert):
    from ftdist.submit import job_payload

    path = _pipeline_files(tmp_path, tiny_bert, storage_options={"secret": "hunter2-literal"})
    with pytest.raises(UserError) as e:
        job_payload(path, [])
    assert "stage 'dapt' config key storage.options.secret holds a literal secret" in str(e.value)
    assert "hunter2" not in str(e.value)
