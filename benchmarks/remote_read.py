"""Reading over HTTP against reading local files: the same N records through ``pipelines.cascade`` with the
trivial model of ``benchmarks/data_path.py`` (so reading and decoding dominate), read (a) from local paths and
(b) from a static HTTP server on 127.0.0.1 that answers each request after an added latency.

    python -m benchmarks.remote_read [--records 4000] [--latency_ms 50] [--slow_latency_ms 200]
                                     [--in_flight 8,64] [--config CFG] [override ...]

The server (started and stopped here, in its own process so that its CPU time is its own) serves the shared
sample's real JPEGs (``../shared/data/imagenet-sample``) from memory with aiohttp: a request waits its latency
on the event loop (no thread, no CPU) and counts itself in flight while it does; the script prints the
server's CPU seconds, since it shares the machine's cores with the job. The records are the sample's images
repeated under distinct ids, in a Parquet manifest; each run is a fresh process on FnApiRunner (in that
process), its wall time and peak RSS measured as ``benchmarks/data_path.py`` measures them. Overrides
(``read.in_flight=16``...) go to every run; ``--in_flight`` adds remote runs at other values of
``read.in_flight`` (lines only, the ratio is of the configured value). ``--config`` runs a real cascade
instead of the trivial model (``benchmarks/gpu_check.sh`` does, on the GPU machine's loopback).

The last lines: ``remote_vs_local_ratio`` (records/s over HTTP / records/s local, same run; goal >= 0.7 at
50 ms), ``remote_records_per_s``, ``inflight_peak`` (the most requests the server had in flight at once), the
peak RSS of each run and ``rss_remote_vs_local`` (goal <= 1.3), and ``remote_vs_local_ratio_200ms``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchmarks.data_path import ROOT, config, measured, tiny_model

SAMPLE = os.path.join(os.path.dirname(ROOT), "shared", "data", "imagenet-sample")


def serve(folder: str, latency_s: float, port_file: str) -> None:
    """A static server of ``folder``'s JPEGs (held in memory) on 127.0.0.1, each answer after ``latency_s``;
    ``/_stats`` gives the requests served and the most in flight at once, ``/_latency?s=X`` sets the latency."""
    import asyncio

    from aiohttp import web

    files = {}
    for name in sample_names(folder):
        with open(os.path.join(folder, name), "rb") as fh:
            files[name] = fh.read()
    state = {"latency": latency_s, "in_flight": 0, "peak": 0, "served": 0}

    async def image(request):
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        try:
            await asyncio.sleep(state["latency"])
            body = files.get(request.match_info["name"])
            state["served"] += 1
            return web.Response(body=body, content_type="image/jpeg") if body else web.Response(status=404)
        finally:
            state["in_flight"] -= 1

    async def stats(request):
        out = dict(state, cpu_s=time.process_time())
        if "reset" in request.query:
            state.update(peak=0, served=0)
        return web.json_response(out)

    async def latency(request):
        state["latency"] = float(request.query["s"])
        return web.json_response(state)

    async def main():
        app = web.Application()
        app.add_routes([web.get("/_stats", stats), web.get("/_latency", latency), web.get("/img/{name:.+}", image)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        with open(port_file + ".tmp", "w") as fh:
            fh.write(str(site._server.sockets[0].getsockname()[1]))
        os.replace(port_file + ".tmp", port_file)
        await asyncio.sleep(6 * 3600)  # bounded: the benchmark stops it long before

    asyncio.run(main())


def sample_names(folder: str) -> list[str]:
    """The images of a sample folder: the ``path`` column of its labels.csv."""
    with open(os.path.join(folder, "labels.csv"), newline="") as fh:
        return [row["path"] for row in csv.DictReader(fh)]


class Server:
    """The static server in a child process, stopped on exit from the ``with`` block."""

    def __init__(self, folder: str, latency_s: float, tmp: str):
        self.port_file = os.path.join(tmp, "port")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.remote_read", "--serve", folder,
                                      "--latency_ms", str(latency_s * 1000), "--port_file", self.port_file], cwd=ROOT)
        deadline = time.time() + 30
        while not os.path.exists(self.port_file):
            if time.time() > deadline or self.proc.poll() is not None:
                self.proc.kill()
                raise SystemExit("the HTTP server did not start")
            time.sleep(0.05)
        with open(self.port_file) as fh:
            self.url = f"http://127.0.0.1:{fh.read()}"

    def get(self, what: str) -> dict:
        with urllib.request.urlopen(f"{self.url}/{what}", timeout=10) as answer:
            return json.load(answer)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def manifest(path: str, names: list[str], records: int, base: str) -> str:
    """``records`` rows over ``names`` (repeated), each with its own id, ``base/name`` as uri."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [f"r{i:07d}" for i in range(records)]
    uris = [f"{base}/{names[i % len(names)]}" for i in range(records)]
    pq.write_table(pa.table({"id": ids, "uri": uris}), path)
    return path


