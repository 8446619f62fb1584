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
import itertools
import pickle
import zlib
from typing import Any, Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindows
from fsspec.implementations.local import LocalFileSystem

from models.failures import BreakerConfig, Category, CircuitBreaker
from transforms.fetch import ReadPolicy, Reads, read_failure
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
from transforms.records import READ_STAGE, DeadLetter, Record, category_of

DEAD = "dead_letter"
DEFAULT_READ_TIMEOUT_S = 300.0
LOCAL = LocalFileSystem()


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

    def __init__(self, num_classes: Optional[int] = None, extras: Optional[Sequence[str]] = None,
                 limit: int = 0):
        self.extras = extras
        self.limit = limit  # --limit: each part lists at most its first ``limit`` inputs (LimitInputs keeps N)
        self.listed = Metrics.counter(NAMESPACE, "inputs_listed")
        self.num_classes = num_classes

    def process(self, source: str | ManifestPart):
        entries = self._entries(source)
        for position, entry in itertools.islice(entries, self.limit) if self.limit else entries:
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


class LimitInputs(beam.PTransform):
    """``--limit N``: the N inputs first in listing order, of those listed by ``ExpandSource`` (each part lists
    at most N, so the first N of all are among them); the others read are counted in ``inputs_beyond_limit``,
    the count invariant's term for them. The N positions meet in one small combine (N positions)."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit

    def expand(self, keyed):
        cut = (keyed | "Positions" >> beam.Map(lambda kv: kv[1][0])
               | "FirstN" >> beam.combiners.Top.Smallest(self.limit))
        return keyed | "Keep" >> beam.ParDo(_KeepFirst(), beam.pvalue.AsSingleton(cut))


class _KeepFirst(beam.DoFn):
    def __init__(self):
        self.beyond = Metrics.counter(NAMESPACE, "inputs_beyond_limit")

    def process(self, element, first: list):
        if first and element[1][0] <= first[-1]:
            yield element
        else:
            self.beyond.inc()


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


class ReadBytes(beam.DoFn):
    """Fill in a Record's encoded bytes, many reads in flight at once (``transforms.fetch.Reads``): records
    come out as their reads end, in any order, the last ones at the bundle's end. Any failure to read one
    input (missing, refused, a server error, a stall longer than ``timeout_s``, not a regular file,
    oversized) is that input's dead letter. ``read``: the config's ``read`` block (None: its defaults)."""

    def __init__(self, max_bytes: int, timeout_s: float = DEFAULT_READ_TIMEOUT_S, read: Any = None,
                 breaker: Optional[BreakerConfig] = None):
        self.policy = ReadPolicy.of(max_bytes, timeout_s, read)
        self.breaker = breaker or BreakerConfig()
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

    def _outputs(self, ended) -> Iterator:
        if getattr(self, "_breaker", None) is None:  # it holds a lock: made where the DoFn runs, never pickled
            self._breaker = CircuitBreaker("reading the inputs", self.breaker)
        for record, data, reason in ended:
            # every input the same failure (a wrong base folder, a refused bucket): the job stops, uncommitted
            self._breaker.observe(None if data is not None else category_of(reason), reason or "")
            yield dead(record.id, record.uri, reason) if data is None else dataclasses.replace(record, data=data)


class ReadInputs(beam.PTransform):
    """Source (glob or manifest URL) -> PCollection[Record] with bytes, plus a ``dead_letter`` output.

    ``reader`` replaces ``ReadBytes`` (a DoFn from a listed Record to records and dead letters), e.g. one
    that decodes videos into frame records. ``num_classes``: labels outside ``[0, num_classes)`` are
    ``label_error``s (the record is unlabelled).
    ``done``: Parquet files of earlier runs (with an ``id`` column) whose ids this run skips."""

    def __init__(self, source: str, max_bytes: int, reader: Optional[beam.DoFn] = None,
                 num_classes: Optional[int] = None, timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 done: Sequence[str] = (), read: Any = None, breaker: Optional[BreakerConfig] = None,
                 limit: int = 0):
        super().__init__()
        self.limit = limit
        self.read = read
        self.breaker = breaker
        self.done = tuple(done)
        self.source = source
        self.max_bytes = max_bytes
        self.reader = reader
        self.num_classes = num_classes
        self.timeout_s = timeout_s

    def expand(self, pbegin):
        reader = self.reader or ReadBytes(self.max_bytes, self.timeout_s, self.read, self.breaker)
        sources = pbegin | "Source" >> beam.Create([self.source])
        if is_manifest(self.source):
            sources = sources | "SplitManifests" >> SplitManifests()
        extras = None
        if is_manifest(self.source):
            try:  # every file of a glob carries the columns of all of them, as the predictions' schema does
                extras = [f.name for f in extra_fields(self.source)] if is_glob(self.source) else None
            except Exception:  # unreadable from here (a Dataflow dry run): each file carries its own
                extras = None
        keyed = sources | "Expand" >> beam.ParDo(ExpandSource(self.num_classes, extras, self.limit))
        if self.limit:
            keyed = keyed | "Limit" >> LimitInputs(self.limit)
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
