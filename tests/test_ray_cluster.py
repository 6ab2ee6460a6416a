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


def test_no_address_starts_a_private_cluster_even_where_ray_start_recorded_one(tmp_path, monkeypatch):
    """``ray.init()`` without an address joins the cluster the last ``ray start`` on the machine recorded
    (``ray/ray_current_cluster`` under RAY_TMPDIR, live or dead) and then refuses ``num_cpus``; ftdist's
    local mode must start its own cluster instead, and only ``auto``/an address/RAY_ADDRESS join one."""
    from ray._private.services import canonicalize_bootstrap_address

    from ftdist.ray_cluster import ray_init_kwargs

    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6399")  # nothing listens there
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert canonicalize_bootstrap_address(None) is not None  # what a bare ray.init() would join
    local = ray_init_kwargs(None, {"num_cpus": 2}, logging_level="WARNING")
    assert local == {"address": "local", "num_cpus": 2, "logging_level": "WARNING"}
    assert canonicalize_bootstrap_address(local["address"]) is None  # Ray starts a new cluster
    assert ray_init_kwargs("auto", {"num_cpus": 2}) == {"address": "auto"}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_init_kwargs(None, {"num_cpus": 2}, log_to_driver=True) == {"address": "10.0.0.1:6379",
                                                                          "log_to_driver": True}
