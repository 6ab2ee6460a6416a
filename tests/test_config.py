"""Schema validation, overrides, did-you-mean hints, redaction, fingerprints (no Ray needed)."""

import re
from pathlib import Path

import pytest
import yaml

from conftest import base_config

from ftdist.config import dump_config, load_config
from ftdist.redaction import redact, resolve_env_refs
from ftdist.errors import UserError

BASE = {"model": {"path": "m"}, "data": {"path": "d"}}


def test_defaults_and_overrides():
    cfg = load_config(data=BASE, overrides=["train.learning_rate=3e-5", "scaling.num_workers=4",
                                            "deepspeed.zero_stage=3", "train.adam_betas=[0.9, 0.95]"])
    assert cfg.train.learning_rate == 3e-5
    assert cfg.scaling.num_workers == 4
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.train.adam_betas == (0.9, 0.95)
    assert cfg.eval_metric == "accuracy" and cfg.eval_mode == "max"


@pytest.mark.parametrize("data, overrides, fragment", [
    ({**BASE, "trian": {}}, [], "unknown key 'trian'; did you mean 'train'?"),
    ({**BASE, "train": {"learnig_rate": 1e-4}}, [], "did you mean 'train.learning_rate'"),
    (BASE, ["train.lerning_rate=1"], "did you mean 'train.learning_rate'"),
    (BASE, ["train.epochs=zero"], "'train.epochs'"),
    (BASE, ["train.epochs=0"], "greater than or equal to 1"),
    (BASE, ["deepspeed.zero_stage=5"], "'deepspeed.zero_stage'"),
    (BASE, ["deepspeed.offload_params=true"], "needs deepspeed.zero_stage: 3"),
    ({"data": {"path": "d"}}, [], "required key 'model'"),
    (BASE, ["model.task=causal-lm", "model.num_labels=3"], "only apply to task sequence-classification"),
    (BASE, ["train.eval_metric=perplexity"], "not reported for task sequence-classification"),
    (BASE, ["notakey"], "must look like dotted.key=value"),
    # elastic (min_workers < num_workers) runs re-plan only the plain reader: refused at config time (D15)
    (BASE, ["scaling.num_workers=2", "scaling.min_workers=1", "data.replay={paths: [old]}"],
     "scaling.min_workers with data.replay: a replay run resumes only on the number of workers it started with"),
    ({**{k: v for k, v in BASE.items() if k != "data"}, "tasks": [{"name": "a", "data": {"path": "d"}}]},
     ["scaling.num_workers=2", "scaling.min_workers=1"], "scaling.min_workers: a multi-task run resumes only"),
])
def test_bad_config_is_one_line_user_error(data, overrides, fragment):
    with pytest.raises(UserError) as e:
        load_config(data=data, overrides=overrides)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(UserError):  # yaml.safe_load refuses python tags
        load_config(unsafe)


def test_secrets_are_redacted_and_env_refs_resolved_late(monkeypatch):
    cfg = load_config(data={**BASE, "storage": {"options": {"key": "AKIAFAKE", "secret": "s3cr3t-value",
                                                            "token": "${env:MY_TOKEN}", "anon": False}}},
                      overrides=["model.path=s3://user:pw@host/bucket"])
    text = dump_config(cfg)
    assert "s3cr3t-value" not in text and "AKIAFAKE" not in text and "pw@" not in text
    assert "${env:MY_TOKEN}" in text  # a reference is not a secret
    monkeypatch.setenv("MY_TOKEN", "tok-123")
    assert resolve_env_refs(cfg.storage.options)["token"] == "tok-123"
    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(UserError, match="MY_TOKEN is not set"):
        resolve_env_refs(cfg.storage.options)
    assert redact({"nested": {"password": "x"}})["nested"]["password"] == "***"


def test_fingerprint_ignores_scaling_and_storage():
    a = load_config(data=BASE)
    b = load_config(data=BASE, overrides=["scaling.num_workers=8", "storage.retries=1"])
    c = load_config(data=BASE, overrides=["train.learning_rate=1e-3"])
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()


# --- secret names are whole words, not substrings (issue 11 item 1) ---------------------------

@pytest.mark.parametrize("name", ["tokenize", "tokenizer", "max_tokens", "keep_text", "session_name", "author",
                                  "key_field", "monkey", "passthrough", "TOKENIZERS_PARALLELISM", "tokenized",
                                  "num_tokens", "text_field"])
