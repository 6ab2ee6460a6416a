"""``ftdist predict --overwrite`` on a real Ray cluster: the new output is written beside the old one
and swapped in only when complete, so a rerun that fails (or is interrupted) leaves the previous
output byte for byte, on local disk and on S3 (moto server on loopback). Also: ids keep their exact
form (CSV ids are text), a UTF-8-BOM CSV and a JSONL starting with a blank line are read as written.

One Ray cluster (2 CPUs) for the module; inputs are a few rows, so each run is one small batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from exports import export_tiny
from ftdist.config import StorageSection
from ftdist.errors import UserError
from ftdist.predict import PREDICT_MARKER, PredictOptions, run_predict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_bert) -> str:
    return export_tiny(tiny_bert, tmp_path_factory.mktemp("overwrite") / "run" / "model")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _ids(folder: Path) -> list:
    return pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("part-*.parquet"))]).column("id").to_pylist()


def _no_staging_left(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".")], list(parent.iterdir())


def test_ctrl_c_of_a_real_predict_leaves_the_previous_output_and_says_so(model, tmp_path):
    """SIGINT to the process group of a running ``ftdist predict --overwrite`` (what Ctrl-C in a terminal
    sends): exit 130, the line interrupted_message promises, the previous output byte for byte.
    First in the module: the subprocess starts its own Ray before this module's cluster exists."""
    import os
    import signal
    import subprocess
    import sys
    import time

    rows = tmp_path / "many.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "text": f"row {i} " * 20}) + "\n" for i in range(50_000)))
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_bytes(b"previous shard")
    (out / PREDICT_MARKER).write_text("{}")
    before = _files(out)
    cmd = [sys.executable, "-c", "import sys; from ftdist.cli import main; sys.exit(main())", "predict", model, "--input", str(rows), "--output", str(out),
           "--overwrite", "--batch-size", "8", "--cpus-per-worker", "0.5"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stderr is not None
    try:
        for line in proc.stderr:  # the header comes once Ray runs the job
            if line.startswith("[ftdist] predict:"):
                break
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 130, err
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "ftdist: interrupted; the partial output was removed" in err.strip().splitlines()[-1], err
    assert _files(out) == before
    _no_staging_left(tmp_path)


def test_failing_or_interrupted_rerun_leaves_the_previous_local_output(model, ray_module, tmp_path):
    import ftdist.predict as predict

    bom_csv = tmp_path / "ids.csv"  # Excel's "CSV UTF-8": a byte-order mark; ids with leading zeros
    bom_csv.write_bytes(b"\xef\xbb\xbfid,text\n007,good movie\n008,bad movie\n010,fine\n")
    out = tmp_path / "out"
    opts = PredictOptions(model=model, input=str(bom_csv), output=str(out), cpus_per_worker=0.5, batch_size=2)
    assert run_predict(opts, progress=lambda _: None)["rows"] == 3
    assert sorted(_ids(out)) == ["007", "008", "010"]  # text, as written: they join back to the input
    before = _files(out)

    bad = tmp_path / "bad.jsonl"  # fails inside Ray on its first row, after the job has started
    bad.write_text(json.dumps({"id": 1, "text": None}) + "\n" + json.dumps({"id": 2, "text": "ok"}) + "\n")
    with pytest.raises(UserError, match="input row with id 1: field 'text' is NoneType"):
        run_predict(PredictOptions(model=model, input=str(bad), output=str(out), overwrite=True,
                                   cpus_per_worker=0.5), progress=lambda _: None)
    assert _files(out) == before
    _no_staging_left(tmp_path)

    blank_first = tmp_path / "blank.jsonl"  # a blank first line is skipped, as Arrow's reader skips it
    blank_first.write_text("\n" + "".join(json.dumps({"id": i, "text": f"row {i}"}) + "\n" for i in range(5)))
    again = PredictOptions(model=model, input=str(blank_first), output=str(out), overwrite=True, cpus_per_worker=0.5,
                           batch_size=2, rows_per_file=2)
    predict.PROGRESS_EVERY_S = 0.0  # a progress line per batch: Ctrl-C arrives after the first shard is written

    def ctrl_c(line: str) -> None:
        if not line.startswith("predict:"):
            raise KeyboardInterrupt

    try:
        with pytest.raises(KeyboardInterrupt):
            run_predict(again, progress=ctrl_c)
    finally:
        predict.PROGRESS_EVERY_S = 5.0
    assert _files(out) == before  # what interrupted_message promises
    _no_staging_left(tmp_path)
    from ftdist.cli import interrupted_message

    assert "partial output was removed" in interrupted_message("predict")

    assert run_predict(again, progress=lambda _: None)["rows"] == 5  # the rerun replaces the output
    assert sorted(_ids(out)) == list(range(5)) and sorted(_files(out)) == [
        PREDICT_MARKER, "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    # the folder is a Parquet data set as it is: readers skip the marker ('_' prefix), as pandas does
    assert pq.read_table(str(out)).num_rows == 5 and len(pd.read_parquet(str(out))) == 5
    _no_staging_left(tmp_path)


def test_failing_rerun_leaves_the_previous_s3_output(model, ray_module, s3_server, s3_bucket, tmp_path):
    fs = s3_server.fs()
    bucket = s3_bucket.removeprefix("s3://")
    # an earlier ftdist's output (its marker had no '_' prefix) is replaced like any other
    old = {"part-00000.parquet": b"old shard 0", "part-00001.parquet": b"old shard 1", "ftdist_predict.json": b"{}"}
    for name, data in old.items():
        fs.pipe(f"{bucket}/scored/{name}", data)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"id": f"r{i}", "text": f"row {i}"}) + "\n" for i in range(3)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "text": 5}) + "\n")
    cfg = StorageSection(endpoint_url=s3_server.endpoint)

    def snapshot() -> dict[str, bytes]:
        fs.invalidate_cache()
        return {p.rsplit("/", 1)[-1]: fs.cat_file(p) for p in fs.find(bucket)}

    with pytest.raises(UserError, match="input row with id 'x'"):
        run_predict(PredictOptions(model=model, input=str(bad), output=f"{s3_bucket}/scored", overwrite=True,
                                   cpus_per_worker=0.5, storage=cfg), progress=lambda _: None)
    assert snapshot() == old  # untouched, and no staged prefix left in the bucket

    run_predict(PredictOptions(model=model, input=str(rows), output=f"{s3_bucket}/scored/", overwrite=True,
                               cpus_per_worker=0.5, storage=cfg), progress=lambda _: None)
    new = snapshot()
    assert sorted(new) == [PREDICT_MARKER, "part-00000.parquet"]  # the stale shard is gone
    assert json.loads(new[PREDICT_MARKER])["rows"] == 3
    fs.get(f"{bucket}/scored/part-00000.parquet", str(tmp_path / "p.parquet"))
    assert sorted(pq.read_table(tmp_path / "p.parquet").column("id").to_pylist()) == ["r0", "r1", "r2"]


def test_a_jsonl_row_arrow_cannot_read_is_named_by_its_line(model, ray_module, tmp_path):
    """Ray's reader fails on such a row and its fallback parser reports its own error ("Extra data:
    line 2 column 1"); the driver then finds the row itself and names it."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "text": "a"}\n\n{"id": 2, "text": "\\udc80"}\n')
    with pytest.raises(UserError, match="input '.*bad.jsonl' line 3: field 'text' holds an unpaired surrogate"):
        run_predict(PredictOptions(model=model, input=str(bad), output=str(tmp_path / "o"), cpus_per_worker=0.5),
                    progress=lambda _: None)
    assert not (tmp_path / "o").exists()
