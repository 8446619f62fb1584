"""The output folder: one owner for a run's life in it, and for reading it back as one dataset.

A folder holds runs, each under its own run id: ``<table>/<run_id>-SSSSS-of-NNNNN.parquet`` for every table,
then ``runs/<run_id>.json`` (the run record: the commit; a run without one never happened for readers), then
``manifest.json`` (a copy of the latest committed run's record). ``RunFolder`` is the only code that knows these
names: it describes a folder (committed runs, interrupted ones), takes its lock for a run's life (``hold``:
released on every exit path), clears it for ``--overwrite`` (only files it wrote, after every check that can
run before work), names the files a run writes, commits, and reads tables back (one table over chosen or all
committed runs, the latest view, the ids done for ``--skip_done``).

Layout rules (docs/OUTPUTS.md): nothing that the project did not write is ever removed or overwritten; a folder
holding such files is refused without ``--overwrite`` and kept as it is with it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import posixpath
import re
import secrets
import socket
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import fsspec
import fsspec.utils
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem
from pyarrow.fs import FSSpecHandler, PyFileSystem

from transforms.tables import ALL_TABLE_NAMES, DEAD_LETTER, PREDICTIONS

MANIFEST = "manifest.json"  # a copy of the latest committed run's record
RUNS = "runs"  # runs/<run_id>.json: the run record; a run is committed iff it is there
RUNNING = "_RUNNING"  # the lock of the run writing the folder (an OS lock on local disks)
REPORT = "report"  # pipelines.report's folder; it writes only the names below into it
REPORT_FILES = ("report.md", "report.html", "exit_ratios.png", "confidence_by_stage.png", "reliability.png",
                "runs.png", "shadow_agreement.png")
PROBE = ".write-probe"
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")  # UTC start time + random suffix: sortable and unique
RUN_ID_EXAMPLE = "20261128T101500Z-3fa2c1"
RUN_FILE = re.compile(rf"^(?P<run_id>{RUN_ID.pattern})-\d{{5}}-of-\d{{5}}\.parquet$")
RECORD_FILE = re.compile(rf"^(?P<run_id>{RUN_ID.pattern})\.json$")
BEAM_TEMP = re.compile(rf"^beam-temp-(?P<run_id>{RUN_ID.pattern})-[0-9a-f]+$")  # a sink's files before finalize
WRITE_TEMP = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp$")  # write_json's temporary names
GLOB_CHARS = "*?["  # Beam's file sinks match their temporary files by glob: these break finalize
log = logging.getLogger("cascade")


def new_run_id(now: Optional[datetime.datetime] = None) -> str:
    """A run id: its UTC start time to the second and 6 random hex digits, e.g. ``20261128T101500Z-3fa2c1``."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


@dataclass
class Lock:
    """The folder's lock while a run holds it: on a local disk an exclusive ``flock`` on ``_RUNNING`` (the
    kernel drops it when the process dies, so a killed run never blocks the next), elsewhere the file
    created exclusively, whole. ``previous``: what a killed holder had written there, if anything."""

    run_id: str
    path: str
    fd: Optional[int] = None
    previous: dict = field(default_factory=dict)


