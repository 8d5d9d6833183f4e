"""What the batch writes when things go wrong (issue 21): a job that fails inside its worker, a
crash while a result is written, a worker killed while it saves an inversion. Observed on disk and
through Python's audit events (every file opened for writing, every rename), in this process and
on a local Ray cluster. Each test names the mutation of `benchmarks/mutation.py` that it catches.
"""

from __future__ import annotations

import json
import os
import sys

import pytest

from anyv2v_core.batch.runner import run_batch
from anyv2v_core.testing.tiny_models import moving_square_video
from anyv2v_core.video import write_image, write_video

SMALL = {"size": "32x32", "steps": 2, "inversion_steps": 2}


@pytest.fixture
def jobs(tmp_path, tiny_model_dir):
    """A good job and one that only its worker can refuse: 6 frames of a 4-frame video (the frame
    count is checked against the decoded video, when the job runs)."""
    frames = moving_square_video(4)
    inputs = {"model": str(tiny_model_dir), "video": str(write_video(tmp_path / "source.mp4", frames, fps=8)),
              "edited_first_frame": str(write_image(tmp_path / "first.png", frames[0].flip(-1))), **SMALL}
    good, failing = {**inputs, "prompt": "a square"}, {**inputs, "prompt": "a square", "frames": 6}
    path = tmp_path / "jobs.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(failing) + "\n")
    return path


def finished_folders(out) -> list[str]:
    return sorted(path.name for path in out.iterdir() if path.is_dir() and path.name != "inversions")


def assert_the_second_job_failed_in_its_worker(summary, out) -> None:
    assert (summary.jobs, summary.done, summary.failed, summary.invalid) == (2, 1, 1, 0)
    (failure,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert failure["line"] == 2 and failure["attempts"] == 1 and failure["id"]
    assert "frames" in failure["error"]
    (result,) = finished_folders(out)  # the good job's, and nothing of the failed one
    assert result != failure["id"] and json.loads((out / result / "result.json").read_text())["line"] == 1


def test_a_job_that_fails_in_its_worker_is_counted_recorded_with_its_attempts_and_leaves_no_folder(jobs, tmp_path):
    """Mutations: failed-job-counted-done, failure-without-attempts."""
    out = tmp_path / "out"
    summary = run_batch(jobs, out, inversion_cache=out / "inversions", stream=None)
    assert_the_second_job_failed_in_its_worker(summary, out)


def test_a_result_appears_by_one_rename_and_a_crash_while_writing_it_leaves_nothing(jobs, tmp_path, monkeypatch):
    """Nothing is ever created or opened for writing at a result's final path: the finished folder
    arrives by one rename. A crash while the files are written leaves no result and no partial
    folder. Mutation: result-committed-by-copying."""
    out = tmp_path / "out"
    events: list[tuple[str, str]] = []
    recording = [True]

    def audit(event: str, args) -> None:
        if not recording[0]:
            return
        if event == "open" and isinstance(args[0], (str, os.PathLike)) and (
                isinstance(args[1], str) and set(args[1]) & set("wax+") or args[2] & (os.O_WRONLY | os.O_RDWR)):
            events.append(("write", os.fspath(args[0])))
        elif event in ("os.mkdir", "os.rename", "shutil.copytree"):
            events.append((event, os.fspath(args[1] if event == "os.rename" else args[0])))

    sys.addaudithook(audit)  # audit hooks cannot be removed: `recording` switches this one off
    try:
        summary = run_batch(jobs, out, inversion_cache=None, stream=None)
    finally:
        recording[0] = False
    assert summary.done == 1
    (result,) = finished_folders(out)
    final = str(out / result)
    at_the_final_path = [(event, path) for event, path in events if path == final or path.startswith(final + os.sep)]
    assert at_the_final_path == [("os.rename", final)], at_the_final_path

    import anyv2v_core.batch.worker as worker

    def disk_full(path, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker, "write_image", disk_full)  # after edited.mp4, before result.json
    crashed = tmp_path / "crashed"
    summary = run_batch(jobs, crashed, inversion_cache=None, stream=None)
    assert (summary.done, summary.failed) == (0, 2)
    assert finished_folders(crashed) == [] and not list(crashed.glob(".partial-*"))


def test_temporary_inversion_files_of_killed_workers_are_gone_when_a_run_starts_and_when_it_ends(
        jobs, tmp_path, monkeypatch):
    """A worker killed while it saves an inversion leaves `inversions/.<key>.<random>.safetensors`.
    Mutation: cache-temps-kept-after-the-run."""
    import anyv2v_core.batch.store as store

    out = tmp_path / "out"
    cache = out / "inversions"
    cache.mkdir(parents=True)
    (cache / ".before.0badc0de.safetensors").write_bytes(b"half of an earlier run's inversion")
    save = store.save_inversion
    seen_at_first_save = []

    def save_beside_a_dying_worker(path, inversion, **kwargs):
        seen_at_first_save.append(sorted(p.name for p in cache.iterdir()))
        (cache / f".{path.stem}.deadbeef.safetensors").write_bytes(b"half an inversion")  # the killed worker's
        return save(path, inversion, **kwargs)

    monkeypatch.setattr(store, "save_inversion", save_beside_a_dying_worker)
    assert run_batch(jobs, out, inversion_cache=cache, stream=None).done == 1
    assert seen_at_first_save and seen_at_first_save[0] == []  # swept when the run started
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []  # and when it ended
    assert len(list(cache.glob("*.safetensors"))) == 1  # the good job's inversion, whole


def test_on_ray_a_job_that_fails_in_its_worker_is_counted_recorded_with_its_attempts_and_leaves_no_folder(
        jobs, tmp_path):
    """Mutations: failed-job-counted-done, failure-without-attempts."""
    try:
        import ray
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("Ray is not installed (pip install -r requirements-batch.txt)")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    try:
        out = tmp_path / "out"
        summary = run_batch(jobs, out, inversion_cache=out / "inversions", ray_address="auto", workers=1, stream=None)
    finally:
        ray.shutdown()
    assert_the_second_job_failed_in_its_worker(summary, out)
