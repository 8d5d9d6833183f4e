"""A batch on Ray: one long-lived actor per GPU (or per CPU worker slot), each an `EditWorker`
holding a loaded backbone.

The driver hands every actor one job at a time. An actor keeps to one group (one source video and
inversion settings) until its jobs are gone, so it inverts that video once and edits it many
times; an idle actor then takes a group nobody has started, and only then helps with a group whose
inversion is already done (it loads it from the disk cache). An actor that dies (killed, out of
host memory, its node lost) is replaced, and its job runs again, up to `retries` times; a job that
its dead worker had finished is not redone (its result is on disk). Ctrl-C kills the actors; the
finished results stay.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections import deque
from pathlib import Path

from ..errors import AnyV2VError
from .jobs import Job
from .progress import BatchProgress
from .worker import FAILED, EditWorker, JobOutcome

logger = logging.getLogger("AnyV2V")


class GroupScheduler:
    """Which job an idle worker slot runs next, keeping each group on the slot that holds its inversion."""

    def __init__(self, jobs: list[Job]) -> None:
        self.queues: dict[str, deque[Job]] = {}
        for job in jobs:
            self.queues.setdefault(job.group, deque()).append(job)
        self.owner: dict[int, str] = {}  # slot -> the group it works on
        self.inverted: set[str] = set()  # groups with a finished job: their inversion is cached

    def next_job(self, slot: int, *, anything: bool = False) -> Job | None:
        group = self.owner.get(slot)
        if group is None or not self.queues[group]:
            owned = set(self.owner.values())
            fresh = [g for g, queue in self.queues.items() if queue and g not in owned]
            shared = [g for g, queue in self.queues.items() if queue and (g in self.inverted or anything)]
            if not fresh and not shared:
                return None
            group = fresh[0] if fresh else max(shared, key=lambda g: len(self.queues[g]))
            self.owner[slot] = group
        return self.queues[group].popleft()

    def again(self, job: Job) -> None:
        """Run `job` again, first among its group's jobs."""
        self.queues[job.group].appendleft(job)

    def ended(self, job: Job) -> None:
        self.inverted.add(job.group)

    def left(self) -> int:
        return sum(len(queue) for queue in self.queues.values())


def run_on_ray(
    jobs: list[Job],
    out: Path,
    inversion_cache: Path | None,
    progress: BatchProgress,
    *,
    address: str,
    workers: int | None,
    gpus_per_worker: float | None,
    cpus_per_worker: float,
    retries: int,
) -> None:
    """Run the jobs on Ray actors, one job at a time per actor."""
    try:
        import ray
    except ImportError:
        raise AnyV2VError("--ray needs Ray: pip install -r requirements-batch.txt (or pip install 'ray>=2.9')") from None
    if not ray.is_initialized():
        ray.init(address=None if address == "auto" else address, log_to_driver=False)
    resources = ray.cluster_resources()
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    if workers is None:
        slots = resources.get("GPU", 0) / gpus_per_worker if gpus_per_worker else resources.get("CPU", 1) / cpus_per_worker
        workers = max(1, math.floor(slots))
    workers = min(workers, len(jobs))
    for resource, each in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
        if workers * each > resources.get(resource, 0):
            logger.warning("%d workers x %g %s do not fit in the cluster's %g %s now; the others wait for the cluster "
                           "to grow (lower --workers or --%ss-per-worker otherwise)", workers, each, resource,
                           resources.get(resource, 0), resource, resource.lower())

    actor_class = ray.remote(EditWorker)
    run_name = f"anyv2v-batch-{secrets.token_hex(3)}"
    started = 0

    def start_worker():
        nonlocal started
        name, started = f"{run_name}-{started}", started + 1
        return actor_class.options(name=name, num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0).remote(
            out, inversion_cache, name, torch_threads=max(1, round(cpus_per_worker)))

    actors = [start_worker() for _ in range(workers)]
    scheduler = GroupScheduler(jobs)
    running: dict = {}  # object ref -> (slot, job)
    attempts: dict[str, int] = {}

    def feed(anything: bool = False) -> None:
        busy = {slot for slot, _ in running.values()}
        for slot in range(len(actors)):
            job = None if slot in busy else scheduler.next_job(slot, anything=anything)
            if job is not None:
                attempts[job.id] = attempts.get(job.id, 0) + 1
                running[actors[slot].run.remote(job)] = (slot, job)
                progress.job_started()

    try:
        feed()
        while running or scheduler.left():
            if not running:  # every slot idle, jobs left only in groups not yet inverted: take them anyway
                feed(anything=True)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.2)
            progress.draw()
            for ref in ready:
                slot, job = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    actors[slot] = start_worker()
                    progress.worker_replaced()
                    if attempts[job.id] <= retries:
                        progress.job_retried()
                        scheduler.again(job)
                        continue
                    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    outcome = JobOutcome(job.id, job.line, FAILED, "", f"its worker died {attempts[job.id]} times "
                                         f"(last: {reason}); it may need more memory than a worker has")
                scheduler.ended(job)
                progress.job_ended(outcome, attempts=attempts[job.id])
            feed()
    finally:
        for actor in actors:
            ray.kill(actor)
