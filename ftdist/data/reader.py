"""The streaming reader: each worker reads only its share of a split, deterministically and resumably.

How an epoch is laid out (a pure function of seed, epoch, rank and world size; see ``plan_epoch``):

1. The shard order is permuted with ``rng(seed, epoch)``; the split's rows, concatenated in that
   order, form one global sequence of ``N`` rows.
2. Rank ``r`` owns a contiguous range of that sequence: ``N // W`` rows, plus one for the first
   ``N % W`` ranks. Every row is owned by exactly one rank, so every sample is seen exactly once
   per epoch across workers; nothing is dropped or duplicated.
3. Every rank runs the same number of batches ``S = ceil(ceil(N / W) / batch_size)``, which keeps
   collectives in lockstep; a rank's rows are spread over its ``S`` batches as evenly as possible
   (sizes differ by at most one), which is how uneven tails are handled.
4. The rank reads only the shards overlapping its range, one whole shard at a time (so memory is
   bounded by a shard, whatever the data set size), permutes each shard's rows, and streams them
   through a bounded shuffle buffer. With ``length_bucketing`` the shuffled stream is cut into
   chunks of about a shuffle buffer's worth of whole batches; each chunk is sorted by length, cut
   at the planned batch sizes and its batches are handed out in a seeded random order, so every
   batch holds similar lengths (less padding) while the chunk stays a random sample.
5. A background thread reads ahead ``prefetch_shards`` shards while the current one trains. For a
   raw-text data set that thread also tokenizes each shard (one batch call of the fast tokenizer),
   so on-the-fly tokenization overlaps with compute like I/O does.

The position is ``(epoch, batches_done)``; resuming replays the (cheap, I/O-only) stream up to that
batch and continues, so no sample of an interrupted epoch is repeated or skipped.

**Resuming on another number of workers** (``Resize``, ``plan_segments``). An epoch interrupted at
batch ``b`` on ``W`` ranks is continued by ``W'`` ranks as a new *segment*: each old rank's rows
after its first ``b`` batches (its stream from batch ``b`` on), concatenated in old-rank order, form
the epoch's remaining sequence; the new ranks split it into contiguous ranges and batches exactly as
rule 2-3 split a whole epoch. Every row of the epoch is thus in an old rank's trained prefix or in
exactly one new rank's range. Segments nest (a resized epoch resized again), the position stays
one batch count per epoch (a segment starts at the batch where the previous one stopped), and the
next epoch is planned on the new size as usual.
"""

from __future__ import annotations

import copy
import hashlib
import io
import queue
import threading
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ftdist import storage
from ftdist.config import StorageSection
from ftdist.uri import join_uri
from ftdist.data.manifest import Manifest, load_manifest
from ftdist.errors import UserError


@dataclass(frozen=True)
class RankSlice:
    shard: int  # index into manifest.shards
    start: int  # first row inside the shard
    stop: int


@dataclass(frozen=True)
class EpochPlan:
    slices: list[RankSlice]
    batch_sizes: list[int]

    @property
    def num_rows(self) -> int:
        return sum(s.stop - s.start for s in self.slices)


@dataclass(frozen=True)
class Resize:
    """An earlier segment of an interrupted epoch: ``world`` ranks trained it until the epoch's
    batch ``batch`` (a position from a checkpoint), then the run resumed on another size."""

    world: int
    batch: int


@dataclass(frozen=True)
class Segment:
    """A stretch of an epoch trained by one world size: from the epoch's batch ``start`` on, rank
    ``r`` trains ``shares[r]`` rows of the segment's sequence in batches of ``sizes[r]``."""

    world: int
    start: int
    shares: list[int]
    sizes: list[list[int]]

    @property
    def steps(self) -> int:
        return len(self.sizes[0])

    def remaining(self, rank: int, done: int) -> int:
        """Rows of ``rank``'s share left after its first ``done`` batches."""
        return self.shares[rank] - sum(self.sizes[rank][:done])


