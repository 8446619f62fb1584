"""Outputs analysts can trust: one real run on labelled sample images with unreadable inputs and a Parquet
manifest of its own columns, read back with DuckDB, Polars and pandas exactly as the README shows; the
files' compression and metadata; the run report; the plan before the run; incomplete runs; the commands'
help."""

from __future__ import annotations

import datetime
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import cascade, common, report, run_report
from transforms.manifests import count_inputs

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = [0.5, 0.25, 0.25]  # far from what clean images do: the report must warn
CONFIG = f"""stages:
  - {{model: lite0, resolution: 224, batch_size: 4, threshold: 0.2836400395387615}}
  - {{model: lite1, resolution: 240, batch_size: 4, threshold: 0.1967618632021696}}
  - {{model: lite2, resolution: 260, batch_size: 4}}
calibration:
  target: match:lite2@260
  data: a test's made-up calibration
  heldout_records: 100
  heldout_accuracy: 0.9
  margin: 0.02
  heldout_gmacs: 0.9
  expected_exit_ratios: {EXPECTED}
"""


def manifest_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema([
        ("uri", pa.string()), ("label", pa.int32()), ("camera", pa.string()), ("shard", pa.int64()),
        ("date", pa.date32())]))


@pytest.fixture(scope="module")
def run(tmp_path_factory, sample_subset):
    tmp = tmp_path_factory.mktemp("outputs")
    (tmp / "text.jpg").write_text("not a picture\n")
    rows = [{"uri": r["uri"], "label": None if i % 4 == 3 else r["label"], "camera": f"cam{i % 2}", "shard": i,
             "date": datetime.date(2026, 11, 1 + i)} for i, r in enumerate(sample_subset[:10])]
    rows += [{"uri": str(tmp / "missing.jpg"), "label": 1, "camera": "cam9", "shard": 10, "date": None},
             {"uri": str(tmp / "text.jpg"), "label": 2, "camera": "cam9", "shard": 11, "date": None},
             {"uri": "", "label": 3, "camera": "cam9", "shard": 12, "date": None}]
    pq.write_table(manifest_table(rows), tmp / "manifest.parquet")
    (tmp / "config.yaml").write_text(CONFIG)
    args = ["--config", str(tmp / "config.yaml"), "--input", str(tmp / "manifest.parquet"), "--output",
            str(tmp / "out")]
    manifest = cascade.run([*args, "--runner=FnApiRunner"])
    return {"tmp": tmp, "out": tmp / "out", "rows": rows, "manifest": manifest, "args": args}