def test_innocent_names_are_not_secret(name):
    from ftdist.redaction import is_secret_name

    assert not is_secret_name(name)


@pytest.mark.parametrize("name", ["token", "aws_secret_access_key", "api_key", "password", "session_token",
                                  "sas_token", "apiKey", "secret", "passwd", "credentials", "access_key", "key",
                                  "auth", "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "sig",
                                  "HF_TOKEN", "client.secret", "accessToken", "private_key", "DB_PASS", "MY_APIKEY",
                                  "X_CONNECTION_STRING", "PGPASSWORD", "AZURE_CREDENTIAL", "AWS_ACCESS_KEY_ID"])
def test_secret_names_are_secret(name):
    from ftdist.redaction import is_secret_name

    assert is_secret_name(name)


def test_tokenize_is_not_redacted():
    cfg = load_config(data={**BASE, "model": {"path": "m", "tokenizer": "tok-dir"},
                            "data": {"path": "d", "prepare": {"input": "x.csv", "tokenize": False}}})
    text = dump_config(cfg)
    assert "tokenize: false" in text and "***" not in text


SHIPPED = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "cluster" / "jobs").glob("*.yaml"))
SWEEPS = sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "tune").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED)
def test_saved_config_of_every_shipped_job_loads_back_to_the_same_fingerprint(path, tmp_path):
    import yaml

    if "stages" in yaml.safe_load(Path(path).read_text()):  # a pipeline file: each stage's config
        from ftdist.pipeline.spec import load_pipeline

        configs = [st.config for st in load_pipeline(path).stages]
    else:
        configs = [load_config(path)]
    for cfg in configs:
        saved = tmp_path / "config.yaml"
        saved.write_text(dump_config(cfg))
        again = load_config(saved)
        assert again.fingerprint() == cfg.fingerprint()
        assert again.model_dump() == cfg.model_dump()


@pytest.mark.parametrize("path", SWEEPS)
def test_saved_sweep_base_of_every_shipped_spec_loads_back_to_the_same_fingerprint(path, tmp_path, monkeypatch):
    import yaml

    from ftdist.sweep.spec import dump_spec, load_sweep_spec, resolve_sweep

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # base.path is relative to the repo root
    rs = resolve_sweep(load_sweep_spec(path))
    saved = yaml.safe_load(dump_spec(rs))["base_config"]
    again = load_config(data=saved)
    assert again.fingerprint() == rs.base_config.fingerprint()


# --- credentials in URL query strings (issue 11 item 12) -------------------------------------

SAS = "https://acct.blob.core.windows.net/c/x.jsonl?sv=2022-11-02&se=2030-01-01&sp=r&sig=SASFAKESIG%2Babc%3D"
PRESIGNED = ("https://bucket.s3.amazonaws.com/k/raw.csv?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAFAKEPRESIGN%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
             "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
             "&X-Amz-Security-Token=FAKESESSIONTOKEN123&X-Amz-Signature=deadbeefFAKESIGNATURE")


@pytest.mark.parametrize("url, secrets, kept", [
    (SAS, ["SASFAKESIG"], ["sv=2022-11-02", "sp=r", "acct.blob.core.windows.net/c/x.jsonl"]),
    (PRESIGNED, ["AKIAFAKEPRESIGN", "FAKESESSIONTOKEN123", "deadbeefFAKESIGNATURE"],
     ["X-Amz-Expires=3600", "bucket.s3.amazonaws.com/k/raw.csv"]),
    ("https://h/x?token=abc123tok&page=2", ["abc123tok"], ["page=2"]),
    ("https://h/x?api_key=k3yv4lue#frag", ["k3yv4lue"], ["#frag"]),
    ("s3://user:pw-in-url@host/bucket", ["pw-in-url"], ["host/bucket"]),
])
def test_url_query_credentials_are_redacted(url, secrets, kept):
    from ftdist.redaction import redact_uri

    for text in (url, f"reading '{url}' failed: 403"):
        out = redact_uri(text)
        assert not [s for s in secrets if s in out], out
        assert all(k in out for k in kept), out


