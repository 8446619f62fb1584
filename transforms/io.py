"""Reading inputs in a pipeline: a glob of image URLs, a manifest (CSV / Parquet) or a glob of manifests.
What an input is, and the rules of listing (CSV, ids, labels), are ``transforms.manifests`` (plain Python);
this module's DoFns move what it lists.

Listing happens in DoFns, not on the driver. A manifest input is split into parts (``SplitManifests``: each
CSV file, and runs of row groups of each Parquet file), spread over workers by a shuffle, so that no worker
reads every row of 10^8; each row's position is (file, row), its place in the listing. A shuffle keyed by
record id follows, so that reading bytes and the first stage spread over workers and duplicate ids meet:
an id is a key, so the input listed first with it (the lowest position) decides, and the others become
``duplicate_id`` dead letters. Rows that cannot be listed (a broken CSV record, no uri) cross the same
shuffle, so that ``--skip_done`` skips every row of an id an earlier run has before any verdict on it.

Error boundaries: every manifest row and every listed file ends as one record or one dead letter (rules in
``transforms.manifests``). Reading one input catches every exception, and is bounded in time. What can be
known before any work is checked by ``transforms.manifests.check_source``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import queue
import stat
import threading
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence

import apache_beam as beam
import fsspec
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from fsspec.implementations.local import LocalFileSystem

from models.failures import Category
from transforms.manifests import (
    ManifestPart,
    extra_fields,
    is_glob,
    is_manifest,
    list_source,
    manifest_entries,
    manifest_files,
    manifest_parts,
)
from transforms.progress import NAMESPACE, progress
from transforms.records import READ_STAGE, DeadLetter, Record

DEAD = "dead_letter"
DEFAULT_READ_TIMEOUT_S = 300.0
LOCAL = LocalFileSystem()


class InputError(OSError):
    """An input that cannot be read, with the reason in words (``not a regular file``, ``too large``...)."""


def dead(rid: str, uri: str, error: str, category: Category | str = "") -> beam.pvalue.TaggedOutput:
    """A dead letter raised while listing or reading an input (its category from the reason unless given)."""
    progress.add(READ_STAGE, "failed")
    return beam.pvalue.TaggedOutput(DEAD, DeadLetter(rid, uri, READ_STAGE, error, category))


class ExpandSource(beam.DoFn):
    """A glob of image files, a manifest, or a part of one (``ManifestPart``) -> ``(id, (position in the
    listing, uri, label, label error, extra columns, problem))`` per input, ``problem`` None for a record or
    ``(reason, category)`` for a row that cannot be listed (keyed by its id, or ``MANIFEST#LINE``): every
    row meets the others of its id, and the ids of earlier runs, before any verdict (``FirstOfId``).
    A position is (manifest file, first row group of the part, row in the part), so positions compare in
    listing order across parts read on different workers. Every input is counted in ``inputs_listed`` as it
    is read, the left side of the count invariant: one per file of a glob, one per manifest row (a CSV's
    records after the header, a Parquet file's rows)."""

    def __init__(self, num_classes: Optional[int] = None, extras: Optional[Sequence[str]] = None):
        self.extras = extras
        self.listed = Metrics.counter(NAMESPACE, "inputs_listed")
        self.num_classes = num_classes

    def process(self, source: str | ManifestPart):
        for position, entry in self._entries(source):
            self.listed.inc()
            if isinstance(entry, DeadLetter):
                yield entry.id, (position, wire(entry.uri), None, None, None,
                                 (entry.error, Category(entry.category).value))
            else:
                yield entry.id, (position, wire(entry.uri), entry.label, entry.label_error, entry.extras, None)

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


def wire(uri: str) -> str | bytes:
    """A uri as Beam's coders can carry it: a local file name that is not UTF-8 (decoded by the OS with
    surrogateescape) as its bytes; ``unwire`` gives it back."""
    try:
        uri.encode("utf-8")
        return uri
    except UnicodeEncodeError:
        return uri.encode("utf-8", "surrogateescape")


def unwire(uri: str | bytes) -> str:
    return uri.decode("utf-8", "surrogateescape") if isinstance(uri, bytes) else uri


ID_BUCKETS = 2048  # keys of the shuffle by id: ids are grouped by a hash, and by id within a group
PACK_INPUTS = 32_768  # listed inputs a worker holds before it packs them, per bucket, for the shuffle


def id_bucket(rid: str) -> int:
    """The shuffle key of an id: the same in every process (``hash`` of a str is not)."""
    return zlib.crc32(rid.encode("utf-8", "surrogatepass")) % ID_BUCKETS


def pack(inputs: list[tuple]) -> bytes:
    """Listed inputs ``(id, position, uri, label, label error, extras, problem)`` of one bucket as they cross
    the shuffle by id: one compressed bytes object for many of them (about 20 bytes per input, where a
    tuple of Python objects takes hundreds), because a runner that groups in memory (FnApiRunner) holds all
    of them at once, and any runner moves fewer bytes."""
    return zlib.compress(pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL), 1)


def unpack(packed: bytes) -> list[tuple]:
    """``pack``'s inputs, back (bytes that this job's own ``PackById`` made, never a user's)."""
    return pickle.loads(zlib.decompress(packed))


class PackById(beam.DoFn):
    """``(id, (position, uri, label, label error, extras, problem))`` -> ``(bucket of the id, packed inputs of
    that bucket)``: the inputs of a bundle are held until ``PACK_INPUTS`` of them (or the bundle's end), then
    packed per bucket, so that a worker holds at most ``PACK_INPUTS`` and the shuffle carries a few bytes
    per input."""

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


DONE = (None,) * 6  # (position, uri, label, label error, extras, problem) of an id an earlier run's outputs have


class FirstOfId(beam.DoFn):
    """``(bucket, [packed inputs (id, position, uri, label, label error, extras, problem), ...])`` -> per id,
    the verdict on the row listed first with it (a Record, or its dead letter if it could not be listed);
    every later row of the id -> a ``duplicate_id`` dead letter. Ids key the output tables, so two inputs
    never share one, and the choice does not depend on the order in which a shuffle delivers them (nor on a
    retry). An id that an earlier run of the output folder has (``DONE``, from ``ReadInputs``' ``done``
    files) is skipped, every row of it whatever happened to it while listing, and counted in
    ``inputs_skipped``: inputs listed = skipped + predictions + dead letters."""

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
            (_, uri, label, label_error, extras, problem), *others = sorted(listed, key=lambda item: item[0])
            uri = unwire(uri)
            for _, other, *_ in others:
                yield dead(rid, unwire(other), f"duplicate id {rid!r}: an earlier input has it ({uri}) and is the one "
                                       "kept; give each input its own id", Category.DUPLICATE_ID)
            if problem is not None:
                yield dead(rid, uri, *problem)
            else:
                yield Record(id=rid, uri=uri, label=label, label_error=label_error, extras=extras)


def done_ids(rows) -> tuple[str, tuple]:
    """A row (its ``id`` column) of an earlier run's table -> the ``DONE`` marker of that id, for the shuffle."""
    return rows["id"], DONE


class _Readers:
    """Daemon threads that run reads for ``with_timeout``, started once per process and reused: a thread per
    read costs more than reading a small file. A thread stuck in a read that timed out is left behind (it is
    a daemon: it never holds the process) and another takes its place."""

    def __init__(self):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def run(self, fn: Callable[[], Any], seconds: float, what: str) -> Any:
        box: dict = {}
        done = threading.Event()
        with self._lock:
            if self._idle == 0:
                threading.Thread(target=self._serve, name="input reader", daemon=True).start()
            else:
                self._idle -= 1
        self._tasks.put((fn, box, done))
        if not done.wait(seconds):
            raise TimeoutError(f"timeout: reading took longer than {seconds:g} s (decode.read_timeout_s)")
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _serve(self):
        while True:
            fn, box, done = self._tasks.get()
            try:
                box["value"] = fn()
            except BaseException as err:  # handed to the caller
                box["error"] = err
            with self._lock:
                self._idle += 1
            done.set()


_READERS = _Readers()


def with_timeout(fn: Callable[[], Any], seconds: float, what: str) -> Any:
    """``fn()``, or ``TimeoutError`` after ``seconds``. It runs in a daemon thread, which is left behind if it
    blocks for good (a stalled server, a pipe nobody writes to): it never holds the job or the process."""
    return _READERS.run(fn, seconds, what)


FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def is_local_path(uri: str) -> bool:
    """A plain local path (no protocol): read directly, without fsspec's URL parsing."""
    return "://" not in uri and not uri.startswith(("file:", "memory:"))


def open_input(uri: str):
    """(filesystem, path) of one input; a local input must be a regular file (a FIFO or a device could block
    or never end), else ``InputError``."""
    fs, path = (LOCAL, uri) if is_local_path(uri) else fsspec.core.url_to_fs(uri)
    if isinstance(fs, LocalFileSystem):
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            kind = next((k for test, k in FILE_KINDS if test(mode)), "not a file")
            raise InputError(f"not a regular file: {kind}")
    return fs, path


def read_input(uri: str, max_bytes: int) -> bytes:
    """The bytes of one input, at most ``max_bytes``; larger inputs are refused unread where their size is
    known."""
    fs, path = open_input(uri)
    with fs.open(path, "rb") as fh:
        size = getattr(fh, "size", None)
        if size is not None and size > max_bytes:
            raise InputError(f"too large: file of {size} bytes exceeds decode.max_bytes={max_bytes}")
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InputError(f"too large: file exceeds decode.max_bytes={max_bytes}")
    return data


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def read_failure(err: BaseException) -> str:
    """Why an input could not be read, in words whose start names the kind of failure (see
    ``transforms.records.REASON_CATEGORIES``). fsspec reports any failed HTTP request for a file's size as
    ``FileNotFoundError``; the HTTP status or connection error it wraps says what really happened."""
    chain = list(_causes(err))
    for cause in chain:
        status = getattr(cause, "status", None)
        if isinstance(status, int) and status >= 400:
            message = getattr(cause, "message", "") or ""
            if status == 404:
                return f"file not found (HTTP 404 {message})".replace(" )", ")")
            if status in (401, 403):
                return f"permission denied (HTTP {status} {message})".replace(" )", ")")
            return f"HTTP error {status} {message}".rstrip()
        name = type(cause).__name__
        if name in ("ClientPayloadError", "ContentLengthError", "TransferEncodingError"):
            return f"HTTP error: the body ended early ({name}: {cause})"
        if name.startswith("ClientConnect") or name == "ServerDisconnectedError" or isinstance(cause, ConnectionError):
            return f"connection failed: {name}: {cause}"
        if isinstance(cause, TimeoutError) and str(cause).startswith("timeout"):
            return str(cause)
    if isinstance(err, InputError):
        return str(err)
    if isinstance(err, TimeoutError):
        return f"timeout: {type(err).__name__}: {err}"
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, PermissionError):
        return f"permission denied: {err.strerror or err}"
    if isinstance(err, IsADirectoryError):
        return "not a regular file: a folder"
    return f"could not read: {type(err).__name__}: {err}"


