"""Running a batch: validate every job, skip the finished ones, run the rest, record the failures.

`EditWorker` runs jobs with the engine, unchanged: it holds one loaded backbone and the inversion
of the video it edits last ("invert once, edit many"), and writes each result atomically. The
same class runs in this process (no --ray) and as the body of every Ray actor (`ray_runner.py`).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import logging
import platform
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import torch

from ..errors import AnyV2VError, AnyV2VOutOfMemory
from ..inversion import Inversion
from ..options import OUTPUT_KEYS, backbone_options, edit_settings
from ..pipeline import EditSettings, edit, invert_source
from ..video import read_frames, read_image, write_image, write_video
from .jobs import Job, JobFailure, read_jobs
from .store import (RESULT_FILE, FailureLog, InversionCache, commit_result, inversion_key, is_finished, prepare_output,
                    remove_leftovers)

logger = logging.getLogger("AnyV2V")

DONE, FAILED, FINISHED_BEFORE = "done", "failed", "finished before"


@dataclass(frozen=True)
class JobOutcome:
    job_id: str
    line: int
    status: str  # DONE, FAILED, or FINISHED_BEFORE (another worker or run wrote its result first)
    worker: str
    error: str | None = None


class EditWorker:
    """Runs jobs one at a time with one loaded backbone (reloaded when a job names other load options)."""

    def __init__(self, out: Path, inversion_cache: Path | None, name: str = "local", torch_threads: int | None = None):
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.out, self.name = Path(out), name
        self.cache = None if inversion_cache is None else InversionCache(Path(inversion_cache))
        self.backbone, self.backbone_key = None, None
        self.inversions: dict[str, Inversion] = {}  # the last one: a group's jobs come one after another

    def run(self, job: Job) -> JobOutcome:
        if is_finished(self.out, job.id):  # a retry of a job its dead worker had finished
            return JobOutcome(job.id, job.line, FINISHED_BEFORE, self.name)
        try:
            written = self._edit(job)
        except (AnyV2VError, AnyV2VOutOfMemory) as error:
            return JobOutcome(job.id, job.line, FAILED, self.name, str(error))
        except Exception as error:  # a bug or a library's error: this job fails, the batch goes on
            logger.exception("job %s (line %d) failed", job.id, job.line)
            return JobOutcome(job.id, job.line, FAILED, self.name, f"{type(error).__name__}: {error}")
        return JobOutcome(job.id, job.line, DONE if written else FINISHED_BEFORE, self.name)

    def _edit(self, job: Job) -> bool:
        args, timings = job.options, {}
        with timed(timings, "load"):
            backbone = self._load(args)
        with timed(timings, "read"):
            frames, _ = read_frames(args.video)
            edited_first_frame = read_image(args.edited_first_frame)
            settings = edit_settings(args).resolved(backbone.defaults)
        with counted_calls(backbone.denoiser) as calls:
            with timed(timings, "inversion"):
                inversion, inversion_origin, inversion_key = self._inversion(job, backbone, frames, settings)
            inversion_calls = calls[0]
            with timed(timings, "edit"):
                result = edit(backbone, frames, edited_first_frame, prompt=args.prompt, settings=settings,
                              inversion=inversion)
        record = {
            "id": job.id, "line": job.line, "worker": self.name,
            "options": {key: value for key, value in vars(args).items() if key not in OUTPUT_KEYS},
            "settings": dataclasses.asdict(settings), "backbone": backbone.name,
            "frames": int(result.frames.shape[0]), "fps": result.fps,
            "inversion": {"key": inversion_key, "origin": inversion_origin},
            "model_calls": {"inversion": inversion_calls, "edit": calls[0] - inversion_calls},
            "versions": versions(), "timings_s": timings,
        }

        def write(folder: Path) -> None:
            with timed(timings, "write"):
                write_video(folder / "edited.mp4", result.frames, result.fps)
                write_image(folder / "first_frame.png", result.frames[0])
            timings["total"] = round(sum(timings.values()), 3)
            record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            (folder / RESULT_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")

        return commit_result(self.out, job.id, write)

    def _load(self, args):
        options = backbone_options(args)
        key = json.dumps(options, sort_keys=True, default=str)
        if key != self.backbone_key:
            from ..loading import load_backbone  # looked up at call time, like the CLI's

            self.backbone, self.backbone_key, self.inversions = None, None, {}
            gc.collect()  # frees the previous model before the next one loads
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.backbone, self.backbone_key = load_backbone(**options), key
        return self.backbone

    def _inversion(self, job: Job, backbone, frames: torch.Tensor, settings: EditSettings):
        """The job's inversion (settings resolved) from memory, the disk cache, or inverted now; with
        its origin and key."""
        key = inversion_key(video_hash=job.video_hash, load_options=backbone_options(job.options), backbone=backbone,
                            settings=settings)
        if key in self.inversions:
            return self.inversions[key], "memory", key
        inversion, origin = None if self.cache is None else self.cache.load(key), "disk"
        if inversion is None:
            inversion, origin = invert_source(backbone, frames, settings), "computed"
            if self.cache is not None:
                self.cache.save(key, inversion)
        self.inversions = {key: inversion}
        return inversion, origin, key


@contextmanager
def timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    """Seconds the block took, into timings[phase]."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] = round(time.perf_counter() - started, 3)


@contextmanager
def counted_calls(module: torch.nn.Module) -> Iterator[list[int]]:
    """Counts the module's forward calls into the yielded one-element list while the block runs."""
    calls = [0]

    def count(*_) -> None:
        calls[0] += 1

    handle = module.register_forward_pre_hook(count)
    try:
        yield calls
    finally:
        handle.remove()


