"""What the entry points know about particular runners: offline checks of a Dataflow GPU submission and
the Dataflow dry run (``--runner=DataflowRunner --dry_run=True``), which builds and validates the whole
job description without submitting it, so that a broken option fails on the laptop, not on the cloud; and
the local runner's worker modes (``local_problems``, ``worker_count``)."""

from __future__ import annotations

import json
import os
from typing import Optional

from apache_beam.options.pipeline_options import (
    DebugOptions,
    DirectOptions,
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
    TestOptions,
    WorkerOptions,
)

# Dataflow GPU type -> the Compute Engine machine type prefixes it can be attached to.
GPU_MACHINES = {
    "nvidia-tesla-t4": ("n1-", "custom-"),
    "nvidia-tesla-p4": ("n1-", "custom-"),
    "nvidia-tesla-v100": ("n1-", "custom-"),
    "nvidia-tesla-p100": ("n1-", "custom-"),
    "nvidia-tesla-a100": ("a2-highgpu-",),
    "nvidia-a100-80gb": ("a2-ultragpu-",),
    "nvidia-l4": ("g2-",),
    "nvidia-h100-80gb": ("a3-highgpu-",),
    "nvidia-h100-mega-80gb": ("a3-megagpu-",),
}
ACCELERATOR_FLAGS = ("install-nvidia-driver", "use_nvidia_mps")
ACCELERATOR = "worker_accelerator="


def runner_name(options: PipelineOptions) -> str:
    """``DataflowRunner``, ``dataflow`` or a dotted class path -> ``dataflow``."""
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    name = runner if isinstance(runner, str) else type(runner).__name__
    return name.rsplit(".", 1)[-1].lower().removesuffix("runner")


LOCAL_RUNNERS = ("direct", "fnapi", "switchingdirect")
LOSSY_THREADS = (
    "--direct_running_mode=multi_threading can lose records: its worker threads send their output through "
    "Beam's gRPC data plane, whose buffer a timer thread flushes (then clears) every second while the bundle "
    "is still writing to it (apache_beam/runners/worker/data_plane.py, TimeBasedBufferingClosableOutputStream; "
    "a 2,000-record run here once lost a prediction that way). Use --direct_running_mode=in_memory "
    "--direct_num_workers=N: the same worker threads, each model loaded once and shared, with no data plane "
    "in between (run_local.sh's default; docs/RUNNERS.md)")
# Beam warns that in_memory with several workers lacks worker parallelism; it runs them in parallel
# (FnApiRunner's ParallelBundleManager over one in-process worker each), so the warning misleads here and
# common.setup_logging drops it.
FN_RUNNER_LOGGER = "apache_beam.runners.portability.fn_api_runner.fn_runner"
IN_MEMORY_WORKERS_WARNING = "If direct_num_workers is not equal to 1, direct_running_mode should be"


def worker_count(options: PipelineOptions) -> int:
    """How many workers the local runner runs at once (``--direct_num_workers``; 0: one per core); 1 for
    the runners that bring their own workers."""
    if local_mode(options) is None:
        return 1
    workers = options.view_as(DirectOptions).direct_num_workers
    return (os.cpu_count() or 1) if workers == 0 else max(1, workers or 1)


def local_mode(options: PipelineOptions) -> Optional[str]:
    """The local runner's ``--direct_running_mode``; None for the runners that bring their own workers."""
    return options.view_as(DirectOptions).direct_running_mode if runner_name(options) in LOCAL_RUNNERS else None


def in_process(options: PipelineOptions) -> bool:
    """Whether the workers are threads of this very process: the local runner in its ``in_memory`` mode."""
    return local_mode(options) == "in_memory"


def local_problems(options: PipelineOptions) -> list[str]:
    """What the local runner's options would get wrong: ``multi_threading``'s lossy data plane."""
    return [LOSSY_THREADS] if local_mode(options) == "multi_threading" else []


def refuse(problems: list[str]) -> None:
    """Stop before any work if the options have problems, listing them."""
    if problems:
        raise SystemExit("invalid pipeline options:\n  " + "\n  ".join(problems))


def is_dry_run(options: PipelineOptions) -> bool:
    """``--dry_run=True``: only the Dataflow runner builds a job without running it; elsewhere it would run."""
    if not options.view_as(TestOptions).dry_run:
        return False
    if runner_name(options) != "dataflow":
        raise SystemExit("--dry_run=True is only supported with --runner=DataflowRunner (other runners would run)")
    return True


