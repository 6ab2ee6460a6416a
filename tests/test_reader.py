"""The streaming reader on real shards: exactly once per epoch across ranks, mid-epoch resume
without repeats or gaps, bounded reads, and one-line errors for broken data sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import prepare_local, synthetic_rows, write_jsonl
from ftdist.config import StorageSection
from ftdist.data.reader import ShardReader
from ftdist.errors import UserError

S = StorageSection()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_bert) -> str:
    d = tmp_path_factory.mktemp("reader")
    raw = write_jsonl(d / "raw.jsonl", synthetic_rows(1003, seed=5))
    return prepare_local(raw, d / "ds", tiny_bert, rows_per_shard=37)


def _ids(batches) -> list[int]:
    return [r["sample_id"] for b in batches for r in b]


def _reader(ds: str, rank: int, world: int, **kw) -> ShardReader:
    args = dict(batch_size=8, seed=11, shuffle=True, shuffle_buffer=50, prefetch=2, length_bucketing=True) | kw
    return ShardReader(f"{ds}/train", S, rank, world, **args)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_exactly_once_per_epoch_and_resume_mid_epoch(dataset, world):
    n_rows = _reader(dataset, 0, world).manifest.num_rows
    for epoch in range(2):
        everyone = []
        steps = {_reader(dataset, r, world).num_batches() for r in range(world)}
        assert len(steps) == 1  # collectives stay in lockstep
        for rank in range(world):
            full = list(_reader(dataset, rank, world).batches(epoch))
            assert len(full) in steps
            k = len(full) // 2
            # A fresh reader (as after a restart) continues exactly where batch k ended.
            resumed = list(_reader(dataset, rank, world).batches(epoch, start_batch=k))
            assert _ids(full[k:]) == _ids(resumed)
            everyone += _ids(full)
        assert sorted(everyone) == sorted(set(everyone)) and len(everyone) == n_rows
    # A new epoch is a new order; the same epoch is the same order.
    a, b = _reader(dataset, 0, 1), _reader(dataset, 0, 1)
    assert _ids(a.batches(0)) == _ids(b.batches(0)) != _ids(b.batches(1))


def test_batches_are_padded_dynamically_and_bucketed(dataset):
    from ftdist.data.collate import collate

    r = _reader(dataset, 0, 1, shuffle_buffer=400)
    widths, lengths = [], []
    for rows in r.batches(0):
        b = collate(rows, 0, "sequence-classification")
        widths.append(b["input_ids"].shape[1])
        lengths.append(max(len(x["input_ids"]) for x in rows))
    assert widths == lengths  # padded to the longest in the batch, not max_length
    assert max(widths) < 64


def _copy(dataset: str, tmp_path: Path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(dataset, dst)
    return dst


@pytest.mark.parametrize("damage, fragment", [
    ("truncate-shard", "truncated or corrupt"),
    ("drop-manifest", "manifest.json' is missing"),
    ("bad-version", "manifest version 99"),
    ("empty-split", "does not exist or is empty"),
    ("no-label-column", "lacks column(s) ['label']"),
])
def test_broken_data_sets_give_one_line_errors(dataset, tmp_path, damage, fragment):
    ds = _copy(dataset, tmp_path)
    split = ds / "train"
    manifest = json.loads((split / "manifest.json").read_text())
    if damage == "truncate-shard":
        shard = split / manifest["shards"][0]["file"]
        shard.write_bytes(shard.read_bytes()[:100])
    elif damage == "drop-manifest":
        (split / "manifest.json").unlink()
    elif damage == "bad-version":
        manifest["version"] = 99
        (split / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "empty-split":
        shutil.rmtree(split)
    elif damage == "no-label-column":
        del manifest["columns"]["label"]
        (split / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError) as e:
        r = ShardReader(str(split), S, 0, 1, batch_size=8, seed=0, shuffle=False)
        list(r.batches(0))
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert str(split) in str(e.value)
