"""One cascade, several ways of running it: the tables must agree row for row.

- in process: ``--runner=FnApiRunner`` (the reference),
- worker threads sharing the models: ``--direct_running_mode=in_memory --direct_num_workers=2`` (and
  ``multi_threading``, whose data plane can lose records, refused);
- separate worker processes: ``--direct_running_mode=multi_processing --direct_num_workers=2``,
- Beam's portable job API: ``--runner=PortableRunner --environment_type=EXTERNAL`` against a job service
  and a worker pool that this file starts and stops (the Job API, artifact staging and Fn API harness
  contract that Flink and Dataflow Runner v2 use),
- Dataflow: the GPU submission command of docs/RUNNERS.md built into a full job description with
  ``--dry_run=True`` (nothing submitted), and broken options failing before any work.

Every run goes through ``cascade.run`` with the command line a user types after ``python -m pipelines.cascade``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest

from pipelines import cascade
from pipelines.folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "imagenet-sample"
N_IMAGES = 8
# A cheap self-cascade: Lite0 at 160 px, then Lite0 at 224 px. On the first 8 sample images a threshold
# of 0.9 exits 4 at stage 1 and escalates 4, so both stages and the re-batching between them run.
CONFIG = """\
stages:
  - {model: lite0, resolution: 160, batch_size: 4, threshold: 0.9}
  - {model: lite0, resolution: 224, batch_size: 4}
"""
RUN_TIMEOUT_S = 240
SERVICE_START_TIMEOUT_S = 60
CONFIDENCE_TOL = 1e-5  # float32 kernels give batch-composition-dependent rounding (about 1e-7 here)

DATAFLOW_GPU_FLAGS = [
    "--runner=DataflowRunner",
    "--project=my-project",
    "--region=us-central1",
    "--temp_location=gs://my-bucket/tmp",
    "--sdk_container_image=us-central1-docker.pkg.dev/my-project/cascade/cascade:0.1.0",
    "--sdk_location=container",
    "--machine_type=g2-standard-8",
    "--dataflow_service_options=worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver;use_nvidia_mps",
    "--experiments=use_runner_v2",
    "--max_num_workers=50",
]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A manifest of 8 real images, one undecodable file and one missing file, and the config."""
    labels = SAMPLE / "labels.csv"
    if not labels.exists():
        pytest.skip(f"the shared ImageNet sample is not at {labels}")
    folder = tmp_path_factory.mktemp("runners")
    with open(labels) as fh:
        rows = list(csv.DictReader(fh))[:N_IMAGES]
    (folder / "not_an_image.jpg").write_bytes(b"this is text, not a JPEG")
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["uri", "label"])
        writer.writerows([str(SAMPLE / r["path"]), r["class_index"]] for r in rows)
        writer.writerow([str(folder / "not_an_image.jpg"), 1])
        writer.writerow([str(folder / "missing.jpg"), 2])
    config = folder / "config.yaml"
    config.write_text(CONFIG)
    return {"folder": folder, "manifest": str(manifest), "config": str(config)}


def worker_env() -> dict:
    """Worker processes (multi-process SDK workers, job service, worker pool, its harnesses) import this
    repository and find this venv's ``python`` first on PATH (the pool starts harnesses as ``python``)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join((os.path.dirname(sys.executable), env.get("PATH", "")))
    return env


@pytest.fixture(scope="module", autouse=True)
def _workers_see_the_repo():
    with pytest.MonkeyPatch.context() as mp:
        for key in ("PYTHONPATH", "PATH"):
            mp.setenv(key, worker_env()[key])
        yield


def cascade_argv(case, output: Path, *beam_args: str) -> list[str]:
    return ["--config", case["config"], "--input", case["manifest"], "--output", str(output), *beam_args]


def run_bounded(case, output: Path, *beam_args: str) -> dict:
    """``cascade.run`` in a thread, given up on after a timeout: a portable job whose harness died waits
    forever, and the caller's services, ended in its ``finally``, then end the job too."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(cascade.run, cascade_argv(case, output, *beam_args)).result(timeout=RUN_TIMEOUT_S)
    except FutureTimeout:
        pytest.fail(f"cascade with {beam_args} did not finish in {RUN_TIMEOUT_S} s")
    finally:
        pool.shutdown(wait=False)


def tables(output: Path) -> dict:
    by_id = lambda rows: sorted(rows, key=lambda r: (r["id"], r.get("stage", 0)))  # noqa: E731
    return {
        "predictions": by_id(RunFolder(str(output)).read("predictions").to_pylist()),
        "dead_letter": by_id([{k: v for k, v in r.items() if k != "run_id"}  # run ids differ between runs
                              for r in RunFolder(str(output)).read("dead_letter").to_pylist()]),
        "exit_stats": sorted(RunFolder(str(output)).read("exit_stats").to_pylist(), key=lambda r: r["stage"]),
    }


