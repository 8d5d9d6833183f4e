"""Running a batch: validate every job, skip the finished ones, run the rest, record the failures.

The jobs run on an `EditWorker` (`worker.py`) in this process, or on Ray actors (`ray_runner.py`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .jobs import Job, read_jobs
from .progress import BatchProgress
from .store import FailureLog, is_finished, prepare_output, remove_leftovers
from .worker import EditWorker


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
