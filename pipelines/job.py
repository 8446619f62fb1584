"""The steps every job that writes an output folder takes (``pipelines.cascade``, ``pipelines.score``), each
once, in this order: ``prepare`` (every check that can run before work), then, in the folder's hold, build and
``run`` the pipeline, count, commit; so that no entry point can touch the folder before its checks pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from configs import schema
from configs.plan import CascadePlan, TaskKind, build_plan
from models import failures
from models.classifier import release_checked
from pipelines import common, runners
from pipelines.folder import RunFolder, new_run_id
from transforms.fetch import with_timeout
from transforms.manifests import check_source, count_inputs, extra_fields
from transforms.progress import progress
from transforms.stage import default_threads
from transforms.tables import ALL_TABLE_NAMES
from transforms.tasks import ImageTask, task_for

log = logging.getLogger("cascade")


@dataclass
class Job:
    """A job whose checks have passed: the config, the Beam pipeline, the plan (every model built and run once),
    the task, and the output folder, not yet touched."""

    cfg: schema.CascadeConfig
    profile: Optional[str]
    beam_args: list[str]
    options: PipelineOptions
    pipeline: beam.Pipeline
    plan: CascadePlan
    task: ImageTask
    folder: RunFolder
    started_utc: str
    dry_run: bool
    tables: Sequence[str]

    @property
    def run_id(self) -> str:
        return self.plan.run_id

    def hold(self):
        """The output folder held for this run (``RunFolder.hold``), made ready as the flags say."""
        return self.folder.hold(self.run_id, overwrite=self.cfg.overwrite, keep_committed=self.cfg.skip_done,
                                tables=self.tables)


def invalid(what: str, err: Exception) -> SystemExit:
    return SystemExit(f"{what}: {err}")


@contextlib.contextmanager
def prepare(cfg: schema.CascadeConfig, beam_args: list[str], profile: Optional[str] = None,
            test_pipeline: Optional[beam.Pipeline] = None, *, tables: Sequence[str] = ALL_TABLE_NAMES,
            manifest_columns: bool = True) -> Iterator[Job]:
    """Every check that can run before work, in order: Beam's options and the runner's; the input (it lists
    something; a manifest's header); the output folder's name and that the input does not list it; the plan,
    each stage's model built with its weights and run once (a checkpoint that does not fit fails here, naming
    the stage); the task, with the manifest's own columns (``manifest_columns``). The models checked are
    released when the job ends (in-process workers take them as they are)."""
    options = PipelineOptions(beam_args)
    runners.refuse(runners.dataflow_problems(options) + runners.local_problems(options))
    dry_run = runners.is_dry_run(options)
    p = test_pipeline or beam.Pipeline(options=options)  # Beam validates the options here
    folder = RunFolder(cfg.output)
    if not dry_run:
        bounded(lambda: check_source(cfg.input), cfg)
        folder.check_apart_from(cfg.input)
    folder.check_name()
    threads, workers = None, runners.worker_count(options)
    if not cfg.torch_threads and (workers > 1 or options.view_as(DirectOptions).direct_running_mode
                                  == "multi_processing"):
        threads = default_threads(workers)  # per worker, process or thread
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        plan = dataclasses.replace(checked_plan(cfg, threads, runners.in_process(options)), run_id=new_run_id(now))
        # a manifest column clashing with ours is refused here (not on a dry run: inputs need not be readable)
        extras = bounded(lambda: extra_fields(cfg.input), cfg) if manifest_columns and not dry_run else ()
        try:
            task = task_for(plan, extras)
        except ValueError as err:
            raise invalid("invalid input", err) from None
        yield Job(cfg, profile, list(beam_args), options, p, plan, task, folder,
                  now.isoformat(timespec="seconds"), dry_run, tuple(tables))
    finally:
        release_checked()  # the checked models no worker took


def bounded(fn, cfg: schema.CascadeConfig):
    """``fn()``, a read of the input on this machine before any work (the listing's headers), bounded like every
    read by ``decode.read_timeout_s``: a stalled manifest URL or filesystem is a clear failure in that time."""
    try:
        return with_timeout(fn, cfg.decode.read_timeout_s, cfg.input)
    except TimeoutError:
        raise SystemExit(f"invalid input: reading {cfg.input} took longer than {cfg.decode.read_timeout_s:g} s "
                         "(decode.read_timeout_s): a stalled server or filesystem") from None
    except (OSError, ValueError) as err:
        raise invalid("invalid input", err) from None


def checked_plan(cfg: schema.CascadeConfig, torch_threads: Optional[int] = None, keep_models: bool = False
                 ) -> CascadePlan:
    """The run's plan, every stage's model built with its weights and run once first, so that a checkpoint that
    does not fit (shapes, class count) fails here, before any work, naming the stage. ``keep_models``: the
    workers are threads of this process, which take the checked models as they are."""
    try:
        return build_plan(cfg, torch_threads=torch_threads, check_models=True, keep_models=keep_models)
    except schema.ConfigError as err:
        raise invalid("invalid config", err) from None


class Interrupted(SystemExit):
    """Ctrl-C or SIGTERM: one line and exit status 130, instead of a traceback of every thread."""

    def __init__(self, message: str):
        super().__init__(130)
        self.message = message


def _stop(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run(job: Job):
    """Run the job's pipeline to its end. Ctrl-C or SIGTERM stop it (Beam wraps the interrupt of its worker
    threads in its own error: the signal, not the error's type, says what happened); the folder's lock is
    released by ``hold`` on the way out."""
    stopped = []

    def stop(signum, frame):
        stopped.append(signal.Signals(signum).name)
        logging.getLogger("apache_beam").setLevel(logging.CRITICAL)  # its workers' tracebacks of the interrupt
        raise KeyboardInterrupt(stopped[-1])

    try:
        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: the embedding program handles its signals
        previous = {}
    if runners.in_process(job.options):  # the workers are threads of this process: their progress is shown here
        progress.start_run()
        if job.plan.task is not TaskKind.VIDEO_FRAMES:  # (a video's frames are not counted before it is read)
            threading.Thread(target=_count, args=(job.cfg.input,), name="cascade-count", daemon=True).start()
    try:
        result = job.pipeline.run()
        result.wait_until_finish()
        return result
    except BaseException as err:
        if stopped:
            raise Interrupted(f"interrupted by {stopped[0]}: run {job.run_id} stopped before its commit; nothing "
                              f"was committed to {job.folder.url} (its earlier runs are as they were); rerun with "
                              "--skip_done to keep them and do the rest") from None
        cause = failures.systemic_cause(err) if isinstance(err, Exception) else None
        if cause is not None:  # a stage's circuit breaker stopped the job: its one line, not the runner's traceback
            raise SystemExit(cause) from None
        raise
    finally:
        progress.finish_run()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _count(source: str) -> None:
    """The inputs' total for the progress display, counted beside the run (footers of Parquet manifests, lines
    of CSV ones, files of a glob), so that the first records never wait for a count."""
    try:
        progress.set_total(count_inputs(source)[0])
    except (OSError, ValueError) as err:
        log.debug("inputs not counted for the progress display: %s", err)


def main(run_entry, argv: Sequence[str]) -> None:
    """A command line's life: SIGTERM stops it as Ctrl-C does, and either prints one line and exits with status
    130 at once: the runner's worker threads may still be inside a model, whose native thread pools must not
    be torn down under them by the interpreter's exit (the folder's lock is already released by then)."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        run_entry(argv)
    except (Interrupted, KeyboardInterrupt) as err:
        message = err.message if isinstance(err, Interrupted) else (
            f"interrupted by {err.args[0] if err.args else 'SIGINT'}: the run did not finish (a run is committed only "
            "once its runs/<run_id>.json is written)")
        print(message, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


def versions(cfg: schema.CascadeConfig) -> dict:
    return common.versions("apache-beam", "torch", "torchvision", "pyarrow", "numpy", "pillow", "omegaconf",
                           "cascade-inference", *(("av",) if cfg.video else ()))
