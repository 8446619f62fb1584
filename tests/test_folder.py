"""The output folder's owner (pipelines/folder.py): its lock under races, --overwrite removing only what the
project wrote and only after every check, true commit messages, and the latest view over several runs."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import folder
from pipelines.folder import RunFolder
from tests.conftest import write_manifest
from transforms.tables import DEAD_LETTER, PREDICTIONS

ROOT = Path(__file__).resolve().parents[1]
RUN_A, RUN_B, RUN_C = "20261201T000000Z-aaaaaa", "20261202T000000Z-bbbbbb", "20261203T000000Z-cccccc"


def committed(out: Path, run_id: str, tables: dict[str, list[dict]], commit: bool = True) -> None:
    """A run as the pipeline leaves it: table files named by the run, then (if ``commit``) its record."""
    for name, rows in tables.items():
        table = {PREDICTIONS.name: PREDICTIONS, DEAD_LETTER.name: DEAD_LETTER}[name]
        (out / name).mkdir(parents=True, exist_ok=True)
        full = [table.row(**{**{f.name: None for f in table.schema}, **r, "run_id": run_id}) for r in rows]
        pq.write_table(pa.Table.from_pylist(full, table.schema), out / name / f"{run_id}-00000-of-00001.parquet")
    if commit:
        RunFolder(str(out)).commit({"run_id": run_id})


def prediction(rid: str, pred: int = 1) -> dict:
    return {"id": rid, "uri": f"/d/{rid}.jpg", "pred_class": pred, "confidence": 0.9, "exit_stage": 1, "gmacs": 0.4,
            "stages": [{"stage": 1, "model": "lite0@224", "pred_class": pred, "confidence": 0.9}], "shadow": False}


def dead(rid: str) -> dict:
    return {"id": rid, "uri": f"/d/{rid}.jpg", "stage": 0, "category": "read_error", "error": "gone"}


# ---- --overwrite: only what the project wrote, only after the checks -----------------------------------------

def test_overwrite_removes_only_what_the_project_wrote_records_first(tmp_path, monkeypatch):
    out = tmp_path / "out"
    committed(out, RUN_A, {"predictions": [prediction("a")]})
    committed(out, RUN_B, {"predictions": [prediction("b")]}, commit=False)  # an interrupted run
    (out / "report").mkdir()
    (out / "report" / "report.md").write_text("# old report")
    users = {out / "predictions" / "cat.jpg": b"photo", out / "runs" / "notes.txt": b"mine",
             out / "report" / "mine.txt": b"mine", out / "photos" / "dog.jpg": b"photo", out / "README": b"mine"}
    for path, data in users.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with pytest.raises(SystemExit, match=r"not empty .*committed run 20261201T000000Z-aaaaaa.*--overwrite"):
        with RunFolder(str(out)).hold(RUN_C):
            pass
    removed = []
    real_rm = type(RunFolder(str(out)).fs).rm
    monkeypatch.setattr(type(RunFolder(str(out)).fs), "rm", lambda self, path, *a, **k: (
        removed.append(os.path.relpath(path, out)), real_rm(self, path, *a, **k)))
    with RunFolder(str(out)).hold(RUN_C, overwrite=True):
        pass
    ours = [r for r in removed if r != folder.PROBE]
    assert ours[:2] == [folder.MANIFEST, f"runs/{RUN_A}.json"]  # no reader takes the tables for a run after this
    assert sorted(ours[2:]) == sorted([f"predictions/{RUN_A}-00000-of-00001.parquet",
                                       f"predictions/{RUN_B}-00000-of-00001.parquet", "report/report.md"])
    assert {path: path.read_bytes() for path in users} == users  # the user's files, untouched


def test_a_manifest_the_project_did_not_write_is_never_replaced(tmp_path):
    (tmp_path / folder.MANIFEST).write_text('{"my": "own file"}')
    with pytest.raises(SystemExit, match=r"holds a manifest\.json that this project did not write"):
        with RunFolder(str(tmp_path)).hold(RUN_A, overwrite=True):
            pass
    assert (tmp_path / folder.MANIFEST).read_text() == '{"my": "own file"}'


def test_unwritable_output_is_refused_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match=r"^output: cannot write to .*a-file/out: "):
        with RunFolder(str(tmp_path / "a-file" / "out")).hold(RUN_A):
            pass


@pytest.mark.parametrize("source, refused", [
    ("{d}/**", True),  # would list the run's own files
    ("{d}/**/*.parquet", True),
    ("{d}/*/*/*", True),
    ("{d}/*.jpg", False),
    ("{d}/out/m.csv", True),  # the input lies inside the output folder
    ("{d}/m.csv", False),
])
def test_an_input_that_would_list_or_lies_in_the_output_is_refused(tmp_path, source, refused):
    out = RunFolder(str(tmp_path / "out"))
    source = source.format(d=tmp_path)
    if refused:
        with pytest.raises(SystemExit, match=r"^output: the input .* (would list the files|lies inside)"):
            out.check_apart_from(source)
    else:
        out.check_apart_from(source)


# ---- the lock -------------------------------------------------------------------------------------------------

def _contend(out: str, log: str, go: float, overwrite: bool, keep: bool) -> None:
    while time.time() < go:
        time.sleep(0.001)
    run_id = folder.new_run_id()
    try:
        with RunFolder(out).hold(run_id, overwrite=overwrite, keep_committed=keep):
            with open(log, "a") as fh:
                fh.write(f"in {run_id} {time.monotonic()}\n")
            time.sleep(0.02)
            with open(log, "a") as fh:
                fh.write(f"out {run_id} {time.monotonic()}\n")
    except SystemExit:
        pass


@pytest.mark.parametrize("overwrite, keep", [(True, False), (False, True)], ids=["overwrite", "skip_done"])
def test_many_processes_racing_for_one_folder_never_hold_it_together(tmp_path, overwrite, keep):
    out, log = str(tmp_path / "out"), str(tmp_path / "log")
    ctx = multiprocessing.get_context("fork")
    for _ in range(8):  # rounds of 12 processes started at the same instant
        go = time.time() + 0.3
        procs = [ctx.Process(target=_contend, args=(out, log, go, overwrite, keep)) for _ in range(12)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
    events = [line.split() for line in Path(log).read_text().splitlines()]
    holders = 0
    for kind, _, _ in sorted(events, key=lambda e: float(e[2])):
        holders += 1 if kind == "in" else -1
        assert holders <= 1, "two runs held the folder at once"
    assert sum(kind == "in" for kind, _, _ in events) >= 8  # every round, someone got it
    assert os.listdir(out) == []  # released by each


def test_a_killed_holder_never_blocks_the_next_run_and_is_reported_truly(tmp_path):
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")

    def hold_and_die(run_id: str, files: bool, commit: bool) -> None:
        with RunFolder(str(out)).hold(run_id, overwrite=True):
            if files:
                committed(out, run_id, {"predictions": [prediction("x")]}, commit=commit)
            os._exit(9)  # killed: no release

    p = ctx.Process(target=hold_and_die, args=(RUN_A, True, False))
    p.start()
    p.join(60)
    assert (out / folder.RUNNING).exists()
    with pytest.raises(SystemExit, match=rf"holds an incomplete run: the run that locked it \(run_id {RUN_A}.*"
                                         r"ended without committing"):
        with RunFolder(str(out)).hold(RUN_B):
            pass
    with RunFolder(str(out)).hold(RUN_B, keep_committed=True):  # its files removed, its inputs done again
        assert RunFolder(str(out)).run_files() == {}
    # killed after its commit: the folder holds a committed run, and no message says it did not commit
    p = ctx.Process(target=hold_and_die, args=(RUN_C, True, True))
    p.start()
    p.join(60)
    with pytest.raises(SystemExit) as refused:
        with RunFolder(str(out)).hold(folder.new_run_id()):
            pass
    assert "not empty" in str(refused.value) and f"committed run {RUN_C}" in str(refused.value)
    assert "without committing" not in str(refused.value)


# ---- commit messages say what is on disk ------------------------------------------------------------------------

def test_a_failed_commit_says_whether_the_run_is_committed(tmp_path, monkeypatch):
    out = RunFolder(str(tmp_path))
    real = folder.write_json

    def fail_on(name):
        def write(output, target, payload):
            if target == name:
                raise OSError(28, "No space left on device")
            return real(output, target, payload)
        return write

    monkeypatch.setattr(folder, "write_json", fail_on(f"runs/{RUN_A}.json"))
    with pytest.raises(SystemExit, match=r"the run is NOT committed"):
        out.commit({"run_id": RUN_A})
    assert out.committed_runs() == []
    monkeypatch.setattr(folder, "write_json", fail_on(folder.MANIFEST))
    with pytest.raises(SystemExit, match=rf"the run {RUN_A} IS committed \(.*runs/{RUN_A}\.json is written\) but "
                                         r".*manifest\.json"):
        out.commit({"run_id": RUN_A})
    assert out.committed_runs() == [RUN_A]


# ---- reading back: the latest view ------------------------------------------------------------------------------

def test_the_latest_view_has_one_row_per_id_from_the_latest_run_that_has_it(tmp_path):
    out = tmp_path / "out"
    committed(out, RUN_A, {"predictions": [prediction("a", 1), prediction("b", 1)], "dead_letter": [dead("c")]})
    # a later run: b again (--overwrite of nothing: a retry), c retried and now classified, d new
    committed(out, RUN_B, {"predictions": [prediction("b", 2), prediction("c", 2), prediction("d", 2)]})
    committed(out, RUN_C, {"predictions": [prediction("e", 3)]}, commit=False)  # never committed: never read
    view = RunFolder(str(out)).latest()
    assert view.column("id").to_pylist() == ["a", "b", "c", "d"]
    assert view.column("pred_class").to_pylist() == [1, 2, 2, 2]
    assert view.column("run_id").to_pylist() == [RUN_A, RUN_B, RUN_B, RUN_B]
    assert RunFolder(str(out)).latest(DEAD_LETTER.name).num_rows == 0  # c's latest outcome is a prediction
    assert view.schema.equals(PREDICTIONS.schema, check_metadata=False)
    assert RunFolder(str(out)).read(PREDICTIONS.name).num_rows == 5  # every committed row, without the view


def test_in_its_latest_run_an_id_is_its_prediction_else_its_first_dead_letter(tmp_path):
    out = tmp_path / "out"
    duplicate = {**dead("a"), "stage": 0, "category": "duplicate_id", "uri": "/d/0.jpg"}
    committed(out, RUN_A, {"predictions": [prediction("a")], "dead_letter": [duplicate, dead("b")]})
    committed(out, RUN_B, {"dead_letter": [{**dead("b"), "stage": 2, "category": "model_error"},
                                           {**dead("b"), "category": "duplicate_id"}, {**dead("c"), "uri": "/z"},
                                           {**dead("c"), "uri": "/y"}]})
    folder_ = RunFolder(str(out))
    assert folder_.latest().column("id").to_pylist() == ["a"]  # a's duplicate is not its outcome
    latest_dead = folder_.latest(DEAD_LETTER.name).to_pylist()
    assert [(r["id"], r["run_id"], r["category"], r["uri"]) for r in latest_dead] == [
        ("b", RUN_B, "model_error", "/d/b.jpg"), ("c", RUN_B, "read_error", "/y")]


# ---- Ctrl-C and SIGTERM -------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_run_says_so_in_one_line_and_commits_nothing(tmp_path, sig):
    from pipelines import demo

    out = tmp_path / "out"
    many = tmp_path / "m.csv"  # minutes of work: it is interrupted
    many.write_text("id,uri\n" + "".join(f"{i}-{n},{p}\n" for i, p in enumerate(demo.photos()) for n in range(100)))
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cascade", "--runner=FnApiRunner", "--input", str(many),
                             "--direct_running_mode=in_memory", "--direct_num_workers=2", "--output", str(out)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "predictions").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(2)  # the stages are running
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines()[-1].startswith(f"interrupted by {sig.name}: run ") and "nothing was committed" in err
    assert "Traceback" not in err, err[-3000:]
    assert RunFolder(str(out)).committed_runs() == [] and not (out / folder.RUNNING).exists()


def test_a_failed_score_overwrite_keeps_the_earlier_scoring_run(tmp_path, sample_subset):
    from pipelines import score

    out = tmp_path / "scores"
    committed(out, RUN_A, {"dead_letter": [dead("a")]})
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    manifest = write_manifest(tmp_path / "m.csv", [{"uri": r["uri"], "label": r["label"]} for r in sample_subset[:2]])
    config = tmp_path / "pool.yaml"
    config.write_text(f"models:\n  mine: {{arch: 'torchvision:resnet18', weights: '{tmp_path / 'missing.pt'}', "
                      "num_classes: 1000, resolution: 32}\nstages:\n  - {model: mine}\n")
    with pytest.raises(SystemExit, match=r"^invalid config: stages\.0\.model: "):
        score.run(["--config", str(config), "--input", manifest, "--output", str(out), "--overwrite",
                   "--runner=FnApiRunner"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert RunFolder(str(out)).committed_runs() == [RUN_A]


def test_a_stalled_manifest_url_fails_the_start_clearly_within_the_read_timeout(tmp_path):
    """The listing's own reads before any work (the manifest's header) are bounded by decode.read_timeout_s:
    a server that accepts and never answers is a clear failure in that time, not a five-minute hang."""
    import socket
    import threading

    from pipelines import cascade

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list = []

    def accept() -> None:  # and never answer
        with contextlib.suppress(OSError):
            while True:
                held.append(server.accept())

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/m.csv"
    started = time.monotonic()
    try:
        for argv in ([], ["--plan"]):
            with pytest.raises(SystemExit, match=r"^invalid input: reading http://127\.0\.0\.1:\d+/m\.csv took longer "
                                                 r"than 1 s \(decode\.read_timeout_s\)"):
                cascade.run(["--runner=FnApiRunner", "--input", url, "--output", str(tmp_path / "out"),
                             "decode.read_timeout_s=1", *argv])
    finally:
        server.close()
    assert time.monotonic() - started < 30 and not (tmp_path / "out").exists()
