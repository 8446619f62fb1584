"""Listing inputs: a glob of files, a manifest (CSV / Parquet) or a glob of manifests -> one Record or one
DeadLetter per input. Plain Python (no Beam): ``transforms.io``'s DoFns call it, tests and tools call it alone.

Rules (docs/ROBUSTNESS.md says them for users):

- **CSV is read as CSV** (RFC 4180, Python's ``csv`` in strict mode, excel dialect): quoted fields may hold
  separators, doubled quotes and line breaks; lines end with LF, CRLF or CR. A file that Python's ``csv``
  reads gives exactly its records (empty records are not rows). A broken record (a quote that does not close
  properly, a byte that is not UTF-8, a field over the csv field limit, a line or record over
  ``MAX_RECORD_CHARS``) is one dead letter, and reading resynchronises by the parser's own rule: the next
  record starts on the line after the one the broken record started on, so a broken record costs the line
  it starts on, never the records after it. Every physical line is part of exactly one record or dead
  letter (or is empty). The first record is the header.
- **A Parquet manifest** is read in batches; a cell that cannot become a Python value costs its row.
- **One id rule** (``normalise_id``, ``record_id``): an id is the ``id`` cell normalised once (text with its
  surrounding spaces removed, an integer-valued number, ``1`` / ``1.0`` / ``"1.0"``, is the integer ``"1"``;
  null, NaN, empty is no id), else the input's uri, and a uri is the absolute, normalised URL of the input
  (``normalise_uri``: ``m.csv``, ``./m.csv`` and ``d/../m.csv`` list the same uris). Ids are valid UTF-8 text
  (a file name that is not is escaped, ``utf8_text``).
- **Labels never stop a row** (``read_label``): a label is a class index, or the row is unlabelled (``label``
  null); a cell that is no class index is recorded in ``label_error``.
- What can be known before any work (a header without a uri column, duplicate column names, a glob whose
  files disagree on a column's type) is refused by ``check_source`` with a message naming the file.
"""

from __future__ import annotations

import collections
import csv
import glob
import math
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterable, Iterator, Optional, Sequence

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from transforms.fetch import is_local_path
from transforms.records import READ_STAGE, DeadLetter, Record, utf8_text

URI_COLUMNS = ("uri", "path")
LABEL_COLUMNS = ("label", "class_index")
MANIFEST_SUFFIXES = (".csv", ".parquet")
MAX_RECORD_CHARS = 1 << 20  # a CSV line or record longer than this is broken (a field: csv.field_size_limit())
INT32 = 2**31
GLOB_CHARS = "*?["
LOCAL = LocalFileSystem()
MANIFEST_BATCH_ROWS = 8192  # Parquet manifest rows turned into Python objects at a time
PART_ROWS = 200_000  # Parquet rows per part, at least one row group
# label cells that mean "no label" (pandas' default missing-value markers, and -1): the row is unlabelled
UNLABELLED = frozenset({"", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind",
                        "1.#qnan", "<na>", "n/a", "na", "nan", "null", "none"})
INTEGRAL_TEXT = re.compile(r"[+-]?\d+\.0*")  # "1.0", "12.000": a float's rendering of an integer