def assert_same_tables(got: dict, want: dict) -> None:
    """Row for row: same ids, classes, exit stages, GMACs and dead letters; scores to float32 rounding."""
    assert [r["id"] for r in got["predictions"]] == [r["id"] for r in want["predictions"]]
    for g, w in zip(got["predictions"], want["predictions"]):
        exact = ("uri", "label", "pred_class", "pred_name", "exit_stage")
        assert {k: g[k] for k in exact} == {k: w[k] for k in exact}, g["id"]
        assert [t["class"] for t in g["top5"]] == [t["class"] for t in w["top5"]], g["id"]
        assert g["gmacs"] == pytest.approx(w["gmacs"], rel=1e-12), g["id"]
        assert g["confidence"] == pytest.approx(w["confidence"], abs=CONFIDENCE_TOL), g["id"]
        assert [t["prob"] for t in g["top5"]] == pytest.approx([t["prob"] for t in w["top5"]], abs=CONFIDENCE_TOL)
    assert got["dead_letter"] == want["dead_letter"]
    counts = ("stage", "model", "records_in", "records_exited", "records_failed", "labelled_exited",
              "total_inputs", "predictions", "dead_letters")
    assert [{k: r[k] for k in counts} for r in got["exit_stats"]] == [
        {k: r[k] for k in counts} for r in want["exit_stats"]
    ]


@pytest.fixture(scope="module")
def reference(case):
    output = case["folder"] / "in_process"
    manifest = cascade.run(cascade_argv(case, output, "--runner=FnApiRunner"))
    assert manifest["invariant_holds"]
    return tables(output)


def test_reference_exercises_both_stages_and_dead_letters(reference):
    stages = [r["exit_stage"] for r in reference["predictions"]]
    assert len(stages) == N_IMAGES and set(stages) == {1, 2}
    assert [(d["stage"], d["error"]) for d in sorted(reference["dead_letter"], key=lambda d: d["stage"])] == [
        (0, "file not found"),
        (1, "not an image Pillow can identify (unknown or corrupt format)"),
    ]


def test_multi_processing_matches_in_process(case, reference):
    output = case["folder"] / "multi_processing"
    cascade.run(cascade_argv(case, output, "--runner=FnApiRunner", "--direct_running_mode=multi_processing",
                             "--direct_num_workers=2"))
    assert_same_tables(tables(output), reference)


def test_worker_threads_sharing_each_model_match_in_process(case, reference, caplog):
    """``run_local.sh``'s default: two worker threads in one process (Beam's ``in_memory`` mode with two
    workers), each model loaded once and shared by both (torch one intra-op thread per worker); same tables
    as one worker, in both execution modes; one "loaded" line per model and process."""
    caplog.set_level(logging.DEBUG, logger="cascade.fused")
    for execution in ("fused", "staged"):
        output = case["folder"] / f"worker_threads_{execution}"
        cascade.run(cascade_argv(case, output, "--runner=FnApiRunner", "--direct_running_mode=in_memory",
                                 "--direct_num_workers=2", f"execution={execution}"))
        assert_same_tables(tables(output), reference)
    loads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage 1: loaded")]
    assert len([m for m in loads if "fused" in m]) == 1, loads  # one process, one load, shared by the threads
    setups = {r.getMessage() for r in caplog.records if r.getMessage().startswith("fused step set up in thread")}
    assert len(setups) == 2, setups  # the fused step set up by both workers


def test_multi_threading_whose_data_plane_can_lose_records_is_refused_before_any_work(case):
    output = case["folder"] / "multi_threading"
    with pytest.raises(SystemExit, match=r"multi_threading can lose records.*--direct_running_mode=in_memory "
                                         r"--direct_num_workers=N"):
        cascade.run(cascade_argv(case, output, "--runner=FnApiRunner", "--direct_running_mode=multi_threading",
                                 "--direct_num_workers=2"))
    assert not output.exists()


