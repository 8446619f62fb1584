"""Reading inputs: a glob of image URLs, a manifest (CSV / Parquet) or a glob of manifests, all through fsspec.

Listing happens in DoFns, not on the driver. A manifest input is split into parts (``SplitManifests``: each
CSV file, and runs of row groups of each Parquet file), spread over workers by a shuffle, so that no worker
reads every row of 10^8; each row's position is (file, row), its place in the listing. A shuffle keyed by
record id follows, so that reading bytes and the first stage spread over workers and duplicate ids meet:
an id is a key, so the input listed first with it (the lowest position) is kept and the others become
dead letters.

Error boundaries: every manifest row and every listed file ends as one record or one dead letter. A CSV
manifest is read one physical line at a time (a record is one line; a quoted field cannot span lines), so a
bad line (not UTF-8, unbalanced quote, too long, more fields than the header) is that line's dead letter and
the lines after it are read as usual; a Parquet row group that cannot be read is a dead letter per row.
Reading one input catches every exception, and is bounded in time. What can be known before any work (the
manifest's header, a glob that matches nothing, a folder given as input) is checked by ``check_source``.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import math
import os
import pickle
import posixpath
import stat
import zlib
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from fsspec.implementations.local import LocalFileSystem

from models.failures import Category
from transforms.fetch import ReadPolicy, Reads, read_failure
from transforms.progress import NAMESPACE, progress
from transforms.records import READ_STAGE, DeadLetter, Record, record_id

DEAD = "dead_letter"
URI_COLUMNS = ("uri", "path")
LABEL_COLUMNS = ("label", "class_index")
MANIFEST_SUFFIXES = (".csv", ".parquet")
MAX_ROW_BYTES = 128 * 1024  # the csv module's field limit: no field of a line this long can exceed it
DEFAULT_READ_TIMEOUT_S = 300.0
INT32 = 2**31
GLOB_CHARS = "*?["
BOM = b"\xef\xbb\xbf"


class BadRow(ValueError):
    """A manifest row that cannot become a record; the message is the dead letter's reason."""


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def join_uri(base: str, path: str) -> str:
    """Resolve a manifest entry relative to the manifest's folder (URLs and absolute paths stay as they are).
    The entry is data: spaces around it are kept."""
    if "://" in path or path.startswith("/") or not base:
        return path
    return posixpath.join(base, path)


def _pick(columns: Iterable[str], choices: tuple[str, ...]) -> Optional[str]:
    lower = {str(c).lower(): c for c in columns}
    return next((lower[c] for c in choices if c in lower), None)


def _physical_lines(fh, limit: int = MAX_ROW_BYTES, block: int = 1 << 20) -> Iterator[tuple[int, Optional[bytes]]]:
    """``(line number from 1, the line without its ending)`` for each line of a binary file, or ``None``
    for a line longer than ``limit`` bytes (skipped without holding it in memory)."""
    number, buf, skipping = 0, b"", False
    while True:
        chunk = fh.read(block)
        if not chunk:
            break
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            number += 1
            line = buf[start:end].removesuffix(b"\r")
            yield number, None if skipping or len(line) > limit else line
            skipping, start = False, end + 1
        buf = buf[start:]
        if len(buf) > limit + 1:  # the line under way is already too long: drop what was read of it
            skipping, buf = True, b""
    if buf or skipping:
        line = buf.removesuffix(b"\r")
        yield number + 1, None if skipping or len(line) > limit else line


def _csv_fields(line: bytes, number: int) -> list[str]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRow(f"bad manifest row: line {number}: not UTF-8 text (byte 0x{line[err.start]:02x} at byte "
                     f"{err.start + 1})") from None
    try:
        return next(csv.reader([text], strict=True))
    except csv.Error as err:
        raise BadRow(f"bad manifest row: line {number}: malformed CSV ({err}); a record is one line, quotes must "
                     "close on it") from None


def _csv_header(fh, source: str) -> list[str]:
    first = next(_physical_lines(fh), (1, b""))[1]
    if first is None:
        raise ValueError(f"manifest {source}: the header line is longer than {MAX_ROW_BYTES} bytes")
    try:
        return _csv_fields(first.removeprefix(BOM), 1)
    except BadRow as err:
        raise ValueError(f"manifest {source}: header: {str(err).split(': ', 2)[-1]}") from None


MANIFEST_BATCH_ROWS = 8192  # Parquet manifest rows turned into Python objects at a time