def versions() -> dict[str, str | None]:
    def version(distribution: str) -> str | None:
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            return None

    anyv2v = version("anyv2v")
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    if anyv2v is None and pyproject.is_file():  # a ComfyUI custom node is a checkout, not an installed package
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.MULTILINE)
        anyv2v = found.group(1) if found else None
    return {"anyv2v": anyv2v, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": version("diffusers"), "transformers": version("transformers")}


# ---------------------------------------------------------------------------------------------- the batch


@dataclass
class BatchSummary:
    jobs: int  # valid jobs in the file (a repeated one once)
    invalid: int  # lines refused before any model loaded
    finished_before: int  # skipped: finished by an earlier run
    done: int = 0
    failed: int = 0
    replaced_workers: int = 0
    interrupted: bool = False
    failures_file: Path | None = None

    def describe(self) -> str:
        text = (f"{self.jobs + self.invalid} jobs: {self.done} done now, {self.finished_before} done before, "
                f"{self.failed + self.invalid} failed")
        if self.failed + self.invalid:
            text += f" (see {self.failures_file})"
        if self.replaced_workers:
            text += f"; {self.replaced_workers} dead worker(s) replaced"
        if self.interrupted:
            remaining = self.jobs - self.finished_before - self.done - self.failed
            text += f"; interrupted with {remaining} job(s) left: run the same command again to finish them"
        return text


@dataclass
class BatchProgress:
    """Counts outcomes, records failures, and draws `done / failed / running, ETA` on a stream."""

    total: int  # jobs to run in this run
    failures: FailureLog
    stream: TextIO | None = None
    done: int = 0
    failed: int = 0
    running: int = 0
    replaced_workers: int = 0
    started: float = field(default_factory=time.perf_counter)

    def job_started(self) -> None:
        self.running += 1
        self.draw()

    def worker_replaced(self) -> None:
        self.replaced_workers += 1

    def job_retried(self) -> None:
        """A job's worker died before the job ended; the job runs again."""
        self.running -= 1

    def job_ended(self, outcome: JobOutcome, attempts: int = 1) -> None:
        self.running -= 1
        if outcome.status == FAILED:
            self.failed += 1
            self.failures.add(JobFailure(line=outcome.line, error=outcome.error, id=outcome.job_id,
                                         attempts=attempts).record())
        else:
            self.done += 1
        self.draw(line=True)

    def draw(self, *, line: bool = False) -> None:
        """Redraw the bar in place on a terminal; elsewhere (a log file) write one `line` per ended job."""
        terminal = self.stream is not None and self.stream.isatty()
        if self.stream is None or not (terminal or line):
            return
        elapsed = time.perf_counter() - self.started
        ended = self.done + self.failed
        eta = "-:--:--" if not ended else _clock(elapsed / ended * (self.total - ended))
        start, end = ("\r", " ") if terminal else ("", "\n")
        self.stream.write(f"{start}batch: {ended}/{self.total} [{self.done} done, {self.failed} failed, {self.running} "
                          f"running] {_clock(elapsed)} elapsed, ETA {eta}{end}")
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None and self.stream.isatty():
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"


def run_batch(
    jobs_file: Path,
    out: Path,
    *,
    inversion_cache: Path | None,
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    retries: int = 2,
    stream: TextIO | None = None,
) -> BatchSummary:
    """Run the jobs of `jobs_file` not finished in `out`; in this process, or on Ray actors when
    `ray_address` is given ("auto": the local cluster, started if needed). Ctrl-C stops the batch:
    finished results stay, and running the same batch again does only what is left. The progress
    goes to `stream` (None: nowhere); the bad lines to it or stderr."""
    out = Path(out)
    jobs, invalid = read_jobs(jobs_file)  # every line checked before any model loads
    prepare_output(out)
    remove_leftovers(out, inversion_cache)
    failures = FailureLog(out)
    failures.start([failure.record() for failure in invalid])
    for failure in invalid:
        print(f"line {failure.line}: error: {failure.error}", file=stream or sys.stderr)
    pending = [job for job in jobs if not is_finished(out, job.id)]
    summary = BatchSummary(jobs=len(jobs), invalid=len(invalid), finished_before=len(jobs) - len(pending),
                           failures_file=failures.path)
    progress = BatchProgress(total=len(pending), failures=failures, stream=stream)
    try:
        if ray_address is None:
            run_here(pending, out, inversion_cache, progress)
        elif pending:
            from .ray_runner import run_on_ray

            run_on_ray(
                pending, out, inversion_cache, progress, address=ray_address, workers=workers,
                gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, retries=retries)
    except KeyboardInterrupt:
        summary.interrupted = True  # killed actors may still be stopping: the next run removes their partial results
    else:
        remove_leftovers(out, inversion_cache)  # from workers that died; the others are idle
    finally:
        progress.close()
    summary.done, summary.failed, summary.replaced_workers = progress.done, progress.failed, progress.replaced_workers
    return summary


def run_here(jobs: list[Job], out: Path, inversion_cache: Path | None, progress: BatchProgress) -> None:
    """Run the jobs in this process, a group's jobs one after another."""
    worker = EditWorker(out, inversion_cache)
    for job in grouped(jobs):
        progress.job_started()
        progress.job_ended(worker.run(job))


def grouped(jobs: list[Job]) -> list[Job]:
    """The jobs with each group's together, groups in the order they first appear."""
    first = {}
    for job in jobs:
        first.setdefault(job.group, len(first))
    return sorted(jobs, key=lambda job: first[job.group])
