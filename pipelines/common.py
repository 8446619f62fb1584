"""What the entry points share: splitting the command line, the output folder rules (its lock, run ids,
the atomic manifest as the commit marker), reading tables back (only the files of committed runs)."""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import logging
import os
import platform
import posixpath
import re
import secrets
import socket
import uuid
from importlib import metadata
from typing import Iterator, Optional, Sequence

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
from apache_beam.options import pipeline_options
from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipelines import drop_warning, runners
from transforms.tables import ALL_TABLE_NAMES

MANIFEST = "manifest.json"  # the latest committed run's manifest
RUNS = "runs"  # runs/<run_id>.json: a run is committed iff its manifest is there
RUN_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")  # UTC start time + random suffix: sortable and unique
RUN_FILE = re.compile(rf"^(?P<run_id>{RUN_ID.pattern})-\d{{5}}-of-\d{{5}}\.parquet$")
BEAM_TEMP = re.compile(rf"^beam-temp-(?P<run_id>{RUN_ID.pattern})-")  # a sink's files before they are finalized
RUNNING = "_RUNNING"  # the lock of the run writing a folder: created exclusively, removed when it ends
OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")
GLOB_CHARS = "*?["  # Beam's file sinks match their temporary files by glob: these break finalize


def new_run_id(now: Optional[datetime.datetime] = None) -> str:
    """A run id: its UTC start time to the second and 6 random hex digits, e.g. ``20261128T101500Z-3fa2c1``."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return f"{now.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"


def _beam_parser() -> argparse.ArgumentParser:
    """A parser of every pipeline option Beam knows (as ``PipelineOptions.get_all_options`` builds it)."""
    parser = pipeline_options._BeamArgumentParser(allow_abbrev=False)
    for cls in {str(c): c for c in pipeline_options.PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    return parser


def split_argv(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(our flags, OmegaConf dotted overrides, Beam's pipeline flags) from one command line.

    A flag that is neither ours nor Beam's, and a word that is not a flag's value nor a ``key=value``
    override, fail here, before any work (Beam itself would only warn and drop them): ``--ouput DIR`` or
    ``stages.0.threshold:0.5`` must not run a job with the defaults."""
    args, rest = parser.parse_known_args(argv)
    beam = _beam_parser()
    _, unknown = beam.parse_known_args(rest)
    known = [o for p in (parser, beam) for a in p._actions for o in a.option_strings]
    overrides, problems = [], []
    for word in unknown:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1)
            problems.append(f"{word}: unknown flag" + (f" (did you mean {close[0]}?)" if close else ""))
        elif OVERRIDE.match(word):
            overrides.append(word)
        else:
            problems.append(f"{word}: neither a flag nor a key=value override")
    if problems:
        parser.error("\n  ".join(["refused before any work:", *problems]))
    beam_args = list(rest)
    for word in overrides:
        del beam_args[len(beam_args) - 1 - beam_args[::-1].index(word)]
    return args, overrides, beam_args


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cascade").setLevel(logging.INFO)
    drop_warning(runners.FN_RUNNER_LOGGER, runners.IN_MEMORY_WORKERS_WARNING)


def check_output_name(output: str) -> None:
    """Refuse, before any work, an output path that Beam's file sinks cannot finalize."""
    bad = sorted({c for c in output if c in GLOB_CHARS})
    if bad:
        raise SystemExit(f"output: {output!r} contains {' '.join(bad)}, glob characters that Beam's file sinks "
                         "cannot finalize; choose a folder name without * ? [")


def _marker(fs, path: str) -> dict:
    try:
        return json.loads(fs.cat_file(f"{path}/{RUNNING}"))
    except (OSError, ValueError):
        return {}


def _is_gone(holder: dict) -> bool:
    """Whether the run that holds a lock is certainly not running: it ran in a process of this machine that
    has ended (or in this very process, whose earlier run failed), or the marker is unreadable."""
    if not holder:
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _lock(fs, path: str, output: str, overwrite: bool, run_id: str) -> str:
    """Create ``RUNNING`` exclusively (two runs cannot both create it) for run ``run_id``. A lock left by a run
    that is gone (killed) is taken over with ``overwrite``; a live one is never."""
    info = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    marker = f"{path}/{RUNNING}"
    for attempt in range(2):
        try:
            try:
                with fs.open(marker, "xb") as fh:
                    fh.write(json.dumps(info).encode())
            except (ValueError, NotImplementedError):  # a filesystem without exclusive create: check, then write
                if fs.exists(marker):
                    raise FileExistsError(marker) from None
                fs.pipe_file(marker, json.dumps(info).encode())
            return run_id
        except FileExistsError:
            holder = _marker(fs, path)
            if attempt == 0 and overwrite and _is_gone(holder):
                fs.rm(marker)
                continue
            who = ", ".join(f"{k} {holder[k]}" for k in ("run_id", "host", "pid", "started") if k in holder)
            if _is_gone(holder) and holder.get("pid") != os.getpid():  # killed: its outputs were never committed
                held = describe_folder(output) or "no table file"
                raise SystemExit(
                    f"output folder {output} holds an incomplete run: the run that locked it "
                    f"({who or 'unreadable marker'}) ended without committing (killed or failed); the folder "
                    f"holds {held}; pass --overwrite to replace it") from None
            raise SystemExit(
                f"output folder {output} is locked by another run ({who or 'unreadable marker'}): {RUNNING} exists. "
                "Two runs cannot write one folder. If that run has ended without cleaning up (killed), pass "
                f"--overwrite from its machine, or delete {output.rstrip('/')}/{RUNNING}") from None
    raise AssertionError("unreachable")