def _split(n: int, world: int, batch_size: int) -> tuple[list[int], list[list[int]]]:
    """``n`` rows over ``world`` ranks (rule 2) and each share over the common batch count (rule 3)."""
    base, extra = divmod(n, world)
    shares = [base + (1 if r < extra else 0) for r in range(world)]
    steps = min(-(-shares[0] // batch_size), shares[-1])
    return shares, [[(k + 1) * m // steps - k * m // steps for k in range(steps)] for m in shares]


def plan_segments(shard_rows: list[int], batch_size: int, resizes: list[Resize], world: int) -> list[Segment]:
    """The segments of an epoch begun on ``resizes[0].world`` ranks and resized at each
    ``Resize.batch``, ending with ``world`` ranks (pure; ``[one segment]`` without resizes)."""
    worlds = [r.world for r in resizes] + [world]
    n, start, segments = sum(shard_rows), 0, []
    for k, w in enumerate(worlds):
        if n < w:
            raise UserError(f"the interrupted epoch has {n} sample(s) left to train, fewer than the {w} worker(s) "
                            f"it is resumed on; resume on at most {n} worker(s) (scaling.num_workers)")
        shares, sizes = _split(n, w, batch_size)
        seg = Segment(w, start, shares, sizes)
        segments.append(seg)
        if k < len(resizes):
            done = resizes[k].batch - start
            if not 0 < done < seg.steps:
                raise ValueError(f"resize at batch {resizes[k].batch} is outside segment {k} "
                                 f"(batches {start}..{start + seg.steps})")
            n, start = sum(seg.remaining(r, done) for r in range(w)), resizes[k].batch
    return segments


def epoch_rng(seed: int, epoch: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, *extra])


def plan_epoch(shard_rows: list[int], rank: int, world: int, batch_size: int, seed: int, epoch: int,
               shuffle: bool) -> EpochPlan:
    """Which rows of which shards rank ``rank`` reads in ``epoch``, and its batch sizes."""
    n = sum(shard_rows)
    if n < world:
        raise UserError(f"a split has {n} rows but there are {world} workers; every worker needs at least one row; "
                        f"use fewer workers (scaling.num_workers) or more data")
    order = epoch_rng(seed, epoch).permutation(len(shard_rows)) if shuffle else np.arange(len(shard_rows))
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    hi = lo + base + (1 if rank < extra else 0)
    slices, offset = [], 0
    for s in order:
        rows = shard_rows[s]
        a, b = max(lo, offset), min(hi, offset + rows)
        if a < b:
            slices.append(RankSlice(int(s), a - offset, b - offset))
        offset += rows
    steps = num_batches(shard_rows, world, batch_size)
    mine = hi - lo
    sizes = [(k + 1) * mine // steps - k * mine // steps for k in range(steps)]
    return EpochPlan(slices, sizes)


def num_batches(shard_rows: list[int], world: int, batch_size: int) -> int:
    """Batches per epoch, identical on every rank: enough for the largest share, but never more than
    the smallest share has rows (so no rank ever gets an empty batch)."""
    n = sum(shard_rows)
    largest, smallest = -(-n // world), n // world
    return min(-(-largest // batch_size), smallest)


class ShardReader:
    """Streams one split for one rank. Iterate ``batches(epoch, start_batch)`` for row dicts."""

    def __init__(self, split_uri: str, cfg: StorageSection, rank: int, world: int, batch_size: int, seed: int,
                 shuffle: bool, shuffle_buffer: int = 4096, prefetch: int = 2, length_bucketing: bool = False,
                 manifest: Manifest | None = None, tokenizer: Any = None, max_length: int | None = None) -> None:
        self.uri, self.cfg = split_uri, cfg
        self.manifest = manifest or load_manifest(split_uri, cfg)
        self.rank, self.world, self.batch_size, self.seed = rank, world, batch_size, seed
        self.shuffle, self.buffer, self.prefetch = shuffle, max(shuffle_buffer, batch_size), prefetch
        self.length_bucketing = length_bucketing and shuffle
        label = ["label"] if "label" in self.manifest.columns else []
        self.columns = ["sample_id", "input_ids", "length"] + label  # what every row carries
        self.tokenizer, self.max_length = None, max_length
        if not self.manifest.tokenized:
            if tokenizer is None or max_length is None:
                raise ValueError(f"'{split_uri}' holds raw text: ShardReader needs tokenizer= and max_length=")
            # Our own copy: the read-ahead thread tokenizes while the caller may use the original.
            self.tokenizer = copy.deepcopy(tokenizer)
        self.read_columns = ["sample_id", "text"] + label if self.tokenizer is not None else self.columns
        rows = [s.rows for s in self.manifest.shards]
        if self.manifest.num_rows < world:
            plan_epoch(rows, rank, world, batch_size, seed, 0, shuffle)  # raises the one-line error
        self.shard_rows = rows

    def num_batches(self, resizes: list[Resize] | None = None) -> int:
        """Batches of an epoch; with ``resizes`` (an epoch resumed on another size) the epoch's total:
        the batches trained before the last resize plus the current segment's."""
        if not resizes:
            return num_batches(self.shard_rows, self.world, self.batch_size)
        last = plan_segments(self.shard_rows, self.batch_size, resizes, self.world)[-1]
        return last.start + last.steps

    # -- reading -------------------------------------------------------------------------------

    def _read_slice(self, sl: RankSlice) -> pa.Table:
        info = self.manifest.shards[sl.shard]
        uri = join_uri(self.uri, info.file)
        data = storage.read_bytes(uri, self.cfg)
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise UserError(f"shard '{uri}' is truncated or corrupt (content hash differs from the manifest); "
                            f"re-run `ftdist data prepare`")
        try:
            table = pq.read_table(io.BytesIO(data), columns=self.read_columns)
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise UserError(f"shard '{uri}' cannot be read ({str(e).splitlines()[0][:120]}); "
                            f"re-run `ftdist data prepare`") from None
        if table.num_rows != info.rows:
            raise UserError(f"shard '{uri}' has {table.num_rows} rows, the manifest says {info.rows}; "
                            f"re-run `ftdist data prepare`")
        table = table.slice(sl.start, sl.stop - sl.start)
        return self._tokenized(table) if self.tokenizer is not None else table

    def _tokenized(self, table: pa.Table) -> pa.Table:
        """Raw-text slice -> the columns a prepared shard has (same ids ``prepare`` would have written)."""
        from ftdist.data.prepare import tokenize

        assert self.max_length is not None  # checked in __init__ for raw-text splits
        enc = tokenize(self.tokenizer, table.column("text").to_pylist(), self.max_length)
        table = table.drop_columns(["text"])
        table = table.append_column("input_ids", pa.array(enc, pa.list_(pa.int32())))
        return table.append_column("length", pa.array([len(e) for e in enc], pa.int32()))

    def _tables(self, plan: EpochPlan) -> Generator[pa.Table, None, None]:
        """Slices in plan order, read ahead by a background thread."""
        if self.prefetch <= 0:
            for sl in plan.slices:
                yield self._read_slice(sl)
            return
        q: queue.Queue[Any] = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item: Any) -> bool:
            """Hand ``item`` over unless the consumer has stopped: a plain ``put`` on a full queue
            would block this thread (and the tables it holds) forever once nobody reads."""
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                for sl in plan.slices:
                    if stop.is_set() or not put(self._read_slice(sl)):
                        return
                put(None)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
                put(e)

        th = threading.Thread(target=work, name=f"ftdist-prefetch-r{self.rank}", daemon=True)
        th.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            th.join(timeout=30)  # at most one slice read in flight; never leave a reader behind

    def _rows(self, epoch: int, plan: EpochPlan, rank: int) -> Generator[dict[str, Any], None, None]:
        rng = epoch_rng(self.seed, epoch, rank + 1)
        buf: list[dict[str, Any]] = []
        tables = self._tables(plan)
        try:
            yield from self._rows_of(tables, rng, buf)
        finally:
            tables.close()  # explicit: do not rely on garbage collection to stop the read-ahead
        yield from self._drain(buf, rng, keep=0)

    def _rows_of(self, tables: Iterator[pa.Table], rng: np.random.Generator,
                 buf: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Rows of each table in a seeded order, through the bounded shuffle buffer ``buf``."""
        for table in tables:
            # Token ids stay in Arrow's int32 buffer (rows are numpy views into it): a Python list
            # per row would cost ~10x the memory of the shard itself.
            ids = table.column("input_ids").combine_chunks()
            offsets, values = ids.offsets.to_numpy(), ids.values.to_numpy()
            scalars = {c: table.column(c).to_pylist() for c in self.columns if c != "input_ids"}
            idx = rng.permutation(table.num_rows) if self.shuffle else range(table.num_rows)
            for i in idx:
                row = {c: col[i] for c, col in scalars.items()}
                row["input_ids"] = values[offsets[i]:offsets[i + 1]]
                buf.append(row)
                if len(buf) >= self.buffer:
                    yield from self._drain(buf, rng, keep=self.buffer // 2)

    def _drain(self, buf: list[dict[str, Any]], rng: np.random.Generator, keep: int) -> Iterator[dict[str, Any]]:
        """Emit ``len(buf) - keep`` rows, chosen at random when shuffling."""
        n_out = len(buf) - keep
        if n_out <= 0:
            return
        if self.shuffle:
            rng.shuffle(buf)  # in place; deterministic given the rng
        out, buf[:] = buf[:n_out], buf[n_out:]
        yield from out

    def _batched(self, rows: Iterator[dict[str, Any]], sizes: list[int],
                 rng: np.random.Generator) -> Iterator[list[dict[str, Any]]]:
        """Cut the row stream into batches of ``sizes``. With bucketing, each chunk of whole batches
        is sorted by length and cut at the batch sizes, then its batches come in random order: the
        cuts coincide with batch boundaries, so no batch straddles two length runs."""
        if not self.length_bucketing:
            for size in sizes:
                yield [next(rows) for _ in range(size)]
            return
        per_chunk = max(1, self.buffer // self.batch_size)
        for c in range(0, len(sizes), per_chunk):
            chunk_sizes = sizes[c:c + per_chunk]
            chunk = sorted((next(rows) for _ in range(sum(chunk_sizes))), key=lambda r: r["length"])
            # The j-th batch takes the perm[j]-th length run, cut to the j-th planned size: batches come
            # in random length order while batch k still has size sizes[k] (a resize counts on that).
            perm = rng.permutation(len(chunk_sizes))
            run_sizes = np.empty(len(chunk_sizes), dtype=np.int64)
            run_sizes[perm] = chunk_sizes
            bounds = np.cumsum([0, *run_sizes])
            for j in perm:
                yield chunk[bounds[j]:bounds[j + 1]]

    def _plan_batches(self, epoch: int, rank: int, world: int) -> Generator[list[dict[str, Any]], None, None]:
        """Every batch ``rank`` of ``world`` trains in an epoch planned on that size (rules 1-4)."""
        plan = plan_epoch(self.shard_rows, rank, world, self.batch_size, self.seed, epoch, self.shuffle)
        rows = self._rows(epoch, plan, rank)
        # A separate stream from the shuffle's, so bucketing never changes which rows a rank gets.
        order_rng = epoch_rng(self.seed, epoch, rank + 1, 1)
        try:
            yield from self._batched(rows, plan.batch_sizes, order_rng)
        finally:  # also when the consumer stops iterating early: stops the read-ahead thread now
            rows.close()

    def _segment_batches(self, epoch: int, segments: list[Segment], k: int,
                         rank: int) -> Generator[list[dict[str, Any]], None, None]:
        """Every batch ``rank`` trains in segment ``k`` of a resized epoch (see the module docstring)."""
        if k == 0:
            yield from self._plan_batches(epoch, rank, segments[0].world)
            return
        seg, prev = segments[k], segments[k - 1]
        lo = sum(seg.shares[:rank])
        rows = self._remaining_rows(epoch, segments, k - 1, seg.start - prev.start, lo, lo + seg.shares[rank])
        try:
            yield from self._batched(rows, seg.sizes[rank], epoch_rng(self.seed, epoch, rank + 1, 2, k))
        finally:
            rows.close()

    def _remaining_rows(self, epoch: int, segments: list[Segment], k: int, done: int, lo: int,
                        hi: int) -> Generator[dict[str, Any], None, None]:
        """Rows ``lo:hi`` of segment ``k``'s untrained rows: each of its ranks' rows after ``done``
        batches, concatenated in rank order."""
        seg, offset = segments[k], 0
        for q in range(seg.world):
            left = seg.remaining(q, done)
            a, b = max(lo, offset), min(hi, offset + left)
            if a < b:
                stream = self._segment_batches(epoch, segments, k, q)
                try:
                    rows = (row for i, batch in enumerate(stream) if i >= done for row in batch)
                    for j, row in enumerate(rows):
                        if j >= b - offset:
                            break
                        if j >= a - offset:
                            yield row
                finally:
                    stream.close()
            offset += left

    def batches(self, epoch: int, start_batch: int = 0, max_batches: int | None = None,
                resizes: list[Resize] | None = None) -> Iterator[list[dict[str, Any]]]:
        """Lists of row dicts for this rank's batches of ``epoch``, starting after ``start_batch`` batches
        (counted from the epoch's start). ``resizes``: the epoch began on other world sizes (a resumed
        run); this rank then reads its range of the rows those sizes left untrained."""
        if resizes:
            segments = plan_segments(self.shard_rows, self.batch_size, resizes, self.world)
            first = segments[-1].start
            stream = self._segment_batches(epoch, segments, len(segments) - 1, self.rank)
        else:
            first, stream = 0, self._plan_batches(epoch, self.rank, self.world)
        try:
            for k, batch in enumerate(stream, start=first):
                if max_batches is not None and k >= max_batches:
                    break
                if k >= start_batch:
                    yield batch
        finally:  # also when the consumer stops iterating early: stops the read-ahead thread now
            stream.close()
