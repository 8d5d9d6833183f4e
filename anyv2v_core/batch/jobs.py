"""The jobs of a batch: one edit per line of a JSON-lines file.

A line is a JSON object whose keys are the `edit` subcommand's option names with `_` for `-`
(model, video, edited_first_frame, prompt, steps, conv_tau, window, dtype, ...; true for a switch
such as sample_posterior, null for an option's default). The options of `python -m anyv2v_core
edit` (`options.py`) read it, so every one works in a batch and is checked the same way. `out`,
`save_latents` and `overwrite` are not job keys: the batch writes each result to <out>/<job id>/.

Every check that needs no model and no decoded video runs here, for every line, before any model
loads: the options, the settings against a local model's defaults, the input files, the model
folder. The model's frame-count rules need the video's frames: they are checked when the job runs. A job's id is
a hash of the options its line gives, with each input file replaced by a hash of its content and
local paths made absolute: the same edit has the same id wherever its files are.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ..backbones.folders import REPO_ID, resolve_source
from ..errors import AnyV2VError
from ..options import backbone_options, check_edit_settings, edit_settings, job_line_parser, job_options
from ..video import read_image, video_files
from .store import content_hash, inversion_settings

logger = logging.getLogger("AnyV2V")


@dataclass(frozen=True)
class Job:
    line: int  # 1-based line number in the jobs file
    id: str
    options: argparse.Namespace  # the parsed `edit` options, local paths absolute
    video_hash: str
    # Jobs of one group share one inversion: same model and load options, same source video, same
    # inversion settings. The batch runs a group's jobs on the worker that inverted its video.
    group: str


@dataclass(frozen=True)
class JobFailure:
    line: int
    error: str  # the one-line message the CLI prints after "error: "
    id: str | None = None
    attempts: int = 0  # times a worker started the job (0: refused before any model loaded)

    def record(self) -> dict:
        return asdict(self)


def read_jobs(path: Path) -> tuple[list[Job], list[JobFailure]]:
    """The valid jobs of a JSON-lines file (a repeated job once) and a failure for each bad line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise AnyV2VError(f"cannot read the jobs file {path} ({error}); pass a JSON-lines file, one edit per line") from None
    parser = job_line_parser()
    file_hashes: dict[Path, str] = {}  # a video edited many times is read once
    jobs: dict[str, Job] = {}
    failures = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            job = parse_job(line, number, parser, file_hashes)
        except AnyV2VError as error:
            failures.append(JobFailure(line=number, error=str(error)))
            continue
        if job.id in jobs:
            logger.warning("line %d repeats the job of line %d; it runs once", number, jobs[job.id].line)
            continue
        jobs[job.id] = job
    return list(jobs.values()), failures


def parse_job(line: str, number: int, parser: argparse.ArgumentParser, file_hashes: dict[Path, str]) -> Job:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError as error:
        raise AnyV2VError(f"not valid JSON ({error.msg} at column {error.colno}); a job is one JSON object per line") from None
    if not isinstance(entry, dict):
        raise AnyV2VError(f"a JSON {type(entry).__name__}, not an object; a job is an object of edit options, e.g. "
                          '{"model": "...", "video": "...", "edited_first_frame": "...", "prompt": "..."}')
    args = job_options(entry, parser)
    _make_paths_absolute(args)
    # the checks of `edit` before its model loads, in the same order
    settings = edit_settings(args)
    video = video_files(args.video)
    read_image(args.edited_first_frame)
    check_edit_settings(args, settings, frame_count=None)  # the frame rules are checked when the job runs
    if Path(args.model).exists() or not REPO_ID.match(args.model):  # a repo id is checked where it downloads
        resolve_source(args.model)

    video_hash = _files_hash(video, file_hashes)
    identity = {key: getattr(args, key, value) for key, value in entry.items() if value is not None and value is not False}
    identity.update(video=video_hash, edited_first_frame=_files_hash([args.edited_first_frame], file_hashes))
    group = {"load": backbone_options(args), "video": video_hash, "inversion": inversion_settings(settings)}
    return Job(line=number, id=content_hash(identity)[:20], options=args, video_hash=video_hash,
               group=content_hash(group))


def _make_paths_absolute(args: argparse.Namespace) -> None:
    """Workers may run elsewhere than the driver's working folder: paths become absolute."""
    for key, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, key, value.expanduser().absolute())
    local_model = Path(args.model).expanduser()
    if local_model.exists():  # resolved: two spellings of one folder (`..`, a link) are one model, one job id
        args.model = str(local_model.resolve())


def _files_hash(files: list[Path], known: dict[Path, str]) -> str:
    """Hash of the files' content (and names, for a folder of frames: their order is the video's)."""
    digests = []
    for path in files:
        if path not in known:
            digest = hashlib.sha256()
            try:
                with path.open("rb") as file:
                    for chunk in iter(lambda: file.read(1 << 20), b""):
                        digest.update(chunk)
            except OSError as error:
                raise AnyV2VError(f"cannot read {path} ({error.strerror}); check the file and its permissions") from None
            known[path] = digest.hexdigest()
        digests.append(known[path] if len(files) == 1 else [path.name, known[path]])
    return digests[0] if len(files) == 1 else content_hash(digests)
