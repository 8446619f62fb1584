"""Splittable reading: a glob of manifests, read in parts (CSV files, runs of Parquet row groups) on any
worker, with the duplicate-id rule of one listing (the first file in sorted order, then the first row, wins)
and every row counted as it is read."""

from __future__ import annotations

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms import manifests
from transforms.io import DEAD, ReadInputs
from transforms.manifests import manifest_parts


def write_parquet(path, ids, uris, row_group_size):
    pq.write_table(pa.table({"id": ids, "uri": uris}), path, row_group_size=row_group_size)


def test_a_glob_of_manifests_is_read_in_parts_with_the_first_listed_id_kept(tmp_path, monkeypatch):
    images = tmp_path / "img"
    images.mkdir()
    for name in "abcdefgh":
        (images / f"{name}.jpg").write_bytes(name.encode())
    write_parquet(tmp_path / "m1.parquet", ["x", "y"], ["img/a.jpg", "img/b.jpg"], 5)
    # m2: row groups of 2 rows, parts of 2 rows: its duplicate of x loses to m1's, its own second "z" (in a later
    # part) to its first; m3 is listed after m2 and its "w" loses to m2's
    write_parquet(tmp_path / "m2.parquet", ["z", "x", "w", "q", "z"],
                  ["img/c.jpg", "img/d.jpg", "img/e.jpg", "img/missing.jpg", "img/f.jpg"], 2)
    write_parquet(tmp_path / "m3.parquet", ["w", "v"], ["img/g.jpg", "img/h.jpg"], 1)
    (tmp_path / "m4.csv").write_text("id,uri\nx,img/a.jpg\n")  # not matched by the glob
    monkeypatch.setattr(manifests, "PART_ROWS", 2)
    assert [p.row_groups for p in manifest_parts(1, str(tmp_path / "m2.parquet"))] == [(0, 1), (1, 2), (2, 3)]

    source = str(tmp_path / "m*.parquet")
    manifests.check_source(source)
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | ReadInputs(source, max_bytes=100)
        kept = out["records"] | "Kept" >> beam.Map(lambda r: (r.id, r.uri.rsplit("/", 1)[-1], r.data))
        dead = out[DEAD] | "Dead" >> beam.Map(lambda d: (d.id, d.uri.rsplit("/", 1)[-1], d.error.split(":")[0]))
        assert_that(kept, equal_to([("x", "a.jpg", b"a"), ("y", "b.jpg", b"b"), ("z", "c.jpg", b"c"),
                                    ("w", "e.jpg", b"e"), ("v", "h.jpg", b"h")]), label="kept")
        assert_that(dead, equal_to([("x", "d.jpg", "duplicate id 'x'"), ("z", "f.jpg", "duplicate id 'z'"),
                                    ("w", "g.jpg", "duplicate id 'w'"), ("q", "missing.jpg", "file not found")]),
                    label="dead")
    listed = p.result.metrics().query(MetricsFilter().with_name("inputs_listed"))["counters"]
    assert sum(c.committed for c in listed) == 9  # 2 + 5 + 2 rows: inputs = records + dead letters


def test_ids_of_earlier_runs_are_skipped_through_the_grouping_by_id(tmp_path):
    """``done`` files (an earlier run's tables) join the grouping by id: every row of a done id is skipped and
    counted, duplicates of it included; the other ids keep the first-listed rule."""
    for name in "abcd":
        (tmp_path / f"{name}.jpg").write_bytes(name.encode())
    write_parquet(tmp_path / "m.parquet", ["x", "y", "x", "z", "z"],
                  ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "a.jpg"], 2)
    pq.write_table(pa.table({"id": ["x", "q"], "pred_class": [1, 2]}), tmp_path / "done.parquet")
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | ReadInputs(str(tmp_path / "m.parquet"), max_bytes=100, done=[str(tmp_path / "done.parquet")])
        kept = out["records"] | "Kept" >> beam.Map(lambda r: (r.id, r.uri.rsplit("/", 1)[-1]))
        dead = out[DEAD] | "Dead" >> beam.Map(lambda d: (d.id, d.uri.rsplit("/", 1)[-1]))
        assert_that(kept, equal_to([("y", "b.jpg"), ("z", "d.jpg")]), label="kept")
        assert_that(dead, equal_to([("z", "a.jpg")]), label="dead")
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query(MetricsFilter())["counters"]
                if c.key.metric.name in ("inputs_listed", "inputs_skipped")}
    assert counters == {"inputs_listed": 5, "inputs_skipped": 2}  # 5 = 2 skipped + 2 records + 1 dead letter


