"""Reading the bytes of inputs, many at a time: a window of reads in flight per caller, bounded in requests and
in bytes, each read bounded in time and failing alone. No Beam here: ``transforms.io.ReadBytes`` only moves
records in and out of a ``Reads`` window.

- ``http://`` and ``https://`` inputs are read by one asyncio event loop per process (aiohttp, the client that
  fsspec's HTTP filesystem uses), one GET per input: its ``Content-Length`` is checked against
  ``decode.max_bytes`` before the body is read, redirects, TLS and DNS failures are named as such, and
  transient failures (HTTP 429/500/502/503/504, a connection reset, a body cut short) are retried with
  exponential backoff, honouring ``Retry-After`` up to a bound, within the input's deadline.
- Every other input (a plain local path, ``file://``, ``gs://``, ``s3://``, ``memory://``) is read by fsspec in
  a reader thread, so that a stalled filesystem (NFS, gcsfuse) holds that thread, never the job: the read is
  that input's timeout dead letter after ``decode.read_timeout_s``, and its thread is left behind.
- The bytes that reads hold (being received, or received and not yet taken by the caller) are bounded by
  ``read.bytes_in_flight``: a read whose size is known waits before its body until it fits (a read alone may
  always go on, so an input larger than the budget is read on its own); one of unknown size waits until the
  budget is not full.

The outcome of each read is its bytes or the reason it failed, in words whose start names the kind of failure
(``transforms.records.REASON_CATEGORIES``), always valid UTF-8.
"""

from __future__ import annotations

import asyncio
import atexit
import email.utils
import errno
import os
import queue
import random
import socket
import ssl
import stat
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

