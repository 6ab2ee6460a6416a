"""What the worker loop needs from whoever runs it: Ray Train (``ray_worker.RaySession``) or nothing
(``LocalSession``: one process, world size 1, used by the benchmark harness and unit tests)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from typing import Any, Protocol


class Session(Protocol):
    rank: int
    world_size: int
    local_rank: int

    def restore_dir(self) -> contextlib.AbstractContextManager[str | None]:
        """The latest checkpoint as a local folder, or None for a fresh start."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        """Publish metrics (and a checkpoint folder holding this rank's part, registered as ``name``)."""

    def fetch_checkpoint(self, name: str, dest: str) -> str:
        """Copy a reported checkpoint into the local folder ``dest`` and return it."""

    def node_id(self) -> str: ...


class LocalSession:
    """World size 1, checkpoints in a local folder, metrics kept in memory."""

    def __init__(self, checkpoint_root: str) -> None:
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        self.root = checkpoint_root
        self.reports: list[dict[str, Any]] = []
        os.makedirs(self.root, exist_ok=True)

    def _latest(self) -> str | None:
        marker = os.path.join(self.root, "latest.json")
        if not os.path.exists(marker):
            return None
        with open(marker) as f:
            return os.path.join(self.root, json.load(f)["name"])

    @contextlib.contextmanager
    def restore_dir(self) -> Iterator[str | None]:
        yield self._latest()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and name:
            dest = os.path.join(self.root, name)
            shutil.copytree(checkpoint_dir, dest, dirs_exist_ok=True)
            with open(os.path.join(self.root, "latest.json.tmp"), "w") as f:
                json.dump({"name": name}, f)
            os.replace(os.path.join(self.root, "latest.json.tmp"), os.path.join(self.root, "latest.json"))

    def fetch_checkpoint(self, name: str, dest: str) -> str:
        shutil.copytree(os.path.join(self.root, name), dest, dirs_exist_ok=True)
        return dest

    def node_id(self) -> str:
        return socket.gethostname()


def init_single_process_group(device_type: str) -> None:
    """A world-size-1 process group so DeepSpeed runs without Ray (bench, unit tests)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("gloo" if device_type == "cpu" else "nccl", rank=0, world_size=1)
