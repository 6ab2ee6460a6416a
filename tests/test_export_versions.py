"""Readers of an export see one complete version: the old one or the new one, never a mix, never none,
and never a stale cached copy after the export was replaced (audit 2026-12-07 D3, D21)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time

import pytest

from exports import export_tiny
from ftdist import modeling, storage
from ftdist.config import StorageSection
from ftdist.errors import UserError
from ftdist.inference import Predictor, locate_export

TEXTS = ["the car was great", "awful road today"]


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory, tiny_bert) -> tuple[str, str]:
    """Two exports of the same model with different heads (seeds), as two trainings would leave."""
    base = tmp_path_factory.mktemp("versions")
    return (export_tiny(tiny_bert, base / "a" / "model", seed=0),
            export_tiny(tiny_bert, base / "b" / "model", seed=123))


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> str:
    monkeypatch.setattr(modeling, "CACHE_DIR", str(tmp_path / "cache"))
    return str(tmp_path / "cache")


def _scores(uri: str, st: StorageSection | None = None) -> list[float]:
    return [s for r in Predictor(uri, st).predict_texts(TEXTS) for s in r["scores"]]


def test_a_replaced_export_on_s3_is_fetched_anew(two_exports, s3_server, s3_bucket, cache):
    a, b = two_exports
    st = StorageSection(endpoint_url=s3_server.endpoint)
    uri = f"{s3_bucket}/m"
    shutil.copy(os.path.join(a, "config.json"), os.path.join(a, "only-in-a.txt"))
    try:
        storage.upload_dir(a, uri, st, last="ftdist_export.json")
    finally:
        os.remove(os.path.join(a, "only-in-a.txt"))
    first = _scores(uri, st)
    assert first == pytest.approx(_scores(a), abs=1e-6)

    storage.upload_dir(b, uri, st, last="ftdist_export.json")  # a re-export to the same prefix
    assert locate_export(uri, st).version != locate_export(a).version
    second = _scores(uri, st)
    assert second == pytest.approx(_scores(b), abs=1e-6), "the cached weights of the old export answered"
    assert second != pytest.approx(first, abs=1e-6)
    # the new version's listing has no file of the old one left behind, and one cached copy remains
    assert "only-in-a.txt" not in storage.listdir(uri, st)
    assert len([d for d in os.listdir(os.path.join(cache, "models")) if not d.endswith(".lock")]) == 1


def test_an_upload_without_a_marker_keeps_the_files_already_there(s3_server, s3_bucket, tmp_path):
    """TensorBoard's folder of a resumed run on S3 gets each process's event file: publishing the new one
    must not delete the earlier process's (only a versioned publish, with a marker, replaces a folder)."""
    st = StorageSection(endpoint_url=s3_server.endpoint)
    uri = f"{s3_bucket}/run/tensorboard"
    for name in ("events.first", "events.second"):
        local = tmp_path / name
        local.mkdir()
        (local / name).write_text(name)
        storage.upload_dir(str(local), uri, st)
    assert storage.listdir(uri, st) == ["events.first", "events.second"]


def test_a_half_replaced_export_on_s3_is_never_loaded(two_exports, s3_server, s3_bucket, cache, monkeypatch):
    a, b = two_exports
    st = StorageSection(endpoint_url=s3_server.endpoint)
    uri = f"{s3_bucket}/m"
    storage.upload_dir(a, uri, st, last="ftdist_export.json")
    # Mid-upload of a re-export: B's weights are in place, A's marker still is.
    s3_server.fs().put_file(os.path.join(b, "model.safetensors"), f"{uri[5:]}/model.safetensors")
    monkeypatch.setattr(modeling, "PUBLISH_WAIT_S", 1.0)
    with pytest.raises(UserError, match="kept changing while it was downloaded"):
        modeling.resolve_model_path(uri, st)
    storage.upload_dir(b, uri, st, last="ftdist_export.json")  # the upload completes
    local = modeling.resolve_model_path(uri, st)
    with open(os.path.join(local, "model.safetensors"), "rb") as got, \
            open(os.path.join(b, "model.safetensors"), "rb") as want:
        assert got.read() == want.read()
    assert json.loads(open(os.path.join(local, "ftdist_export.json")).read())["files"]


def _watch(path: str, stop_file: str, out) -> None:
    """Count the moments ``path`` has no folder (a reader polling as fast as it can)."""
    missing = seen = 0
    while not os.path.exists(stop_file):
        seen += 1
        if not os.path.isdir(path):
            missing += 1
    out.put((missing, seen))


def test_a_local_reexport_never_leaves_a_moment_without_the_folder(two_exports, tmp_path):
    a, b = two_exports
    target = str(tmp_path / "run" / "model")
    storage.upload_dir(a, target, StorageSection())
    stop = str(tmp_path / "stop")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    reader = ctx.Process(target=_watch, args=(target, stop, out))
    reader.start()
    time.sleep(2.0)  # the reader is polling
    for i in range(300):
        storage.upload_dir(b if i % 2 else a, target, StorageSection())
    open(stop, "w").close()
    missing, seen = out.get(timeout=60)
    reader.join(timeout=30)
    assert seen > 1000, "the reader did not poll during the swaps"
    assert missing == 0, f"the export folder was missing {missing} times of {seen} looks"
    assert sorted(p for p in os.listdir(tmp_path / "run") if not p.startswith("model")) == []
