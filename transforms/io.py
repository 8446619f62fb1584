"""Reading inputs: a glob of image URLs or a manifest (CSV / Parquet), all through fsspec.

Listing happens in a DoFn, not on the driver, and is followed by a shuffle keyed by record id, so that
reading bytes and the first stage spread over workers and duplicate ids meet: an id is a key, so the input
listed first with it is kept and the others become dead letters. Every input that cannot be listed or read
becomes a dead letter.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import posixpath
from typing import Iterable, Iterator, Optional

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from models.failures import Category
from transforms.progress import NAMESPACE, progress
from transforms.records import READ_STAGE, DeadLetter, Record

DEAD = "dead_letter"
URI_COLUMNS = ("uri", "path")
LABEL_COLUMNS = ("label", "class_index")
MANIFEST_SUFFIXES = (".csv", ".parquet")


def is_manifest(source: str) -> bool:
    return source.lower().endswith(MANIFEST_SUFFIXES)


def _join(base: str, path: str) -> str:
    """Resolve a manifest entry relative to the manifest's folder (URLs and absolute paths stay as they are)."""
    if "://" in path or path.startswith("/") or not base:
        return path
    return posixpath.join(base, path)


def _pick(columns: Iterable[str], choices: tuple[str, ...]) -> Optional[str]:
    lower = {c.lower(): c for c in columns}
    return next((lower[c] for c in choices if c in lower), None)


def _manifest_rows(source: str) -> Iterator[dict]:
    with fsspec.open(source, "rb") as fh:
        if source.lower().endswith(".parquet"):
            pfile = pq.ParquetFile(fh)
            for group in range(pfile.num_row_groups):
                yield from pfile.read_row_group(group).to_pylist()
        else:
            yield from csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8-sig", newline=""))


def _header(source: str) -> list[pa.Field]:
    """A manifest's columns with their types: a Parquet manifest's own, strings for a CSV's."""
    with fsspec.open(source, "rb") as fh:
        if source.lower().endswith(".parquet"):
            return list(pq.ParquetFile(fh).schema_arrow)
        names = next(csv.reader(io.TextIOWrapper(fh, encoding="utf-8-sig", newline="")), [])
    return [pa.field(name, pa.string()) for name in names]


def manifest_columns(source: str) -> tuple[str, Optional[str], Optional[str]]:
    """(uri column, label column, id column) of a manifest, read from its header; fails if no uri column."""
    columns = [f.name for f in _header(source)]
    uri = _pick(columns, URI_COLUMNS)
    if uri is None:
        raise ValueError(f"manifest {source}: needs a column named one of {URI_COLUMNS}; has {columns}")
    return uri, _pick(columns, LABEL_COLUMNS), _pick(columns, ("id",))


def extra_fields(source: str) -> list[pa.Field]:
    """The columns of a manifest besides its uri, label and id ones (none for a glob): carried through to the
    predictions under their own names and types (strings from a CSV, an empty cell as null)."""
    if not is_manifest(source):
        return []
    used = set(manifest_columns(source))
    return [f for f in _header(source) if f.name not in used]


def count_inputs(source: str) -> tuple[int, str]:
    """(inputs a source lists, how they were counted), without reading any input: a Parquet manifest's rows
    from its footer, a CSV manifest's non-blank lines after the header, a glob's files. Bad rows and
    duplicate ids are counted too (they become dead letters)."""
    if source.lower().endswith(".parquet"):
        with fsspec.open(source, "rb") as fh:
            return pq.ParquetFile(fh).metadata.num_rows, "rows in the Parquet manifest's footer"
    if is_manifest(source):
        with fsspec.open(source, "rb") as fh:
            lines = sum(1 for line in fh if line.strip())
        return max(lines - 1, 0), "non-blank lines of the CSV manifest after its header"
    fs, _, _ = fsspec.get_fs_token_paths(source)
    found = fs.glob(source if "://" in source else fs._strip_protocol(source), detail=True)
    return sum(1 for info in found.values() if info.get("type") != "directory"), "files matching the glob"


def dead(rid: str, uri: str, error: str, category: Category) -> beam.pvalue.TaggedOutput:
    """A dead letter raised while listing or reading an input."""
    progress.add(READ_STAGE, "failed")
    return beam.pvalue.TaggedOutput(DEAD, DeadLetter(rid, uri, READ_STAGE, error, category))


def read_failure(err: Exception) -> tuple[str, Category]:
    """The reason and category of an input whose bytes could not be read."""
    if isinstance(err, FileNotFoundError):
        return "file not found", Category.NOT_FOUND
    category = {PermissionError: Category.PERMISSION_DENIED, TimeoutError: Category.TIMEOUT}.get(
        type(err), Category.READ_ERROR)
    return f"could not read: {type(err).__name__}: {err}", category


