"""What the entry points share: splitting the command line, the output folder rules (its lock, the
atomic manifest), reading tables back."""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import logging
import os
import platform
import re
import socket
import uuid
from importlib import metadata
from typing import Optional, Sequence

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
from apache_beam.options import pipeline_options
from pyarrow.fs import FSSpecHandler, PyFileSystem

from transforms.tables import ALL_TABLE_NAMES

MANIFEST = "manifest.json"
RUNNING = "_RUNNING"  # the lock of the run writing a folder: created exclusively, removed when it ends
OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")
GLOB_CHARS = "*?["  # Beam's file sinks match their temporary files by glob: these break finalize


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


def _lock(fs, path: str, output: str, overwrite: bool) -> str:
    """Create ``RUNNING`` exclusively (two runs cannot both create it) and return this run's id. A lock left by
    a run that is gone (killed) is taken over with ``overwrite``; a live one is never."""
    run_id = uuid.uuid4().hex
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
            raise SystemExit(
                f"output folder {output} is locked by another run ({who or 'unreadable marker'}): {RUNNING} exists. "
                "Two runs cannot write one folder. If that run has ended without cleaning up (killed), pass "
                f"--overwrite from its machine, or delete {output.rstrip('/')}/{RUNNING}") from None
    raise AssertionError("unreachable")


def prepare_output(output: str, overwrite: bool, tables: Sequence[str] = ALL_TABLE_NAMES) -> str:
    """Take the folder's lock (``RUNNING``), so that a second run started into it is refused; refuse a folder
    holding anything else unless ``overwrite``; with it, remove the earlier run's manifest (first: a folder
    without one is incomplete) and tables, so that no stale file can be mistaken for this run's. Then check
    that the folder is writable. All before any work; returns this run's id, for ``release_output``."""
    check_output_name(output)
    fs, path = fsspec.core.url_to_fs(output)
    path = path.rstrip("/")
    try:
        fs.makedirs(path, exist_ok=True)
        run_id = _lock(fs, path, output, overwrite)
    except OSError as err:
        raise SystemExit(f"output: cannot write to {output}: {type(err).__name__}: {err}") from None
    try:
        existing = [e for e in fs.ls(path, detail=False) if e.rstrip("/").rsplit("/", 1)[-1] != RUNNING]
        if existing and not overwrite:
            raise SystemExit(f"output folder {output} is not empty ({len(existing)} entries); "
                             "pass --overwrite to replace an earlier run's outputs")
        for name in (MANIFEST, *tables):
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


def table_dataset(output: str, name: str) -> ds.Dataset:
    """The Parquet files of table ``name`` under a run's output folder, as one ``pyarrow.dataset``."""
    fs, path = fsspec.core.url_to_fs(output)
    files = sorted(fs.glob(f"{path.rstrip('/')}/{name}/*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet files for table {name!r} under {output}")
    return ds.dataset(files, format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs)))


def count_rows(output: str, name: str) -> int:
    """Rows of a table, from the Parquet footers alone (0 if it has no files)."""
    try:
        return table_dataset(output, name).count_rows()
    except FileNotFoundError:
        return 0


def read_table(output: str, name: str) -> pa.Table:
    """A whole table (for the small ones, and for tests and reports)."""
    return table_dataset(output, name).to_table()


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
    temporary = f"{path.rstrip('/')}/.{name}.{uuid.uuid4().hex}.tmp"
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