LOCAL = LocalFileSystem()
HTTP = ("http://", "https://")
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_REDIRECTS = 10
HTTP_GRACE_S = 1.0  # past an HTTP read's deadline, the time its coroutine has to end itself before it is cancelled
CHUNK = 1 << 16
FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
              (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class InputError(OSError):
    """An input that cannot be read, with the reason in words (``not a regular file``, ``too large``...)."""


class HTTPStatusError(OSError):
    """An HTTP answer of status >= 400; ``retry_after`` is the server's ``Retry-After`` in seconds, if any."""

    def __init__(self, status: int, message: str, retry_after: Optional[float] = None):
        super().__init__(f"HTTP {status} {message}")
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass(frozen=True)
class ReadPolicy:
    """How one window reads: the ``read`` block of a config (``configs.schema.ReadConfig``) with the limits of
    ``decode`` that apply to every read."""

    max_bytes: int  # decode.max_bytes
    timeout_s: float  # decode.read_timeout_s: each input's deadline, retries and waits included
    in_flight: int = 64  # read.in_flight
    bytes_in_flight: int = 64 << 20  # read.bytes_in_flight
    attempts: int = 3  # read.attempts
    backoff_s: float = 0.2  # read.backoff_s
    retry_after_max_s: float = 10.0  # read.retry_after_max_s

    @classmethod
    def of(cls, max_bytes: int, timeout_s: float, read: Any = None) -> "ReadPolicy":
        """From the decode limits and a ``read`` config block (None: the defaults)."""
        if read is None:
            return cls(max_bytes, timeout_s)
        return cls(max_bytes, timeout_s, read.in_flight, read.bytes_in_flight, read.attempts, read.backoff_s,
                   read.retry_after_max_s)


def valid_text(text: str) -> str:
    """``text`` as valid UTF-8 text: bytes that were not UTF-8 (decoded with surrogate escapes, as HTTP reason
    phrases and POSIX file names are) and lone surrogates become backslash escapes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


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


def too_large(max_bytes: int, size: Optional[int] = None) -> InputError:
    if size is None:
        return InputError(f"too large: file exceeds decode.max_bytes={max_bytes}")
    return InputError(f"too large: file of {size} bytes exceeds decode.max_bytes={max_bytes}")


def read_input(uri: str, max_bytes: int, reserve: Optional[Callable[[int], None]] = None) -> bytes:
    """The bytes of one input through fsspec, at most ``max_bytes``; larger inputs are refused unread where
    their size is known. ``reserve(size)`` is called before the bytes are read (0 where the size is unknown)."""
    fs, path = open_input(uri)
    with fs.open(path, "rb") as fh:
        size = getattr(fh, "size", None)
        if size is None and isinstance(fs, LocalFileSystem):
            size = os.fstat(fh.fileno()).st_size
        if size is not None and size > max_bytes:
            raise too_large(max_bytes, size)
        if reserve is not None:
            reserve(size or 0)
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise too_large(max_bytes)
    return data


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _connection_failure(cause: BaseException) -> Optional[str]:
    """A connection that could not be made or was lost, named: DNS, TLS, refused, reset."""
    name = type(cause).__name__
    host = getattr(cause, "host", None)
    where = f" to {host}:{cause.port}" if host else ""
    os_error = getattr(cause, "os_error", None)
    if name == "ClientConnectorDNSError" or isinstance(os_error, socket.gaierror) or isinstance(cause, socket.gaierror):
        return f"connection failed: DNS lookup failed{' for ' + host if host else ''} ({name}: {cause})"
    if name == "ClientConnectorCertificateError" or isinstance(cause, ssl.SSLCertVerificationError):
        return f"connection failed: TLS certificate not accepted{where} ({name}: {cause})"
    if "SSL" in name or isinstance(cause, ssl.SSLError) or isinstance(os_error, ssl.SSLError):
        return f"connection failed: TLS handshake failed{where} ({name}: {cause})"
    if name.startswith("ClientConnect") or name == "ServerDisconnectedError" or isinstance(cause, ConnectionError):
        return f"connection failed: {name}: {cause}"
    if name == "ClientOSError" and getattr(cause, "errno", None) in (errno.ECONNRESET, errno.EPIPE):
        return f"connection failed: reset by the server ({name}: {cause})"
    return None


def _one_line(cause: BaseException) -> str:
    return " ".join(f"{type(cause).__name__}: {cause}".split())


def _failure(err: BaseException) -> str:
    chain = list(_causes(err))
    for cause in chain:  # aiohttp reports an answer it cannot parse as an HTTP 400 of its own making
        names = {kind.__name__ for kind in type(cause).__mro__}
        if "PayloadEncodingError" in names or type(cause).__name__ == "ClientPayloadError":
            return f"HTTP error: the body ended early ({_one_line(cause)})"
        if "HttpProcessingError" in names:
            return f"HTTP error: not a valid HTTP answer ({_one_line(cause)})"
    for cause in chain:
        name = type(cause).__name__
        if name == "TooManyRedirects":
            return f"HTTP error: redirect loop (more than {MAX_REDIRECTS} redirects)"
        status = getattr(cause, "status", None)
        if isinstance(status, int) and status >= 400:
            message = getattr(cause, "message", "") or ""
            if status == 404:
                return f"file not found (HTTP 404 {message})".replace(" )", ")")
            if status in (401, 403):
                return f"permission denied (HTTP {status} {message})".replace(" )", ")")
            return f"HTTP error {status} {message}".rstrip()
        connection = _connection_failure(cause)
        if connection:
            return connection
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


def read_failure(err: BaseException) -> str:
    """Why an input could not be read, in valid UTF-8 words whose start names the kind of failure (see
    ``transforms.records.REASON_CATEGORIES``). fsspec reports any failed HTTP request for a file's size as
    ``FileNotFoundError``; the HTTP status or connection error it wraps says what really happened."""
    return valid_text(_failure(err))


def timeout_error(seconds: float) -> TimeoutError:
    return TimeoutError(f"timeout: reading took longer than {seconds:g} s (decode.read_timeout_s)")


class _Readers:
    """Daemon threads that run blocking reads, started once per process and reused: a thread per read costs
    more than reading a small file. A thread stuck in a read that timed out is left behind (it is a daemon: it
    never holds the process) and another takes its place."""

    def __init__(self):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._lock:
            if self._idle == 0:
                threading.Thread(target=self._serve, name="input reader", daemon=True).start()
            else:
                self._idle -= 1
        self._tasks.put((fn, future))
        return future

    def run(self, fn: Callable[[], Any], seconds: float) -> Any:
        future = self.submit(fn)
        try:
            return future.result(seconds)
        except TimeoutError:
            if future.done():  # fn's own TimeoutError
                raise
            raise timeout_error(seconds) from None

    def _serve(self):
        while True:
            fn, future = self._tasks.get()
            future.set_running_or_notify_cancel()  # a running read cannot be cancelled: it ends in its thread
            try:
                value = fn()
            except BaseException as err:  # handed to the caller
                with self._lock:
                    self._idle += 1
                future.set_exception(err)
            else:
                with self._lock:
                    self._idle += 1
                future.set_result(value)


_READERS = _Readers()


def with_timeout(fn: Callable[[], Any], seconds: float, what: str = "") -> Any:
    """``fn()``, or ``TimeoutError`` after ``seconds``. It runs in a daemon thread, which is left behind if it
    blocks for good (a stalled server, a pipe nobody writes to): it never holds the job or the process."""
    return _READERS.run(fn, seconds)


class ByteBudget:
    """The bytes that one window's reads may hold at once. ``take`` waits (a thread) or ``take_async`` awaits (a
    coroutine) until ``n`` more fit, or until nothing is held (a read larger than the budget goes alone)."""

    def __init__(self, total: int):
        self.total = total
        self.held = 0
        self._cond = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def _fits(self, n: int) -> bool:
        return self.held == 0 or self.held + n <= self.total

    def take(self, n: int, deadline: float = 0.0) -> None:
        with self._cond:
            left = None if not deadline else max(deadline - time.monotonic(), 0.0)
            if not self._cond.wait_for(lambda: self._fits(n), left):
                raise TimeoutError("timeout: waited for bytes in flight (read.bytes_in_flight)")
            self.held += n

    async def take_async(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self._fits(n):
                    self.held += n
                    return
                waiter = loop.create_future()
                self._waiters.append((loop, waiter))
            await waiter

    def count(self, n: int) -> None:
        """``n`` more bytes held without waiting: those of a body that arrives longer than announced."""
        with self._cond:
            self.held += n

    def give(self, n: int) -> None:
        if not n:
            return
        with self._cond:
            self.held -= n
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            loop.call_soon_threadsafe(_wake, waiter)


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def retry_after(value: Optional[str]) -> Optional[float]:
    """A ``Retry-After`` header in seconds (a number of seconds or an HTTP date), None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0) if when else None


