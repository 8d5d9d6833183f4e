"""A batch's progress: the outcomes counted, the failures recorded, a bar drawn."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TextIO

from .jobs import JobFailure
from .store import FailureLog
from .worker import FAILED, JobOutcome


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
