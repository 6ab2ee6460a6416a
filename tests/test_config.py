"""Schema validation, overrides, did-you-mean hints, redaction, fingerprints (no Ray needed)."""

import pytest

from ftdist.config import dump_config, load_config, redact, resolve_env_refs
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
