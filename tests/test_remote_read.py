"""Reads in flight (issue 23): inputs over HTTP from a server on 127.0.0.1 that misbehaves as real ones do
(garbage, a stall mid-body, a redirect loop, a Content-Length over decode.max_bytes, resets, 503 with
Retry-After, a slow trickle, a reason phrase that is not UTF-8): each is that input's dead letter saying what
happened, or is read after its retries; the others are classified exactly as the same images read locally."""

from __future__ import annotations

import http.server
import os
import re
import socket
import struct
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from configs import schema
from pipelines import cascade
from pipelines.folder import RunFolder
from tests.conftest import scripted, torchscript_config
from transforms import fetch
from transforms.fetch import ReadPolicy, Reads
from transforms.records import DeadLetter

TIMEOUT_S = 1.5
MAX_BYTES = 1_000_000


class Misbehaving(http.server.BaseHTTPRequestHandler):
    """``/ok/<path>``: a file of ``root``; every other name, one way of failing. Counts requests per name."""

    protocol_version = "HTTP/1.1"
    root = Path()
    hits: dict[str, int] = {}

    def log_message(self, *args):
        pass

    def send(self, status: int, body: bytes = b"", length: int | None = None, **headers) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        name = self.path.strip("/")
        self.hits[name] = self.hits.get(name, 0) + 1
        count = self.hits[name]
        if name.startswith("ok/"):
            return self.send(200, (self.root / name[3:]).read_bytes())
        if name == "garbage":  # not HTTP at all
            self.wfile.write(b"\x00\x01 this is not HTTP\r\n\r\n")
            self.close_connection = True
        elif name == "redirect-loop":
            self.send(302, Location="/redirect-loop")
        elif name == "too-large":  # announced larger than decode.max_bytes: refused before the body is held
            self.send(200, b"x" * 1000, length=MAX_BYTES + 1)
            self.close_connection = True
        elif name == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
        elif name == "busy-then-ok":  # 503 with Retry-After twice, then the image
            if count <= 2:
                return self.send(503, Retry_After="0")
            return self.send(200, (self.root / "img.jpg").read_bytes())
        elif name == "always-503":
            self.send(503, Retry_After="0")
        elif name == "stall-mid-body":
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(b"\xff\xd8" * 100)
            self.wfile.flush()
            time.sleep(TIMEOUT_S + 2)
            self.close_connection = True
        elif name == "slow-trickle":  # 100 bytes per 0.1 s: never done within the timeout
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(int((TIMEOUT_S + 1) * 10)):
                self.wfile.write(b"x" * 100)
                self.wfile.flush()
                time.sleep(0.1)
            self.close_connection = True
        elif name == "bad-reason":  # a reason phrase that is not UTF-8
            self.wfile.write(b"HTTP/1.1 418 Not \xff\xfe UTF-8\r\nContent-Length: 0\r\n\r\n")
        else:
            self.send(404)


# name -> the dead letter's category and reason
FAILURES = {
    "garbage": ("http_error", r"^HTTP error: not a valid HTTP answer \(.*Bad status line"),
    "redirect-loop": ("http_error", r"^HTTP error: redirect loop \(more than 10 redirects\)$"),
    "too-large": ("too_large", rf"^too large: file of {MAX_BYTES + 1} bytes exceeds decode\.max_bytes={MAX_BYTES}$"),
    "reset": ("http_error", r"^connection failed: (reset by the server|ServerDisconnectedError)"),
    "always-503": ("http_error", r"^HTTP error 503 Service Unavailable$"),
    "stall-mid-body": ("timeout", rf"^timeout: reading took longer than {TIMEOUT_S:g} s \(decode\.read_timeout_s\)$"),
    "slow-trickle": ("timeout", rf"^timeout: reading took longer than {TIMEOUT_S:g} s"),
    "bad-reason": ("http_error", r"^HTTP error 418 Not \\xff\\xfe UTF-8$"),
    "missing.jpg": ("not_found", r"^file not found \(HTTP 404 Not Found\)$"),
}


@pytest.fixture
def server(sample_subset, tmp_path):
    images = tmp_path / "served"
    images.mkdir()
    for i, row in enumerate(sample_subset[:8]):
        os.link(row["uri"], images / f"{i}.jpg")
    os.link(sample_subset[0]["uri"], images / "img.jpg")
    Misbehaving.root, Misbehaving.hits = images, {}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Misbehaving)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", images
    srv.shutdown()
    srv.server_close()