def accelerator(options: PipelineOptions) -> Optional[dict]:
    """The ``worker_accelerator`` service option parsed into {type, count, flags...}, or None."""
    given = [o for o in options.view_as(GoogleCloudOptions).dataflow_service_options or [] if o.startswith(ACCELERATOR)]
    if not given:
        return None
    spec: dict = {"flags": []}
    for part in given[-1][len(ACCELERATOR):].split(";"):
        key, sep, value = part.partition(":")
        if key in ("type", "count"):
            spec[key] = value
        elif part:
            spec["flags"].append(part)
    return spec


def dataflow_problems(options: PipelineOptions) -> list[str]:
    """What would fail or misbehave on Dataflow GPU workers, found offline from the options alone."""
    if runner_name(options) != "dataflow":
        return []
    gpu = accelerator(options)
    if gpu is None:
        return []
    problems = []
    machine = options.view_as(WorkerOptions).machine_type or ""
    gpu_type = gpu.get("type", "")
    if gpu_type not in GPU_MACHINES:
        problems.append(f"worker_accelerator type {gpu_type!r} is not one of {', '.join(sorted(GPU_MACHINES))}")
    elif not machine.startswith(GPU_MACHINES[gpu_type]):
        problems.append(f"--machine_type={machine or '(unset)'} cannot carry {gpu_type}; "
                        f"use a {' or '.join(GPU_MACHINES[gpu_type])}* machine type")
    if not gpu.get("count", "").isdigit() or int(gpu["count"]) < 1:
        problems.append(f"worker_accelerator count {gpu.get('count')!r} must be a positive integer")
    unknown = [f for f in gpu["flags"] if f.split(":", 1)[0] not in ACCELERATOR_FLAGS]
    if unknown:
        known = ", ".join(("type:", "count:", *ACCELERATOR_FLAGS))
        problems.append(f"worker_accelerator has unknown parts {unknown}; known: {known}")
    if not any(f.startswith("install-nvidia-driver") for f in gpu["flags"]):
        problems.append("worker_accelerator lacks install-nvidia-driver: the workers would have no CUDA driver")
    experiments = options.view_as(DebugOptions).experiments or []
    if "use_nvidia_mps" in gpu["flags"]:
        if gpu.get("count") != "1":
            problems.append("use_nvidia_mps needs count:1 (one GPU per worker)")
        if "no_use_multiple_sdk_containers" in experiments:
            problems.append("use_nvidia_mps with --experiments=no_use_multiple_sdk_containers leaves one process "
                            "to share the GPU with: drop one of them")
    if not options.view_as(WorkerOptions).sdk_container_image:
        problems.append("GPU workers need --sdk_container_image (the default Beam image has no CUDA PyTorch); "
                        "build it from the Dockerfile")
    return problems


def dataflow_job(result) -> dict:
    """The full Dataflow job description a dry run would have submitted (job, environment, worker pool),
    assembled offline from the runner's job and its options, as a JSON-like dict."""
    from apache_beam.runners.dataflow.internal import apiclient
    from google.cloud import dataflow

    job = result.job
    staged = f"{job.google_cloud_options.staging_location.rstrip('/')}/pipeline.pb"
    environment = apiclient.Environment(
        packages=[],
        options=job.options,
        environment_version=getattr(apiclient, "_FNAPI_ENVIRONMENT_MAJOR_VERSION", "8"),
        proto_pipeline_staged_url=staged,
        proto_pipeline=job.proto_pipeline,
    )
    job.proto.environment = environment.proto
    described = json.loads(dataflow.Job.to_json(job.proto, use_integers_for_enums=False))
    described["pipelineTransforms"] = sorted(
        t.unique_name for t in job.proto_pipeline.components.transforms.values() if not t.subtransforms
    )
    return described


def summarize_dataflow_job(described: dict) -> list[str]:
    env = described.get("environment", {})
    pool = (env.get("workerPools") or [{}])[0]
    return [
        f"Dataflow dry run: job {described.get('name')} ({described.get('type')}) built and validated, not submitted",
        f"  machine type: {pool.get('machineType', '(Dataflow default)')}; "
        f"max workers: {pool.get('autoscalingSettings', {}).get('maxNumWorkers', '(default)')}",
        f"  SDK container: {pool.get('workerHarnessContainerImage')}",
        f"  service options: {env.get('serviceOptions', [])}",
        f"  experiments: {env.get('experiments', [])}",
        f"  {len(described['pipelineTransforms'])} primitive transforms",
    ]