class ExpandSource(beam.DoFn):
    """A glob or a manifest -> ``(id, (position in the listing, Record without bytes))`` per input; bad
    manifest rows -> dead letters. Every input it yields is counted in ``inputs_listed``, the left side of
    the count invariant."""

    def __init__(self):
        self.listed = Metrics.counter(NAMESPACE, "inputs_listed")

    def process(self, source: str):
        for position, element in enumerate(self._expand(source)):
            self.listed.inc()
            yield element if isinstance(element, beam.pvalue.TaggedOutput) else (element.id, (position, element))

    def _expand(self, source: str):
        if not is_manifest(source):
            fs, _, paths = fsspec.get_fs_token_paths(source)
            for path in sorted(paths):
                if fs.isdir(path):
                    continue
                uri = fs.unstrip_protocol(path) if "://" in source else path
                yield Record(id=uri, uri=uri)
            return
        uri_col, label_col, id_col = manifest_columns(source)
        extras = [f.name for f in extra_fields(source)]
        csv_cells = not source.lower().endswith(".parquet")
        base = posixpath.dirname(source)
        for line, row in enumerate(_manifest_rows(source), start=2):
            raw_uri = row.get(uri_col)
            if raw_uri is None or str(raw_uri).strip() == "":
                yield dead(f"{source}#{line}", f"{source}#{line}", f"manifest row {line}: empty {uri_col}",
                           Category.BAD_MANIFEST_ROW)
                continue
            uri = _join(base, str(raw_uri).strip())
            label = row.get(label_col) if label_col else None
            try:
                label = None if label is None or str(label).strip() == "" else int(label)
            except ValueError:
                yield dead(uri, uri, f"manifest row {line}: label {label!r} is not an integer",
                           Category.BAD_MANIFEST_ROW)
                continue
            rid = str(row[id_col]) if id_col and row.get(id_col) not in (None, "") else uri
            carried = {k: None if csv_cells and row.get(k) == "" else row.get(k) for k in extras}
            yield Record(id=rid, uri=uri, label=label, extras=carried)


class FirstOfId(beam.DoFn):
    """``(id, [(position, Record), ...])`` -> the Record listed first with that id; any other -> a dead
    letter. Ids key the output tables, so two inputs never share one, and the choice does not depend on
    the order in which a shuffle delivers them (nor on a retry)."""

    def process(self, element):
        rid, listed = element
        (_, kept), *others = sorted(listed, key=lambda item: item[0])
        for _, record in others:
            yield dead(record.id, record.uri, f"duplicate id {rid!r}: an earlier input has it ({kept.uri}) and is "
                                              "the one kept; give each input its own id", Category.DUPLICATE_ID)
        yield kept


class ReadBytes(beam.DoFn):
    """Fill in a Record's encoded bytes; unreadable or oversized files -> dead letters."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes

    def process(self, record: Record):
        try:
            with fsspec.open(record.uri, "rb") as fh:
                size = getattr(fh, "size", None)
                if size is not None and size > self.max_bytes:
                    yield dead(record.id, record.uri, f"file of {size} bytes exceeds decode.max_bytes="
                                                      f"{self.max_bytes}", Category.TOO_LARGE)
                    return
                data = fh.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                yield dead(record.id, record.uri, f"file exceeds decode.max_bytes={self.max_bytes}",
                           Category.TOO_LARGE)
                return
        except (OSError, ValueError, ImportError) as err:  # ImportError: a protocol whose fsspec package is absent
            yield dead(record.id, record.uri, *read_failure(err))
            return
        yield dataclasses.replace(record, data=data)


class ReadInputs(beam.PTransform):
    """Source (glob or manifest URL) -> PCollection[Record] with bytes, plus a ``dead_letter`` output.

    ``reader`` replaces ``ReadBytes`` (a DoFn from a listed Record to records and dead letters), e.g. one
    that decodes videos into frame records."""

    def __init__(self, source: str, max_bytes: int, reader: Optional[beam.DoFn] = None):
        super().__init__()
        self.source = source
        self.max_bytes = max_bytes
        self.reader = reader

    def expand(self, pbegin):
        reader = self.reader or ReadBytes(self.max_bytes)
        listed = (
            pbegin
            | "Source" >> beam.Create([self.source])
            | "Expand" >> beam.ParDo(ExpandSource()).with_outputs(DEAD, main="records")
        )
        unique = (
            listed.records
            | "GroupById" >> beam.GroupByKey()
            | "FirstOfId" >> beam.ParDo(FirstOfId()).with_outputs(DEAD, main="records")
        )
        read = unique.records | (type(reader).__name__) >> beam.ParDo(reader).with_outputs(DEAD, main="records")
        dead = (listed[DEAD], unique[DEAD], read[DEAD]) | "ReadFailures" >> beam.Flatten()
        return {"records": read.records, DEAD: dead}
