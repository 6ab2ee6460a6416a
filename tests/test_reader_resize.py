"""An epoch interrupted on one number of workers and resumed on another: the old ranks' trained
prefixes plus the new ranks' re-planned batches hold every sample of the epoch exactly once, for
random data set layouts, batch sizes, world-size chains and interruption points (real shards)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import prepare_local, synthetic_rows, write_jsonl
from ftdist.config import StorageSection
from ftdist.data.reader import Resize, ShardReader, num_batches, plan_segments
from ftdist.errors import UserError

S = StorageSection()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, tiny_bert) -> list[str]:
    """Two layouts: many small shards with a ragged last one, and a few larger ones."""
    out = []
    for rows, per_shard in ((97, 10), (61, 25)):
        d = tmp_path_factory.mktemp(f"resize-{rows}")
        raw = write_jsonl(d / "raw.jsonl", synthetic_rows(rows, seed=rows))
        out.append(prepare_local(raw, d / "ds", tiny_bert, rows_per_shard=per_shard))
    return out


def _reader(ds: str, rank: int, world: int, bs: int, buffer: int, bucketing: bool) -> ShardReader:
    return ShardReader(f"{ds}/train", S, rank, world, bs, seed=3, shuffle=True, shuffle_buffer=buffer, prefetch=1,
                       length_bucketing=bucketing)


def _ids(batches) -> list[int]:
    return [r["sample_id"] for b in batches for r in b]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 1), bs=st.integers(1, 9), worlds=st.lists(st.integers(1, 4), min_size=2, max_size=4),
       cuts=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3), buffer=st.sampled_from([4, 16, 64]),
       bucketing=st.booleans(), epoch=st.integers(0, 2))
@example(which=0, bs=1, worlds=[1, 2], cuts=[1.0, 0.0, 0.0], buffer=4, bucketing=False, epoch=0)
@example(which=1, bs=1, worlds=[1, 2], cuts=[1.0, 0.0, 0.0], buffer=4, bucketing=False, epoch=0)
def test_resized_epoch_trains_every_sample_exactly_once(datasets, which, bs, worlds, cuts, buffer, bucketing, epoch):
    ds = datasets[which]
    make = lambda rank, world: _reader(ds, rank, world, bs, buffer, bucketing)  # noqa: E731
    shard_rows = make(0, worlds[0]).shard_rows
    # Interruption points: a mid-epoch batch of each segment but the last (as checkpoints are).
    resizes: list[Resize] = []
    for w, cut in zip(worlds[:-1], cuts):
        seg = plan_segments(shard_rows, bs, resizes, w)[-1]
        if seg.steps < 2:
            break
        resizes.append(Resize(w, seg.start + 1 + int(cut * (seg.steps - 2))))
    world = worlds[len(resizes)]
    trained: list[int] = []
    for k, r in enumerate(resizes):  # each earlier segment: every rank's batches up to the interruption
        for rank in range(r.world):
            trained += _ids(make(rank, r.world).batches(epoch, max_batches=r.batch, resizes=resizes[:k]))
    everything = sorted(i for rank in range(1) for i in _ids(make(rank, 1).batches(epoch)))
    if len(everything) - len(trained) < world:  # fewer samples left than workers: refused in one line, by design
        with pytest.raises(UserError, match="fewer than the"):
            plan_segments(shard_rows, bs, resizes, world)
        return
    sizes = []
    for rank in range(world):  # the last segment: the resumed ranks, from where the last one stopped
        reader = make(rank, world)
        start = resizes[-1].batch if resizes else 0
        batches = list(reader.batches(epoch, start_batch=start, resizes=resizes))
        assert len(batches) == reader.num_batches(resizes) - start  # every rank: the same count (lockstep)
        sizes += [len(b) for b in batches]
        trained += _ids(batches)
    assert sorted(trained) == everything  # exactly once: nothing repeated, nothing skipped
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert max(sizes) <= (bs + 1 if bs == 1 else bs)


def test_a_resized_epoch_is_deterministic_and_resumable_mid_segment(datasets):
    """A resumed segment can itself be checkpointed and resumed (same size): the batches continue."""
    ds, resizes = datasets[0], [Resize(2, 3)]
    full = list(_reader(ds, 0, 3, 4, 16, True).batches(1, start_batch=3, resizes=resizes))
    again = list(_reader(ds, 0, 3, 4, 16, True).batches(1, start_batch=3, resizes=resizes))
    later = list(_reader(ds, 0, 3, 4, 16, True).batches(1, start_batch=5, resizes=resizes))
    assert _ids(full) == _ids(again) and _ids(full[2:]) == _ids(later)


def test_without_resizes_the_plan_is_the_epoch_plan():
    rows = [10, 7, 31]
    for world in (1, 2, 5):
        (seg,) = plan_segments(rows, 4, [], world)
        assert seg.start == 0 and seg.steps == num_batches(rows, world, 4) and sum(seg.shares) == 48


def test_fewer_samples_left_than_new_workers_is_one_line():
    # 4 rows on 1 worker in batches of 1, interrupted after 3: one row left for 2 workers.
    with pytest.raises(UserError, match="1 sample.*2 worker.*scaling.num_workers"):
        plan_segments([4], 1, [Resize(1, 3)], 2)
