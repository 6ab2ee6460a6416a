"""``data.replay``: batches of earlier data sets mixed into this run's training epochs (rehearsal).

An epoch of a run with replay is its own training split's batches, every sample exactly once as
always, plus ``R`` replay batches, ``R = round(S · f / (1 − f))`` for ``S`` own batches and
``data.replay.fraction`` ``f`` (so replay is ``f`` of the epoch's batches), shared among the replay sets
in proportion to their size. A replay set's batches in epoch ``e`` are the first of its own reader's
epoch ``e`` (its shard order and shuffle drawn from ``(seed, e)``, so each epoch replays other
samples), at most one whole pass: every replayed sample at most once per epoch. Where a set holds
fewer batches than its share, all of them are replayed and the fraction is lower (logged).

Which batch comes from which source is a seeded permutation of ``(seed, epoch)``, the same on every
rank (each batch holds one source's rows: no padding across sources). The mix is a function of the
batch position, so a run resumed mid-epoch continues each source exactly where it stopped.

Replayed rows carry ``sample_id = (k << 40) + id`` (``k`` = the replay set's 1-based index), so
recorded sample ids never collide with this run's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from ftdist.config import ReplaySection, StorageSection
from ftdist.data.manifest import Manifest, check_compatible, load_manifest
from ftdist.data.reader import epoch_rng
from ftdist.uri import join_uri
from ftdist.errors import UserError

REPLAY_ID_SHIFT = 40


class BatchSource(Protocol):
    def num_batches(self) -> int: ...

    def batches(self, epoch: int, start_batch: int = 0,
                max_batches: int | None = None) -> Iterator[list[dict[str, Any]]]: ...


def replay_counts(own: int, fraction: float, per_pass: list[int]) -> list[int]:
    """Replay batches per epoch from each set: ``round(own·f/(1−f))`` shared by size, each at most a pass."""
    want = round(own * fraction / (1 - fraction))
    total = sum(per_pass)
    return [min(n, round(want * n / total)) for n in per_pass] if total else [0 for _ in per_pass]


def epoch_sources(own: int, counts: list[int], seed: int, epoch: int) -> np.ndarray:
    """Source of each batch position of ``epoch``: 0 = this run's data, ``k`` = replay set ``k``."""
    order = np.repeat(np.arange(len(counts) + 1), [own, *counts])
    return epoch_rng(seed, epoch, 0, 7).permutation(order)


def replay_manifests(replay: ReplaySection, own: Manifest, task: str, num_labels: int | None,
                     tokenizer_fp: dict[str, Any] | None, cfg: StorageSection) -> list[Manifest]:
    """The replay sets' train manifests, each checked against this run: same task and tokenizer, and for
    classification the same labels (other labels need their own head: that is a multi-task run)."""
    out = []
    for path in replay.paths:
        uri = join_uri(path, "train")
        m = load_manifest(uri, cfg)
        check_compatible(m, uri, task, num_labels, tokenizer_fp)
        if task == "sequence-classification" and m.label_names != own.label_names:
            raise UserError(f"data.replay: '{path}' has labels {m.label_names} but this run's data set has "
                            f"{own.label_names}; replaying other labels needs a head per task: list both data sets "
                            f"under tasks: (README: Multi-task fine-tuning)")
        out.append(m)
    return out


class ReplayMix:
    """This run's training reader with replay sets' batches mixed in (see the module docstring)."""

    def __init__(self, own: BatchSource, replays: list[BatchSource], fraction: float, seed: int) -> None:
        self.own, self.replays, self.seed = own, replays, seed
        self.own_batches = own.num_batches()
        self.counts = replay_counts(self.own_batches, fraction, [r.num_batches() for r in replays])

    def num_batches(self) -> int:
        return self.own_batches + sum(self.counts)

    def batches(self, epoch: int, start_batch: int = 0,
                max_batches: int | None = None) -> Iterator[list[dict[str, Any]]]:
        sources = epoch_sources(self.own_batches, self.counts, self.seed, epoch)
        if max_batches is not None:
            sources = sources[:max_batches]
        done = np.bincount(sources[:start_batch], minlength=len(self.counts) + 1)
        streams = [self.own.batches(epoch, start_batch=int(done[0]))] + [
            r.batches(epoch, start_batch=int(done[k + 1]), max_batches=self.counts[k])
            for k, r in enumerate(self.replays)]
        try:
            for src in sources[start_batch:]:
                rows = next(streams[src])
                if src:
                    rows = [{**r, "sample_id": (int(src) << REPLAY_ID_SHIFT) + int(r["sample_id"])} for r in rows]
                yield rows
        finally:  # stops every read-ahead thread, also when the consumer stops early
            for s in streams:
                close = getattr(s, "close", None)
                if close is not None:
                    close()