class ReadBytes(beam.DoFn):
    """Fill in a Record's encoded bytes. Any failure to read one input (missing, refused, a server error,
    a stall longer than ``timeout_s``, not a regular file, oversized) is that input's dead letter."""

    def __init__(self, max_bytes: int, timeout_s: float = DEFAULT_READ_TIMEOUT_S):
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def process(self, record: Record):
        try:
            if is_local_path(record.uri):  # a regular local file (others are refused) is read here: handing
                data = read_input(record.uri, self.max_bytes)  # each read to a thread cost more than the read
            else:
                data = with_timeout(lambda: read_input(record.uri, self.max_bytes), self.timeout_s, record.uri)
        except Exception as err:  # one input's failure, whatever it is, is that input's dead letter
            yield dead(record.id, record.uri, read_failure(err))
            return
        yield dataclasses.replace(record, data=data)


class ReadInputs(beam.PTransform):
    """Source (glob or manifest URL) -> PCollection[Record] with bytes, plus a ``dead_letter`` output.

    ``reader`` replaces ``ReadBytes`` (a DoFn from a listed Record to records and dead letters), e.g. one
    that decodes videos into frame records. ``num_classes``: labels outside ``[0, num_classes)`` are
    ``label_error``s (the record is unlabelled).
    ``done``: Parquet files of earlier runs (with an ``id`` column) whose ids this run skips."""

    def __init__(self, source: str, max_bytes: int, reader: Optional[beam.DoFn] = None,
                 num_classes: Optional[int] = None, timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 done: Sequence[str] = ()):
        super().__init__()
        self.done = tuple(done)
        self.source = source
        self.max_bytes = max_bytes
        self.reader = reader
        self.num_classes = num_classes
        self.timeout_s = timeout_s

    def expand(self, pbegin):
        reader = self.reader or ReadBytes(self.max_bytes, self.timeout_s)
        sources = pbegin | "Source" >> beam.Create([self.source])
        if is_manifest(self.source):
            sources = sources | "SplitManifests" >> SplitManifests()
        extras = None
        if is_manifest(self.source):
            try:  # every file of a glob carries the columns of all of them, as the predictions' schema does
                extras = [f.name for f in extra_fields(self.source)] if is_glob(self.source) else None
            except Exception:  # unreadable from here (a Dataflow dry run): each file carries its own
                extras = None
        keyed = sources | "Expand" >> beam.ParDo(ExpandSource(self.num_classes, extras))
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
        dead = (unique[DEAD], read[DEAD]) | "ReadFailures" >> beam.Flatten()
        return {"records": read.records, DEAD: dead}
