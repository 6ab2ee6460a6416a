"""``ftdist init --csv FILE`` (ftdist/starter.py): the starter config a new user's own CSV gets.

The config must load, name the right columns and encoding, and prepare the file as written; bad
input is one line and exit 2 with nothing written; the column detection holds for any column order
and names (property test)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import synthetic_rows
from ftdist.cli import main
from ftdist.config import StorageSection, load_config
from ftdist.starter import detect, run_name


def _write_csv(path: Path, header: list[str], rows: list[list[object]], encoding: str = "utf-8") -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    path.write_bytes(buf.getvalue().encode(encoding))
    return path


def _tickets(path: Path, encoding: str = "utf-8", n: int = 120) -> Path:
    """A support-ticket CSV: an id, a date, the text (with an accented word) and its label."""
    rows = [[r["id"], f"2026-01-{r['id'] % 28 + 1:02d}", r["text"] + " café", r["label"]] for r in synthetic_rows(n)]
    return _write_csv(path, ["ticket_id", "opened", "body", "label"], rows, encoding)


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "latin-1"])
def test_the_starter_config_loads_names_the_columns_and_prepares_as_written(encoding, tmp_path, tiny_bert, capsys,
                                                                           monkeypatch):
    from ftdist.data.prepare import prepare

    data = _tickets(tmp_path / "my tickets.csv", encoding)
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--csv", str(data), "--model", tiny_bert]) == 0
    out = capsys.readouterr().out
    assert "wrote my-tickets.yaml: text column 'body', label column 'label' (3 classes)" in out, out
    cfg = load_config(str(tmp_path / "my-tickets.yaml"), [])
    assert cfg.run.name == "my-tickets" and cfg.model.path == tiny_bert
    spec = cfg.data.prepare
    assert spec is not None and (spec.text_field, spec.label_field) == ("body", "label")
    assert spec.encoding == encoding and spec.input == str(data)
    manifests = prepare(spec, str(tmp_path / "ds"), cfg.model.path, cfg.data.max_length, cfg.model.task,
                        StorageSection())
    assert sum(m.num_rows for m in manifests.values()) == 120
    assert manifests["train"].label_names == ["negative", "neutral", "positive"]
    text = (tmp_path / "my-tickets.yaml").read_text()
    assert "Not used: ticket_id, opened" in text and "ftdist train my-tickets.yaml" in text


def test_named_columns_and_output_are_taken_as_given(tmp_path, capsys):
    data = _write_csv(tmp_path / "t.csv", ["a", "b", "c"],
                      [[f"text number {i} is here", f"note {i % 4}", "x" if i % 2 else "y"] for i in range(40)])
    out = tmp_path / "conf" / "mine.yaml"
    out.parent.mkdir()
    assert main(["init", "--csv", str(data), "--output", str(out), "--text", "b", "--label", "c"]) == 0
    spec = load_config(str(out), []).data.prepare
    assert spec is not None and (spec.text_field, spec.label_field) == ("b", "c")


@pytest.mark.parametrize("case, fragment", [
    ("missing", "does not exist"),
    ("numbers only", "no column holds text"),
    ("no label", "no column looks like a label"),
    ("one class", "has 1 distinct value"),
    ("blank first line", "first line must name the columns"),
    ("no rows", "no rows under the header"),
    ("unknown --label", "--label 'rating' is not a column"),
    ("output exists", "exists; pass another --output, or --force"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, fragment, tmp_path, capsys):
    data = tmp_path / "in.csv"
    args: list[str] = []
    if case == "numbers only":
        _write_csv(data, ["x", "y"], [[i, i % 3] for i in range(30)])
    elif case == "no label":
        _write_csv(data, ["id", "text"], [[i, f"a text with a number {i}"] for i in range(30)])
    elif case == "one class":
        _write_csv(data, ["text", "label"], [[f"text {i} words", "same"] for i in range(30)])
    elif case == "blank first line":
        data.write_text("\n\ntext,label\n")
    elif case == "no rows":
        data.write_text("text,label\n")
    elif case in ("unknown --label", "output exists"):
        _tickets(data)
        args = ["--label", "rating"] if case == "unknown --label" else []
        if case == "output exists":
            (tmp_path / "out.yaml").write_text("mine: keep\n")
    out = tmp_path / "out.yaml"
    before = out.read_text() if out.exists() else None
    assert main(["init", "--csv", str(data), "--output", str(out), *args]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ftdist: error:") and fragment in lines[0], err
    assert (out.read_text() if out.exists() else None) == before  # nothing written or replaced


def test_force_replaces_the_output(tmp_path, capsys):
    data = _tickets(tmp_path / "in.csv")
    out = tmp_path / "out.yaml"
    out.write_text("old: true\n")
    assert main(["init", "--csv", str(data), "--output", str(out), "--force"]) == 0
    assert yaml.safe_load(out.read_text())["data"]["prepare"]["text_field"] == "body"


def test_max_length_covers_the_texts_as_a_power_of_two():
    def found(chars: int) -> int:
        rows = "\n".join(f"{'w' * chars},{i % 2}" for i in range(20))
        return detect(f"text,label\n{rows}\n", "utf-8").max_length

    assert [found(c) for c in (10, 200, 1000, 100_000)] == [32, 64, 256, 512]


@pytest.mark.parametrize("name, want", [("my tickets.csv", "my-tickets"), ("2026_export.csv.gz", "run-2026_export"),
                                        ("s3://b/p/Reviews.tsv", "Reviews")])
def test_run_name_from_the_file_name(name, want):
    assert run_name(name) == want


WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(classes=st.lists(WORD, min_size=2, max_size=6, unique=True),
       names=st.lists(WORD, min_size=4, max_size=4, unique=True),
       order=st.permutations(range(4)), n=st.integers(12, 80), seed=st.integers(0, 1000))
def test_detection_finds_the_text_and_label_whatever_the_columns_are_called(classes, names, order, n, seed):
    """Columns: an id (numeric, unique), a number, the text (the longest) and the label (few values),
    under any names and in any order: the text and label are found."""
    import random

    rng = random.Random(seed)
    columns = [
        [str(i) for i in range(n)],  # an id
        [f"{rng.uniform(0, 5):.2f}" for _ in range(n)],  # a score
        [" ".join(rng.choice(["good", "bad", "fine", "slow", "late"]) for _ in range(rng.randint(4, 12)))
         for _ in range(n)],  # the text
        [classes[i % len(classes)] for i in range(n)],  # the label, every class present
    ]
    header = [names[k] for k in order]
    rows = list(zip(*[columns[k] for k in order], strict=True))
    buf = io.StringIO()
    csv.writer(buf).writerows([header, *rows])
    found = detect(buf.getvalue(), "utf-8")
    assert (found.text, found.label) == (names[2], names[3])
    assert found.classes == sorted(classes) and found.rows == n


def test_a_column_called_a_label_wins_over_one_with_fewer_values():
    rows = "\n".join(f"a longer text about order {i},{'email' if i % 2 else 'phone'},{'abcd'[i % 4]}" for i in range(40))
    found = detect(f"text,channel,category\n{rows}\n", "utf-8")
    assert (found.text, found.label, found.unused) == ("text", "category", ["channel"])