def test_presigned_url_in_config_never_reaches_the_saved_config():
    cfg = load_config(data={**BASE, "data": {"path": "d", "prepare": {"input": PRESIGNED}}},
                      overrides=[f"model.path={SAS}"])
    text = dump_config(cfg)
    assert "deadbeefFAKESIGNATURE" not in text and "SASFAKESIG" not in text and "FAKESESSIONTOKEN123" not in text
    from ftdist.redaction import literal_secrets

    assert set(literal_secrets(cfg)) == {"model.path", "data.prepare.input"}


# --- ${env:NAME} in every string value, resolved only where used (issue 11 item 9) ------------

REFS = {"run": {"name": "${env:FTDIST_T_RUN}"}, "model": {"path": "${env:FTDIST_T_MODEL}"},
        "data": {"path": "${env:FTDIST_T_DATA}/ds"},
        "storage": {"path": "${env:FTDIST_T_STORE}", "endpoint_url": "${env:FTDIST_T_ENDPOINT}"}}


def test_env_refs_in_any_string_value_resolve_in_a_copy(monkeypatch, tmp_path):
    for name, value in {"FTDIST_T_RUN": "exp-1", "FTDIST_T_MODEL": "s3://models/m", "FTDIST_T_DATA": str(tmp_path),
                        "FTDIST_T_STORE": "s3://bucket/runs", "FTDIST_T_ENDPOINT": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
    cfg = load_config(data=REFS)
    assert cfg.data.path == "${env:FTDIST_T_DATA}/ds"  # not made "absolute" under the current directory
    r = cfg.resolved()
    assert (r.run.name, r.model.path, r.data.path) == ("exp-1", "s3://models/m", f"{tmp_path}/ds")
    assert (r.storage.path, r.storage.endpoint_url, r.run_uri()) == ("s3://bucket/runs", "http://127.0.0.1:9",
                                                                      "s3://bucket/runs/exp-1")
    assert r.fingerprint() == cfg.fingerprint()  # the fingerprint is of the references, on both copies
    text = dump_config(r)  # what the run folder keeps: the references, never their values
    assert "${env:FTDIST_T_MODEL}" in text and "s3://models/m" not in text and "exp-1" not in text
    assert cfg.model.path == "${env:FTDIST_T_MODEL}"  # the original is untouched


def test_unset_env_ref_is_one_line_user_error_naming_it(monkeypatch):
    monkeypatch.delenv("FTDIST_T_MODEL", raising=False)
    cfg = load_config(data={**BASE, "model": {"path": "${env:FTDIST_T_MODEL}"}})
    with pytest.raises(UserError) as e:
        cfg.resolved()
    assert "FTDIST_T_MODEL is not set" in str(e.value) and "\n" not in str(e.value)


def test_env_ref_value_is_validated_after_resolution(monkeypatch):
    monkeypatch.setenv("FTDIST_T_RUN", "no spaces allowed")
    cfg = load_config(data={**BASE, "run": {"name": "${env:FTDIST_T_RUN}"}})
    with pytest.raises(UserError, match="run.name"):
        cfg.resolved()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fp16_without_loss_scaling_is_refused_before_anything_starts(stage, capsys, tmp_path):
    from ftdist.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"path": "d"},
                                    "train": {"precision": "fp16"}, "deepspeed": {"zero_stage": stage}}))
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp16" in err[0] and "zero_stage" in err[0], err
    path.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"path": "d"},
                                    "train": {"precision": "fp16"}, "deepspeed": {"zero_stage": 0}}))
    assert main(["config", str(path)]) == 0


@pytest.mark.parametrize("override, says", [
    ("train.epochs=abc", "--set train.epochs=abc: 'train.epochs': Input should be a valid integer"),
    ("train.eval_metric=bogus", "--set train.eval_metric=bogus: train.eval_metric 'bogus' is not reported"),
])
def test_a_bad_set_value_is_blamed_on_the_set_not_the_yaml_file(tmp_path, override, says):
    """A value typed on the command line is named there; the file's own bad value still names the file."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base_config("m", "d", str(tmp_path / "runs"))))
    with pytest.raises(UserError) as caught:
        load_config(str(path), overrides=["train.learning_rate=3e-5", override])
    assert str(caught.value).startswith(says), str(caught.value)
    bad = base_config("m", "d", str(tmp_path / "runs"), train={"epochs": "abc"})
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(UserError, match=f"^{re.escape(str(path))}: 'train.epochs'"):
        load_config(str(path), overrides=["train.learning_rate=3e-5"])
