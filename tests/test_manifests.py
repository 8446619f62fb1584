"""Listing rules (``transforms.manifests``, plain Python): CSV read as CSV, fuzzed against Python's ``csv``
(valid: the same records; broken: every physical line accounted for, a broken record costing only the line
it starts on); the id rule; labels that never cost a row; what is refused before any work; Parquet cells;
file names that are not UTF-8. The same rules through real pipelines are in test_robustness.py and
test_reading.py."""

from __future__ import annotations

import collections
import csv
import io
import os
import re
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transforms import manifests
from transforms.manifests import (
    check_source,
    count_inputs,
    csv_records,
    extra_fields,
    list_source,
    manifest_entries,
    normalise_id,
    read_label,
)
from transforms.records import DeadLetter, Record

BOM = b"\xef\xbb\xbf"


def fuzz(cases: int) -> settings:
    """Deterministic (the same cases on every run), no example database on disk."""
    return settings(max_examples=cases, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


def our_records(path: Path) -> list[tuple[int, int, list | None, str]]:
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:  # as manifests opens it
        return list(csv_records(fh))


def pythons_records(path: Path) -> list[list[str]] | None:
    """The oracle: Python's csv module (strict) on the file, its non-empty records; None where it fails."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            return [fields for fields in csv.reader(fh, strict=True) if fields]
    except (csv.Error, UnicodeDecodeError):
        return None


def assert_every_line_accounted_for(path: Path, records) -> None:
    """Records and dead letters cover disjoint runs of physical lines (LF, CRLF or CR), in order; a dead
    letter covers one line (the one its broken record starts on); every line not covered is empty."""
    lines = path.read_bytes().removeprefix(BOM).splitlines()
    covered, previous = set(), 0
    for first, last, fields, problem in records:
        assert (fields is None) == bool(problem), (first, fields, problem)
        assert previous < first <= last <= len(lines), (previous, first, last)
        assert fields is not None or first == last, problem
        covered |= set(range(first, last + 1))
        previous = last
    assert all(lines[n - 1] == b"" for n in set(range(1, len(lines) + 1)) - covered)


CELL = st.text(alphabet=st.sampled_from(list('ab ,"\n\r\té\x00;\'')) | st.characters(codec="utf-8"), max_size=12)


def test_a_csv_file_pythons_csv_reads_gives_exactly_its_records(tmp_path):
    outcomes = collections.Counter()

    @fuzz(500)
    @given(rows=st.lists(st.lists(CELL, min_size=1, max_size=4), max_size=8),
           quoting=st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]),
           end=st.sampled_from(["\r\n", "\n", "\r"]), bom=st.booleans(), last_end=st.booleans())
    def check(rows, quoting, end, bom, last_end):
        buf = io.StringIO()
        csv.writer(buf, quoting=quoting, lineterminator=end).writerows(rows)
        text = buf.getvalue() if last_end else buf.getvalue().removesuffix(end)
        path = tmp_path / "m.csv"
        path.write_bytes((BOM if bom else b"") + text.encode("utf-8", "surrogatepass"))
        ours, expected = our_records(path), pythons_records(path)
        assert_every_line_accounted_for(path, ours)
        if expected is not None:
            assert [fields for _, _, fields, _ in ours] == expected
        outcomes["same as csv" if expected is not None else "csv fails"] += 1

    check()
    assert outcomes["same as csv"] > 400, outcomes


SIMPLE = st.text(alphabet="abcxyz019._-", min_size=1, max_size=8)


def test_a_broken_record_costs_only_the_line_it_starts_on(tmp_path, monkeypatch):
    """Lines of a valid manifest broken by an unbalanced quote, a byte that is not UTF-8, or a length over the
    limit: each is one dead letter naming its line, and every other row reads as it would alone."""
    monkeypatch.setattr(manifests, "MAX_RECORD_CHARS", 300)

    @fuzz(300)
    @given(rows=st.lists(st.lists(SIMPLE, min_size=2, max_size=3), min_size=1, max_size=12),
           breaks=st.dictionaries(st.integers(0, 11), st.sampled_from(["quote", "quote-end", "byte", "long"]),
                                  max_size=4),
           end=st.sampled_from([b"\n", b"\r\n"]))
    def check(rows, breaks, end):
        lines = [b"uri,label,x"] + [",".join(r).encode() for r in rows]
        broken = set()
        for index, how in breaks.items():
            if index >= len(rows):
                continue
            line = lines[index + 1]
            lines[index + 1] = {"quote": b'"' + line, "quote-end": line + b',"tail', "byte": line + b"\xff",
                                "long": line + b"y" * 400}[how]
            broken.add(index + 2)  # its line number (the header is line 1)
        path = tmp_path / "m.csv"
        path.write_bytes(end.join(lines) + end)
        ours = our_records(path)
        assert_every_line_accounted_for(path, ours)
        assert {first for first, _, fields, _ in ours if fields is None} == broken
        kept = [fields for first, _, fields, _ in ours if fields is not None]
        assert kept == [["uri", "label", "x"]] + [r for i, r in enumerate(rows) if i + 2 not in broken]
        assert count_inputs(str(path))[0] == len(ours) - 1 == sum(1 for _ in manifest_entries(str(path)))

    check()


def test_quoted_separators_quotes_and_line_breaks_are_one_record(tmp_path):
    (tmp_path / "a,b.jpg").write_bytes(b"x")
    path = tmp_path / "m.csv"
    path.write_text('uri,caption,label\n"a,b.jpg","line one\nline ""two""\r\nthree",1\nc.jpg,,\n', newline="")
    entries = [e for _, e in manifest_entries(str(path), 10)]
    assert [(e.uri, e.extras, e.label) for e in entries] == [
        (str(tmp_path / "a,b.jpg"), {"caption": 'line one\nline "two"\r\nthree'}, 1),
        (str(tmp_path / "c.jpg"), {"caption": None}, None)]
    assert count_inputs(str(path)) == (2, "records of the CSV manifest after its header")
    path.write_text('uri,label\n"open.jpg,1\nd.jpg,2\n', newline="")  # a quote that never closes
    entries = [e for _, e in manifest_entries(str(path), 10)]
    assert isinstance(entries[0], DeadLetter) and entries[0].id == f"{path}#2"
    assert entries[0].error.startswith("bad manifest row: line 2: malformed CSV: a quoted field that opens on this "
                                       "line does not close properly (unexpected end of data, line 3)")
    assert isinstance(entries[1], Record) and entries[1].uri == str(tmp_path / "d.jpg") and entries[1].label == 2


# ---- ids -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell, rid", [
    (1, "1"), (1.0, "1"), ("1.0", "1"), ("12.000", "12"), (" 7 ", "7"), ("007", "007"), (-3, "-3"),
    (float("nan"), None), (None, None), ("", None), ("  ", None), ("NaN", None), (1.5, "1.5"),
    (Decimal("2.00"), "2"), (Decimal("2.50"), "2.5"), (2**62, str(2**62)), ("a b", "a b"), ("1e3", "1e3"),
])
def test_the_id_rule_normalises_every_spelling_once(cell, rid):
    assert normalise_id(cell) == rid


@pytest.mark.parametrize("cell", [True, b"x", [1], {"a": 1}])
def test_an_id_that_is_neither_text_nor_a_number_is_refused(cell):
    with pytest.raises(manifests.BadRow, match="^id is a "):
        normalise_id(cell)


def test_int_ids_one_day_and_float_ids_with_gaps_the_next_are_the_same_ids(tmp_path):
    """pandas writes an int column with a gap as float64: day 2's 1.0 is day 1's 1, and its NaN is no id
    (the uri is), never the text 'nan' (which a second NaN would duplicate)."""
    pq.write_table(pa.table({"id": pa.array([1, 2, 3]), "uri": ["a.jpg", "b.jpg", "c.jpg"]}), tmp_path / "d1.parquet")
    pq.write_table(pa.table({"id": pa.array([1.0, None, float("nan"), 3.0]), "uri": ["a.jpg", "b.jpg", "x.jpg",
                                                                                  "c.jpg"]}), tmp_path / "d2.parquet")
    (tmp_path / "d3.csv").write_text("id,uri\n1.0,a.jpg\n,b.jpg\nnan,x.jpg\n3,c.jpg\n")
    day1, day2, day3 = ([e.id for _, e in manifest_entries(str(tmp_path / f"{d}"))]
                        for d in ("d1.parquet", "d2.parquet", "d3.csv"))
    assert day1 == ["1", "2", "3"]
    assert day2 == day3 == ["1", str(tmp_path / "b.jpg"), str(tmp_path / "x.jpg"), "3"]


def test_uri_derived_ids_do_not_depend_on_how_the_manifest_path_is_written(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.jpg").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("uri\na.jpg\n./img/../a.jpg\nimg/a.jpg\n")
    monkeypatch.chdir(tmp_path)
    spellings = ["m.csv", "./m.csv", "d/../m.csv", str(tmp_path / "m.csv"), f"file://{tmp_path}/m.csv",
                 str(tmp_path / "d" / ".." / "m.csv")]
    ids = {s: [e.id for _, e in manifest_entries(s)] for s in spellings}
    assert all(i == [str(tmp_path / "a.jpg")] * 2 + [str(tmp_path / "img" / "a.jpg")] for i in ids.values()), ids
    globs = {s: [r.id for r in list_source(s)] for s in ("img/*.jpg", "./img/*.jpg", f"{tmp_path}/d/../img/*.jpg")}
    assert all(i == [str(tmp_path / "img" / "a.jpg")] for i in globs.values()), globs


@pytest.mark.parametrize("uri, normal", [
    ("file:///x/./y/../a.jpg", "/x/a.jpg"),
    ("HTTP://Example.COM/a/./b/../c.jpg?q=1/../2", "http://example.com/a/c.jpg?q=1/../2"),
    ("gs://bucket/a//b/./c.jpg", "gs://bucket/a//b/c.jpg"),  # an empty segment names another object: kept
    ("s3://bucket/x/../y.jpg", "s3://bucket/y.jpg"),
    ("/data/space.jpg ", "/data/space.jpg "),  # spaces are part of a name
])
def test_uris_are_absolute_normalised_urls(uri, normal):
    assert manifests.normalise_uri(uri) == normal


def test_a_file_name_that_is_not_utf8_lists_with_an_escaped_id(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg"), "wb") as fh:  # latin-1, not UTF-8
        fh.write(b"x")
    records = list(list_source(str(tmp_path / "*.jpg")))
    bad = next(r for r in records if "caf" in r.uri)
    assert bad.id == f"{tmp_path}/caf\\xe9.jpg" and bad.id.encode("utf-8")
    assert open(bad.uri, "rb").read() == b"x"  # the uri still opens the file
    assert DeadLetter(bad.id, bad.uri, 0, "x").as_row("r")["uri"] == bad.id


# ---- labels ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cell, label, problem", [
    ("3", 3, None), (3, 3, None), ("2.0", 2, None), (None, None, None), ("", None, None), (" ", None, None),
    ("-1", None, None), (-1, None, None), (-1.0, None, None), ("n/a", None, None), ("NA", None, None),
    ("null", None, None), ("None", None, None), (float("nan"), None, None),
    ("10", None, r"^10 is outside the model's classes 0\.\.9$"), (-2, None, r"^-2 is outside"),
    ("2.7", None, r"^2\.7 is not an integer$"), ("cat", None, r"^'cat' is not an integer$"),
    (True, None, r"^True is a boolean"), ([1], None, r"^a list"), (float("inf"), None, r"^inf is not an integer$"),
])
def test_a_label_is_a_class_index_or_the_row_is_unlabelled(cell, label, problem):
    found, why = read_label(cell, 10)
    assert found == label and (why is None) == (problem is None), why
    assert problem is None or re.search(problem, why)


# ---- refused before any work ------------------------------------------------------------------------------

@pytest.mark.parametrize("header, message", [
    ("uri,label,uri", r"names column 'uri' twice"),
    ("uri,Camera,camera", r"names column 'camera' twice \(as 'Camera' too\)"),
    ('"a\nb",uri\n', None),  # a quoted header name may hold a line break: accepted
])
def test_a_header_with_a_column_twice_is_refused_before_any_work(tmp_path, header, message):
    path = tmp_path / "m.csv"
    path.write_text(f"{header}\nx,y.jpg,z\n")
    if message is None:
        check_source(str(path))
        return
    with pytest.raises(ValueError, match=message) as err:
        check_source(str(path))
    assert str(path) in str(err.value)


def test_a_parquet_header_with_a_column_twice_is_refused(tmp_path):
    table = pa.Table.from_arrays([pa.array(["a.jpg"]), pa.array(["x"]), pa.array([1])], names=["uri", "c", "C"])
    pq.write_table(table, tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"names column 'C' twice"):
        check_source(str(tmp_path / "m.parquet"))


def test_a_glob_whose_files_disagree_on_a_column_type_is_refused_before_any_work(tmp_path):
    pq.write_table(pa.table({"uri": ["a.jpg"], "score": pa.array([1])}), tmp_path / "m1.parquet")
    pq.write_table(pa.table({"uri": ["b.jpg"], "score": pa.array([None], pa.null()), "cam": ["c"]}),
                   tmp_path / "m2.parquet")
    source = str(tmp_path / "m*.parquet")
    check_source(source)  # a column of nulls takes the others' type; a column one file lacks is null there
    assert [(f.name, f.type) for f in extra_fields(source)] == [("score", pa.int64()), ("cam", pa.string())]
    assert [e.extras for _, e in manifest_entries(str(tmp_path / "m1.parquet"), extras=["score", "cam"])] == [
        {"score": 1, "cam": None}]
    pq.write_table(pa.table({"uri": ["c.jpg"], "score": ["high"]}), tmp_path / "m3.parquet")
    with pytest.raises(ValueError, match=rf"column 'score' is int64 in {tmp_path}/m1.parquet but 'score' is string "
                                         rf"in {tmp_path}/m3.parquet"):
        check_source(source)


# ---- Parquet ---------------------------------------------------------------------------------------------

def test_a_parquet_cell_that_cannot_be_read_costs_its_row_not_its_row_group(tmp_path):
    taken = pa.array([0, 2**62, 86_400_000, None], pa.timestamp("ms"))  # 2**62 ms is past the year 9999
    pq.write_table(pa.table({"uri": [f"{i}.jpg" for i in range(4)], "taken": taken}), tmp_path / "m.parquet")
    entries = [e for _, e in manifest_entries(str(tmp_path / "m.parquet"))]
    assert [type(e).__name__ for e in entries] == ["Record", "DeadLetter", "Record", "Record"]
    assert re.match(r"^bad manifest row: row 2: column 'taken' cannot be read: ", entries[1].error)
    assert entries[2].extras["taken"].day == 2
