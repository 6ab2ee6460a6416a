"""``ftdist predict`` / ``ftdist serve`` on bad input: one stderr line, exit 2, before Ray starts
(fast: in-process ``ftdist.cli.main``), and the request parser the service uses (pure)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import synthetic_rows, write_jsonl
from exports import export_tiny
from ftdist.cli import main
from ftdist.serve import Limits, RequestError, parse_request


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bert) -> dict:
    root = tmp_path_factory.mktemp("deploy-cli")
    model = export_tiny(tiny_bert, root / "run" / "model")
    partial = root / "partial"
    shutil.copytree(model, partial)
    (partial / "ftdist_export.json").unlink()
    write_jsonl(root / "in.jsonl", [{"id": i, "text": r["text"]} for i, r in enumerate(synthetic_rows(5))])
    write_jsonl(root / "noid.jsonl", [{"body": r["text"]} for r in synthetic_rows(5)])
    (root / "in.txt").write_text("hello\n")
    (root / "notjson.jsonl").write_text("hello world\n")
    (root / "out").mkdir()
    (root / "out" / "part-00000.parquet").write_bytes(b"old")
    return {"root": root, "model": model, "partial": str(partial)}


def cases(w: dict) -> list[tuple[list[str], str]]:
    r, m = w["root"], w["model"]
    inp = str(r / "in.jsonl")
    return [
        (["predict", w["partial"], "--input", inp, "--output", str(r / "o1")], "not a complete ftdist export"),
        (["predict", str(r / "nowhere"), "--input", inp, "--output", str(r / "o1")], "does not exist"),
        (["predict", m, "--input", str(r / "missing.jsonl"), "--output", str(r / "o1")], "input '"),
        (["predict", m, "--input", str(r / "noid.jsonl"), "--output", str(r / "o1")], "has no column 'text'"),
        (["predict", m, "--input", str(r / "noid.jsonl"), "--text-field", "body", "--output", str(r / "o1")],
         "has no column 'id'"),
        (["predict", m, "--input", str(r / "in.txt"), "--output", str(r / "o1")], "pass --format jsonl|csv|parquet"),
        (["predict", m, "--input", str(r / "notjson.jsonl"), "--output", str(r / "o1")], "is not JSON Lines"),
        (["predict", m, "--input", inp, "--output", str(r / "out")], "already exists; pass --overwrite"),
        (["predict", m, "--input", inp, "--output", str(r / "o1"), "--batch-size", "0"], "--batch-size 0 must be >= 1"),
        (["serve", w["partial"]], "not a complete ftdist export"),
        (["serve", m, "--replicas", "0"], "--replicas 0 must be >= 1"),
        (["serve", m, "--replicas", "3", "--max-replicas", "2"], "--max-replicas 2 is below --replicas 3"),
    ]


def test_bad_input_is_one_line_exit_2_before_ray(world, capsys):
    import socket

    import ray

    ray_was_up = ray.is_initialized()  # an earlier test's in-process cluster may be running
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = str(taken.getsockname()[1])
    more = [(["serve", world["model"], "--port", port], f"cannot listen on 127.0.0.1:{port}")]
    for argv, reason in cases(world) + more:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ftdist: error: ") and reason in err, (argv, err)
        assert "Traceback" not in err
    taken.close()
    assert ray.is_initialized() == ray_was_up  # every mistake above was caught before a cluster was started
    assert (world["root"] / "out" / "part-00000.parquet").read_bytes() == b"old"  # refused, untouched


@pytest.mark.parametrize("body,status,reason", [
    (b"{", 400, "malformed JSON at line 1"),
    (b'{"texts": [["nested"]]}', 422, "texts[0] must be a string, got list"),
    (b'{"texts": []}', 422, "'texts' is empty"),
    (b'{"text": 1.5}', 422, "'text' must be a string, got float"),
    (b'{"texts": ["a", "b", "c"]}', 413, "3 texts in one request; at most 2"),
    (b'{"text": "abcdef"}', 413, "has 6 characters; at most 5"),
    (b'{"prompt": "a"}', 422, "must be a JSON object"),
])
def test_request_parser_refuses(body, status, reason):
    with pytest.raises(RequestError, match=None) as e:
        parse_request(body, Limits(max_texts=2, max_text_chars=5))
    assert e.value.status == status and reason in str(e.value), str(e.value)


def test_request_parser_accepts_one_text_or_a_list():
    limits = Limits(max_texts=2, max_text_chars=5)
    assert parse_request(json.dumps({"text": "abc"}).encode(), limits) == (["abc"], True)
    assert parse_request(json.dumps({"texts": ["a", "é"]}).encode(), limits) == (["a", "é"], False)


@pytest.mark.parametrize("command,says", [
    ("predict", "the partial output was removed and any earlier --output is untouched: rerun the same command to "
                "start over"),
    ("data", "data prepare keeps no partial state: rerun the same command to start over"),
    ("tune", "add --resume to continue the sweep"),
    ("train", "rerun the same command to resume from the latest checkpoint"),
])
def test_ctrl_c_message_says_what_a_rerun_does(command, says):
    """predict and data prepare keep no checkpoint (README, Deploying a model): their Ctrl-C line must not
    promise a resume; tests/test_predict_overwrite.py interrupts a real predict and checks what it left."""
    from ftdist.cli import interrupted_message

    line = interrupted_message(command)
    assert line.startswith("ftdist: interrupted; ") and says in line and "\n" not in line
    assert ("checkpoint" in line) == (command in ("tune", "train"))


@pytest.mark.parametrize("lines, reason", [
    (['{"id": 1, "text": "a"}', '', '{"id": "x", "text": "b"}'], "line 3: id 'x' is text but earlier rows have integer ids"),
    (['{"id": 1, "text": "a"}', '["id", 2]'], "line 2 is not a JSON object"),
    (['{"id": 1, "text": "a"}', '{"id": 2, "text": "b"} trailing'], "line 2 is not JSON (Extra data"),
])
def test_the_jsonl_row_rays_reader_failed_on_is_found(lines, reason, tmp_path):
    """What predict reports once Ray's JSON reader failed mid-stream (tests/test_predict_overwrite.py
    runs one through Ray): the file and line of the first row Arrow cannot read, on the driver."""
    from ftdist.config import StorageSection
    from ftdist.predict import PredictOptions, Source, _bad_jsonl_row

    f = tmp_path / "rows.jsonl"
    f.write_text("\n".join(lines) + "\n")
    opts = PredictOptions(model="m", input=str(f), output=str(tmp_path / "o"), storage=StorageSection())
    err = _bad_jsonl_row(Source("jsonl", [str(f)], "id", "text", None, False), opts)
    assert err is not None and str(err).startswith(f"input '{f}' {reason}"), err
    f.write_text(lines[0] + "\n")
    assert _bad_jsonl_row(Source("jsonl", [str(f)], "id", "text", None, False), opts) is None


def test_request_parser_refuses_unencodable_text_and_over_long_numbers():
    limits = Limits(max_texts=2, max_text_chars=500)  # a body limit of 13 kB: room for 5,000 digits
    for body, status, reason in [(b'{"text": "\\ud800a"}', 422, "'text' cannot be encoded as UTF-8"),
                                 (b'{"texts": ["a", "b\\udfff"]}', 422, "texts[1] cannot be encoded as UTF-8"),
                                 (b'{"texts": [' + b"9" * 5000 + b"]}", 422, "a number too long to read")]:
        with pytest.raises(RequestError) as e:
            parse_request(body, limits)
        assert e.value.status == status and reason in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_body_limit_admits_every_request_within_the_text_limits():
    # the worst case per character: an astral character as a 12-byte surrogate-pair escape
    body = json.dumps({"texts": ["\U0001F600" * 10_000] * 64}).encode()
    texts, single = parse_request(body, Limits())
    assert len(texts) == 64 and not single and len(body) <= Limits().max_body_bytes


def test_a_failing_request_fails_alone_in_a_batch(world):
    from ftdist.inference import Predictor
    from ftdist.serve import predict_each

    p = Predictor(world["model"])
    with pytest.raises(TypeError):  # what the tokenizer does with a lone surrogate: the whole batch fails
        p.predict_texts(["good", "\ud800", "fine"])
    out = predict_each(p.predict_texts, [["good"], ["\ud800"], ["fine", "ok"]], chunk=2)
    assert isinstance(out[1], TypeError)
    assert out[0] == p.predict_texts(["good"]) and out[2] == p.predict_texts(["fine", "ok"])


@pytest.mark.parametrize("flags,reason", [
    (["--port", "70000"], "argument --port: 70000 is not a port (1-65535)"),
    (["--port", "0"], "argument --port: 0 is not a port (1-65535)"),
    (["--cpus-per-replica", "0"], "argument --cpus-per-replica: '0' is not a positive number"),
    (["--cpus-per-replica", "nan"], "argument --cpus-per-replica: 'nan' is not a positive number"),
    (["--cpus-per-replica", "inf"], "argument --cpus-per-replica: 'inf' is not a positive number"),
    (["--batch-wait-ms", "-5"], "argument --batch-wait-ms: '-5' is not a number >= 0"),
    (["--batch-wait-ms", "nan"], "argument --batch-wait-ms: 'nan' is not a number >= 0"),
])
def test_serve_flags_out_of_range_are_one_line_exit_2(world, capsys, flags, reason):
    import ray

    ray_was_up = ray.is_initialized()
    with pytest.raises(SystemExit) as e:  # argparse refuses them: no model is loaded, no Ray started
        main(["serve", world["model"], *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("ftdist: error: ") and reason in err, err
    assert ray.is_initialized() == ray_was_up