def read_all(uris: dict[str, str], policy: ReadPolicy) -> dict[str, tuple]:
    reads, out = Reads(policy), {}
    for key, uri in uris.items():
        reads.submit(key, uri)
        out.update((k, (data, reason)) for k, data, reason in reads.ready())
    out.update((k, (data, reason)) for k, data, reason in reads.ready(wait_all=True))
    assert reads.budget.held == 0  # every byte taken is given back
    return out


def test_each_misbehaving_answer_is_that_input_s_failure_and_the_others_are_read(server):
    base, images = server
    uris = {name: f"{base}/{name}" for name in FAILURES}
    uris |= {f"ok{i}": f"{base}/ok/{i}.jpg" for i in range(8)} | {"busy-then-ok": f"{base}/busy-then-ok"}
    started = time.monotonic()
    out = read_all(uris, ReadPolicy(MAX_BYTES, TIMEOUT_S, in_flight=8, backoff_s=0.01))
    assert time.monotonic() - started < TIMEOUT_S + 1.5  # reads wait together, not one after the other
    assert set(out) == set(uris)
    for i in range(8):
        assert out[f"ok{i}"] == ((images / f"{i}.jpg").read_bytes(), None)
    assert out["busy-then-ok"] == ((images / "img.jpg").read_bytes(), None)
    assert Misbehaving.hits["busy-then-ok"] == 3 and Misbehaving.hits["always-503"] == 3  # read.attempts
    for name, (category, reason) in FAILURES.items():
        data, why = out[name]
        assert data is None and re.search(reason, why), (name, why)
        assert DeadLetter(name, uris[name], 0, why).category.value == category, (name, why)
        why.encode("utf-8")  # valid UTF-8, whatever the server sent


def test_dns_and_tls_failures_are_named(server):
    base, _ = server
    port = base.rsplit(":", 1)[1]
    out = read_all({"dns": "http://no-such-host.invalid/a.jpg", "tls": f"https://127.0.0.1:{port}/ok/0.jpg"},
                   ReadPolicy(MAX_BYTES, 5.0))
    assert re.match(r"^connection failed: DNS lookup failed for no-such-host\.invalid", out["dns"][1]), out
    assert re.match(r"^connection failed: TLS handshake failed to 127\.0\.0\.1", out["tls"][1]), out


def test_retry_after_is_honoured_up_to_its_bound(server):
    base, _ = server
    started = time.monotonic()
    policy = ReadPolicy(MAX_BYTES, 5.0, attempts=2, backoff_s=0.0, retry_after_max_s=0.3)
    Misbehaving.hits["busy-then-ok"] = 1  # one 503 left before the image
    fetch.Reads(policy)  # a window costs nothing until it reads
    out = read_all({"busy": f"{base}/busy-then-ok"}, policy)
    assert out["busy"][1] is None and time.monotonic() - started < 2
    assert fetch.retry_after("120") == 120.0 and fetch.retry_after("soon") is None
    assert 0 <= fetch.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") <= 1  # a date in the past: now


def test_the_window_bounds_reads_and_bytes_in_flight(server):
    base, images = server
    size = max((images / f"{i}.jpg").stat().st_size for i in range(8))
    reads = Reads(ReadPolicy(MAX_BYTES, 5.0, in_flight=3, bytes_in_flight=size + 1))
    seen = 0
    for i in range(8):
        reads.submit(i, f"{base}/ok/{i}.jpg")
        assert len(reads) <= 3
        seen += sum(1 for _ in reads.ready())
        assert reads.budget.held <= size + 1
    seen += sum(1 for _ in reads.ready(wait_all=True))
    assert seen == 8 and reads.peak == 3 and reads.budget.held == 0


