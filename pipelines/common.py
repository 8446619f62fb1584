"""What the entry points share: splitting the command line, the output folder rules, reading tables back."""

from __future__ import annotations

import argparse
import json
import logging
import platform
from importlib import metadata
from typing import Optional, Sequence

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
from pyarrow.fs import FSSpecHandler, PyFileSystem

from transforms.tables import ALL_TABLE_NAMES

MANIFEST = "manifest.json"


def split_argv(
    parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]
) -> tuple[argparse.Namespace, list[str], list[str]]:
    """(our flags, OmegaConf dotted overrides, Beam's pipeline flags) from one command line."""
    args, rest = parser.parse_known_args(argv)
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    beam_args = [a for a in rest if a not in overrides]
    return args, overrides, beam_args


def setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cascade").setLevel(logging.INFO)


def prepare_output(output: str, overwrite: bool, tables: Sequence[str] = ALL_TABLE_NAMES) -> None:
    """Refuse an output folder holding anything unless ``overwrite``; with it, remove the earlier run's
    manifest (first: a folder without one is incomplete) and tables, so that no stale file can be mistaken
    for this run's. Then check that the folder is writable, before any work."""
    fs, path = fsspec.core.url_to_fs(output)
    try:
        if fs.exists(path):
            existing = fs.ls(path, detail=False)
            if existing and not overwrite:
                raise SystemExit(f"output folder {output} is not empty ({len(existing)} entries); "
                                 "pass --overwrite to replace an earlier run's outputs")
            for name in (MANIFEST, *tables):
                target = f"{path.rstrip('/')}/{name}"
                if fs.exists(target):
                    fs.rm(target, recursive=True)
        fs.makedirs(path, exist_ok=True)
        probe = f"{path.rstrip('/')}/.write-probe"
        fs.pipe_file(probe, b"")
        fs.rm(probe)
    except OSError as err:
        raise SystemExit(f"output: cannot write to {output}: {type(err).__name__}: {err}") from None


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
    fs, path = fsspec.core.url_to_fs(output)
    target = f"{path.rstrip('/')}/{name}"
    with fs.open(target, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True, default=str)
    return target