def readme_recipes(folder: Path) -> dict:
    """Run the README's reading recipes (its python blocks under "Reading the outputs") on ``folder``."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Reading the outputs", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 4, "the README shows committed runs, DuckDB, Polars and pandas"
    namespace: dict = {}
    for block in blocks:
        exec(block.replace('DIR = "out/sample"', f"DIR = {str(folder)!r}"), namespace)
    return namespace


def test_the_readme_recipes_agree_on_accuracy_exit_ratios_and_dead_letters(run):
    got = readme_recipes(run["out"])
    labelled = [r for r in common.read_table(str(run["out"]), "predictions").to_pylist() if r["label"] is not None]
    accuracy = sum(r["label"] == r["pred_class"] for r in labelled) / len(labelled)
    assert got["accuracy_duckdb"] == pytest.approx(accuracy)
    assert got["accuracy_polars"] == pytest.approx(accuracy)
    assert float(got["accuracy_pandas"]) == pytest.approx(accuracy)
    assert got["exit_ratio_sum"] == pytest.approx(1.0)
    assert sum(ratio for _, _, ratio in got["exit_ratios"]) == pytest.approx(1.0)
    counts = run["manifest"]["counts"]
    assert got["failed_all_stages"] == counts["dead_letters"] == 3  # reading (stage 0) included
    assert {c: n for c, n, _ in got["dead_by_category"]} == {"not_found": 1, "not_an_image": 1,
                                                              "bad_manifest_row": 1}
    assert got["dead_pandas"].to_dict() == {"bad_manifest_row": 1, "not_an_image": 1, "not_found": 1}
    assert yaml.safe_load(got["config"])["calibration"]["expected_exit_ratios"] == EXPECTED
    assert set(got["top5"].columns) == {"id", "class", "name", "prob"} and len(got["top5"]) == 5 * 10
    # the trap the README warns of: pandas' default turns the nullable label into float64 and counts
    # every unlabelled row as wrong
    import pandas as pd

    naive = pd.concat([pd.read_parquet(f) for f in got["files"]["predictions"]])
    assert naive.label.dtype == "float64"
    assert (naive.pred_class == naive.label).mean() < accuracy


def test_every_file_is_zstd_and_says_which_run_and_config_wrote_it(run):
    run_id = run["manifest"]["run_id"]
    assert common.RUN_ID.fullmatch(run_id)
    files = sorted(run["out"].glob("*/*.parquet"))
    assert {f.parent.name for f in files} == {"predictions", "exit_stats", "dead_letter"}
    for f in files:
        assert f.name.startswith(f"{run_id}-"), f
        meta = pq.ParquetFile(f).metadata
        assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns)} == {"ZSTD"}, f
        kv = {k.decode(): v.decode() for k, v in meta.metadata.items()}
        assert kv["cascade.run_id"] == run_id and kv["cascade.table"] == f.parent.name
        assert yaml.safe_load(kv["cascade.config"])["stages"][0]["threshold"] == pytest.approx(0.28364, abs=1e-5)
        assert "apache-beam" in kv["cascade.versions"] and kv["cascade.started_utc"] == run["manifest"]["started_utc"]
        assert set(pq.read_table(f, columns=["run_id"]).column("run_id").to_pylist()) == {run_id}
    assert (run["out"] / common.RUNS / f"{run_id}.json").exists() and (run["out"] / common.MANIFEST).exists()


def test_manifest_columns_are_carried_through_with_their_types(run):
    table = common.read_table(str(run["out"]), "predictions")
    schema = table.schema
    assert (schema.field("camera").type, schema.field("shard").type, schema.field("date").type) == (
        pa.string(), pa.int64(), pa.date32())
    listed = {r["uri"]: r for r in run["rows"]}
    for row in table.to_pylist():
        assert {k: row[k] for k in ("camera", "shard", "date")} == {k: listed[row["uri"]][k]
                                                                   for k in ("camera", "shard", "date")}
        assert (row["label_name"] is None) == (row["label"] is None)
        assert row["top5"][0] == {"class": row["pred_class"], "name": row["pred_name"], "prob": pytest.approx(
            row["top5"][0]["prob"])}


def test_exit_stats_has_reading_as_stage_zero_and_the_papers_exit_ratio(run):
    stats = sorted(common.read_table(str(run["out"]), "exit_stats").to_pylist(), key=lambda r: r["stage"])
    assert [s["stage"] for s in stats] == [0, 1, 2, 3] and stats[0]["model"] == "read"
    assert stats[0]["records_in"] == run["manifest"]["counts"]["inputs_listed"] == 13
    assert stats[0]["records_failed"] == 2 and stats[1]["records_in"] == 11  # missing file, empty uri
    assert sum(s["records_failed"] for s in stats) == stats[0]["dead_letters"]
    predictions = stats[0]["predictions"]
    for s in stats[1:]:
        assert s["exit_ratio"] == pytest.approx(s["records_exited"] / predictions)
        classified = s["records_in"] - s["records_failed"]
        assert s["exit_ratio_of_reached"] == pytest.approx(s["records_exited"] / classified)
    assert stats[3]["exit_ratio_of_reached"] == 1.0


def test_the_run_report_is_written_self_contained_and_warns_of_drift(run, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(run["out"], folder)
    run_id = run["manifest"]["run_id"]
    stray = folder / "predictions" / "20991231T000000Z-ffffff-00000-of-00001.parquet"  # a run never committed
    shutil.copy(next((folder / "predictions").glob(f"{run_id}-*.parquet")), stray)
    assert common.count_rows(str(folder), "predictions") == run["manifest"]["counts"]["predictions"]
    written = report.run(["--run", str(folder)])
    assert "WARNING: stage 1 exit ratio" in capsys.readouterr().out
    names = {Path(p).name for p in written}
    assert names == {"report.md", "report.html", "exit_ratios.png", "confidence_by_stage.png", "reliability.png"}
    md = (folder / "report" / "report.md").read_text()
    for section in ("## Counts", "## Stages", "## Cost and accuracy", "## Against the calibration", "## Plots",
                    "## Top confusions", "## Dead letters"):
        assert section in md
    assert "**holds**" in md and "20991231T000000Z-ffffff" in md and "never committed" in md
    assert "drift from the calibration's by more than 5 points" in md
    assert "| not_found | 1 | 0 |" in md and "| bad_manifest_row | 1 | 0 |" in md and "| not_an_image | 1 | 1 |" in md
    page = (folder / "report" / "report.html").read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == 3 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href=" not in page and "<table>" in page


def test_the_report_reads_its_tables_a_batch_at_a_time_with_the_same_result(run, monkeypatch):
    """The report tallies the predictions and dead letters in batches (a run of 10^8 rows is never held in
    memory): batches of 2 rows give the same report, figures and plots as one batch."""
    whole = run_report.build_report(str(run["out"]))
    monkeypatch.setattr(run_report, "REPORT_BATCH_ROWS", 2)
    batched = run_report.build_report(str(run["out"]))
    assert run_report.to_markdown(batched[0]) == run_report.to_markdown(whole[0])
    assert batched[1] == whole[1] and batched[2] == whole[2]
    assert whole[2]["dead_letters_by_category"] == {"not_found": 1, "bad_manifest_row": 1, "not_an_image": 1}
    labelled = [r for r in run["rows"][:10] if r["label"] is not None]
    assert sum(n for _, _, _, n in run_report.tally_predictions(str(run["out"]), run["manifest"]["run_id"])
               .reliability()) == len(labelled)


def test_the_plan_counts_inputs_and_prices_the_run_without_running_it(run):
    plan = cascade.run([*run["args"][:-2], "--output", str(run["tmp"] / "planned"), "--plan"])
    assert not (run["tmp"] / "planned").exists()
    stats = {s["stage"]: s for s in common.read_table(str(run["out"]), "exit_stats").to_pylist()}
    assert plan["records"] == stats[0]["records_in"] == 13
    assert list(plan["expected_exit_ratios"]) == EXPECTED
    assert plan["worst_gmacs"] == pytest.approx(stats[1]["worst_case_gmacs"])
    assert plan["last_model_gmacs"] == pytest.approx(stats[1]["last_model_gmacs"])
    cumulative = [stats[k]["cumulative_gmacs"] for k in (1, 2, 3)]
    assert plan["avg_gmacs"] == pytest.approx(sum(r * c for r, c in zip(EXPECTED, cumulative)))
    started = time.perf_counter()
    shown = subprocess.run([sys.executable, "-m", "pipelines.cascade", *run["args"], "--plan",
                            "--runner=DataflowRunner", "--project=nowhere"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    took = time.perf_counter() - started
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "13 inputs (rows in the Parquet manifest's footer)" in shown.stdout
    assert "| 1 | lite0@224 | 0.2836 | 0.385 | 0.385 | 50.0% | 100.0% |" in shown.stdout
    assert "machine-hours" in shown.stdout and "GPU-hours" in shown.stdout and "figures used" in shown.stdout
    assert "apitools" not in shown.stderr
    print(f"--plan as a command: {took:.1f} s (imports included)")


def test_inputs_are_counted_from_footers_lines_and_globs(tmp_path):
    (tmp_path / "m.csv").write_text("uri,label\na.jpg,1\n\nb.jpg,\nc.jpg,2\n")
    for name in ("x.jpg", "y.jpg"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.jpg").mkdir()
    assert count_inputs(str(tmp_path / "m.csv"))[0] == 3
    assert count_inputs(str(tmp_path / "*.jpg"))[0] == 2


def test_a_manifest_column_named_like_one_of_ours_is_refused_before_any_work(tmp_path, sample_subset):
    pq.write_table(pa.table({"uri": [sample_subset[0]["uri"]], "Confidence": [0.5]}), tmp_path / "m.parquet")
    (tmp_path / "one.yaml").write_text("stages:\n  - {model: lite0, resolution: 224, batch_size: 4}\n")
    with pytest.raises(SystemExit, match=r"^invalid input: manifest column\(s\) \['Confidence'\] would clash with "
                                         r"column\(s\) of table 'predictions'"):
        cascade.run(["--config", str(tmp_path / "one.yaml"), "--input", str(tmp_path / "m.parquet"), "--output",
                     str(tmp_path / "out"), "--runner=FnApiRunner"])
    assert not (tmp_path / "out").exists()


def test_help_lists_the_profiles_without_markup_or_the_apitools_warning():
    shown = subprocess.run([sys.executable, "-m", "pipelines.cascade", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "apitools" not in shown.stderr, shown.stderr[-2000:]
    assert "``" not in shown.stdout and "\\" not in shown.stdout  # no RST markup, no broken continuation
    for profile in ("lite_cascade", "imagenet_sample_calibrated", "video_frames", "dataflow_gpu", "flink"):
        assert re.search(rf"^  {profile} ", shown.stdout, re.M), profile
    assert "--plan" in shown.stdout
    shown = subprocess.run([sys.executable, "-m", "pipelines.report", "--help"], cwd=ROOT, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "apitools" not in shown.stderr, shown.stderr[-2000:]
    assert "report.md and report.html" in shown.stdout and "``" not in shown.stdout