def transient(err: BaseException) -> bool:
    """Whether a failed HTTP read may succeed if tried again: 429/500/502/503/504, a reset or dropped connection,
    a body cut short. A refused connection, a DNS or TLS failure, a 4xx, a size refusal are not retried."""
    if isinstance(err, HTTPStatusError):
        return err.status in TRANSIENT_STATUS
    name = type(err).__name__
    if name in ("ServerDisconnectedError", "ClientPayloadError"):
        return True
    return name == "ClientOSError" and getattr(err, "errno", None) in (errno.ECONNRESET, errno.EPIPE)


class _HTTP:
    """The process's event loop and HTTP session for reads (started on first use, in a daemon thread)."""

    _lock = threading.Lock()
    _instance: Optional["_HTTP"] = None

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.session = None
        ready = threading.Event()
        threading.Thread(target=self._serve, args=(ready,), name="http reads", daemon=True).start()
        ready.wait()
        atexit.register(self.close)

    @classmethod
    def get(cls) -> "_HTTP":
        with cls._lock:
            if cls._instance is None or cls._instance.loop.is_closed():
                cls._instance = cls()
            return cls._instance

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    async def _session(self):
        if self.session is None:
            import aiohttp

            # no limit on connections: each window bounds its own reads; no overall timeout: each read has its own
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        return self.session

    def close(self) -> None:
        if self.session is not None and not self.loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self.session.close(), self.loop).result(2)
            except Exception:  # the process is exiting: nothing to do about a session that does not close
                pass

    def submit(self, uri: str, policy: ReadPolicy, budget: ByteBudget, taken: list) -> Future:
        return asyncio.run_coroutine_threadsafe(self._read(uri, policy, budget, taken), self.loop)

    async def _read(self, uri: str, policy: ReadPolicy, budget: ByteBudget, taken: list) -> bytes:
        deadline = self.loop.time() + policy.timeout_s
        try:
            return await asyncio.wait_for(self._attempts(uri, policy, budget, taken, deadline), policy.timeout_s)
        except BaseException as err:  # failed, timed out or cancelled (abandoned): its bytes are given back here
            budget.give(taken[0])
            taken[0] = 0
            if isinstance(err, asyncio.TimeoutError):
                raise timeout_error(policy.timeout_s) from None
            raise

    async def _attempts(self, uri: str, policy: ReadPolicy, budget: ByteBudget, taken: list,
                        deadline: float) -> bytes:
        session = await self._session()
        for attempt in range(1, policy.attempts + 1):
            try:
                return await self._get(session, uri, policy.max_bytes, budget, taken)
            except Exception as err:
                budget.give(taken[0])
                taken[0] = 0
                if attempt == policy.attempts or not transient(err):
                    raise
                wait = policy.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)
                if isinstance(err, HTTPStatusError) and err.retry_after is not None:
                    wait = min(err.retry_after, policy.retry_after_max_s)
                if self.loop.time() + wait >= deadline:  # no time left for another try: this failure is final
                    raise
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    @staticmethod
    async def _get(session, uri: str, max_bytes: int, budget: ByteBudget, taken: list) -> bytes:
        async with session.get(uri, max_redirects=MAX_REDIRECTS) as response:
            if response.status >= 400:
                raise HTTPStatusError(response.status, valid_text(response.reason or ""),
                                      retry_after(response.headers.get("Retry-After")))
            length = response.content_length
            if length is not None and length > max_bytes:
                raise too_large(max_bytes, length)
            want = length if length is not None else 0
            await budget.take_async(want)
            taken[0] = want
            parts, size = [], 0
            async for chunk in response.content.iter_chunked(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(max_bytes)
                if size > taken[0]:  # a body without Content-Length (or longer than it): count what arrives
                    budget.count(size - taken[0])
                    taken[0] = size
                parts.append(chunk)
            return b"".join(parts)


@dataclass
class _Pending:
    key: Any
    deadline: float
    future: Future
    taken: list  # [bytes taken from the budget by this read]
    http: bool  # read by the event loop (cancelled at its deadline), else by a reader thread (left behind)


class Reads:
    """A window of reads in flight for one caller (one thread): ``submit`` starts a read, ``ready`` hands back
    finished ones as ``(key, bytes or None, reason or None)``, waiting while the window is full (or, with
    ``wait_all``, until every read has ended). At most ``policy.in_flight`` reads are in flight or finished and
    not yet handed back; every read ends by its deadline."""

    def __init__(self, policy: ReadPolicy):
        self.policy = policy
        self.budget = ByteBudget(policy.bytes_in_flight)
        self._pending: dict[int, _Pending] = {}
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._next = 0
        self.peak = 0

    def __len__(self) -> int:
        return len(self._pending)

    def full(self) -> bool:
        return len(self._pending) >= self.policy.in_flight

    def submit(self, key: Any, uri: str) -> None:
        taken = [0]
        if uri.startswith(HTTP):
            future = _HTTP.get().submit(uri, self.policy, self.budget, taken)
        else:
            deadline = time.monotonic() + self.policy.timeout_s
            future = _READERS.submit(lambda: self._blocking(uri, taken, deadline))
        ticket, self._next = self._next, self._next + 1
        http = uri.startswith(HTTP)  # a coroutine ends itself at its deadline: this one is a safety net
        self._pending[ticket] = _Pending(key, time.monotonic() + self.policy.timeout_s + (HTTP_GRACE_S if http else 0),
                                         future, taken, http)
        self.peak = max(self.peak, len(self._pending))
        future.add_done_callback(lambda _: self._done.put(ticket))

    def _blocking(self, uri: str, taken: list, deadline: float) -> bytes:
        def reserve(size: int) -> None:
            self.budget.take(size, deadline)
            taken[0] = size

        data = read_input(uri, self.policy.max_bytes, reserve)
        if len(data) > taken[0]:  # the size was unknown (or the file grew): count what was read
            self.budget.count(len(data) - taken[0])
            taken[0] = len(data)
        return data

    def ready(self, wait_all: bool = False) -> Iterator[tuple[Any, Optional[bytes], Optional[str]]]:
        """Finished reads, without waiting while the window has room (and reads are not all to be waited for)."""
        while self._pending:
            must_wait = wait_all or self.full()
            try:
                if must_wait:
                    earliest = min(p.deadline for p in self._pending.values())
                    ticket = self._done.get(timeout=max(earliest - time.monotonic(), 0.0) + 0.01)
                else:
                    ticket = self._done.get_nowait()
            except queue.Empty:
                if not must_wait:
                    return
                yield from self._expired()
                continue
            pending = self._pending.pop(ticket, None)
            if pending is None:  # a read abandoned at its deadline ended after all: only its bytes are given back
                continue
            yield self._outcome(pending)

    def _outcome(self, pending: _Pending) -> tuple[Any, Optional[bytes], Optional[str]]:
        try:
            data = pending.future.result(0)
        except BaseException as err:  # one input's failure, whatever it is, is that input's outcome
            self.budget.give(pending.taken[0])
            return pending.key, None, read_failure(err)
        self.budget.give(pending.taken[0])
        return pending.key, data, None

    def _expired(self) -> Iterator[tuple[Any, Optional[bytes], Optional[str]]]:
        """Reads past their deadline: a timeout each. A thread stuck in one is left behind; the bytes it took
        are given back if it ever ends."""
        now = time.monotonic()
        for ticket, pending in list(self._pending.items()):
            if pending.deadline > now or pending.future.done():
                continue
            if pending.http:  # the coroutine gives its bytes back as it is cancelled
                if not pending.future.cancel():  # it has just ended: handed back as usual
                    continue
            else:
                pending.future.add_done_callback(lambda _, p=pending: self.budget.give(p.taken[0]))
            del self._pending[ticket]
            yield pending.key, None, read_failure(timeout_error(self.policy.timeout_s))
