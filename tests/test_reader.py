"""The streaming reader on real shards: exactly once per epoch across ranks, mid-epoch resume
without repeats or gaps, bounded reads, and one-line errors for broken data sets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import NAMES, prepare_local, synthetic_rows, write_jsonl
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


def _padding_waste(reader: ShardReader) -> float:
    """Fraction of the padded token grid that is padding, over one epoch."""
    real = grid = 0
    for rows in reader.batches(0):
        lengths = [len(r["input_ids"]) for r in rows]
        real, grid = real + sum(lengths), grid + max(lengths) * len(rows)
    return 1 - real / grid


def test_length_bucketing_cuts_padding_and_keeps_exactly_once(dataset):
    """Bucketed batches are cut at batch boundaries inside a sorted chunk: padding falls to a
    fraction of random batching's, and the rows of the epoch are still each seen once."""
    plain = _reader(dataset, 0, 1, shuffle_buffer=200, length_bucketing=False)
    bucketed = _reader(dataset, 0, 1, shuffle_buffer=200, length_bucketing=True)
    assert _padding_waste(bucketed) < _padding_waste(plain) / 3
    ids = _ids(bucketed.batches(0))
    assert sorted(ids) == sorted(_ids(plain.batches(0))) and len(ids) == len(set(ids))
    assert sorted(len(b) for b in bucketed.batches(0)) == sorted(len(b) for b in plain.batches(0))


def _prepare(tmp_path_factory, tiny_bert, name: str, **options) -> str:
    """The reader fixture's raw rows prepared again, with PrepareSection ``options``."""
    from ftdist.config import PrepareSection
    from ftdist.data.prepare import prepare

    d = tmp_path_factory.mktemp(name)
    raw = write_jsonl(d / "raw.jsonl", synthetic_rows(1003, seed=5))
    spec = PrepareSection(input=str(raw), rows_per_shard=37, **options)
    prepare(spec, str(d / "ds"), tiny_bert if spec.tokenize else None, 64, "sequence-classification", S,
            label_names=NAMES)
    return str(d / "ds")


def _stream(reader: ShardReader, epochs: int = 2) -> list[tuple[int, list[int], int, int]]:
    return [(r["sample_id"], [int(t) for t in r["input_ids"]], r["length"], r["label"])
            for e in range(epochs) for b in reader.batches(e) for r in b]


def test_raw_text_data_set_is_tokenized_on_the_fly_to_the_same_batches(dataset, tmp_path_factory, tiny_bert):
    """A raw-text data set streams exactly the batches (ids, tokens, order, labels) of the tokenized one."""
    from ftdist.data.manifest import load_manifest
    from ftdist.modeling import load_tokenizer

    raw_ds = _prepare(tmp_path_factory, tiny_bert, "raw-text", tokenize=False)
    m = load_manifest(f"{raw_ds}/train", S)
    assert not m.tokenized and m.tokenizer is None and m.max_length is None and "text" in m.columns
    import pyarrow.parquet as pq
    assert "input_ids" not in pq.read_schema(f"{raw_ds}/train/{m.shards[0].file}").names
    tok = load_tokenizer(tiny_bert, trust_remote_code=False)
    with pytest.raises(ValueError, match="raw text"):
        _reader(raw_ds, 0, 2)
    for rank in (0, 1):
        on_the_fly = _stream(_reader(raw_ds, rank, 2, tokenizer=tok, max_length=64))
        assert on_the_fly == _stream(_reader(dataset, rank, 2))
    # max_length applies at read time: a shorter one truncates without re-preparing.
    short = _stream(_reader(raw_ds, 0, 1, tokenizer=tok, max_length=16), epochs=1)
    assert max(length for _, _, length, _ in short) == 16
    assert all(len(ids) == length for _, ids, length, _ in short)


def test_keep_text_stores_the_raw_text_next_to_the_ids(dataset, tmp_path_factory, tiny_bert):
    import pyarrow.parquet as pq

    kept = _prepare(tmp_path_factory, tiny_bert, "keep-text", keep_text=True)
    raw = {i: r["text"] for i, r in enumerate(synthetic_rows(1003, seed=5))}
    rows = [r for f in sorted(Path(kept, "train").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert rows and all(r["text"] == raw[r["sample_id"]] for r in rows)
    assert _stream(_reader(kept, 0, 1)) == _stream(_reader(dataset, 0, 1))


def test_raw_text_data_set_is_reused_when_only_max_length_changes(tmp_path, tiny_bert):
    from ftdist.config import PrepareSection
    from ftdist.data.prepare import spec_record

    raw, tok = PrepareSection(input="x.jsonl", tokenize=False), PrepareSection(input="x.jsonl")
    assert spec_record(raw, "sequence-classification", 0, 64) == spec_record(raw, "sequence-classification", 0, 128)
    assert spec_record(tok, "sequence-classification", 0, 64) != spec_record(tok, "sequence-classification", 0, 128)


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


def _prefetch_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name.startswith("ftdist-prefetch") and t.is_alive()]


@pytest.mark.parametrize("how", ["max_batches", "consumer_breaks"])
def test_prefetch_thread_stops_when_the_consumer_stops_early(dataset, how):
    """``max_steps_per_epoch`` (or a consumer that breaks out) stops reading mid-epoch: the read-ahead
    thread must exit instead of blocking forever on a full queue, holding its tables."""
    import time

    before = len(_prefetch_threads())
    # Rank 0 of 14 reads 2-3 shards of 37 rows; a 1-slot queue is full as soon as the first is taken.
    reader = _reader(dataset, 0, 14, prefetch=1, shuffle_buffer=8)
    for epoch in range(3):
        taken = 0
        for _ in reader.batches(epoch, max_batches=2 if how == "max_batches" else None):
            taken += 1
            time.sleep(0.3)  # a training step: the read-ahead thread fills the queue meanwhile
            if how == "consumer_breaks":
                break
        assert taken == (2 if how == "max_batches" else 1)
    deadline = time.monotonic() + 5
    while len(_prefetch_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_prefetch_threads()) == before, f"{len(_prefetch_threads()) - before} read-ahead thread(s) leaked"