class BadRow(ValueError):
    """A manifest row that cannot become a record; the message is the dead letter's reason."""


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def is_glob(source: str) -> bool:
    """Whether a source names files by a glob (glob characters in its path, not in its protocol or host)."""
    return any(c in fsspec.core.url_to_fs(source)[1] for c in GLOB_CHARS)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4: ``a/./b/../c`` -> ``a/c``; empty segments (``//``) are kept: on an object store they
    name other objects."""
    out: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if len(out) > 1 or (out and out[0] != ""):
                out.pop()
            if last:
                out.append("")
        elif segment == ".":
            if last:
                out.append("")
        else:
            out.append(segment)
    return "/".join(out)


def normalise_uri(uri: str) -> str:
    """The absolute, normalised form of an input's location, the same whatever the spelling: a local path
    (or ``file://`` URL) -> its absolute path without ``.``/``..`` segments; a URL -> its scheme (and an
    HTTP host) in lower case, its path without ``.``/``..`` segments. Everything else is kept as written
    (spaces included: they are part of a file's name; no percent-decoding)."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):] or "/"
    if is_local_path(uri):
        if uri.startswith("/") and "/." not in uri and "//" not in uri and not uri.endswith("/"):
            return uri  # already absolute and normal (the common case: a manifest entry joined to its folder)
        return os.path.abspath(uri) + ("/" if uri.endswith("/") and uri != "/" else "")
    if "://" not in uri:  # memory:path, file:path: as fsspec reads them
        return uri
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    host, slash, path = rest.partition("/")
    query = ""
    if scheme in ("http", "https"):
        host = host.lower()
        cut = min((i for i in (path.find("?"), path.find("#")) if i >= 0), default=len(path))
        path, query = path[:cut], path[cut:]
    return f"{scheme}://{host}{slash}{_remove_dot_segments(path) if slash else ''}{query}"


def join_uri(base: str, path: str) -> str:
    """A manifest entry resolved against the manifest's folder (URLs and absolute paths stay where they
    point), normalised (``normalise_uri``). The entry is data: spaces around it are kept."""
    if "://" not in path and not path.startswith("/") and base:
        path = f"{base.rstrip('/')}/{path}"
    return normalise_uri(path)


def normalise_id(value: Any) -> Optional[str]:
    """An ``id`` cell -> the record's id, or None for no id. The rule, the same for every file format and
    every run, so that ``--skip_done`` compares like with like: text without its surrounding spaces; a
    number that is an integer (``1``, ``1.0``, text ``"1.0"``) is that integer (``"1"``); other numbers
    as Python writes them (``"1.5"``); null, NaN, empty or blank text (and the text ``nan``) is no id.
    Booleans, bytes, lists and structs raise ``BadRow``."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() == "nan":
            return None
        return str(int(text.split(".", 1)[0])) if INTEGRAL_TEXT.fullmatch(text) else utf8_text(text)
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        raise BadRow(f"id is a {type(value).__name__}, not text or a number")
    if isinstance(value, int):
        return str(value)
    if value != value:  # NaN (float or Decimal)
        return None
    if math.isfinite(value) and value == int(value):
        return str(int(value))
    return str(value.normalize()) if isinstance(value, Decimal) else repr(value)


def record_id(given: Optional[str], uri: str) -> str:
    """A record's id: its manifest's normalised ``id`` where it has one, else its (normalised) uri."""
    return given if given is not None else utf8_text(uri)


def read_label(value: Any, num_classes: Optional[int] = None) -> tuple[Optional[int], Optional[str]]:
    """A manifest's label cell -> ``(class index or None, why it is not one or None)``. Unlabelled without a
    problem: null, NaN, empty, and the markers of ``UNLABELLED`` (``-1``, ``n/a``, ``NA``, ``null``...).
    A class index: an integer, or a number written as an integral float (``2.0``: pandas writes an int
    column with gaps as floats), in ``[0, num_classes)`` (without a class count: in int32). Anything else
    is unlabelled with the reason: ``2.7``, inf, booleans, lists, text that is no number, a class the model
    does not have. A label never stops its row from being classified."""
    try:
        return _class_index(value, num_classes), None
    except BadRow as err:
        return None, str(err)


def _class_index(value: Any, num_classes: Optional[int]) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRow(f"{value!r} is a boolean, not a class index")
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in UNLABELLED:
            return None
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise BadRow(f"{value!r} is not an integer") from None
    if isinstance(value, (float, Decimal)):
        if value != value:
            return None
        if not math.isfinite(value) or value != int(value):
            raise BadRow(f"{value!r} is not an integer")
        value = int(value)
    if not isinstance(value, int):
        raise BadRow(f"a {type(value).__name__} ({str(value)[:80]}) is not a class index")
    if value == -1:
        return None
    if num_classes is not None and not 0 <= value < num_classes:
        raise BadRow(f"{value} is outside the model's classes 0..{num_classes - 1}")
    if not -INT32 <= value < INT32:
        raise BadRow(f"{value} does not fit a 32-bit class index")
    return value


# ---- CSV ------------------------------------------------------------------------------------------------

class BrokenLine(Exception):
    """A physical line that cannot be part of a record (not UTF-8, too long); the message says why."""


class _Lines:
    """The physical lines of a CSV file for ``csv.reader`` (endings kept, as with ``newline=''``), numbered
    from 1. The lines handed out for the record being read are kept (``taken``), so that a broken record
    can be read again from its second line (``pending``); memory is bounded by ``MAX_RECORD_CHARS``."""

    def __init__(self, fh):
        self.fh = fh
        self.number = 0
        self.pending: collections.deque = collections.deque()
        self.taken: list[tuple[int, Any]] = []
        self.size = 0

    def __iter__(self):
        return self

    def start(self) -> None:
        self.taken, self.size = [], 0

    def __next__(self) -> str:
        if self.pending:
            number, line = self.pending.popleft()
        else:
            line = self._read()
            if line is None:
                raise StopIteration
            self.number += 1
            number = self.number
        self.taken.append((number, line))
        if isinstance(line, BrokenLine):
            raise line
        self.size += len(line)
        if self.size > MAX_RECORD_CHARS:
            raise BrokenLine(f"a record longer than {MAX_RECORD_CHARS} characters")
        return line

    def _read(self):
        line = self.fh.readline(MAX_RECORD_CHARS + 1)
        if not line:
            return None
        if len(line) > MAX_RECORD_CHARS and not line.endswith(("\n", "\r")):  # skip the rest of it unheld
            while (more := self.fh.readline(1 << 16)) and not more.endswith(("\n", "\r")):
                pass
            return BrokenLine(f"longer than {MAX_RECORD_CHARS} characters")
        if not line.isascii():
            try:
                line.encode("utf-8")
            except UnicodeEncodeError as err:  # a byte decoded by surrogateescape
                where = len(line[:err.start].encode("utf-8")) + 1
                return BrokenLine(f"not UTF-8 text (byte 0x{ord(line[err.start]) - 0xDC00:02x} at byte {where})")
        return line


def csv_records(fh) -> Iterator[tuple[int, int, Optional[list[str]], str]]:
    """``(first line, last line, fields or None, why not)`` for every non-empty record of a CSV text file
    opened with ``newline=''`` and ``errors='surrogateescape'``: see the module's rules."""
    lines = _Lines(fh)
    reader = csv.reader(lines, strict=True)
    while True:
        lines.start()
        try:
            fields = next(reader)
        except StopIteration:
            return
        except (csv.Error, BrokenLine) as err:
            taken = lines.taken
            first, last = taken[0][0], taken[-1][0]
            if len(taken) == 1:
                reason = str(err) if isinstance(err, BrokenLine) else f"malformed CSV ({err})"
            else:  # resynchronise: the lines after the first are read again, as records of their own
                lines.pending.extendleft(reversed(taken[1:]))
                reason = (f"malformed CSV: a quoted field that opens on this line does not close properly ({err}, "
                          f"line {last}); the lines after it are read as records of their own")
            yield first, first, None, reason
            continue
        if fields:
            yield lines.taken[0][0], lines.taken[-1][0], fields, ""


def _open_csv(source: str):
    return fsspec.open(source, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="")


def _csv_header(records: Iterator, source: str) -> list[str]:
    for first, _, fields, problem in records:
        if fields is None:
            raise ValueError(f"manifest {source}: header (line {first}): {problem}")
        return fields
    return []


# ---- rows of any manifest -------------------------------------------------------------------------------

def _place(source: str, first: int, last: int) -> str:
    if not source.lower().endswith(".csv"):
        return f"row {first}"
    return f"line {first}" if first == last else f"lines {first}-{last}"


def _cell_problem(batch: pa.RecordBatch, i: int) -> str:
    """Why row ``i`` of a batch cannot become Python values: the first of its cells that cannot."""
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            column[i].as_py()
        except Exception as err:  # whatever pyarrow's conversion raises (overflow, out-of-range dates...)
            return f"column {name!r} cannot be read: {type(err).__name__}: {err}"
    return "it cannot be read"


def _parquet_rows(fh, columns: Optional[list[str]], row_groups: Optional[tuple[int, int]]):
    pfile = pq.ParquetFile(fh)
    read = columns and [c for c in pfile.schema_arrow.names if c in columns]
    start, stop = row_groups or (0, pfile.num_row_groups)
    position = sum(pfile.metadata.row_group(g).num_rows for g in range(start))
    for group in range(start, stop):
        size, done = pfile.metadata.row_group(group).num_rows, 0
        try:  # in batches: a row group of millions of rows is never held as Python objects at once
            for batch in pfile.iter_batches(MANIFEST_BATCH_ROWS, row_groups=[group], columns=read or None):
                first = position + done + 1
                try:
                    rows = batch.to_pylist()
                except Exception:  # a cell that cannot be converted costs its row: the batch row by row
                    rows = None
                for i in range(batch.num_rows):
                    if rows is not None:
                        yield first + i, first + i, rows[i], ""
                        continue
                    try:
                        yield first + i, first + i, batch.slice(i, 1).to_pylist()[0], ""
                    except Exception:
                        problem = _cell_problem(batch, i)
                        yield first + i, first + i, None, f"bad manifest row: row {first + i}: {problem}"
                done += batch.num_rows
        except Exception as err:  # a corrupt row group: each of its rows not read is a dead letter
            reason = f"its row group {group} could not be read: {type(err).__name__}: {err}"
            for i in range(position + done + 1, position + size + 1):
                yield i, i, None, f"bad manifest row: row {i}: {reason}"
        position += size


def manifest_rows(source: str, columns: Optional[list[str]] = None,
                  row_groups: Optional[tuple[int, int]] = None
                  ) -> Iterator[tuple[int, int, Optional[dict], str]]:
    """``(first line, last line, row as a dict or None, why not)`` for every row of a manifest: a CSV's
    records by their physical lines (the header is line 1; empty records are not rows), Parquet rows
    numbered from 1 (first = last). A row that cannot be read comes with the reason and no dict, so that
    every row is accounted for. ``row_groups``: of a Parquet file, only row groups ``start`` to
    ``stop - 1`` (numbered as in the whole file)."""
    if source.lower().endswith(".parquet"):
        with fsspec.open(source, "rb") as fh:
            yield from _parquet_rows(fh, columns, row_groups)
        return
    with _open_csv(source) as fh:
        records = csv_records(fh)
        header = _csv_header(records, source)
        for first, last, fields, problem in records:
            if fields is None:
                yield first, last, None, f"bad manifest row: line {first}: {problem}"
            elif len(fields) > len(header):
                yield first, last, None, (f"bad manifest row: {_place(source, first, last)}: {len(fields)} fields "
                                          f"but the header has {len(header)} (a uri with a comma must be quoted)")
            else:
                yield first, last, dict(zip(header, fields + [""] * (len(header) - len(fields)))), ""


def _pick(columns: Iterable[str], choices: tuple[str, ...]) -> Optional[str]:
    lower = {str(c).lower(): c for c in columns}
    return next((lower[c] for c in choices if c in lower), None)


def _header(source: str) -> list[pa.Field]:
    """A manifest's columns with their types: a Parquet manifest's own, strings for a CSV's. Two columns whose
    names differ only in letter case (or not at all) are refused: DuckDB, and the predictions, cannot tell
    them apart."""
    if source.lower().endswith(".parquet"):
        with fsspec.open(source, "rb") as fh:
            fields = list(pq.ParquetFile(fh).schema_arrow)
    else:
        with _open_csv(source) as fh:
            fields = [pa.field(name, pa.string()) for name in _csv_header(csv_records(fh), source)]
    seen: dict[str, str] = {}
    for f in fields:
        if f.name.lower() in seen:
            raise ValueError(f"manifest {source}: the header names column {f.name!r} twice"
                             + (f" (as {seen[f.name.lower()]!r} too)" if seen[f.name.lower()] != f.name else "")
                             + "; give each column its own name")
        seen[f.name.lower()] = f.name
    return fields


def _columns(source: str, names: Sequence[str]) -> tuple[str, Optional[str], Optional[str]]:
    uri = _pick(names, URI_COLUMNS)
    if uri is None:
        raise ValueError(f"manifest {source}: needs a column named one of {URI_COLUMNS}; has {list(names)}")
    return uri, _pick(names, LABEL_COLUMNS), _pick(names, ("id",))


def manifest_columns(source: str) -> tuple[str, Optional[str], Optional[str]]:
    """(uri column, label column, id column) of a manifest, read from its header; fails if no uri column."""
    return _columns(source, [f.name for f in _header(source)])


def _extras(source: str, fields: Sequence[pa.Field]) -> list[pa.Field]:
    used = set(_columns(source, [f.name for f in fields]))
    return [f for f in fields if f.name not in used]


def manifest_files(source: str) -> list[str]:
    """The manifests of an input, normalised (``normalise_uri``): the one named, or the files a glob of
    manifests matches, sorted (the listing order: an id's first row is that of the first file that has it)."""
    if not is_glob(source):
        return [normalise_uri(source)]
    fs, path = fsspec.core.url_to_fs(source)
    return sorted(normalise_uri(fs.unstrip_protocol(p) if "://" in source else p) for p in fs.glob(path)
                  if is_manifest(p) and not fs.isdir(p))


def extra_fields(source: str) -> list[pa.Field]:
    """The columns of a manifest (or of every manifest of a glob) besides its uri, label and id ones: carried
    through to the predictions under their own names and types (strings from a CSV, an empty cell as null;
    null where a file of a glob lacks one). Every file's header is read: a header without a uri column, or
    with a name twice, and a column whose type differs between files (a column of nulls takes the others'
    type) raise ``ValueError`` naming the files."""
    if not is_manifest(source):
        return []
    found: dict[str, tuple[pa.Field, str]] = {}
    for path in manifest_files(source):
        for f in _extras(path, _header(path)):
            known, where = found.get(f.name.lower(), (None, ""))
            if known is None or pa.types.is_null(known.type):
                found[f.name.lower()] = (f.with_nullable(True), path)
            elif known.name != f.name or not (known.type.equals(f.type) or pa.types.is_null(f.type)):
                raise ValueError(f"manifests {source}: column {known.name!r} is {known.type} in {where} but "
                                 f"{f.name!r} is {f.type} in {path}; the files of a glob must agree on their "
                                 "columns' names and types (convert them, or run them separately)")
    return [f for f, _ in found.values()]


def count_inputs(source: str) -> tuple[int, str]:
    """(inputs a source lists, how they were counted), without reading any input and as the job counts
    them: a Parquet manifest's rows from its footer, a CSV manifest's records after its header (broken
    ones included), a glob's files. Bad rows and duplicate ids are counted too (they become dead letters)."""
    if is_manifest(source) and is_glob(source):
        files = manifest_files(source)
        return sum(count_inputs(f)[0] for f in files), f"rows of the {len(files)} manifests the glob matches"
    if source.lower().endswith(".parquet"):
        with fsspec.open(source, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows, "rows in the Parquet manifest's footer"
    if is_manifest(source):
        with _open_csv(source) as fh:
            records = sum(1 for _ in csv_records(fh))
        return max(records - 1, 0), "records of the CSV manifest after its header"
    fs, _, _ = fsspec.get_fs_token_paths(source)
    found = fs.glob(source if "://" in source else fs._strip_protocol(source), detail=True)
    return sum(1 for info in found.values() if info.get("type") != "directory"), "files matching the glob"


def _uri_text(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value if value and value.strip() else None
    raise BadRow(f"uri is a {type(value).__name__}, not text")


def manifest_entries(source: str, num_classes: Optional[int] = None,
                     row_groups: Optional[tuple[int, int]] = None,
                     extras: Optional[Sequence[str]] = None) -> Iterator[tuple[Optional[dict], Any]]:
    """``(row, Record or DeadLetter)`` for every row of a manifest (of its ``row_groups`` only, for a part of
    a Parquet file), in order. A row that cannot be listed (broken, no uri, an id that is no text) is a dead
    letter at stage 0 naming its line (or Parquet row), keyed by its id where it has one, else by
    ``MANIFEST#LINE``. ``extras``: the columns carried through (those of every file of a glob, null where a
    file lacks one); default: this file's own."""
    source = normalise_uri(source)
    fields = _header(source)  # read once per file or part
    uri_col, label_col, id_col = _columns(source, [f.name for f in fields])
    extras = [f.name for f in _extras(source, fields)] if extras is None else list(extras)
    csv_cells = source.lower().endswith(".csv")
    base = posixpath.dirname(source)
    columns = [c for c in (uri_col, label_col, id_col) if c] + extras
    for first, last, row, problem in manifest_rows(source, columns, row_groups):
        where = f"{source}#{first}"
        if row is None:
            yield None, DeadLetter(utf8_text(where), where, READ_STAGE, problem)
            continue
        place = _place(source, first, last)
        try:
            rid = normalise_id(row.get(id_col)) if id_col else None
            raw_uri = _uri_text(row.get(uri_col))
        except BadRow as err:
            yield row, DeadLetter(utf8_text(where), where, READ_STAGE, f"bad manifest row: {place}: {err}")
            continue
        if raw_uri is None:
            yield row, DeadLetter(record_id(rid, where), where, READ_STAGE,
                                  f"bad manifest row: {place}: empty {uri_col}")
            continue
        uri = join_uri(base, raw_uri)
        label, label_error = read_label(row.get(label_col), num_classes) if label_col else (None, None)
        carried = {k: None if csv_cells and row.get(k) == "" else row.get(k) for k in extras}
        yield row, Record(id=record_id(rid, uri), uri=uri, label=label, label_error=label_error, extras=carried)


def list_source(source: str, num_classes: Optional[int] = None) -> Iterator[Record | DeadLetter]:
    """Every input of a glob (one per file) or of a manifest or glob of manifests (one per row: a Record, or
    a DeadLetter for a row that cannot be listed), in listing order, without reading any input."""
    if not is_manifest(source):
        fs, _, paths = fsspec.get_fs_token_paths(source)
        for path in sorted(paths):
            if fs.isdir(path):
                continue
            uri = normalise_uri(fs.unstrip_protocol(path) if "://" in source else path)
            yield Record(id=record_id(None, uri), uri=uri)
        return
    for path in manifest_files(source):
        for _, entry in manifest_entries(path, num_classes):
            yield entry


def first_uri(source: str) -> Optional[str]:
    """The URL of a source's first input (listing only; None if it lists none or cannot be listed from here)."""
    try:
        return next((entry.uri for entry in list_source(source) if isinstance(entry, Record)), None)
    except (OSError, ValueError):
        return None


# ---- before any work ------------------------------------------------------------------------------------

def _has_file(pattern: str) -> bool:
    """Whether a local glob matches at least one file (lazily: stops at the first)."""
    return any(os.path.isfile(p) for p in glob.iglob(pattern, recursive=True))


def check_source(source: str) -> None:
    """What can be known about the input before any work: a manifest is a readable regular file with a uri
    column and no name twice in its header; every manifest of a glob too, and they agree on their columns'
    types; a path without glob characters is a file, not a folder; a local glob matches a file. Raises
    ``ValueError`` saying what is wrong. (A remote glob of files is listed by the job itself: a run that
    lists nothing fails at its end.)"""
    try:
        fs, path = fsspec.core.url_to_fs(source)
        local = isinstance(fs, LocalFileSystem)
        if is_manifest(source) and any(c in path for c in GLOB_CHARS):
            if not manifest_files(source):
                raise ValueError(f"{source}: the glob matches no manifest")
            extra_fields(source)
        elif is_manifest(source) or not any(c in path for c in GLOB_CHARS):
            if not fs.exists(path):
                raise ValueError(f"{source}: no such file")
            kind = fs.info(path).get("type")
            if kind == "directory":
                raise ValueError(f"{source} is a folder; give a glob of its files (e.g. '{source.rstrip('/')}/*.jpg',"
                                 f" '{source.rstrip('/')}/**/*.jpg') or a manifest .csv/.parquet")
            if local and not stat.S_ISREG(os.stat(path).st_mode):
                raise ValueError(f"{source}: not a regular file")
            if is_manifest(source):
                extra_fields(source)
        elif local and not _has_file(path):
            raise ValueError(f"{source}: the glob matches no file")
    except Exception as err:  # whatever reading the header raised (pyarrow, fsspec, a protocol's package)
        if isinstance(err, ValueError):
            raise (err if source in str(err) else ValueError(f"{source}: {err}")) from None
        raise ValueError(f"{source}: cannot be read: {type(err).__name__}: {err}") from None


# ---- parts read in parallel -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestPart:
    """What one worker reads of a manifest: a whole CSV file, or some row groups of a Parquet file. ``file``:
    the file's place among the manifests of the input (sorted), the first part of its rows' positions."""

    file: int
    path: str
    row_groups: Optional[tuple[int, int]] = None  # Parquet: row groups start..stop-1; None: the whole file


def manifest_parts(file: int, path: str) -> Iterator[ManifestPart]:
    """The parts of one manifest file: a CSV whole (a record's start is found only by parsing from the
    start), a Parquet file by runs of row groups of about ``PART_ROWS`` rows (its footer says where)."""
    if not path.lower().endswith(".parquet"):
        yield ManifestPart(file, path)
        return
    try:
        with fsspec.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception:  # an unreadable footer: the part reads as one dead letter saying why
        yield ManifestPart(file, path)
        return
    start, rows = 0, 0
    for group in range(meta.num_row_groups):
        rows += meta.row_group(group).num_rows
        if rows >= PART_ROWS or group == meta.num_row_groups - 1:
            yield ManifestPart(file, path, (start, group + 1))
            start, rows = group + 1, 0