def manifest_rows(source: str, columns: Optional[list[str]] = None,
                  row_groups: Optional[tuple[int, int]] = None) -> Iterator[tuple[int, Optional[dict], str]]:
    """``(row number, row as a dict or None, why not)`` for every row of a manifest: CSV rows are numbered by
    physical line (the header is line 1; empty lines are not rows), Parquet rows from 1. A row that cannot be
    read comes with the reason and no dict, so that every row is accounted for. ``row_groups``: of a Parquet
    file, only row groups ``start`` to ``stop - 1`` (numbered as in the whole file)."""
    with fsspec.open(source, "rb") as fh:
        if source.lower().endswith(".parquet"):
            pfile = pq.ParquetFile(fh)
            read = columns and [c for c in pfile.schema_arrow.names if c in columns]
            start, stop = row_groups or (0, pfile.num_row_groups)
            position = sum(pfile.metadata.row_group(g).num_rows for g in range(start))
            for group in range(start, stop):
                size, read_rows = pfile.metadata.row_group(group).num_rows, 0
                try:  # in batches: a row group of millions of rows is never held as Python objects at once
                    for batch in pfile.iter_batches(MANIFEST_BATCH_ROWS, row_groups=[group], columns=read or None):
                        for i, row in enumerate(batch.to_pylist(), start=position + read_rows + 1):
                            yield i, row, ""
                        read_rows += batch.num_rows
                except Exception as err:  # a corrupt row group: each of its rows not read is a dead letter
                    reason = f"its row group {group} could not be read: {type(err).__name__}: {err}"
                    for i in range(position + read_rows + 1, position + size + 1):
                        yield i, None, f"bad manifest row: row {i}: {reason}"
                position += size
            return
        lines = _physical_lines(fh)
        first = next(lines, (1, b""))[1] or b""
        header = _csv_fields(first.removeprefix(BOM), 1)
        for number, line in lines:
            if line == b"":
                continue
            if line is None:
                yield number, None, f"bad manifest row: line {number}: longer than {MAX_ROW_BYTES} bytes"
                continue
            try:
                fields = _csv_fields(line, number)
            except BadRow as err:
                yield number, None, str(err)
                continue
            if len(fields) > len(header):
                yield number, None, (f"bad manifest row: line {number}: {len(fields)} fields but the header has "
                                     f"{len(header)} (a uri with a comma must be quoted)")
                continue
            yield number, dict(zip(header, fields + [""] * (len(header) - len(fields)))), ""


def _header(source: str) -> list[pa.Field]:
    """A manifest's columns with their types: a Parquet manifest's own, strings for a CSV's."""
    with fsspec.open(source, "rb") as fh:
        if source.lower().endswith(".parquet"):
            return list(pq.ParquetFile(fh).schema_arrow)
        return [pa.field(name, pa.string()) for name in _csv_header(fh, source)]


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


def is_glob(source: str) -> bool:
    """Whether a source names files by a glob (glob characters in its path, not in its protocol or host)."""
    return any(c in fsspec.core.url_to_fs(source)[1] for c in GLOB_CHARS)


def extra_fields(source: str) -> list[pa.Field]:
    """The columns of a manifest besides its uri, label and id ones (none for a glob): carried through to the
    predictions under their own names and types (strings from a CSV, an empty cell as null)."""
    if not is_manifest(source):
        return []
    if is_glob(source):  # a glob of manifests: its first file's
        files = manifest_files(source)
        if not files:
            return []
        source = files[0]
    return _extras(source, _header(source))