class RunFolder:
    """One output folder (a local path or an fsspec URL), resolved once."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or url
        self.fs, path = fsspec.core.url_to_fs(url)
        self.path = path.rstrip("/") or path
        self.local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"RunFolder({self.url!r})"

    def _at(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    # ---- names --------------------------------------------------------------------------------------------

    def table_prefix(self, table: str, run_id: str) -> str:
        """Where a run's sink writes table ``table``: ``<folder>/<table>/<run_id>`` (+ ``-SSSSS-of-NNNNN.parquet``)."""
        return f"{self.url}/{table}/{run_id}"

    def check_name(self) -> None:
        """Refuse, before any work, a folder name that Beam's file sinks cannot finalize."""
        bad = sorted({c for c in self.url if c in GLOB_CHARS})
        if bad:
            raise SystemExit(f"output: {self.url!r} contains {' '.join(bad)}, glob characters that Beam's file sinks "
                         "cannot finalize; choose a folder name without * ? [")

    def check_apart_from(self, source: str) -> None:
        """Refuse, before any work, an output folder that the input would list, or that holds the input: a run
        would read its own outputs, or an --overwrite remove files it was given to read."""
        fs, path = fsspec.core.url_to_fs(source)
        if type(fs) is not type(self.fs):
            return
        path, here = posixpath.normpath(path), posixpath.normpath(self.path)
        if any(c in path for c in GLOB_CHARS):
            pattern = re.compile(fsspec.utils.glob_translate(path))
            written = [f"{here}/{name}" for name in (MANIFEST, f"{RUNS}/{RUN_ID_EXAMPLE}.json",
                                                     f"{REPORT}/{REPORT_FILES[0]}", *(
                f"{t}/{RUN_ID_EXAMPLE}-00000-of-00001.parquet" for t in ALL_TABLE_NAMES))]
            hit = next((w for w in written if pattern.match(w)), None)
            if hit:
                raise SystemExit(f"output: the input glob {source!r} would list the files this run writes into "
                                 f"{self.url} (e.g. {hit[len(here) + 1:]}); choose an output folder outside what "
                                 "the input lists")
        elif path == here or path.startswith(here + "/"):
            raise SystemExit(f"output: the input {source!r} lies inside the output folder {self.url}; choose an "
                             "output folder that does not hold the inputs")

    # ---- describing ---------------------------------------------------------------------------------------

    def committed_runs(self) -> list[str]:
        """The ids of the committed runs (``runs/<run_id>.json`` exists), oldest first."""
        try:
            names = [posixpath.basename(f) for f in self.fs.ls(self._at(RUNS), detail=False)]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(m["run_id"] for m in map(RECORD_FILE.match, names) if m)

    def run_files(self, tables: Sequence[str] = ALL_TABLE_NAMES) -> dict[str, list[str]]:
        """Run id -> the files and sink temporary folders it wrote under the tables' folders (relative paths)."""
        found: dict[str, list[str]] = {}
        for table in tables:
            try:
                entries = self.fs.ls(self._at(table), detail=False)
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                name = posixpath.basename(entry.rstrip("/"))
                match = RUN_FILE.match(name) or BEAM_TEMP.match(name)
                if match:
                    found.setdefault(match["run_id"], []).append(f"{table}/{name}")
        return found

    def incomplete_runs(self, tables: Sequence[str] = ALL_TABLE_NAMES) -> dict[str, list[str]]:
        """Run id -> its files, for every run that wrote here without committing: interrupted, or running."""
        committed = set(self.committed_runs())
        return {run_id: files for run_id, files in self.run_files(tables).items() if run_id not in committed}

    def describe(self) -> str:
        """What the folder holds, for a person deciding whether to pass --overwrite or --skip_done."""
        incomplete, committed = self.incomplete_runs(), self.committed_runs()
        parts = []
        if incomplete:
            run_id, files = sorted(incomplete.items())[-1]
            temp = sum(BEAM_TEMP.match(f.split("/", 1)[1]) is not None for f in files)
            parts.append(f"an incomplete run {run_id} (interrupted or still running: it has no {RUNS}/{run_id}.json;"
                         f" {len(files) - temp} table file(s), {temp} temporary folder(s) of the Parquet sink)"
                         + (f" and {len(incomplete) - 1} more" if len(incomplete) > 1 else ""))
        if committed:
            parts.append(f"the committed run {committed[-1]}"
                         + (f" and {len(committed) - 1} earlier" if len(committed) > 1 else ""))
        return " and ".join(parts)

    def record(self, run_id: Optional[str] = None) -> dict:
        """The record of a committed run (default: the latest); fails, saying why, for a folder without one."""
        runs = self.committed_runs()
        if not runs:
            held = self.describe()
            raise FileNotFoundError(f"{self.url} holds no committed run (no {RUNS}/<run_id>.json)"
                                    + (f"; it holds {held}" if held else "") + ": an interrupted run's tables are "
                                    "incomplete, rerun it with --overwrite (or --skip_done to keep earlier runs)")
        run_id = run_id or runs[-1]
        if run_id not in runs:
            raise FileNotFoundError(f"run {run_id} is not committed in {self.url}; committed: {', '.join(runs)}")
        with self.fs.open(self._at(RUNS, f"{run_id}.json"), "r") as fh:
            return json.load(fh)

    def records(self) -> list[dict]:
        """Every committed run's record, oldest first."""
        return [self.record(run_id) for run_id in self.committed_runs()]

    # ---- the lock -----------------------------------------------------------------------------------------

    def _holder_text(self, holder: dict) -> str:
        return ", ".join(f"{k} {holder[k]}" for k in ("run_id", "host", "pid", "started") if k in holder)

    def _lock_local(self, lock: Lock, info: bytes) -> None:
        marker = lock.path
        for _ in range(100):  # a holder may remove the file between our open and our lock: open it again
            fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = _read_json(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise SystemExit(
                    f"output folder {self.url} is locked by another run ({self._holder_text(holder) or 'starting'}):"
                    f" {RUNNING} is held. Two runs cannot write one folder; wait for it to end") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(marker).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # we locked a file its holder has just removed: the lock is the one at the name
                os.close(fd)
                continue
            lock.previous = _read_json(os.pread(fd, 1 << 16, 0))
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
            lock.fd = fd
            return
        raise SystemExit(f"output folder {self.url}: could not take {RUNNING} (it keeps being replaced)")

    def _lock_remote(self, lock: Lock, info: bytes, take_over: bool) -> None:
        for attempt in range(2):
            try:
                with self.fs.open(lock.path, "xb") as fh:  # object stores create the object whole, on close
                    fh.write(info)
                return
            except FileExistsError:
                holder = _read_json(_cat(self.fs, lock.path))
                if attempt == 0 and take_over and _is_gone(holder):
                    lock.previous = holder
                    self.fs.rm(lock.path)
                    continue
                raise SystemExit(
                    f"output folder {self.url} is locked by another run ({self._holder_text(holder) or 'unreadable'}"
                    f"): {RUNNING} exists. Two runs cannot write one folder. If that run has ended without cleaning "
                    f"up (killed), pass --overwrite from its machine, or delete {self.url}/{RUNNING}") from None
        raise AssertionError("unreachable")

    def _release(self, lock: Lock) -> None:
        try:
            if lock.fd is not None:
                os.unlink(lock.path)  # while still locked: a waiting opener then sees another file and retries
                os.close(lock.fd)
                lock.fd = None
            elif _read_json(_cat(self.fs, lock.path)).get("run_id") == lock.run_id:
                self.fs.rm(lock.path)
        except OSError:
            log.warning("could not remove the lock %s/%s", self.url, RUNNING)

    # ---- a run's life -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, run_id: str, *, overwrite: bool = False, keep_committed: bool = False,
             tables: Sequence[str] = ALL_TABLE_NAMES) -> Iterator[Lock]:
        """Hold the folder for run ``run_id``: take its lock, then make it ready, and release the lock on every
        exit path (an exception, Ctrl-C, SIGTERM turned into an exception). Call it only after every check
        that can run before work has passed: ``overwrite`` removes here what earlier runs wrote.

        Ready means: an empty folder; or, with ``keep_committed`` (``--skip_done``), its committed runs kept
        and the files of runs that never committed removed; or, with ``overwrite``, every file the project
        wrote removed (run records and the manifest first, so that no reader takes a half-removed run for a
        whole one). Anything else the folder holds is refused without ``overwrite`` and kept with it."""
        self.check_name()
        info = json.dumps({"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "started":
                           datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}).encode()
        lock = Lock(run_id, self._at(RUNNING))
        try:
            self.fs.makedirs(self.path, exist_ok=True)
            if self.local:
                self._lock_local(lock, info)
            else:
                self._lock_remote(lock, info, overwrite or keep_committed)
        except OSError as err:
            raise SystemExit(f"output: cannot write to {self.url}: {type(err).__name__}: {err}") from None
        try:
            self._make_ready(lock, overwrite, keep_committed, tables)
            yield lock
        except OSError as err:
            raise SystemExit(f"output: cannot write to {self.url}: {type(err).__name__}: {err}") from None
        finally:
            self._release(lock)

    def _ours(self, tables: Sequence[str]) -> tuple[list[str], list[str]]:
        """(files and folders the project wrote here, relative; top-level entries it did not write)."""
        ours, theirs = [], []
        for entry in self.fs.ls(self.path, detail=False):
            name = posixpath.basename(entry.rstrip("/"))
            if name in (RUNNING, PROBE) or WRITE_TEMP.match(name):
                continue
            if name == MANIFEST and self._is_our_manifest():
                ours.append(name)
            elif name == RUNS and self.fs.isdir(entry):
                inside = [posixpath.basename(e) for e in self.fs.ls(entry, detail=False)]
                ours += [f"{RUNS}/{n}" for n in inside if RECORD_FILE.match(n) or WRITE_TEMP.match(n)]
                theirs += [f"{RUNS}/{n}" for n in inside if not (RECORD_FILE.match(n) or WRITE_TEMP.match(n))]
            elif name in tables and self.fs.isdir(entry):
                inside = [posixpath.basename(e.rstrip("/")) for e in self.fs.ls(entry, detail=False)]
                ours += [f"{name}/{n}" for n in inside if RUN_FILE.match(n) or BEAM_TEMP.match(n)]
                theirs += [f"{name}/{n}" for n in inside if not (RUN_FILE.match(n) or BEAM_TEMP.match(n))]
            elif name == REPORT and self.fs.isdir(entry):
                inside = [posixpath.basename(e) for e in self.fs.ls(entry, detail=False)]
                ours += [f"{REPORT}/{n}" for n in inside if n in REPORT_FILES]
                theirs += [f"{REPORT}/{n}" for n in inside if n not in REPORT_FILES]
            else:
                theirs.append(name)
        return ours, theirs

    def _is_our_manifest(self) -> bool:
        record = _read_json(_cat(self.fs, self._at(MANIFEST)))
        return isinstance(record.get("run_id"), str) and RUN_ID.fullmatch(record["run_id"]) is not None

    def _make_ready(self, lock: Lock, overwrite: bool, keep_committed: bool, tables: Sequence[str]) -> None:
        committed = self.committed_runs()
        stale = lock.previous.get("run_id")
        if stale and stale not in committed and not (overwrite or keep_committed) and self.run_files(tables).get(
                stale):
            raise SystemExit(
                f"output folder {self.url} holds an incomplete run: the run that locked it "
                f"({self._holder_text(lock.previous)}) ended without committing (killed or failed); the folder "
                f"holds {self.describe() or 'no table file'}; pass --overwrite to replace it, or --skip_done to keep "
                "the committed runs and do its inputs again")
        ours, theirs = self._ours(tables)
        if self.fs.exists(self._at(MANIFEST)) and MANIFEST not in ours:
            raise SystemExit(f"output folder {self.url} holds a {MANIFEST} that this project did not write (it names "
                             "no run); a run would replace it: choose another output folder")
        if keep_committed:
            for files in self.incomplete_runs(tables).values():
                for name in files:
                    self.fs.rm(self._at(name), recursive=BEAM_TEMP.match(posixpath.basename(name)) is not None)
        elif ours or theirs:
            if not overwrite:
                held = self.describe()
                raise SystemExit(f"output folder {self.url} is not empty ({len(ours) + len(theirs)} entries"
                             + (f": {held}" if held else "") + "); pass --overwrite to replace its outputs, or "
                             "--skip_done to add this run to its committed runs")
            # run records and the manifest first: without them no reader takes the tables for a run's
            order = sorted(ours, key=lambda n: (not (n == MANIFEST or n.startswith(f"{RUNS}/")), n))
            for name in order:
                self.fs.rm(self._at(name), recursive=BEAM_TEMP.match(posixpath.basename(name)) is not None)
            for folder in (RUNS, REPORT, *tables):
                self._remove_if_empty(folder)
            if theirs:
                log.warning("--overwrite kept %d entr%s of %s that this project did not write (e.g. %s)",
                            len(theirs), "y" if len(theirs) == 1 else "ies", self.url, theirs[0])
        probe = self._at(PROBE)
        self.fs.pipe_file(probe, b"")
        self.fs.rm(probe)

    def _remove_if_empty(self, name: str) -> None:
        path = self._at(name)
        try:
            if self.fs.isdir(path) and not self.fs.ls(path, detail=False):
                self.fs.rmdir(path)
        except OSError:
            pass

    def commit(self, record: dict) -> str:
        """Commit a run whose tables are written: its record as ``runs/<run_id>.json`` (atomic: the commit), then
        as ``manifest.json``. Raises SystemExit saying whether the run is committed, from what is on disk."""
        run_id = record["run_id"]
        marker = f"{self.url}/{RUNS}/{run_id}.json"
        try:
            write_json(self.url, f"{RUNS}/{run_id}.json", record)
        except OSError as err:
            done = run_id in self.committed_runs()
            raise SystemExit(f"output: could not write {marker} ({type(err).__name__}: {err}); " + (
                "it is there all the same: the run IS committed" if done else
                "the tables are written but the run is NOT committed: readers ignore them; rerun with --skip_done "
                "(keeps the earlier runs) or --overwrite")) from None
        try:
            write_json(self.url, MANIFEST, record)
        except OSError as err:
            raise SystemExit(f"output: the run {run_id} IS committed ({marker} is written) but {self.url}/{MANIFEST}, "
                         f"the copy of the latest run's record, could not be updated ({type(err).__name__}: {err}); "
                         f"readers that list {RUNS}/ see the run") from None
        return marker

    # ---- reading back -------------------------------------------------------------------------------------

    def table_files(self, name: str, run_ids: Optional[Sequence[str]] = None) -> list[str]:
        """The files of table ``name`` written by ``run_ids`` (default: every committed run), oldest run first.
        A run that never committed is never read by default; files not named by a run id are never read."""
        wanted = set(self.committed_runs() if run_ids is None else run_ids)
        try:
            entries = self.fs.ls(self._at(name), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        files = []
        for f in sorted(entries):
            match = RUN_FILE.match(posixpath.basename(f))
            if match is not None and match["run_id"] in wanted:
                files.append(f)
        return files

    def file_urls(self, name: str, run_ids: Optional[Sequence[str]] = None) -> list[str]:
        """``table_files`` as URLs a reader in another process opens (``--skip_done`` reads ids from them)."""
        return [self.fs.unstrip_protocol(f) if "://" in self.url else f for f in self.table_files(name, run_ids)]

    def dataset(self, name: str, run_ids: Optional[Sequence[str]] = None) -> ds.Dataset:
        """The Parquet files of table ``name`` (see ``table_files``), as one ``pyarrow.dataset``."""
        files = self.table_files(name, run_ids)
        if not files:
            raise FileNotFoundError(f"no Parquet files of a committed run for table {name!r} under {self.url}")
        # Arrow's own filesystem where it can: its fsspec bridge's threads can abort the interpreter at exit
        filesystem = pafs.LocalFileSystem() if self.local else PyFileSystem(FSSpecHandler(self.fs))
        return ds.dataset(files, format="parquet", filesystem=filesystem)

    def count_rows(self, name: str, run_ids: Optional[Sequence[str]] = None) -> int:
        """Rows of a table, from the Parquet footers alone (0 if it has no files)."""
        try:
            return self.dataset(name, run_ids).count_rows()
        except FileNotFoundError:
            return 0

    def batches(self, name: str, columns: Sequence[str], batch_size: int,
                run_ids: Optional[Sequence[str]] = None) -> Iterator[pa.RecordBatch]:
        """The rows of a table, ``columns`` only, ``batch_size`` at a time: memory that does not grow with it."""
        try:
            data = self.dataset(name, run_ids)
        except FileNotFoundError:
            return
        yield from data.to_batches(columns=list(columns), batch_size=batch_size)

    def read(self, name: str, run_ids: Optional[Sequence[str]] = None) -> pa.Table:
        """A whole table over ``run_ids`` (default: every committed run): for small tables, tests and reports."""
        return self.dataset(name, run_ids).to_table()

    def latest(self, name: str = PREDICTIONS.name, columns: Optional[Sequence[str]] = None) -> pa.Table:
        """The latest view of ``predictions`` or ``dead_letter``: one row per id over every committed run.

        An id's outcome is that of the latest committed run with a row of it in either table (a run that
        skipped the id keeps the earlier row); in that run, its prediction if it has one (a duplicate's later
        rows are dead letters of the same id), else its first dead letter by (``duplicate_id`` last, stage,
        uri, error). So an id is in exactly one of the two views. docs/OUTPUTS.md has the same view in DuckDB
        SQL, for folders too large to read here."""
        if name not in (PREDICTIONS.name, DEAD_LETTER.name):
            raise ValueError(f"the latest view is of {PREDICTIONS.name} or {DEAD_LETTER.name}, not {name!r}")
        tables = {t: self.read(t) if self.table_files(t) else None for t in (PREDICTIONS.name, DEAD_LETTER.name)}
        predicted, dead = tables[PREDICTIONS.name], tables[DEAD_LETTER.name]
        if tables[name] is None:
            return (PREDICTIONS if name == PREDICTIONS.name else DEAD_LETTER).schema.empty_table()
        keys = pa.concat_tables([t.select(["id", "run_id"]) for t in tables.values() if t is not None])
        owner = keys.group_by("id").aggregate([("run_id", "max")]).rename_columns(["id", "run_id"])

        def rows(table: pa.Table, extra: Sequence[str] = ()) -> pa.Table:
            """(id, run_id, ``extra``..., row) of ``table``'s rows from their id's latest run."""
            picked = table.select(["id", "run_id", *extra]).append_column(
                "row", pa.array(range(table.num_rows), pa.int64()))
            return picked.join(owner, ["id", "run_id"], join_type="inner")

        if name == PREDICTIONS.name:
            return _columns(predicted.take(rows(predicted).sort_by("id").column("row")), columns)
        candidates = rows(dead, ["category", "stage", "uri", "error"])
        if predicted is not None:  # the run predicted the id: its dead letters (later duplicates) are not its outcome
            candidates = candidates.join(predicted.select(["id", "run_id"]), ["id", "run_id"], join_type="left anti")
        candidates = candidates.append_column(
            "duplicate", pc.equal(candidates.column("category"), "duplicate_id")).sort_by(
            [("id", "ascending"), ("duplicate", "ascending"), ("stage", "ascending"), ("uri", "ascending"),
             ("error", "ascending")])
        ids = candidates.column("id").to_pylist()
        first = [i for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
        return _columns(dead.take(candidates.column("row").take(pa.array(first, pa.int64()))), columns)


def _columns(table: pa.Table, columns: Optional[Sequence[str]]) -> pa.Table:
    return table.select(list(columns)) if columns else table


def _cat(fs, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except OSError:
        return b""


def _read_json(data: bytes) -> dict:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _is_gone(holder: dict) -> bool:
    """Whether the run that holds a (remote) lock is certainly not running: it ran in a process of this machine
    that has ended. An unreadable lock is never taken for a gone one."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def write_json(output: str, name: str, payload: dict) -> str:
    """Write ``payload`` as ``<output>/<name>`` atomically: to a temporary name, renamed into place once whole,
    so that a full disk or a kill never leaves a truncated file under the final name."""
    fs, path = fsspec.core.url_to_fs(output)
    target = f"{path.rstrip('/')}/{name}"
    folder, base = posixpath.split(target)
    fs.makedirs(folder, exist_ok=True)
    temporary = f"{folder}/.{base}.{uuid.uuid4().hex}.tmp"
    data = json.dumps(payload, indent=2, sort_keys=True, default=str).encode()
    try:
        with fs.open(temporary, "wb") as fh:
            fh.write(data)
        fs.mv(temporary, target)
    except BaseException:
        try:
            if fs.exists(temporary):
                fs.rm(temporary)
        except OSError:
            pass
        raise
    return target
