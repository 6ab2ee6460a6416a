"""``data.replay`` (issue 14, req. 4; ftdist/data/replay.py): earlier data sets' batches mixed into a run's
epochs. This run's samples exactly once per epoch as always, replayed samples at most once per epoch,
the replay share as documented, equal batch counts on every rank, and a mid-epoch restart continuing
every source where it stopped (real readers over real shards); then through the worker loop."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from conftest import base_config, prepare_local, synthetic_rows, write_jsonl
from ftdist.config import StorageSection, load_config
from ftdist.data.reader import ShardReader
from ftdist.data.replay import REPLAY_ID_SHIFT, ReplayMix, epoch_sources, replay_counts


@pytest.fixture(scope="module")
def earlier(tmp_path_factory, tiny_bert) -> str:
    """A second labelled data set with the same labels (the 'earlier stage')."""
    d = tmp_path_factory.mktemp("earlier")
    raw = write_jsonl(d / "raw.jsonl", synthetic_rows(250, seed=9))
    return prepare_local(raw, d / "ds", tiny_bert, rows_per_shard=40)


def test_replay_is_the_fraction_of_the_epochs_batches_shared_by_size_and_at_most_a_pass():
    assert replay_counts(80, 0.2, [100]) == [20]  # 20 / (80 + 20) = 0.2
    assert replay_counts(80, 0.5, [30, 90]) == [20, 60]
    assert replay_counts(80, 0.5, [10, 90]) == [8, 72]
    assert replay_counts(80, 0.5, [5]) == [5]  # a small set gives all it has, once
    s = epoch_sources(10, [3, 2], seed=1, epoch=0)
    assert Counter(s.tolist()) == {0: 10, 1: 3, 2: 2}
    assert s.tolist() == epoch_sources(10, [3, 2], 1, 0).tolist() != epoch_sources(10, [3, 2], 1, 1).tolist()


def _mix(own: str, earlier: str, rank: int, world: int, fraction: float = 0.2) -> ReplayMix:
    def reader(path: str) -> ShardReader:
        return ShardReader(str(Path(path, "train")), StorageSection(), rank, world, 8, seed=3, shuffle=True,
                           shuffle_buffer=32, length_bucketing=True)

    return ReplayMix(reader(own), [reader(earlier)], fraction, seed=3)


def _train_ids(path: str) -> list[int]:
    import pyarrow.parquet as pq

    return sorted(i for f in Path(path, "train").glob("*.parquet") for i in pq.read_table(f)["sample_id"].to_pylist())


@pytest.mark.parametrize("world", [1, 2])
def test_own_samples_once_replayed_at_most_once_per_epoch_and_resume_continues_every_source(world, cls_data, earlier):
    mixes = [_mix(cls_data, earlier, r, world) for r in range(world)]
    assert len({m.num_batches() for m in mixes}) == 1
    own_rows, replay_rows = _train_ids(cls_data), _train_ids(earlier)
    replayed_per_epoch = []
    for epoch in range(3):
        own, replayed = [], []
        for m in mixes:
            batches = list(m.batches(epoch))
            assert len(batches) == m.num_batches() == m.own_batches + m.counts[0]
            for b in batches:
                ids = [r["sample_id"] for r in b]
                assert len({i >> REPLAY_ID_SHIFT for i in ids}) == 1  # one source per batch
                (replayed if ids[0] >> REPLAY_ID_SHIFT else own).extend(ids)
            # Restarted at batch 5: the same batches as the uninterrupted epoch from there on.
            tail = [[r["sample_id"] for r in b] for b in m.batches(epoch, start_batch=5)]
            assert tail == [[r["sample_id"] for r in b] for b in batches[5:]]
        assert sorted(own) == own_rows
        assert len(replayed) == len(set(replayed))  # at most once per epoch
        assert {i >> REPLAY_ID_SHIFT for i in replayed} == {1}
        assert {i & ((1 << REPLAY_ID_SHIFT) - 1) for i in replayed} <= set(replay_rows)
        share = len(replayed) / (len(replayed) + len(own))
        assert 0.15 < share < 0.25, share  # fraction 0.2 of the batches (their sizes differ by at most one)
        replayed_per_epoch.append(set(replayed))
    assert replayed_per_epoch[0] != replayed_per_epoch[1]  # each epoch replays other samples


@pytest.mark.slow
def test_a_run_with_replay_trains_on_both_and_records_both(tiny_bert, cls_data, earlier, tmp_path, process_group):
    from ftdist.loop import train_worker
    from ftdist.session import LocalSession

    cfg = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "rp"},
                                       data={"replay": {"paths": [earlier], "fraction": 0.25},
                                             "record_sample_ids": True},
                                       train={"epochs": 1}, scaling={"num_workers": 1},
                                       tracking={"tensorboard": False, "plots": False}))
    ck = tmp_path / "ck"
    result = train_worker(cfg, LocalSession(str(ck)))
    ids = json.loads(next(ck.rglob("samples_rank0.json")).read_text())["0"]
    own = [i for i in ids if i < 1 << REPLAY_ID_SHIFT]
    assert sorted(own) == _train_ids(cls_data)
    replayed = [i for i in ids if i >= 1 << REPLAY_ID_SHIFT]
    assert len(replayed) == len(set(replayed)) > 0
    assert result["epochs"][0]["train_loss"] > 0
