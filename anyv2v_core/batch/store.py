"""What a batch keeps on disk, in its output folder (on shared storage when workers are on several machines).

- `<out>/<job id>/`: a finished job (edited.mp4, first_frame.png, result.json). A worker writes it
  into `<out>/.partial-<job id>-<random>/` and renames that folder when it is complete, so a result
  folder is always whole; when a job ran twice (its first worker died after finishing it), the
  first result stays and the second is dropped.
- `<out>/failures.jsonl`: the jobs of the latest run that failed, one JSON object per line.
- `<out>/inversions/<key>.safetensors`: inversions, so a later job, another worker or a later run
  edits the same source without inverting it again. The key covers everything the inversion
  depends on: the video's content, the model (its folder's files, load options, dtype and device
  type) and the inversion settings (`inversion_settings`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import AnyV2VError
from ..inversion import Inversion
from ..inversion_store import load_inversion, save_inversion
from ..plan import EditSettings
from ..video import _write_atomically

logger = logging.getLogger("AnyV2V")

RESULT_FILE = "result.json"
FAILURES_FILE = "failures.jsonl"
PARTIAL_PREFIX = ".partial-"
# EditSettings fields that only the sampling and decoding read; every other field, including any
# field added later, is taken to change the inversion (a wrong guess then costs a new inversion,
# never a wrong edit). The seed changes it only when the VAE posterior is sampled.
SAMPLING_ONLY_FIELDS = ("negative_prompt", "cfg", "start_index", "injection", "decode_chunk_size", "sampler", "seed")


def content_hash(value) -> str:
    """A short hex digest of a JSON-serialisable value (tuples as lists, paths as strings)."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def inversion_settings(settings: EditSettings) -> dict:
    """The part of `settings` that the inversion depends on."""
    kept = {name: value for name, value in dataclasses.asdict(settings).items() if name not in SAMPLING_ONLY_FIELDS}
    if settings.sample_posterior:
        kept["seed"] = settings.seed
    return kept


def prepare_output(out: Path) -> None:
    """Create the output folder (`remove_leftovers` then clears what a killed worker or run left)."""
    if out.exists() and not out.is_dir():
        raise AnyV2VError(f"{out} is a file; give --out a folder (it holds one subfolder per job)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise AnyV2VError(f"cannot create the output folder {out} ({error.strerror}); choose another --out") from None


def remove_leftovers(out: Path, inversion_cache: Path | None) -> None:
    """Remove what killed workers left half-written: partial results, and the temporary files of
    inversions they were saving. Only while no worker of this output runs: when a run starts and
    when it ends."""
    for partial in out.glob(PARTIAL_PREFIX + "*"):
        shutil.rmtree(partial, ignore_errors=True)
    if inversion_cache is not None:
        InversionCache(Path(inversion_cache)).remove_partials()


def is_finished(out: Path, job_id: str) -> bool:
    return (out / job_id / RESULT_FILE).is_file()


def commit_result(out: Path, job_id: str, write: Callable[[Path], None]) -> bool:
    """Run `write(folder)` on a new partial folder, then make it `<out>/<job id>/` in one rename.
    False when that folder already holds a result (the job ran twice); the new one is dropped."""
    partial = out / f"{PARTIAL_PREFIX}{job_id}-{secrets.token_hex(4)}"
    partial.mkdir()
    try:
        write(partial)
        try:
            os.rename(partial, out / job_id)
        except OSError as error:
            if is_finished(out, job_id):
                return False
            raise AnyV2VError(f"could not move the result of job {job_id} to {out / job_id} ({error.strerror}); if "
                              f"that folder exists without a {RESULT_FILE}, delete it and run the batch again") from None
        return True
    finally:
        shutil.rmtree(partial, ignore_errors=True)


class FailureLog:
    """`<out>/failures.jsonl`: written anew at the start of a run, then one line per failure, flushed at once."""

    def __init__(self, out: Path) -> None:
        self.path = out / FAILURES_FILE

    def start(self, records: list[dict]) -> None:
        text = "".join(json.dumps(record) + "\n" for record in records)
        _write_atomically(self.path, lambda tmp_name: Path(tmp_name).write_text(text))

    def add(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")


def model_identity(source: str) -> str:
    """A local model folder's files (names, sizes, modification times: replacing a weight file
    changes it) or, for a repo id, the id itself."""
    folder = Path(source)
    if not folder.is_dir():
        return source
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return content_hash([[str(path.relative_to(folder)), path.stat().st_size, path.stat().st_mtime_ns] for path in files])


def inversion_key(*, video_hash: str, load_options: dict, backbone, settings: EditSettings) -> str:
    """What an inversion depends on, hashed: `load_options` are load_backbone's arguments (a Wan
    schedule's shift is one), `settings` are resolved with the backbone's defaults."""
    options = {name: value for name, value in load_options.items() if name not in ("source", "device")}
    return content_hash({"video": video_hash, "model": model_identity(load_options["source"]), "options": options,
                         "backbone": backbone.name, "dtype": str(backbone.dtype), "device": backbone.device.type,
                         "settings": inversion_settings(settings)})


class InversionCache:
    """Inversions on disk under `folder`, one safetensors file per key."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def remove_partials(self) -> None:
        """Remove the temporary files of saves that a killed worker left (see `video._write_atomically`)."""
        for partial in self.folder.glob(".*.safetensors"):
            partial.unlink(missing_ok=True)

    def load(self, key: str) -> Inversion | None:
        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            return load_inversion(path)
        except AnyV2VError as error:  # a damaged cache file costs an inversion, not the job
            logger.warning("ignoring the cached inversion: %s", error)
            return None

    def save(self, key: str, inversion: Inversion) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_inversion(self.folder / f"{key}.safetensors", inversion, overwrite=True)
        except (OSError, AnyV2VError) as error:  # the cache saves time; without it the batch still runs
            logger.warning("the inversion was not cached: %s", error)
