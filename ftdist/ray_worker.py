"""The worker side of Ray Train: the session the loop sees, and the function each worker runs.

``worker_entry`` is the TorchTrainer's ``train_loop_per_worker``: it quiets library noise, resolves
the config's ``${env:...}`` references in the worker (they never travel resolved), and runs
:func:`ftdist.loop.train_worker` with a :class:`RaySession` (``ftdist.session.LocalSession`` is the
same interface without Ray).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from ftdist import storage
from ftdist.config import RunConfig
from ftdist.errors import MemoryLimitExceeded
from ftdist.host_memory import is_allocation_failure, limit_data_segment
from ftdist.uri import join_uri


class RaySession:
    """``Session`` backed by Ray Train v2's worker context."""

    def __init__(self, cfg: RunConfig, restore_from: str | None = None) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.cfg = cfg
        self.restore_from = restore_from
        self.rank, self.world_size, self.local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.restore_from:
            # A fresh run that starts from another run's checkpoint (a PBT exploit); once this run
            # has checkpoints of its own, a restart resumes from those instead.
            with self._fetch_restore_from() as d:
                yield d
            return
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield d

    @contextlib.contextmanager
    def _fetch_restore_from(self) -> Iterator[str]:
        uri = self.restore_from or ""
        if not storage.is_remote(uri):
            yield storage.local_path(uri)
            return
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ftdist-restore-") as tmp:
            yield storage.download_dir(uri, tmp, self.cfg.storage)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def fetch_checkpoint(self, name: str, dest: str) -> str:
        return storage.download_dir(join_uri(self.cfg.run_uri(), name), dest, self.cfg.storage)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()


def quiet_ray_train_logs() -> None:
    """Silence Ray Train's per-report INFO lines in this process.

    Each worker otherwise logs "Reporting training result N: TrainingReport(... the whole metrics
    dict ...)" and "Checkpoint successfully created at ..." every epoch, which drowns ftdist's own
    one-line epoch summaries (they say the same thing). Warnings and errors still pass. Ray names
    one of these loggers after the module's file path, so it is looked up the same way.
    """
    names = ["ray.train.v2._internal.execution.storage", "ray.train._internal.storage"]
    try:
        from ray.train.v2._internal.execution import context as train_context

        names.append(train_context.__file__)
    except ImportError:  # another Ray layout: keep its logs rather than fail the run
        pass
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_library_noise() -> None:
    """Hide library output a user cannot act on, in this process: the demo printed it between
    ftdist's own lines on every worker.

    - torch's FutureWarning that ``all_gather_into_tensor``/``reduce_scatter_tensor`` are deprecated
      (DeepSpeed calls them; nothing in a config changes that);
    - transformers' "Writing model shards" / "Loading weights" progress bars (the export and the
      model load take a second or two; ftdist reports both itself).
    Warnings that say something a user can fix are left alone.
    """
    import warnings

    warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)`"
                                              r" is deprecated", category=FutureWarning)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def worker_entry(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the TorchTrainer."""
    from ftdist.loop import train_worker

    logging.basicConfig(level=logging.WARNING)
    quiet_ray_train_logs()
    quiet_library_noise()
    # The config arrives with its ${env:...} references (never their values): resolve them here.
    cfg = RunConfig.model_validate(config["config"]).resolved()
    session = RaySession(cfg, config.get("restore_from"))
    with memory_limit(cfg, session.rank):
        if cfg.tasks:
            from ftdist.multitask.loop import train_worker as train_multitask

            train_multitask(cfg, session)
        else:
            train_worker(cfg, session)


@contextlib.contextmanager
def memory_limit(cfg: RunConfig, rank: int) -> Iterator[None]:
    """Hold this worker to ``scaling.memory_per_worker_gb`` when ``scaling.enforce_memory_limit``
    is on (``ftdist.host_memory`` says why), and turn a refused allocation into one line."""
    sc = cfg.scaling
    if not sc.enforce_memory_limit or sc.memory_per_worker_gb is None:
        yield
        return
    limit_data_segment(int(sc.memory_per_worker_gb * 2**30))
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not is_allocation_failure(e):
            raise
        raise MemoryLimitExceeded(
            f"rank {rank} needed more memory than scaling.memory_per_worker_gb ({sc.memory_per_worker_gb:g} GB, "
            f"held by scaling.enforce_memory_limit): lower a worker's memory with deepspeed.zero_stage: 3, "
            f"deepspeed.offload_optimizer, model.lora, model.gradient_checkpointing or more workers "
            f"(scaling.num_workers), or raise the limit") from None