def count_inputs(source: str) -> tuple[int, str]:
    """(inputs a source lists, how they were counted), without reading any input and as the job counts
    them: a Parquet manifest's rows from its footer, a CSV manifest's non-empty physical lines after the
    header, a glob's files. Bad rows and duplicate ids are counted too (they become dead letters)."""
    if is_manifest(source) and is_glob(source):
        files = manifest_files(source)
        return sum(count_inputs(f)[0] for f in files), f"rows of the {len(files)} manifests the glob matches"
    if source.lower().endswith(".parquet"):
        with fsspec.open(source, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows, "rows in the Parquet manifest's footer"
    if is_manifest(source):
        with fsspec.open(source, "rb") as fh:
            lines = sum(1 for _, line in _physical_lines(fh) if line != b"")
        return max(lines - 1, 0), "non-empty lines of the CSV manifest after its header"
    fs, _, _ = fsspec.get_fs_token_paths(source)
    found = fs.glob(source if "://" in source else fs._strip_protocol(source), detail=True)
    return sum(1 for info in found.values() if info.get("type") != "directory"), "files matching the glob"


def parse_label(value: Any, num_classes: Optional[int] = None) -> Optional[int]:
    """A manifest's label -> a class index, or None when absent (null, empty, NaN). Integers, and numbers
    written as integral floats (``2.0``: pandas writes an int column with gaps as floats), in
    ``[0, num_classes)`` (without a class count: in int32); anything else raises ``BadRow`` saying why:
    ``2.7``, inf, booleans, lists, structs, text that is no number, a class the model does not have."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRow(f"{value!r} is a boolean, not a class index")
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise BadRow(f"{value!r} is not an integer") from None
            if math.isnan(value):
                raise BadRow(f"{text!r} is not an integer")
    if isinstance(value, (float, Decimal)):
        if isinstance(value, float) and math.isnan(value):
            return None
        if not math.isfinite(value) or value != int(value):
            raise BadRow(f"{value!r} is not an integer")
        value = int(value)
    if not isinstance(value, int):
        raise BadRow(f"a {type(value).__name__} ({str(value)[:80]}) is not a class index")
    if num_classes is not None and not 0 <= value < num_classes:
        raise BadRow(f"{value} is outside the model's classes 0..{num_classes - 1}")
    if not -INT32 <= value < INT32:
        raise BadRow(f"{value} does not fit a 32-bit class index")
    return value


def _text(value: Any, what: str) -> Optional[str]:
    """A uri or id cell as text (None when empty); ids may be integers, never containers."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if what == "id" and isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return str(value)
    raise BadRow(f"{what} is a {type(value).__name__}, not text")


def manifest_entries(source: str, num_classes: Optional[int] = None,
                     row_groups: Optional[tuple[int, int]] = None,
                     extras: Optional[Sequence[str]] = None) -> Iterator[tuple[Optional[dict], Any]]:
    """``(row, Record or DeadLetter)`` for every row of a manifest (of its ``row_groups`` only, for a part of
    a Parquet file), in order. Ids are the ``id`` column, else the uri; a row that cannot be listed is a
    dead letter at stage 0 naming its line (or Parquet row). ``extras``: the columns carried through (those
    of a glob's first manifest, null where a file lacks one); default: this file's own."""
    fields = _header(source)  # read once per file or part
    uri_col, label_col, id_col = _columns(source, [f.name for f in fields])
    extras = [f.name for f in _extras(source, fields)] if extras is None else list(extras)
    csv_cells = source.lower().endswith(".csv")
    base = posixpath.dirname(source)
    columns = [c for c in (uri_col, label_col, id_col) if c] + extras
    for number, row, problem in manifest_rows(source, columns, row_groups):
        where = f"{source}#{number}"
        if row is None:
            yield None, DeadLetter(where, where, READ_STAGE, problem)
            continue
        place = f"line {number}" if source.lower().endswith(".csv") else f"row {number}"
        try:
            rid = _text(row.get(id_col), "id") if id_col else None
            raw_uri = _text(row.get(uri_col), "uri")
        except BadRow as err:
            yield row, DeadLetter(where, where, READ_STAGE, f"bad manifest row: {place}: {err}")
            continue
        if raw_uri is None or not raw_uri.strip():
            yield row, DeadLetter(record_id(rid, where), where, READ_STAGE,
                                  f"bad manifest row: {place}: empty {uri_col}")
            continue
        uri = join_uri(base, raw_uri)
        try:
            label = parse_label(row.get(label_col), num_classes) if label_col else None
        except BadRow as err:
            yield row, DeadLetter(record_id(rid, uri), uri, READ_STAGE, f"bad label: {place}: {err}")
            continue
        carried = {k: None if csv_cells and row.get(k) == "" else row.get(k) for k in extras}
        yield row, Record(id=record_id(rid, uri), uri=uri, label=label, extras=carried)


def _has_file(pattern: str) -> bool:
    """Whether a local glob matches at least one file (lazily: stops at the first)."""
    return any(os.path.isfile(p) for p in glob.iglob(pattern, recursive=True))


def check_source(source: str) -> None:
    """What can be known about the input before any work: a manifest is a readable regular file with a uri
    column in its header; a path without glob characters is a file, not a folder; a local glob matches a
    file. Raises ``ValueError`` saying what is wrong. (A remote glob is listed by the job itself: a run
    that lists nothing fails at its end.)"""
    try:
        fs, path = fsspec.core.url_to_fs(source)
        local = isinstance(fs, LocalFileSystem)
        if is_manifest(source) and any(c in path for c in GLOB_CHARS):
            files = manifest_files(source)
            if not files:
                raise ValueError(f"{source}: the glob matches no manifest")
            manifest_columns(files[0])
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
                manifest_columns(source)
        elif local and not _has_file(path):
            raise ValueError(f"{source}: the glob matches no file")
    except Exception as err:  # whatever reading the header raised (pyarrow, fsspec, a protocol's package)
        if isinstance(err, ValueError) and source in str(err):
            raise
        raise ValueError(f"{source}: cannot be read: {type(err).__name__}: {err}") from None


def dead(rid: str, uri: str, error: str, category: Category | str = "") -> beam.pvalue.TaggedOutput:
    """A dead letter raised while listing or reading an input (its category from the reason unless given)."""
    progress.add(READ_STAGE, "failed")
    return beam.pvalue.TaggedOutput(DEAD, DeadLetter(rid, uri, READ_STAGE, error, category))


@dataclass(frozen=True)
class ManifestPart:
    """What one worker reads of a manifest: a whole CSV file, or some row groups of a Parquet file. ``file``:
    the file's place among the manifests of the input (sorted), the first part of its rows' positions."""

    file: int
    path: str
    row_groups: Optional[tuple[int, int]] = None  # Parquet: row groups start..stop-1; None: the whole file


PART_ROWS = 200_000  # Parquet rows per part, at least one row group


def manifest_files(source: str) -> list[str]:
    """The manifests of an input: the one named, or the files a glob of manifests matches, sorted (the
    listing order: an id's first row is that of the first file that has it)."""
    if not is_glob(source):
        return [source]
    fs, path = fsspec.core.url_to_fs(source)
    return sorted(fs.unstrip_protocol(p) if "://" in source else p for p in fs.glob(path)
                  if is_manifest(p) and not fs.isdir(p))


def manifest_parts(file: int, path: str) -> Iterator[ManifestPart]:
    """The parts of one manifest file: a CSV whole (a record is a line, found only by reading from the
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


class ExpandSource(beam.DoFn):
    """A glob of image files, a manifest, or a part of one (``ManifestPart``) -> ``(id, (position in the
    listing, uri, label, extra columns))`` per input; bad manifest rows -> dead letters.
    A position is (manifest file, first row group of the part, row in the part), so positions compare in
    listing order across parts read on different workers. Every input is counted in ``inputs_listed`` as it
    is read, the left side of the count invariant: one per file of a glob, one per manifest row (a CSV's
    non-empty physical lines after the header, a Parquet file's rows)."""

    def __init__(self, num_classes: Optional[int] = None, extras: Optional[Sequence[str]] = None):
        self.extras = extras
        self.listed = Metrics.counter(NAMESPACE, "inputs_listed")
        self.num_classes = num_classes

    def process(self, source: str | ManifestPart):
        for position, entry in self._entries(source):
            self.listed.inc()
            if isinstance(entry, DeadLetter):
                progress.add(READ_STAGE, "failed")
                yield beam.pvalue.TaggedOutput(DEAD, entry)
            else:
                yield entry.id, (position, entry.uri, entry.label, entry.extras)

    def _entries(self, source: str | ManifestPart) -> Iterator[tuple[tuple[int, int, int], Record | DeadLetter]]:
        if isinstance(source, str) and is_manifest(source):  # read whole, in this worker (tests, small inputs)
            for file, path in enumerate(manifest_files(source)):
                yield from self._entries(ManifestPart(file, path))
            return
        if isinstance(source, str):
            yield from (((0, 0, i), entry) for i, entry in enumerate(list_source(source, self.num_classes)))
            return
        first = source.row_groups[0] if source.row_groups else 0
        try:
            entries = manifest_entries(source.path, self.num_classes, source.row_groups, self.extras)
            yield from (((source.file, first, i), entry) for i, (_, entry) in enumerate(entries))
        except Exception as err:  # the file itself cannot be read (no header, no uri column): one dead letter
            reason = f"bad manifest: {err}" if isinstance(err, ValueError) else read_failure(err)
            yield (source.file, first, -1), DeadLetter(f"{source.path}#", source.path, READ_STAGE, reason)


def list_source(source: str, num_classes: Optional[int] = None) -> Iterator[Record | DeadLetter]:
    """Every input of a glob (one per file) or of a manifest or glob of manifests (one per row: a Record, or
    a DeadLetter for a row that cannot be listed), in listing order, without reading any input."""
    if not is_manifest(source):
        fs, _, paths = fsspec.get_fs_token_paths(source)
        for path in sorted(paths):
            if fs.isdir(path):
                continue
            uri = fs.unstrip_protocol(path) if "://" in source else path
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


class SplitManifests(beam.PTransform):
    """A manifest or a glob of manifests -> its ``ManifestPart``s, spread over workers: the files are listed
    once, then each file's footer is read (and its parts read) wherever the runner puts it, so that no
    worker reads every row of a large input."""

    def expand(self, source):
        return (
            source
            | "ListManifests" >> beam.FlatMap(lambda s: enumerate(manifest_files(s)))
            | "SpreadFiles" >> beam.Reshuffle()
            | "Parts" >> beam.FlatMapTuple(manifest_parts)
            | "SpreadParts" >> beam.Reshuffle()
        )


ID_BUCKETS = 2048  # keys of the shuffle by id: ids are grouped by a hash, and by id within a group
PACK_INPUTS = 32_768  # listed inputs a worker holds before it packs them, per bucket, for the shuffle


def id_bucket(rid: str) -> int:
    """The shuffle key of an id: the same in every process (``hash`` of a str is not)."""
    return zlib.crc32(rid.encode("utf-8", "surrogatepass")) % ID_BUCKETS


def pack(inputs: list[tuple]) -> bytes:
    """Listed inputs ``(id, position, uri, label, extras)`` of one bucket as they cross the shuffle by id: one
    compressed bytes object for many of them (about 20 bytes per input, where a tuple of Python objects
    takes hundreds), because a runner that groups in memory (FnApiRunner) holds all of them at once, and
    any runner moves fewer bytes."""
    return zlib.compress(pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL), 1)


def unpack(packed: bytes) -> list[tuple]:
    """``pack``'s inputs, back (bytes that this job's own ``PackById`` made, never a user's)."""
    return pickle.loads(zlib.decompress(packed))


class PackById(beam.DoFn):
    """``(id, (position, uri, label, extras))`` -> ``(bucket of the id, packed inputs of that bucket)``: the
    inputs of a bundle are held until ``PACK_INPUTS`` of them (or the bundle's end), then packed per bucket,
    so that a worker holds at most ``PACK_INPUTS`` and the shuffle carries a few bytes per input."""

    def start_bundle(self):
        self._held: dict[int, list[tuple]] = {}
        self._count = 0

    def process(self, element):
        rid, item = element
        self._held.setdefault(id_bucket(rid), []).append((rid, *item))
        self._count += 1
        if self._count >= PACK_INPUTS:
            yield from self._packed()

    def finish_bundle(self):
        for bucket_and_packed in self._packed():
            yield GlobalWindows.windowed_value(bucket_and_packed)

    def _packed(self) -> Iterator[tuple[int, bytes]]:
        held, self._held, self._count = self._held, {}, 0
        for bucket, inputs in held.items():
            yield bucket, pack(inputs)


DONE = (None, None, None, None)  # (position, uri, label, extras) of an id found in an earlier run's outputs


class FirstOfId(beam.DoFn):
    """``(bucket, [packed inputs (id, position, uri, label, extras), ...])`` -> per id, the Record listed first
    with it; any other -> a dead letter. Ids key the output tables, so two inputs never share one, and the
    choice does not depend on the order in which a shuffle delivers them (nor on a retry). An id that an
    earlier run of the output folder has (``DONE``, from ``ReadInputs``' ``done`` files) is skipped, every
    row of it, and counted in ``inputs_skipped``: inputs listed = skipped + predictions + dead letters."""

    def __init__(self):
        self.skipped = Metrics.counter(NAMESPACE, "inputs_skipped")

    def process(self, element):
        _, packed = element
        by_id: dict[str, list] = {}
        for inputs in packed:
            for rid, *item in unpack(inputs):
                by_id.setdefault(rid, []).append(tuple(item))
        for rid, listed in by_id.items():
            if DONE in listed:
                self.skipped.inc(len(listed) - listed.count(DONE))
                continue
            (_, uri, label, extras), *others = sorted(listed, key=lambda item: item[0])
            for _, other, _, _ in others:
                yield dead(rid, other, f"duplicate id {rid!r}: an earlier input has it ({uri}) and is the one kept; "
                                       "give each input its own id")
            yield Record(id=rid, uri=uri, label=label, extras=extras)


def done_ids(rows) -> tuple[str, tuple]:
    """A row (its ``id`` column) of an earlier run's table -> the ``DONE`` marker of that id, for the shuffle."""
    return rows["id"], DONE


class ReadBytes(beam.DoFn):
    """Fill in a Record's encoded bytes, many reads in flight at once (``transforms.fetch.Reads``): records
    come out as their reads end, in any order, the last ones at the bundle's end. Any failure to read one
    input (missing, refused, a server error, a stall longer than ``timeout_s``, not a regular file,
    oversized) is that input's dead letter. ``read``: the config's ``read`` block (None: its defaults)."""

    def __init__(self, max_bytes: int, timeout_s: float = DEFAULT_READ_TIMEOUT_S, read: Any = None):
        self.policy = ReadPolicy.of(max_bytes, timeout_s, read)
        self.peak = Metrics.distribution(NAMESPACE, "reads_in_flight_peak")

    def start_bundle(self):
        self._reads = Reads(self.policy)

    def process(self, record: Record):
        self._reads.submit(record, record.uri)
        yield from self._outputs(self._reads.ready())

    def finish_bundle(self):
        for out in self._outputs(self._reads.ready(wait_all=True)):
            yield (beam.pvalue.TaggedOutput(DEAD, GlobalWindows.windowed_value(out.value))
                   if isinstance(out, beam.pvalue.TaggedOutput) else GlobalWindows.windowed_value(out))
        self.peak.update(self._reads.peak)

    @staticmethod
    def _outputs(ended) -> Iterator:
        for record, data, reason in ended:
            yield dead(record.id, record.uri, reason) if data is None else dataclasses.replace(record, data=data)


class ReadInputs(beam.PTransform):
    """Source (glob or manifest URL) -> PCollection[Record] with bytes, plus a ``dead_letter`` output.

    ``reader`` replaces ``ReadBytes`` (a DoFn from a listed Record to records and dead letters), e.g. one
    that decodes videos into frame records. ``num_classes``: labels outside ``[0, num_classes)`` are dead
    letters. ``done``: Parquet files of earlier runs (with an ``id`` column) whose ids this run skips. ``read``:
    the config's ``read`` block (reads in flight, retries; None: its defaults)."""

    def __init__(self, source: str, max_bytes: int, reader: Optional[beam.DoFn] = None,
                 num_classes: Optional[int] = None, timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 done: Sequence[str] = (), read: Any = None):
        super().__init__()
        self.read = read
        self.done = tuple(done)
        self.source = source
        self.max_bytes = max_bytes
        self.reader = reader
        self.num_classes = num_classes
        self.timeout_s = timeout_s

    def expand(self, pbegin):
        reader = self.reader or ReadBytes(self.max_bytes, self.timeout_s, self.read)
        sources = pbegin | "Source" >> beam.Create([self.source])
        if is_manifest(self.source):
            sources = sources | "SplitManifests" >> SplitManifests()
        extras = None
        if is_manifest(self.source):
            try:  # every file of a glob carries the first one's columns, as the predictions' schema does
                extras = [f.name for f in extra_fields(self.source)] if is_glob(self.source) else None
            except Exception:  # unreadable from here (a Dataflow dry run): each file carries its own
                extras = None
        expand = ExpandSource(self.num_classes, extras)
        listed = sources | "Expand" >> beam.ParDo(expand).with_outputs(DEAD, main="records")
        keyed = listed.records
        if self.done:  # ids of earlier runs meet this run's inputs in the same grouping, and skip them
            done = (
                pbegin
                | "DoneFiles" >> beam.Create(self.done)
                | "ReadDone" >> beam.io.ReadAllFromParquet(columns=["id"])
                | "DoneIds" >> beam.Map(done_ids)
            )
            keyed = (keyed, done) | "WithDone" >> beam.Flatten()
        unique = (
            keyed
            | "PackById" >> beam.ParDo(PackById())
            | "GroupById" >> beam.GroupByKey()
            | "FirstOfId" >> beam.ParDo(FirstOfId()).with_outputs(DEAD, main="records")
        )
        read = unique.records | (type(reader).__name__) >> beam.ParDo(reader).with_outputs(DEAD, main="records")
        dead = (listed[DEAD], unique[DEAD], read[DEAD]) | "ReadFailures" >> beam.Flatten()
        return {"records": read.records, DEAD: dead}