def test_skip_done_skips_every_row_of_a_done_id_before_any_verdict_on_it(tmp_path):
    """Rows an earlier run has the ids of are skipped whatever happened to them while listing: a row without a
    uri, a label that is no class index, a duplicate; a row that cannot be parsed is keyed MANIFEST#LINE and
    skipped by that key. The other ids: the first row decides, later rows are ``duplicate_id``."""
    for name in "ab":
        (tmp_path / f"{name}.jpg").write_bytes(name.encode())
    manifest = tmp_path / "m.csv"
    manifest.write_text('id,uri,label\nx,,1\ny,a.jpg,99\nx,b.jpg,1\n"broken,a.jpg,1\nz,a.jpg,1\nz,b.jpg,2\n'
                        'w,,1\nw,a.jpg,1\n', newline="")
    broken = f"{manifest}#5"
    pq.write_table(pa.table({"id": ["x", "y", broken]}), tmp_path / "done.parquet")
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | ReadInputs(str(manifest), max_bytes=100, num_classes=10, done=[str(tmp_path / "done.parquet")])
        kept = out["records"] | "Kept" >> beam.Map(lambda r: (r.id, r.uri.rsplit("/", 1)[-1], r.label))
        dead = out[DEAD] | "Dead" >> beam.Map(lambda d: (d.id, d.uri.rsplit("/", 1)[-1], d.category.value))
        assert_that(kept, equal_to([("z", "a.jpg", 1)]), label="kept")
        assert_that(dead, equal_to([("z", "b.jpg", "duplicate_id"), ("w", "m.csv#8", "bad_manifest_row"),
                                    ("w", "a.jpg", "duplicate_id")]), label="dead")
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query(MetricsFilter())["counters"]
                if c.key.metric.name in ("inputs_listed", "inputs_skipped")}
    assert counters == {"inputs_listed": 8, "inputs_skipped": 4}  # 8 = 4 skipped + 1 record + 3 dead letters


def test_limit_keeps_the_first_n_inputs_in_listing_order_across_parts(tmp_path, monkeypatch):
    """``--limit 5`` over a glob of manifests read in parts: the first 5 inputs in listing order (files by
    name, then rows), whichever worker read them; the other rows the parts read are counted beyond the limit
    (each part reads at most 5), so inputs listed = beyond + records + dead letters."""
    images = tmp_path / "img"
    images.mkdir()
    for i in range(12):
        (images / f"{i}.jpg").write_bytes(b"%d" % i)
    write_parquet(tmp_path / "m1.parquet", ["a", "b", "c"], [f"img/{i}.jpg" for i in range(3)], 1)
    write_parquet(tmp_path / "m2.parquet", ["d", "e", "f", "g", "h", "i", "j"], [f"img/{i}.jpg" for i in range(3, 10)],
                  2)
    write_parquet(tmp_path / "m3.parquet", ["k", "l"], ["img/10.jpg", "img/11.jpg"], 1)
    monkeypatch.setattr(manifests, "PART_ROWS", 2)
    with TestPipeline(runner="FnApiRunner") as p:
        out = p | ReadInputs(str(tmp_path / "m*.parquet"), max_bytes=100, limit=5)
        assert_that(out["records"] | beam.Map(lambda r: r.id), equal_to(["a", "b", "c", "d", "e"]))
    metrics = p.result.metrics()
    listed = sum(c.committed for c in metrics.query(MetricsFilter().with_name("inputs_listed"))["counters"])
    beyond = sum(c.committed for c in metrics.query(MetricsFilter().with_name("inputs_beyond_limit"))["counters"])
    assert listed - beyond == 5 and beyond > 0
