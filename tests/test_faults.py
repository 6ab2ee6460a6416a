"""Failures caused for real: a training worker SIGKILLed mid-epoch (plain, with gradient accumulation, with ZeRO-2)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import base_config, train_killing_a_worker
from ftdist.config import load_config
from ftdist.launcher import run_training

pytestmark = pytest.mark.slow


def _train_ids(data: str) -> list[int]:
    import pyarrow.parquet as pq

    return sorted(i for f in Path(data, "train").glob("*.parquet") for i in pq.read_table(f)["sample_id"].to_pylist())




# (id, train/deepspeed settings, epochs). Accumulation 2 with a checkpoint every 3 batches puts the
# checkpoint points inside windows: checkpoints land on the next boundary (batches 4, 6, 10, 12). ZeRO-2
# and accumulation share one run (each was a run of its own: the same restore path, twice the time).
VARIANTS = [
    ("plain", {"checkpoint_every_steps": 4}, {"zero_stage": 0}, 2),
    ("zero2-gas2", {"checkpoint_every_steps": 3, "gradient_accumulation_steps": 2}, {"zero_stage": 2}, 2),
]


@pytest.mark.parametrize("name,train,deepspeed,epochs", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_worker_sigkill_mid_epoch_restarts_and_trains_every_sample_once(name, train, deepspeed, epochs, tiny_bert,
                                                                          cls_data, tmp_path, ray_local, capfd):
    sections = dict(train={"epochs": epochs, "learning_rate": 1e-2, **train}, deepspeed=deepspeed,
                    data={"record_sample_ids": True}, scaling={"max_failures": 2})
    cfg = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "killed"}, **sections))
    run = tmp_path / "runs" / "killed"
    summary, killed = train_killing_a_worker(cfg, run, "batch000004")
    assert killed is not None, "the run ended before a worker could be killed"
    assert [e["epoch"] for e in summary["epochs"]] == list(range(1, epochs + 1))

    # The restarted workers restored a checkpoint (not a fresh start), and only ever a boundary one.
    out = capfd.readouterr().out
    resumed = [(int(e), int(b)) for e, b in re.findall(r"resumed from checkpoint at epoch (\d+), batch (\d+)", out)]
    assert resumed, "the restarted workers did not resume from a checkpoint"
    assert all(p > (1, 0) for p in resumed), resumed  # later than the very start
    assert all(b % train.get("gradient_accumulation_steps", 1) == 0 for _, b in resumed), resumed

    # Exactly once: the sample ids kept in the final checkpoint cover every training row once per epoch.
    final = run / sorted(p.name for p in run.iterdir() if p.name.startswith(f"epoch{epochs:03d}"))[-1]
    per_epoch: dict[str, list[int]] = {}
    for f in final.glob("samples_rank*.json"):
        for epoch, ids in json.loads(f.read_text()).items():
            per_epoch.setdefault(epoch, []).extend(ids)
    expected = _train_ids(cls_data)
    assert sorted(per_epoch) == [str(e) for e in range(epochs)]
    for epoch, ids in per_epoch.items():
        assert sorted(ids) == expected, f"epoch {epoch}: repeated or skipped samples"

    # The same run uninterrupted ends with the same metrics (RNG, optimizer, schedule and reader restored).
    # Both runs are deterministic on CPU: they measured bitwise equal; 1e-6 leaves room for summation order.
    clean = load_config(data=base_config(tiny_bert, cls_data, str(tmp_path / "runs"), run={"name": "clean"}, **sections))
    reference = run_training(clean)
    for got, want in zip(summary["epochs"], reference["epochs"], strict=True):
        assert got["step"] == want["step"]
        assert abs(got["val_loss"] - want["val_loss"]) < 1e-6, (got["epoch"], got["val_loss"], want["val_loss"])
    assert abs(summary["test"]["loss"] - reference["test"]["loss"]) < 1e-6
    assert summary["test"]["accuracy"] == reference["test"]["accuracy"]


def _poison_rank_rows(data: str, out: Path, rank: int, world: int, batch_size: int, seed: int, token: int) -> None:
    """A copy of ``data`` in which every training row ``rank`` reads in epoch 0 (and no other row)
    holds ``token`` (shard checksums updated)."""
    import hashlib
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ftdist.config import StorageSection
    from ftdist.data.reader import ShardReader

    shutil.copytree(data, out)
    reader = ShardReader(str(out / "train"), StorageSection(), rank, world, batch_size, seed, shuffle=True)
    mine = {r["sample_id"] for rows in reader.batches(0) for r in rows}
    manifest_path = out / "train" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for shard in manifest["shards"]:
        path = out / "train" / shard["file"]
        table = pq.read_table(path)
        ids = table["input_ids"].to_pylist()
        assert all(token not in row for row in ids)
        ids = [[row[0], token, *row[2:]] if sid in mine else row
               for sid, row in zip(table["sample_id"].to_pylist(), ids, strict=True)]
        column = table.schema.get_field_index("input_ids")
        pq.write_table(table.set_column(column, "input_ids", pa.array(ids, table.schema.field(column).type)), path)
        shard["sha256"], shard["bytes"] = hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size
    manifest_path.write_text(json.dumps(manifest))


def test_a_nan_loss_on_one_rank_stops_every_rank_together(tiny_bert, cls_data, tmp_path, ray_local):
    """Only rank 1's rows hold a token whose embedding is NaN: its loss is NaN from step 1, rank 0's
    finite (weights turn NaN only after the step). The run fails with LossDiverged naming rank 1 at
    that log line, and no checkpoint is kept (rank 0, whose own loss is finite, would otherwise save one)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from ftdist.errors import LossDiverged, RunFailed
    from ftdist.failures import _exc_chain

    token = 30521  # the last id of the tiny BERT's vocabulary: in no row of the synthetic data
    model = tmp_path / "model"
    shutil.copytree(tiny_bert, model)
    weights = load_file(str(model / "model.safetensors"))
    key = next(k for k in weights if k.endswith("word_embeddings.weight"))
    weights[key][token] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    data = tmp_path / "data"
    _poison_rank_rows(cls_data, data, rank=1, world=2, batch_size=16, seed=0, token=token)
    cfg = load_config(data=base_config(str(model), str(data), str(tmp_path / "runs"), run={"name": "nan1"},
                                       train={"epochs": 1, "log_every_steps": 1}))
    with pytest.raises(RunFailed) as caught:
        run_training(cfg)
    failures = next(e.worker_failures for e in _exc_chain(caught.value) if isinstance(
        getattr(e, "worker_failures", None), dict))
    # Rank 1's LossDiverged is always collected. Rank 0 raises the same line at the same all-reduce
    # (shown deterministically by the two-process test below), but Ray Train may tear the group down
    # as soon as rank 1's error arrives, before rank 0's is collected: then rank 0 is absent, never
    # another error (a collective cut short, a timeout).
    raised = {rank: type(err).__name__ for rank, err in failures.items()}
    assert raised in ({1: LossDiverged.__name__}, {0: LossDiverged.__name__, 1: LossDiverged.__name__}), failures
    assert all(str(err) == str(failures[1]) for err in failures.values()), failures  # one line, naming rank 1
    assert "became nan on rank 1 by optimizer step 1:" in str(caught.value)
    assert not [p.name for p in (tmp_path / "runs" / "nan1").iterdir() if p.name.startswith("epoch")]


def _check_divergence_on_rank(rank: int, loss: float, store: str, out) -> None:  # type: ignore[no-untyped-def]
    """One rank of a two-process gloo group: call the loop's divergence check with ``loss``."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from ftdist.loop import stop_if_any_rank_diverged

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        setup = SimpleNamespace(session=SimpleNamespace(rank=rank, world_size=2), device=torch.device("cpu"))
        stop_if_any_rank_diverged(setup, loss, step=7)  # type: ignore[arg-type]
        out.put((rank, None))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put((rank, f"{type(exc).__name__}: {exc}"))
    finally:
        dist.destroy_process_group()


def test_the_divergence_check_raises_on_the_rank_whose_loss_is_finite_too(tmp_path):
    """Rank 1's loss is NaN, rank 0's finite: both ranks raise the same LossDiverged line at the same
    check (one all-reduce), so rank 0 neither checkpoints nor waits in its next collective."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_check_divergence_on_rank, args=(rank, loss, str(tmp_path / "store"), out))
             for rank, loss in ((0, 0.69), (1, float("nan")))]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results[1] is not None and results[1].startswith("LossDiverged: the training loss became nan on rank 1 "
                                                            "by optimizer step 7"), results
    assert results[0] == results[1], results
