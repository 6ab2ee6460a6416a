"""Config -> Ray Train's worker count (pure): fixed, or an elastic (min, max) range that the installed
Ray Train accepts as such."""

from __future__ import annotations

from ftdist.config import load_config
from ftdist.ray_cluster import worker_count

BASE = {"model": {"path": "m"}, "data": {"path": "d"}}


def test_min_workers_makes_the_worker_group_elastic():
    from ray.train import ScalingConfig

    assert worker_count(load_config(data=BASE, overrides=["scaling.num_workers=4"])) == 4
    assert worker_count(load_config(data=BASE, overrides=["scaling.num_workers=4", "scaling.min_workers=4"])) == 4
    elastic = worker_count(load_config(data=BASE, overrides=["scaling.num_workers=4", "scaling.min_workers=2"]))
    assert elastic == (2, 4)
    sc = ScalingConfig(num_workers=elastic)
    assert sc.elasticity_enabled and (sc.min_workers, sc.max_workers) == (2, 4)