def test_model_shared_per_machine_matches_in_process(case, reference, capfd):
    """``model_sharing=machine``: one model per stage serves both worker processes through Beam's proxy."""
    output = case["folder"] / "machine_shared"
    cascade.run(cascade_argv(case, output, "--runner=FnApiRunner", "--direct_running_mode=multi_processing",
                             "--direct_num_workers=2", "model_sharing=machine", "execution=staged"))
    assert_same_tables(tables(output), reference)
    loads = [line for line in capfd.readouterr().err.splitlines() if ": loaded lite0@" in line]
    assert len(loads) == 2, loads  # once per stage for the machine, not once per worker process


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def end_group(proc: subprocess.Popen) -> None:
    """End a process we started in its own session, and whatever it started (its process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # the leader is gone; take any children left in its group with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            break


@contextlib.contextmanager
def beam_service(module: str, port: int, log: Path, *args: str):
    """``python -m MODULE`` listening on ``port``; ready once a gRPC channel to it connects."""
    import grpc

    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=worker_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"{module} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
                try:
                    grpc.channel_ready_future(channel).result(timeout=1)
                    break
                except grpc.FutureTimeoutError:
                    if time.monotonic() > deadline:
                        pytest.fail(f"{module} not ready on port {port} after {SERVICE_START_TIMEOUT_S} s")
        yield proc
    finally:
        end_group(proc)


@pytest.fixture
def portable_services(case):
    """A local job service and an EXTERNAL worker pool on free ports; both ended (by process group) after."""
    folder = case["folder"]
    job_port, pool_port = free_port(), free_port()
    with beam_service("apache_beam.runners.portability.local_job_service_main", job_port, folder / "job_service.log",
                      "--port", str(job_port), "--staging_dir", str(folder / "staging")), \
         beam_service("apache_beam.runners.worker.worker_pool_main", pool_port, folder / "worker_pool.log",
                      "--service_port", str(pool_port)):
        yield f"localhost:{job_port}", f"localhost:{pool_port}"


def test_portable_external_matches_in_process(case, reference, portable_services):
    job_endpoint, pool = portable_services
    output = case["folder"] / "portable"
    run_bounded(case, output, "--runner=PortableRunner", f"--job_endpoint={job_endpoint}",
                "--environment_type=EXTERNAL", f"--environment_config={pool}")
    assert_same_tables(tables(output), reference)


def test_dataflow_gpu_dry_run_builds_the_job(tmp_path, capsys):
    """The submission command of docs/RUNNERS.md, with the dataflow_gpu profile, built offline."""
    pytest.importorskip("google.cloud.dataflow", reason="needs google-cloud-dataflow-client (pip install '.[test]')")
    manifest = cascade.run(["--config", "dataflow_gpu", "--input", "gs://my-bucket/in/manifest.parquet",
                            "--output", "gs://my-bucket/out", *DATAFLOW_GPU_FLAGS, "--dry_run=True"])
    job = manifest["dataflow_job"]
    env = job["environment"]
    (pool,) = env["workerPools"]
    assert job["type"] == "JOB_TYPE_BATCH"
    assert pool["machineType"] == "g2-standard-8"
    assert pool["workerHarnessContainerImage"].endswith("/cascade/cascade:0.1.0")
    assert pool["autoscalingSettings"]["maxNumWorkers"] == 50
    assert env["serviceOptions"] == ["worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver;use_nvidia_mps"]
    assert "use_runner_v2" in env["experiments"]
    transforms = " ".join(job["pipelineTransforms"])
    for step in ("ReadInputs", "Cascade/Stages", "WritePredictions", "WriteDeadLetters", "WriteExitStats"):
        assert step in transforms  # fused, the default: every stage in one step
    assert "not submitted" in capsys.readouterr().out


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--machine_type": "n1-standard-8"}, "cannot carry nvidia-l4"),
        ({"--sdk_container_image": None}, "need --sdk_container_image"),
        ({"--dataflow_service_options": "worker_accelerator=type:nvidia-l4;count:1"}, "lacks install-nvidia-driver"),
        ({"--region": None}, "Missing required option: region"),
        ({"--project": "My Project"}, "Invalid Project ID"),
    ],
)
def test_dataflow_broken_option_fails_before_any_work(tmp_path, change, message):
    pytest.importorskip("google.cloud.dataflow", reason="needs google-cloud-dataflow-client (pip install '.[test]')")
    flags = dict(f.split("=", 1) for f in DATAFLOW_GPU_FLAGS)
    flags.update(change)
    argv = ["--config", "dataflow_gpu", "--input", "gs://my-bucket/in/m.csv", "--output", str(tmp_path / "out"),
            *(f"{k}={v}" for k, v in flags.items() if v is not None), "--dry_run=True"]
    started = time.monotonic()
    with pytest.raises((SystemExit, ValueError), match=message):
        cascade.run(argv)
    assert time.monotonic() - started < 10  # before building any model
    assert not (tmp_path / "out").exists()


FLINK_FLAGS = [
    "--runner=FlinkRunner",
    "--flink_master=flink-jobmanager:8081",
    "--flink_version=1.20",
    "--flink_job_server_jar=/opt/beam/beam-runners-flink-1.20-job-server-2.77.0.jar",
    "--environment_type=DOCKER",
    "--environment_config=us-central1-docker.pkg.dev/my-project/cascade/cascade:0.1.0",
    "--parallelism=16",
]


def test_flink_command_of_the_docs_parses():
    """The Flink command of docs/RUNNERS.md: our flags, the profile and Beam's Flink options all parse
    (Flink itself, and its job-server jar from Maven Central, cannot run here)."""
    from apache_beam.options.pipeline_options import FlinkRunnerOptions, PipelineOptions, PortableOptions

    cfg, beam_args, *_ = cascade.parse(["--config", "flink", "--input", "s3://b/in.csv", "--output", "s3://b/out",
                                        *FLINK_FLAGS])
    assert beam_args == FLINK_FLAGS
    assert (cfg.device, cfg.model_sharing.value, cfg.torch_threads) == ("cpu", "process", 1)
    options = PipelineOptions(beam_args)
    flink = options.view_as(FlinkRunnerOptions)
    assert flink.flink_version in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    assert flink.flink_job_server_jar.endswith("-job-server-2.77.0.jar")
    assert options.view_as(PortableOptions).environment_type == "DOCKER"