def committed_runs(output: str) -> list[str]:
    """The ids of the runs committed in an output folder (``runs/<run_id>.json`` exists), oldest first."""
    fs, path = fsspec.core.url_to_fs(output)
    names = [posixpath.basename(f) for f in fs.glob(f"{path.rstrip('/')}/{RUNS}/*.json")]
    return sorted(n[:-5] for n in names if RUN_ID.fullmatch(n[:-5]))


def incomplete_runs(output: str, tables: Sequence[str] = ALL_TABLE_NAMES) -> dict[str, list[str]]:
    """Run id -> its files and temporary folders, for every run that wrote under ``output`` without being
    committed: interrupted (killed, failed), or still running."""
    fs, path = fsspec.core.url_to_fs(output)
    committed = set(committed_runs(output))
    found: dict[str, list[str]] = {}
    for table in tables:
        folder = f"{path.rstrip('/')}/{table}"
        if not fs.isdir(folder):
            continue
        for entry in fs.ls(folder, detail=False):
            name = posixpath.basename(entry.rstrip("/"))
            match = RUN_FILE.match(name) or BEAM_TEMP.match(name)
            if match and match["run_id"] not in committed:
                found.setdefault(match["run_id"], []).append(f"{table}/{name}")
    return found


def describe_folder(output: str) -> str:
    """What an output folder holds, for a person deciding whether to pass --overwrite."""
    incomplete, committed = incomplete_runs(output), committed_runs(output)
    parts = []
    if incomplete:
        run_id, files = sorted(incomplete.items())[-1]
        temp = sum(BEAM_TEMP.match(f.split("/", 1)[1]) is not None for f in files)
        parts.append(f"an incomplete run {run_id} (interrupted or still running: it has no {RUNS}/{run_id}.json; "
                     f"{len(files) - temp} table file(s), {temp} temporary folder(s) of the Parquet sink)"
                     + (f" and {len(incomplete) - 1} more" if len(incomplete) > 1 else ""))
    if committed:
        parts.append(f"the committed run {committed[-1]}" + (f" and {len(committed) - 1} earlier" if len(committed) > 1
                                                             else ""))
    return " and ".join(parts)


def prepare_output(output: str, overwrite: bool, tables: Sequence[str] = ALL_TABLE_NAMES,
                   run_id: Optional[str] = None, keep_committed: bool = False) -> str:
    """Take the folder's lock (``RUNNING``), so that a second run started into it is refused; refuse a folder
    holding anything else unless ``overwrite``, saying what it holds (a committed run, or an incomplete
    one); with it, remove the earlier runs' manifests and commit markers (first: without them their files
    are never read) and tables, so that no stale file can be mistaken for this run's. Then check that the
    folder is writable. All before any work; returns this run's id (``run_id``, or a new one), for
    ``release_output``. ``keep_committed`` (``--skip_done``): the committed runs stay, to be skipped and
    added to; the files of runs that never committed (killed, failed) are removed, and a killed run's lock
    is taken over: their inputs are done again."""
    run_id = run_id or new_run_id()
    check_output_name(output)
    fs, path = fsspec.core.url_to_fs(output)
    path = path.rstrip("/")
    try:
        fs.makedirs(path, exist_ok=True)
        _lock(fs, path, output, overwrite or keep_committed, run_id)
    except OSError as err:
        raise SystemExit(f"output: cannot write to {output}: {type(err).__name__}: {err}") from None
    try:
        existing = [e for e in fs.ls(path, detail=False) if e.rstrip("/").rsplit("/", 1)[-1] != RUNNING]
        if keep_committed:
            for files in incomplete_runs(output, tables).values():
                for name in files:
                    fs.rm(f"{path}/{name}", recursive=True)
            existing = []
        if existing and not overwrite:
            held = describe_folder(output)
            raise SystemExit(f"output folder {output} is not empty ({len(existing)} entries"
                             + (f": {held}" if held else "") + "); pass --overwrite to replace its outputs")
        for name in () if keep_committed else (MANIFEST, RUNS, *tables):
            target = f"{path}/{name}"
            if fs.exists(target):
                fs.rm(target, recursive=True)
        probe = f"{path}/.write-probe"
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except BaseException as err:
        release_output(output, run_id)
        if isinstance(err, OSError):
            raise SystemExit(f"output: cannot write to {output}: {type(err).__name__}: {err}") from None
        raise
    return run_id


