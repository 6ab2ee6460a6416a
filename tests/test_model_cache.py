"""An ``s3://`` model is downloaded once per node: several workers on one node with a cold cache
must not delete the folder another is loading from (one download under a file lock, published
atomically)."""

from __future__ import annotations

import multiprocessing as mp
import os

import pytest

from ftdist.config import StorageSection


def _resolve_and_load(uri: str, endpoint: str, cache: str, barrier, out) -> None:
    os.environ["FTDIST_CACHE"] = cache
    try:
        from transformers import AutoModel

        from ftdist import modeling

        modeling.CACHE_DIR = cache
        barrier.wait(timeout=60)  # every process finds the cache cold at the same moment
        local = modeling.resolve_model_path(uri, StorageSection(endpoint_url=endpoint))
        seen = os.stat(local).st_ino  # the folder this process loads from
        for _ in range(5):  # keep loading: a concurrent re-download would pull the folder away
            AutoModel.from_pretrained(local)
        out.put(("ok", local, (seen, os.stat(local).st_ino)))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        out.put(("error", f"{type(e).__name__}: {e}", []))


@pytest.mark.slow
def test_workers_on_one_node_share_one_download(s3_server, s3_bucket, tiny_bert, tmp_path):
    fs = s3_server.fs()
    fs.put(tiny_bert, f"{s3_bucket[5:]}/models/tiny", recursive=True)
    uri = f"{s3_bucket}/models/tiny"
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    n = 4
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_resolve_and_load, args=(uri, s3_server.endpoint, cache, barrier, out))
             for _ in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    errors = [r[1] for r in results if r[0] != "ok"]
    assert not errors, errors
    assert len({r[1] for r in results}) == 1
    # Every process loaded the same published folder, and nobody replaced it afterwards: one download.
    inodes = {ino for r in results for ino in r[2]}
    assert len(inodes) == 1, f"the cached model folder was replaced {len(inodes) - 1} time(s) while in use"
    # one published folder, no leftovers of other downloads
    models = os.path.join(cache, "models")
    assert [d for d in os.listdir(models) if not d.endswith(".lock")] == [os.path.basename(results[0][1])]
