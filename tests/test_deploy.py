"""Deploying a trained model, end to end on one tiny training run: ``ftdist predict`` on Ray Data
(local files, a prepared split, S3 on loopback), the Ray Serve HTTP API driven by a real HTTP
client, and parity between the service, the batch predictions and training's own test predictions.

One Ray cluster (2 CPUs) for the module, started and stopped here; Serve is shut down at the end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from conftest import NAMES, SERVE_LIMITS, base_config, free_port, synthetic_rows, write_jsonl
from exports import wait_until_healthy
from ftdist.config import PrepareSection, StorageSection, load_config
from ftdist.errors import UserError
from ftdist.inference import Predictor
from ftdist.predict import PREDICT_MARKER, PredictOptions, run_predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert, ray_module) -> dict:
    """One epoch on 300 rows (1 worker); the data keeps its text so the service can be sent it."""
    from ftdist.data.prepare import prepare
    from ftdist.launcher import run_training

    d = tmp_path_factory.mktemp("deploy")
    raw = write_jsonl(d / "raw.jsonl", synthetic_rows(300, seed=3))
    spec = PrepareSection(input=str(raw), text_field="text", label_field="label", rows_per_shard=100, keep_text=True)
    prepare(spec, str(d / "ds"), tiny_bert, 24, "sequence-classification", StorageSection(), label_names=NAMES)
    cfg = load_config(data=base_config(tiny_bert, str(d / "ds"), str(d / "runs"), run={"name": "dep"},
                                       train={"epochs": 1, "batch_size": 16},
                                       scaling={"num_workers": 1, "cpus_per_worker": 1}))
    run_training(cfg)
    run = d / "runs" / "dep"
    test = pa.concat_tables([pq.read_table(f) for f in sorted((d / "ds" / "test").glob("*.parquet"))]).to_pylist()
    preds = {r["sample_id"]: r for r in map(json.loads, (run / "test_predictions.jsonl").read_text().splitlines())}
    return {"dir": d, "run": str(run), "data": str(d / "ds"), "test": test, "train_preds": preds}


@pytest.fixture(scope="module")
def service(trained) -> str:
    from ftdist.serve import Limits, ServeOptions, start, stop

    port = free_port()
    opts = ServeOptions(model=trained["run"], port=port, cpus_per_replica=0.5, max_batch_size=16,
                        limits=Limits(**SERVE_LIMITS))
    _, started = start(opts, say=lambda _: None)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(url, 60)
    yield url
    stop(started)
    with pytest.raises(requests.ConnectionError):  # drained and gone: nothing listens any more
        requests.get(f"{url}/healthz", timeout=5)


def read_output(out: Path) -> list[dict]:
    return pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("part-*.parquet"))]).to_pylist()


def test_served_batch_and_training_predictions_agree_on_every_test_row(trained, service, tmp_path):
    test, train_preds = trained["test"], trained["train_preds"]
    assert len(test) >= 20 and set(train_preds) == {r["sample_id"] for r in test}
    # the service, sent the test texts in requests of up to 8 (its limit), concurrently batched or not
    served = {}
    for i in range(0, len(test), 8):
        chunk = test[i:i + 8]
        r = requests.post(f"{service}/predict", json={"texts": [row["text"] for row in chunk]}, timeout=60)
        assert r.status_code == 200, r.text
        served.update({row["sample_id"]: p for row, p in zip(chunk, r.json()["predictions"])})
    # ftdist predict on the prepared split (its stored token ids) and on the raw test texts
    run_predict(PredictOptions(model=trained["run"], input=f"{trained['data']}/test", output=str(tmp_path / "split"),
                               batch_size=7, cpus_per_worker=0.5), progress=lambda _: None)
    by_ids = {r["id"]: r for r in read_output(tmp_path / "split")}
    raw = write_jsonl(tmp_path / "test.jsonl", [{"id": r["sample_id"], "text": r["text"]} for r in test])
    run_predict(PredictOptions(model=trained["run"], input=str(raw), output=str(tmp_path / "text"), batch_size=5,
                               cpus_per_worker=0.5), progress=lambda _: None)
    by_text = {r["id"]: r for r in read_output(tmp_path / "text")}
    assert set(served) == set(by_ids) == set(by_text) == set(train_preds)
    for sid, want in train_preds.items():
        for got in (served[sid], by_ids[sid], by_text[sid]):
            assert got["label_id"] == want["prediction"] and got["label"] == NAMES[want["prediction"]], sid
            assert got["scores"] == pytest.approx(want["scores"], abs=1e-4), sid


def test_http_api_refuses_bad_requests_with_one_line_4xx(service):
    ok = requests.post(f"{service}/predict", json={"text": "the car was great"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["prediction"]["label"] in NAMES
    assert math.isclose(sum(ok.json()["prediction"]["scores"]), 1.0, abs_tol=1e-5)
    cases = [
        (b'{"texts": ["a", ', 400, "malformed JSON"),
        (b"\xff\xfe not utf-8", 400, "malformed JSON"),
        (json.dumps({"texts": []}).encode(), 422, "'texts' is empty"),
        (json.dumps({"texts": ["ok", 3]}).encode(), 422, "texts[1] must be a string, got int"),
        (json.dumps({"text": None}).encode(), 422, "'text' must be a string"),
        (json.dumps({"texts": "one string"}).encode(), 422, "'texts' must be a list"),
        (json.dumps(["a", "b"]).encode(), 422, "must be a JSON object"),
        (json.dumps({"text": "a", "extra": 1}).encode(), 422, "must be a JSON object"),
        (json.dumps({"texts": ["a"] * 9}).encode(), 413, "9 texts in one request; at most 8"),
        (json.dumps({"text": "great " * 1000}).encode(), 413, "has 6000 characters; at most 2000"),
        (b"x" * 300_000, 413, "exceeds"),
    ]
    for body, status, reason in cases:
        r = requests.post(f"{service}/predict", data=body, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status, (body[:40], r.status_code, r.text[:200])
        error = r.json()["error"]
        assert reason in error and "\n" not in error and "Traceback" not in r.text, error
    assert requests.get(f"{service}/predict", timeout=30).status_code == 405
    assert requests.get(f"{service}/nope", timeout=30).status_code == 404
    # a text within the character limit but past max_length tokens is truncated as in training
    long = requests.post(f"{service}/predict", json={"text": "great " * 300}, timeout=30)
    assert long.status_code == 200
    meta = requests.get(f"{service}/metadata", timeout=30).json()
    assert meta["label_names"] == NAMES and meta["max_length"] == 24 and meta["task"] == "sequence-classification"
    assert meta["version"] == ok.json()["version"] and meta["version"].startswith("dep-")
    assert meta["limits"] == {"max_texts": 8, "max_text_chars": 2000}
    assert requests.get(f"{service}/healthz", timeout=30).json() == {"status": "ok"}


def test_predict_streams_text_files_into_shards_with_progress(trained, tmp_path):
    rows = [{"id": f"r{i}", "text": r["text"], "other": i} for i, r in enumerate(synthetic_rows(230, seed=9))]
    raw = write_jsonl(tmp_path / "in.jsonl", rows)
    lines: list[str] = []
    import ftdist.predict as predict

    predict.PROGRESS_EVERY_S = 0.0  # a progress line per batch, so that a short test sees several
    try:
        record = run_predict(PredictOptions(model=trained["run"], input=str(raw), output=str(tmp_path / "out"),
                                            batch_size=20, rows_per_file=100, cpus_per_worker=0.5), progress=lines.append)
    finally:
        predict.PROGRESS_EVERY_S = 5.0
    out = read_output(tmp_path / "out")
    assert sorted(r["id"] for r in out) == sorted(r["id"] for r in rows)  # one output row per input row
    assert record["rows"] == 230 and record["files"] == 3 and (tmp_path / "out" / "part-00002.parquet").exists()
    assert json.loads((tmp_path / "out" / PREDICT_MARKER).read_text())["rows"] == 230
    p = Predictor(trained["run"])
    want = {r["id"]: s for r, s in zip(rows, p.predict_texts([r["text"] for r in rows]))}
    for r in out:
        assert r["label"] == want[r["id"]]["label"] and r["scores"] == pytest.approx(want[r["id"]]["scores"], abs=1e-5)
    middle = [line for line in lines if "/~230 rows" in line]  # the JSONL size gives an estimated total
    assert middle and all("rows/s" in line and "ETA" in line for line in middle), lines
    # a second run into the same output is refused; --overwrite replaces it
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        run_predict(PredictOptions(model=trained["run"], input=str(raw), output=str(tmp_path / "out")))
    # a row whose text is not a string fails the job with one line naming the row
    write_jsonl(tmp_path / "bad.jsonl", rows[:50] + [{"id": "broken", "text": None, "other": 0}] + rows[50:60])
    with pytest.raises(UserError, match=r"input row with id 'broken': field 'text' is NoneType, not text"):
        run_predict(PredictOptions(model=trained["run"], input=str(tmp_path / "bad.jsonl"), cpus_per_worker=0.5,
                                   output=str(tmp_path / "out2")), progress=lambda _: None)


def test_predict_reads_model_and_parquet_from_s3_and_writes_there(trained, s3_server, s3_bucket, tmp_path):
    fs = s3_server.fs()
    bucket = s3_bucket.removeprefix("s3://")
    fs.put(f"{trained['run']}/model", f"{bucket}/models/dep", recursive=True)
    rows = [{"id": i, "text": r["text"]} for i, r in enumerate(synthetic_rows(60, seed=4))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    fs.put(str(tmp_path / "in.parquet"), f"{bucket}/in/part-0.parquet")
    cfg = StorageSection(endpoint_url=s3_server.endpoint)
    record = run_predict(PredictOptions(model=f"{s3_bucket}/models/dep", input=f"{s3_bucket}/in",
                                        output=f"{s3_bucket}/out", cpus_per_worker=0.5, storage=cfg),
                         progress=lambda _: None)
    assert record["rows"] == 60
    fs.get(f"{bucket}/out", str(tmp_path / "out"), recursive=True)
    assert sorted(r["id"] for r in read_output(tmp_path / "out")) == list(range(60))
    assert json.loads((tmp_path / "out" / PREDICT_MARKER).read_text())["version"].startswith("dep-")
