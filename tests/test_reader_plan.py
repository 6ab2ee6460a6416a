"""The reader's epoch plan: exactly-once partitioning, equal batch counts, determinism (pure)."""


import pytest

from ftdist.data.reader import num_batches, plan_epoch


@pytest.mark.parametrize("rows, world, bs", [([10], 1, 3), ([7, 5, 9], 2, 4), ([100, 3, 1, 50], 3, 8),
                                              ([5, 5], 4, 16), ([33], 2, 32), ([1, 1, 1], 3, 1),
                                              ([5], 2, 1), ([7, 6], 3, 2), ([1000], 7, 64)])
def test_every_row_once_and_equal_batches(rows, world, bs):
    for epoch in range(3):
        seen = []
        counts = set()
        sizes: list[int] = []
        for r in range(world):
            plan = plan_epoch(rows, r, world, bs, seed=7, epoch=epoch, shuffle=True)
            for sl in plan.slices:
                seen += [(sl.shard, i) for i in range(sl.start, sl.stop)]
            assert sum(plan.batch_sizes) == plan.num_rows
            assert all(s >= 1 for s in plan.batch_sizes)
            # The user's batch size is a bound; the one exception (batch_size 1 with N % W != 0, see
            # the README) puts a rank's extra row into a batch of two rather than dropping it.
            bound = bs + 1 if bs == 1 and sum(rows) % world else bs
            assert max(plan.batch_sizes) <= bound
            counts.add(len(plan.batch_sizes))
            sizes += plan.batch_sizes
        assert sorted(seen) == sorted((s, i) for s, n in enumerate(rows) for i in range(n))
        assert counts == {num_batches(rows, world, bs)}
        assert max(sizes) - min(sizes) <= 1  # README: batch sizes differ by at most one (all ranks)


def test_shard_order_depends_on_epoch_and_seed_only():
    rows = [10] * 12
    order = lambda seed, epoch: [s.shard for s in plan_epoch(rows, 0, 1, 4, seed, epoch, True).slices]
    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)
    assert [s.shard for s in plan_epoch(rows, 0, 1, 4, 1, 0, False).slices] == list(range(12))
