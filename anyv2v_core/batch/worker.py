"""Running one job: `EditWorker` runs jobs with the engine, unchanged.

It holds one loaded backbone and the inversion of the video it edits last ("invert once, edit
many"), and writes each result atomically. The same class runs in this process (no --ray,
`runner.py`) and as the body of every Ray actor (`ray_runner.py`).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import logging
import platform
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..errors import AnyV2VError, AnyV2VOutOfMemory
from ..inversion import Inversion
from ..options import OUTPUT_KEYS, backbone_options, edit_settings
from ..pipeline import edit, invert_source
from ..plan import EditSettings
from ..video import read_frames, read_image, write_image, write_video
from .jobs import Job
from .store import RESULT_FILE, InversionCache, commit_result, inversion_key, is_finished

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