def test_a_stalled_local_filesystem_is_a_timeout_and_holds_no_neighbour(tmp_path, monkeypatch):
    """A plain local path whose filesystem stops answering (NFS, gcsfuse) cannot be made here without root:
    the stall is a stat that blocks, as on such a mount; everything else is the real read."""
    (tmp_path / "a.jpg").write_bytes(b"a" * 10)
    (tmp_path / "b.jpg").write_bytes(b"b" * 10)
    stalled, release = str(tmp_path / "stalled.jpg"), threading.Event()
    real = fetch.open_input

    def open_input(uri):
        if uri == stalled:
            release.wait(30)
        return real(uri)

    monkeypatch.setattr(fetch, "open_input", open_input)
    started = time.monotonic()
    out = read_all({"a": str(tmp_path / "a.jpg"), "stalled": stalled, "b": str(tmp_path / "b.jpg")},
                   ReadPolicy(MAX_BYTES, 0.5))
    release.set()
    assert out["a"] == (b"a" * 10, None) and out["b"] == (b"b" * 10, None)
    assert out["stalled"] == (None, "timeout: reading took longer than 0.5 s (decode.read_timeout_s)")
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("override", ["read.in_flight=0", "read.attempts=0", "read.bytes_in_flight=0",
                                      "read.retry_after_max_s=nan", "read.backoff_s=-1"])
def test_impossible_read_settings_are_refused_naming_the_key(override):
    with pytest.raises(schema.ConfigError, match=rf"^{re.escape(override.split('=')[0])}: must be in"):
        schema.load(None, ["stages=[{model: lite0}]", override])


class Mean(torch.nn.Module):
    """A 10-class model of a few multiply-adds (benchmarks/data_path.py's): the reading path is under test."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) @ torch.linspace(-1, 1, 30).reshape(3, 10)


def test_a_job_over_a_misbehaving_server_classifies_the_rest_as_it_would_locally(server, tmp_path):
    base, images = server
    weights = scripted(Mean(), tmp_path / "mean.pt")
    (tmp_path / "config.yaml").write_text(torchscript_config("mean", weights, "  - {model: mean, batch_size: 4}\n"))
    ids = [f"img{i}" for i in range(8)]
    bad = [name for name in FAILURES if name not in ("stall-mid-body", "slow-trickle")] + ["stall-mid-body"]
    manifests = {"local": (ids, [str(images / f"{i}.jpg") for i in range(8)]),
                 "remote": (ids + bad, [f"{base}/ok/{i}.jpg" for i in range(8)] + [f"{base}/{n}" for n in bad])}
    runs = {}
    for name, (rids, uris) in manifests.items():
        pq.write_table(pa.table({"id": rids, "uri": uris}), tmp_path / f"{name}.parquet")
        manifest = cascade.run(["--config", str(tmp_path / "config.yaml"), "--input", str(tmp_path / f"{name}.parquet"),
                                "--output", str(tmp_path / name), "--runner=FnApiRunner",
                                f"decode.read_timeout_s={TIMEOUT_S}", f"decode.max_bytes={MAX_BYTES}",
                                "read.backoff_s=0.01"])
        assert manifest["invariant_holds"] and manifest["counts"]["inputs_listed"] == len(rids)
        runs[name] = {r["id"]: r for r in RunFolder(str(tmp_path / name)).read("predictions").to_pylist()}
    assert set(runs["remote"]) == set(runs["local"]) == set(ids)
    for rid in ids:  # row for row, the same prediction as the same bytes read locally
        local, remote = runs["local"][rid], runs["remote"][rid]
        assert (remote["pred_class"], remote["confidence"]) == (local["pred_class"], local["confidence"]), rid
    dead = {d["id"]: d for d in RunFolder(str(tmp_path / "remote")).read("dead_letter").to_pylist()}
    assert set(dead) == set(bad)
    for name in bad:
        category, reason = FAILURES[name]
        assert dead[name]["category"] == category and re.search(reason, dead[name]["error"]), dead[name]


def test_the_plan_bounds_remote_reads_by_reads_in_flight_over_latency():
    from configs.estimate import Estimate, Machine, read_lines

    gpu = Machine("gpu", "gpu", "one GPU", "today", 16, {"m": 10_000.0}, 1000.0)
    est = Estimate(("m",), (None,), (0.4,), None, 1000)
    remote = read_lines("gs://bucket/a.jpg", 64, est, {"gpu": gpu}, False)
    assert "read.in_flight=64" in remote[0] and "1,280 records/s per thread; below the compute of gpu" in remote[1]
    assert "above every machine's compute rate" in read_lines("https://h/a.jpg", 4096, est, {"gpu": gpu}, False)[1]
    assert read_lines("/data/a.jpg", 64, est, {"gpu": gpu}, False)[0].startswith("read path: local files")
    assert read_lines(None, 64, est, {}, False) == ["read path: not estimated (no input to look at)"]
