"""Connecting to Ray and sizing the workers against what the cluster has.

A local cluster is started in-process with bounded CPUs and its dashboard on 127.0.0.1; on an
existing cluster, an autoscaler is asked for the workers' nodes, and a cluster that cannot host
them fails with what was asked and what exists instead of pending forever.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from typing import Any

from ftdist.config import RunConfig
from ftdist.errors import UserError


def connect_ray(cfg: RunConfig) -> None:
    """Connect to ``scaling.address`` / RAY_ADDRESS, or start a bounded local cluster in-process."""
    import ray

    if ray.is_initialized():
        return
    # No runtime_env here: inside a Ray job it would replace the job's own (env vars such as the S3
    # endpoint); in local mode workers inherit this process's environment anyway.
    if cfg.scaling.address or os.environ.get("RAY_ADDRESS"):
        init_ray(cfg.scaling.address, log_to_driver=True)
        return
    need = math.ceil(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)
    # Ray warns that the local cluster it starts uses token authentication: ftdist's private cluster
    # on 127.0.0.1 needs no action from the user, so the warning only interrupts the run's output.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    # A rank that stops responding fails the run after collective_timeout_s (Ray Train's worker
    # health check; DeepSpeed's CPU shared-memory allreduce has no timeout of its own). On a
    # cluster, set RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S in the cluster's environment.
    os.environ.setdefault("RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S", str(cfg.scaling.collective_timeout_s))
    # Ray's own helpers find "the" cluster by scanning the machine; with several Ray clusters on one
    # machine that fails, and Train's PlacementGroupCleaner then never frees the resources of a run
    # whose controller was killed (every trial a Tune scheduler stops). Pin the dashboard port and
    # name it in the environment the cluster's processes inherit.
    dashboard: dict[str, Any] = {}
    if "RAY_API_SERVER_ADDRESS" not in os.environ:
        port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        dashboard = {"dashboard_port": port}
    init_ray(None, {"num_cpus": cfg.scaling.local_num_cpus or max(need, 1), "dashboard_host": "127.0.0.1",
                    "include_dashboard": True, "configure_logging": True, **dashboard},
             log_to_driver=True, logging_level=logging.WARNING)


def ray_init_kwargs(address: str | None, local: dict[str, Any], **common: Any) -> dict[str, Any]:
    """``ray.init``'s arguments: join ``address`` (else RAY_ADDRESS) when one is given, otherwise start
    this process's own cluster with the ``local`` arguments (num_cpus, ...); ``common`` go to both.

    Why ``address="local"``: a bare ``ray.init()`` joins the cluster the last ``ray start`` on the
    machine recorded (``ray/ray_current_cluster`` under RAY_TMPDIR), live or dead, and then refuses
    num_cpus; ftdist's local mode must not depend on what else ran on the machine. ``address: auto``
    still joins the recorded cluster on purpose."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        return {"address": address, **common}
    return {"address": "local", **local, **common}


def init_ray(address: str | None, local: dict[str, Any] | None = None, **common: Any) -> None:
    """The one place ftdist calls ``ray.init`` (train, tune, predict, serve): see ``ray_init_kwargs``."""
    import ray

    from ftdist.ray_noise import quiet_ray_noise

    ray.init(**ray_init_kwargs(address, local or {}, **common))
    quiet_ray_noise()  # Ray's every-run lines that are not about the run stay out of its output


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def use_gpu(cfg: RunConfig) -> bool:
    if cfg.scaling.use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.scaling.use_gpu)


def worker_resources(cfg: RunConfig, gpu: bool) -> dict[str, float]:
    s = cfg.scaling
    res: dict[str, float] = {"CPU": s.cpus_per_worker, **s.resources_per_worker}
    if gpu:
        res["GPU"] = s.gpus_per_worker
    if s.memory_per_worker_gb:
        res["memory"] = s.memory_per_worker_gb * 1024**3
    if s.accelerator_type:
        res[f"accelerator_type:{s.accelerator_type}"] = 0.001
    return res


def worker_count(cfg: RunConfig) -> int | tuple[int, int]:
    """Ray Train's ``ScalingConfig.num_workers``: a fixed count, or ``(min, max)`` for elastic training
    (``scaling.min_workers``): Ray Train then starts with as many workers as the cluster has room for,
    restarts the group smaller when a node is lost and larger when room appears, each time from the
    latest checkpoint, which the workers re-plan for the new size (``loop.resume_on_another_size``)."""
    s = cfg.scaling
    if s.min_workers is None or s.min_workers >= s.num_workers:
        return s.num_workers
    return (s.min_workers, s.num_workers)


def wait_for_resources(cfg: RunConfig, per_worker: dict[str, float]) -> None:
    """Fail with a clear message instead of pending forever when the cluster cannot host the workers
    (the fewest it may run with, for an elastic run)."""
    import ray

    count = worker_count(cfg)
    least = count[0] if isinstance(count, tuple) else count
    need = {k: v * least for k, v in per_worker.items()}
    deadline = time.monotonic() + cfg.scaling.placement_timeout_s
    with contextlib.suppress(Exception):  # ask an autoscaler (if any) for the nodes: GPU groups may sit at 0
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{k: v for k, v in per_worker.items() if k != "memory"}] * cfg.scaling.num_workers)
    while True:
        have = ray.cluster_resources()
        short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) + 1e-9 < v}
        if not short:
            return
        if time.monotonic() > deadline:
            asked = ", ".join(f"{k}={v:g}" for k, v in need.items() if not k.startswith("accelerator_type"))
            has = ", ".join(f"{k}={v:g}" for k, v in sorted(have.items())
                            if k in ("CPU", "GPU", "memory") or k in need)
            raise UserError(f"the Ray cluster cannot host {least} worker(s): asked for {asked} "
                            f"in total, the cluster has {has}; lower scaling.num_workers/cpus_per_worker/"
                            f"gpus_per_worker or add nodes (waited scaling.placement_timeout_s="
                            f"{cfg.scaling.placement_timeout_s:g}s)")
        time.sleep(1.0)