def run(tmp: str, cfg: str, source: str, name: str, overrides: list[str]) -> tuple[float, float, str]:
    out = os.path.join(tmp, f"out-{name}")
    cmd = [sys.executable, "-m", "pipelines.cascade", "--config", cfg, "--input", source, "--output", out,
           "--runner=FnApiRunner", *overrides]
    seconds, rss, _, log = measured(cmd)
    if "count invariant holds" not in log:
        raise SystemExit(f"{name}: the count invariant was not checked\n{log[-3000:]}")
    return seconds, rss, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=4000, help="records per run (the sample's images repeated)")
    parser.add_argument("--latency_ms", type=float, default=50.0, help="latency the server adds to each request")
    parser.add_argument("--slow_latency_ms", type=float, default=200.0, help="the latency of the second remote run")
    parser.add_argument("--in_flight", default="", help="extra remote runs at these read.in_flight values")
    parser.add_argument("--config", help="a cascade config to run instead of the trivial model (e.g. on a GPU)")
    parser.add_argument("--sample", default=SAMPLE, help="a folder with labels.csv (its path column: the images)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port_file", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.serve:
        return serve(args.serve, args.latency_ms / 1000, args.port_file)
    names = sample_names(args.sample)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; load average {load}; {args.records} "
          f"records over {len(names)} JPEGs of {args.sample}; overrides: {' '.join(overrides) or 'none'}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, Server(args.sample, args.latency_ms / 1000, tmp) as server:
        cfg = args.config and os.path.abspath(args.config)
        if not cfg:
            weights, cfg = os.path.join(tmp, "tiny.pt"), os.path.join(tmp, "tiny.yaml")
            tiny_model(weights)
            config(cfg, weights, "fused")
        local = manifest(os.path.join(tmp, "local.parquet"), names, args.records, os.path.abspath(args.sample))
        remote = manifest(os.path.join(tmp, "remote.parquet"), names, args.records, f"{server.url}/img")
        results = {}

        def line(name: str, source: str, extra: list[str] = ()) -> None:
            before = server.get("_stats?reset=1")
            seconds, rss, _ = run(tmp, cfg, source, name, [*overrides, *extra])
            after = server.get("_stats")
            served = after["served"]
            results[name] = (args.records / seconds, rss, after["peak"] if served else 0)
            server_cpu = after["cpu_s"] - before["cpu_s"]
            print(f"{name:>24}: {seconds:6.1f} s  {args.records / seconds:7.1f} records/s  peak RSS {rss:5.0f} MB"
                  + (f"  requests {served}, at most {after['peak']} in flight, server CPU {server_cpu:.2f} s "
                     f"({server_cpu / seconds:.0%} of a core)" if served else ""), flush=True)

        line("local", local)
        line(f"http {args.latency_ms:g} ms", remote)
        for value in filter(None, args.in_flight.split(",")):
            line(f"http {args.latency_ms:g} ms in_flight={value}", remote, [f"read.in_flight={value}"])
        server.get(f"_latency?s={args.slow_latency_ms / 1000}")
        line(f"http {args.slow_latency_ms:g} ms", remote)
    (local_rps, local_rss, _), (remote_rps, remote_rss, peak) = (results["local"],
                                                                 results[f"http {args.latency_ms:g} ms"])
    slow_rps = results[f"http {args.slow_latency_ms:g} ms"][0]
    print(f"remote_vs_local_ratio_{args.slow_latency_ms:g}ms={slow_rps / local_rps:.2f}")
    print(f"rss_local_mb={local_rss:.0f}")
    print(f"rss_remote_mb={remote_rss:.0f}")
    print(f"rss_remote_vs_local={remote_rss / local_rss:.2f}")
    print(f"remote_vs_local_ratio={remote_rps / local_rps:.2f}")
    print(f"remote_records_per_s={remote_rps:.1f}")
    print(f"inflight_peak={peak}")


if __name__ == "__main__":
    main()