def release_output(output: str, run_id: str) -> None:
    """Remove the folder's lock if this run holds it (a run that failed in this process releases it too)."""
    fs, path = fsspec.core.url_to_fs(output)
    path = path.rstrip("/")
    try:
        if _marker(fs, path).get("run_id") == run_id:
            fs.rm(f"{path}/{RUNNING}")
    except OSError:
        logging.getLogger("cascade").warning("could not remove the lock %s/%s", output, RUNNING)


def table_files(output: str, name: str, run_ids: Optional[Sequence[str]] = None) -> tuple[object, list[str]]:
    """(filesystem, files) of table ``name``: the files of ``run_ids``, by default of the committed runs; files
    not named by a run id (tables written by hand, or before run ids) are read too. A run that was never
    committed is never read by default."""
    fs, path = fsspec.core.url_to_fs(output)
    wanted = set(committed_runs(output) if run_ids is None else run_ids)
    files = []
    for f in sorted(fs.glob(f"{path.rstrip('/')}/{name}/*.parquet")):
        match = RUN_FILE.match(posixpath.basename(f))
        if match is None or match["run_id"] in wanted:
            files.append(f)
    return fs, files


def done_files(output: str, tables: Sequence[str]) -> list[str]:
    """The files of ``tables`` of the runs committed in ``output``, as URLs a reader opens (``--skip_done``
    reads their ids)."""
    fs, _ = fsspec.core.url_to_fs(output)
    found = []
    for name in tables:
        _, files = table_files(output, name)
        found += [fs.unstrip_protocol(f) if "://" in output else f for f in files]
    return found


def table_dataset(output: str, name: str, run_ids: Optional[Sequence[str]] = None) -> ds.Dataset:
    """The Parquet files of table ``name`` (see ``table_files``), as one ``pyarrow.dataset``."""
    fs, files = table_files(output, name, run_ids)
    if not files:
        raise FileNotFoundError(f"no Parquet files of a committed run for table {name!r} under {output}")
    return ds.dataset(files, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs)))


def count_rows(output: str, name: str, run_ids: Optional[Sequence[str]] = None) -> int:
    """Rows of a table, from the Parquet footers alone (0 if it has no files)."""
    try:
        return table_dataset(output, name, run_ids).count_rows()
    except FileNotFoundError:
        return 0


def table_batches(output: str, name: str, columns: Sequence[str], batch_size: int,
                  run_ids: Optional[Sequence[str]] = None) -> Iterator[pa.RecordBatch]:
    """The rows of a table (see ``table_files``), ``columns`` only, ``batch_size`` at a time: for readers whose
    memory must not grow with the table (none if it has no files)."""
    try:
        data = table_dataset(output, name, run_ids)
    except FileNotFoundError:
        return
    yield from data.to_batches(columns=list(columns), batch_size=batch_size)


def read_table(output: str, name: str, run_ids: Optional[Sequence[str]] = None) -> pa.Table:
    """A whole table (for the small ones, and for tests and reports)."""
    return table_dataset(output, name, run_ids).to_table()


def versions(*packages: str) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


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


def commit_run(output: str, manifest: dict) -> str:
    """Commit a run whose tables are written: its manifest as ``runs/<run_id>.json`` (the commit marker), then
    as ``manifest.json`` (the latest committed run's). Returns the marker's path."""
    marker = write_json(output, f"{RUNS}/{manifest['run_id']}.json", manifest)
    write_json(output, MANIFEST, manifest)
    return marker


def read_manifest(output: str, run_id: Optional[str] = None) -> dict:
    """The manifest of a committed run (default: the latest); fails, saying why, for a folder without one."""
    runs = committed_runs(output)
    if not runs:
        held = describe_folder(output)
        raise FileNotFoundError(f"{output} holds no committed run (no {RUNS}/<run_id>.json)"
                                + (f"; it holds {held}" if held else "") + ": an interrupted run's tables are "
                                "incomplete, rerun it with --overwrite")
    run_id = run_id or runs[-1]
    if run_id not in runs:
        raise FileNotFoundError(f"run {run_id} is not committed in {output}; committed: {', '.join(runs)}")
    fs, path = fsspec.core.url_to_fs(output)
    with fs.open(f"{path.rstrip('/')}/{RUNS}/{run_id}.json", "r") as fh:
        return json.load(fh)
