"""Outputs analysts can trust: one real run on labelled sample images with unreadable inputs and a Parquet
manifest of its own columns; a folder of that run and a --skip_done run over overlapping inputs beside an
uncommitted run's files, read back with DuckDB, Polars and pandas exactly as docs/OUTPUTS.md and the README
show; the files' compression and metadata; the run report; the plan before the run; incomplete runs; the
commands' help."""

from __future__ import annotations

import collections
import datetime
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from pipelines import cascade, report, run_report
from pipelines.folder import MANIFEST, RUN_ID, RUNS, RunFolder
from transforms.manifests import count_inputs

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = [0.5, 0.25, 0.25]  # far from what clean images do: the report must warn
CONFIG = f"""stages:
  - {{model: lite0, resolution: 224, batch_size: 4, threshold: 0.2836400395387615}}
  - {{model: lite1, resolution: 240, batch_size: 4, threshold: 0.1967618632021696}}
  - {{model: lite2, resolution: 260, batch_size: 4}}
calibration:
  cascade: lite0@224 >= 0.283640 -> lite1@240 >= 0.196762 -> lite2@260; confidence max_prob; aggregation logits
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


UNCOMMITTED = "20991231T235959Z-ffffff"  # a run id later than any real one, whose files never committed
SKIP_DONE_THRESHOLD = 0.5  # the second run's stage-1 threshold: its config differs from the first's
PREDICTION_COLUMNS = ("uri", "label", "pred_class", "exit_stage", "confidence", "gmacs")


@pytest.fixture(scope="module")
def folder(run, tmp_path_factory, sample_subset):
    """One output folder of several runs: a copy of the module's run (A: 10 images, a missing file, a text
    file, an empty uri), then a real ``--skip_done --retry_dead_letters`` run (B) over overlapping inputs with
    another threshold (5 ids skipped, 3 new, the missing file now present, the text file again, one image
    listed twice), then the files of a run that never committed (C: B's rows under a later run id, with
    other classes): what a run killed before its commit leaves."""
    tmp = tmp_path_factory.mktemp("folder")
    out = tmp / "out"
    shutil.copytree(run["out"], out)
    rows = run["rows"]
    missing, text = rows[10]["uri"], rows[11]["uri"]
    shutil.copy(rows[0]["uri"], missing)  # the first run's not_found, present now: retried and classified
    listed = [*sample_subset[5:13], {"uri": missing, "label": 1}, {"uri": text, "label": 2}, sample_subset[11]]
    with open(tmp / "more.csv", "w") as fh:
        fh.write("uri,label\n" + "".join(f"{r['uri']},{r['label']}\n" for r in listed))
    second = cascade.run(["--config", str(run["tmp"] / "config.yaml"), "--input", str(tmp / "more.csv"),
                          "--output", str(out), "--skip_done", "--retry_dead_letters", "--runner=FnApiRunner",
                          f"stages.0.threshold={SKIP_DONE_THRESHOLD}"])
    assert second["counts"]["inputs_skipped"] == 5 and second["invariant_holds"]
    for table in ("predictions", "dead_letter", "exit_stats"):
        written = pq.read_table(next((out / table).glob(f"{second['run_id']}-*.parquet")))
        written = written.set_column(0, "run_id", pa.array([UNCOMMITTED] * len(written), pa.string()))
        if table == "predictions":
            other = pc.add(written["pred_class"], 1).cast(pa.int32())
            written = written.set_column(written.schema.get_field_index("pred_class"), "pred_class", other)
        pq.write_table(written, out / table / f"{UNCOMMITTED}-00000-of-00001.parquet")
    return {"out": out, "first": run["manifest"], "second": second, "missing": missing, "text": text,
            "first_ids": [r["uri"] for r in sample_subset[:10]], "new_ids": [r["uri"] for r in sample_subset[10:13]]}


def committed_rows(out: Path, table: str) -> list[dict]:
    """Every row of the committed runs' files, read without the package: a run is committed iff
    runs/<run_id>.json exists, and its files are <table>/<run_id>-SSSSS-of-NNNNN.parquet."""
    committed = {p.stem for p in (out / "runs").glob("*.json")}
    return [row for f in sorted((out / table).glob("*.parquet")) if f.name.rsplit("-", 3)[0] in committed
            for row in pq.read_table(f).to_pylist()]


def expected_latest(out: Path) -> dict:
    """id -> (outcome, row) by the latest view's rule, computed here in plain Python: per id, the latest
    committed run with a row of it wins; in that run its prediction, else its first dead letter ordered by
    (duplicate_id last, stage, uri, error)."""
    predictions, dead = committed_rows(out, "predictions"), committed_rows(out, "dead_letter")
    latest: dict = {}
    for run_id in sorted({r["run_id"] for r in predictions + dead}):
        order = sorted((r for r in dead if r["run_id"] == run_id), reverse=True,
                       key=lambda r: (r["category"] == "duplicate_id", r["stage"], r["uri"], r["error"]))
        latest.update({r["id"]: ("dead_letter", r) for r in order})  # the first in that order is set last
        latest.update({r["id"]: ("prediction", r) for r in predictions if r["run_id"] == run_id})
    return latest


def sql_blocks(text: str) -> dict:
    """The ```sql blocks of a markdown text, by their first line (a comment that names the recipe)."""
    return {block.splitlines()[0]: block for block in re.findall(r"```sql\n(.*?)```", text, re.S)}


def recipes_section() -> str:
    return (ROOT / "docs" / "OUTPUTS.md").read_text().split("\n## Recipes", 1)[1].split("\n## ", 1)[0]


def by_title(rows: dict, start: str):
    (found,) = [value for title, value in rows.items() if title.startswith(f"-- {start}")]
    return found


def docs_recipes(folder: Path, chosen_run: str, chosen_id: str) -> tuple[dict, dict]:
    """Run docs/OUTPUTS.md's recipes on ``folder`` as an analyst pastes them: its DuckDB blocks in order (the
    views first; each query's rows by its first line) and its Python blocks (their variables)."""
    import duckdb

    con = duckdb.connect()
    rows = {}
    for title, block in sql_blocks(recipes_section()).items():
        sql = (block.replace("out/mine", str(folder)).replace("20261128T101500Z-3fa2c1", chosen_run)
               .replace("'cat'", f"'{chosen_id}'"))
        rows[title] = con.execute(sql).fetchall()
    namespace: dict = {"con": con}
    blocks = re.findall(r"```python\n(.*?)```", recipes_section(), re.S)
    assert len(blocks) == 3, "the docs show the committed files, Polars and pandas"
    for block in blocks:
        exec(block.replace('DIR = "out/mine"', f"DIR = {str(folder)!r}"), namespace)
    return rows, namespace


def test_the_latest_view_has_one_row_per_id_from_the_latest_committed_run_that_has_it(folder):
    """The docs' latest view on a folder of two committed runs (the second with --skip_done over overlapping
    inputs) and an uncommitted one: ids the second run skipped keep the first run's rows, a dead letter the
    second run classified becomes its prediction, an image listed twice is one row, and no row of the
    uncommitted run is read; checked against the rule computed in Python and against what each run was given."""
    first, second = folder["first"]["run_id"], folder["second"]["run_id"]
    rows, recipes = docs_recipes(folder["out"], first, folder["text"])
    con = recipes["con"]
    got = {r["id"]: r for r in con.sql("SELECT * FROM latest").pl().to_dicts()}
    assert len(got) == con.execute("SELECT count(*) FROM latest").fetchone()[0]  # one row per id
    assert con.execute(f"SELECT count(*) FROM predictions WHERE run_id = '{UNCOMMITTED}'").fetchone() == (0,)
    expected = expected_latest(folder["out"])
    assert {i: (r["outcome"], r["run_id"]) for i, r in got.items()} == {
        i: (outcome, row["run_id"]) for i, (outcome, row) in expected.items()}
    for i, (outcome, row) in expected.items():  # the same row, column for column
        columns = row.keys() if outcome == "dead_letter" else PREDICTION_COLUMNS
        assert {k: got[i][k] for k in columns} == pytest.approx({k: row[k] for k in columns}), i
    # what each run was given: 10 + 3 + 1 images classified, the text file dead in the second run too, the
    # empty uri's dead letter from the first run (the second did not list it)
    assert all(got[i]["outcome"] == "prediction" and got[i]["run_id"] == first for i in folder["first_ids"])
    assert {i for i, r in got.items() if r["run_id"] == second} == {*folder["new_ids"], folder["missing"],
                                                                    folder["text"]}
    assert got[folder["missing"]]["outcome"] == "prediction" and got[folder["text"]]["category"] == "not_an_image"
    assert [r["category"] for r in got.values() if r["run_id"] == first and r["outcome"] == "dead_letter"] == [
        "bad_manifest_row"]
    assert len(got) == 10 + 3 + 3
    twice = folder["new_ids"][1]  # listed twice in the second run: its prediction, not its duplicate_id
    assert got[twice]["outcome"] == "prediction"
    assert con.execute(f"SELECT category FROM dead_letter WHERE id = '{twice}'").fetchall() == [("duplicate_id",)]
    assert by_title(rows, "the dataset now") == [("dead_letter", 2, 2), ("prediction", 14, 2)]
    stages = collections.Counter(r["exit_stage"] for outcome, r in expected.values() if outcome == "prediction")
    assert [(s, n) for s, n, *_ in by_title(rows, "accuracy and cost by exit stage")] == sorted(stages.items())


def test_the_docs_recipes_give_exit_ratios_counts_and_configs_per_run_and_over_the_folder(folder):
    first, second = folder["first"]["run_id"], folder["second"]["run_id"]
    rows, got = docs_recipes(folder["out"], first, folder["text"])
    predictions, dead = committed_rows(folder["out"], "predictions"), committed_rows(folder["out"], "dead_letter")
    assert len(predictions) == 14 and len(dead) == 5  # the uncommitted run's files lie beside them
    per_run = by_title(rows, "exit ratios per run")
    assert {r[0] for r in per_run} == {first, second}
    for run_id in (first, second):  # each run's ratios sum to 1, and the folder's too (not to 2)
        assert sum(r[7] for r in per_run if r[0] == run_id) == pytest.approx(1.0)
    folder_ratios = by_title(rows, "exit ratios over the folder")
    exited = collections.Counter(r["exit_stage"] for r in predictions)
    assert {r[0]: r[4] for r in folder_ratios} == dict(exited)
    assert {r[0]: r[6] for r in folder_ratios} == pytest.approx({s: n / 14 for s, n in exited.items()})
    threshold = yaml.safe_load(CONFIG)["stages"][0]["threshold"]
    assert folder_ratios[0][2] == pytest.approx(sorted([threshold, SKIP_DONE_THRESHOLD]))
    assert got["exit_ratio_folder"]["exit_ratio"].sum() == pytest.approx(1.0)
    assert dict(got["exit_ratio_folder"].select("stage", "records_exited").iter_rows()) == dict(exited)
    counts = by_title(rows, "counts per run")
    assert counts[-1] == ("all runs", 13 + 11, 5, 14, 5, True)
    assert counts[1][0] == second and counts[1][2:5] == (5, 4, 2)
    labelled = [r for r in predictions if r["label"] is not None]
    accuracy = sum(r["label"] == r["pred_class"] for r in labelled) / len(labelled)
    cost = by_title(rows, "cost and accuracy per run")
    assert cost[-1][:2] == ("all runs", 14) and cost[-1][4] == pytest.approx(accuracy)
    assert cost[-1][2] == pytest.approx(sum(r["gmacs"] for r in predictions) / 14)
    assert got["accuracy_polars"] == pytest.approx(accuracy)
    assert float(got["accuracy_pandas"]) == pytest.approx(accuracy)
    (chosen,) = by_title(rows, "the config of a chosen run")
    assert chosen[0] == first and yaml.safe_load(chosen[2])["stages"][0]["threshold"] == pytest.approx(threshold)
    assert yaml.safe_load(chosen[2])["calibration"]["expected_exit_ratios"] == EXPECTED
    ((_, outcome, run_id, config),) = by_title(rows, "the run and config behind one id")
    assert (outcome, run_id) == ("dead_letter", second)
    assert yaml.safe_load(config)["stages"][0]["threshold"] == SKIP_DONE_THRESHOLD
    assert {c: n for c, n, _ in by_title(rows, "what still fails")} == {"not_an_image": 1, "bad_manifest_row": 1}
    assert by_title(rows, "every run's dead letters") == [(5,)]
    assert got["dead_pandas"].to_dict() == dict(collections.Counter(r["category"] for r in dead))
    assert set(got["top5"].columns) == {"id", "class", "name", "prob"} and len(got["top5"]) == 5 * 14
    latest = [r for outcome, r in expected_latest(folder["out"]).values() if outcome == "prediction"]
    confusions = collections.Counter((r["label_name"], r["pred_name"]) for r in latest
                                     if r["label"] is not None and r["label"] != r["pred_class"])
    assert sorted(by_title(rows, "the top confusions"), key=lambda r: (-r[2], r[0], r[1])) == sorted(
        ((a, b, n) for (a, b), n in confusions.items()), key=lambda r: (-r[2], r[0], r[1]))[:10]
    # the trap the docs warn of: pandas' default turns the nullable label into float64 and counts every
    # unlabelled row as wrong
    import pandas as pd

    naive = pd.concat([pd.read_parquet(f) for f in got["files"]["predictions"]])
    assert naive.label.dtype == "float64"
    assert (naive.pred_class == naive.label).mean() < accuracy


def test_the_readme_query_reads_the_committed_runs(folder):
    """The README's one DuckDB query, on the folder of several runs: every committed prediction by exit
    stage, none of the uncommitted run's."""
    import duckdb

    (query,) = sql_blocks((ROOT / "README.md").read_text()).values()
    got = duckdb.connect().execute(query.replace("out/mine", str(folder["out"]))).fetchall()
    exited = collections.Counter(r["exit_stage"] for r in committed_rows(folder["out"], "predictions"))
    assert [(stage, n) for stage, n, *_ in got] == sorted(exited.items())


def test_every_file_is_zstd_and_says_which_run_and_config_wrote_it(run):
    run_id = run["manifest"]["run_id"]
    assert RUN_ID.fullmatch(run_id)
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
    assert (run["out"] / RUNS / f"{run_id}.json").exists() and (run["out"] / MANIFEST).exists()


def test_manifest_columns_are_carried_through_with_their_types(run):
    table = RunFolder(str(run["out"])).read("predictions")
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
    stats = sorted(RunFolder(str(run["out"])).read("exit_stats").to_pylist(), key=lambda r: r["stage"])
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
    assert RunFolder(str(folder)).count_rows("predictions") == run["manifest"]["counts"]["predictions"]
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
    stats = {s["stage"]: s for s in RunFolder(str(run["out"])).read("exit_stats").to_pylist()}
    assert plan["records"] == stats[0]["records_in"] == 13
    assert list(plan["expected_exit_ratios"]) == EXPECTED
    assert plan["worst_gmacs"] == pytest.approx(stats[1]["worst_case_gmacs"])
    assert plan["last_model_gmacs"] == pytest.approx(stats[1]["last_model_gmacs"])
    cumulative = [stats[k]["cumulative_gmacs"] for k in (1, 2, 3)]
    assert plan["avg_gmacs"] == pytest.approx(sum(r * c for r, c in zip(EXPECTED, cumulative)))
    assert plan["calibration_applies"] is True
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


@pytest.mark.parametrize("override", ["stages.0.threshold=0.99", "confidence=logit_gap", "aggregation=probs",
                                      "stages.1.resolution=280", "stages.2.model=lite1"])
def test_the_plan_never_presents_the_calibration_of_another_cascade_as_this_runs(run, override, capsys):
    plan = cascade.run([*run["args"][:-2], "--output", str(run["tmp"] / "planned"), "--plan", override])
    shown = capsys.readouterr().out
    assert plan["calibration_applies"] is False and plan["expected_exit_ratios"] is None
    assert plan["avg_gmacs"] is None  # unknown until it runs: the compute shown is the worst case
    assert "the calibration does not describe this config: this config's cascade (" in shown
    assert "the calibrated cascade's figures, NOT this run's" in shown and "50.0%" in shown  # labelled as such
    assert "| 1 | lite0@224 |" in shown and "| ? | ? |" in shown


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


def test_the_packages_latest_view_is_the_docs_sql_view(folder):
    """pipelines.folder.RunFolder.latest and the DuckDB recipe analysts paste give the same rows."""
    _, recipes = docs_recipes(folder["out"], folder["first"]["run_id"], folder["text"])
    con, mine = recipes["con"], RunFolder(str(folder["out"]))
    for view, table, columns in (("latest_predictions", "predictions", "id, run_id, pred_class, exit_stage"),
                                 ("latest_dead_letter", "dead_letter", "id, run_id, category, stage")):
        sql = sorted(con.execute(f"SELECT {columns} FROM {view}").fetchall())
        ours = mine.latest(table, [c.strip() for c in columns.split(",")]).to_pylist()
        assert sorted(tuple(r.values()) for r in ours) == sql and sql


def test_the_report_of_a_folder_adds_up_its_committed_runs(folder, tmp_path):
    """pipelines.report --run DIR over a folder of two committed runs (the second with --skip_done and another
    threshold) and an uncommitted one: a table of the runs, counts and the invariant over the folder, the
    stages combined, and the calibration held only against the run of the calibrated cascade."""
    first, second = folder["first"], folder["second"]
    written = report.run(["--run", str(folder["out"]), "--output", str(tmp_path / "all")])
    md = (tmp_path / "all" / "report.md").read_text()
    assert md.startswith("# Output folder: 2 committed runs")
    assert f"`{first['run_id']}`" in md and f"`{second['run_id']}`" in md and UNCOMMITTED in md
    listed = first["counts"]["inputs_listed"] + second["counts"]["inputs_listed"]
    predictions = first["counts"]["predictions"] + second["counts"]["predictions"]
    dead = first["counts"]["dead_letters"] + second["counts"]["dead_letters"]
    assert (f"**{listed}** inputs listed → **5** skipped (an earlier run has their ids) + **{predictions}** "
            f"predictions + **{dead}** dead letters = {listed}.") in md
    assert "**holds**" in md and "varies by run" in md
    stats = {(s["run_id"], s["stage"]): s for s in RunFolder(str(folder["out"])).read("exit_stats").to_pylist()}
    exited = sum(stats[(r["run_id"], 1)]["records_exited"] for r in (first, second))
    assert f"| {exited / predictions:.1%} |" in md  # stage 1's exit ratio over the folder, not a sum of ratios
    assert f"The calibration figures do not apply to run(s) {second['run_id']}: this config's cascade" in md
    assert f"compared with the {first['counts']['predictions']} predictions of run(s) {first['run_id']}" in md
    assert len(written) == 5
    report.run(["--run", str(folder["out"]), "--run_id", first["run_id"], "--output", str(tmp_path / "one")])
    assert (tmp_path / "one" / "report.md").read_text().startswith(f"# Run {first['run_id']}")


def test_a_run_that_classified_nothing_says_so_and_holds_nothing_against_the_calibration(tmp_path, run):
    """A --skip_done run with nothing new: its report says that it classified nothing, never 'holds' over it."""
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    again = cascade.run([*run["args"][:-2], "--output", str(out), "--skip_done", "--runner=FnApiRunner"])
    assert again["counts"]["predictions"] == 0 and again["invariant_holds"]
    report.run(["--run", str(out), "--run_id", again["run_id"], "--output", str(tmp_path / "r")])
    md = (tmp_path / "r" / "report.md").read_text()
    listed = again["counts"]["inputs_listed"]
    assert f"**{listed}** inputs listed → **{again['counts']['inputs_skipped']}** skipped" in md
    assert "This run classified nothing" in md and "## Against the calibration" not in md
    assert "| yes |" not in md and "## Stages" not in md
