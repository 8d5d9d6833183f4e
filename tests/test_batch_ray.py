"""The batch runner on a local Ray cluster (2 CPUs, 2 actors of one torch thread) with the tiny model,
in one scenario (each Ray run costs seconds of actor start-up): 8 edits of 3 videos, an actor
killed mid-job, the driver interrupted, the batch run again. The rerun does only the missing jobs;
every result is present, complete, not duplicated and has exactly the frames of a single CLI
edit; each video is inverted once per actor that edits it."""

from __future__ import annotations

import _thread
import json
import os
import threading
import time

import pytest
import torch

try:
    import ray
except ImportError:
    if os.environ.get("CI"):  # CI installs requirements-batch.txt: there these tests must run
        raise
    pytest.skip("Ray is not installed (pip install -r requirements-batch.txt)", allow_module_level=True)

from anyv2v_core.batch.runner import run_batch
from anyv2v_core.cli import main
from anyv2v_core.testing.tiny_models import moving_square_video
from anyv2v_core.video import read_frames, write_image, write_video

SMALL = {"size": "32x32", "steps": 2, "inversion_steps": 4}
COLOURS = [(0.9, 0.1, 0.1), (0.1, 0.9, 0.1), (0.1, 0.1, 0.9)]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def edits(tmp_path_factory, tiny_model_dir):
    """8 job lines over 3 videos (3, 3 and 2 edits each), and the frames `edit` gives for each."""
    folder = tmp_path_factory.mktemp("batch-inputs")
    entries = []
    for index in range(8):
        video = index % 3
        frames = moving_square_video(4, colour=COLOURS[video])
        entries.append({"model": str(tiny_model_dir), "video": str(folder / f"video{video}.mp4"),
                        "edited_first_frame": str(folder / f"first{video}.png"), "prompt": f"edit number {index}",
                        "seed": index, **SMALL})
        if index < 3:
            write_video(folder / f"video{video}.mp4", frames, fps=8)
            write_image(folder / f"first{video}.png", frames[0].flip(-1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in each actor: the same thread count, the same float results
    try:
        expected = []
        for index, entry in enumerate(entries):
            out = folder / f"cli{index}.mp4"
            argv = ["edit", "--out", str(out)]
            for key, value in entry.items():
                argv += [f"--{key.replace('_', '-')}", str(value)]
            assert main(argv) == 0
            expected.append(read_frames(out)[0])
    finally:
        torch.set_num_threads(threads)
    return entries, expected


def write_jobs(path, entries):
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


def results(out) -> dict[int, dict]:
    """result.json of every finished job, by the line of its job."""
    records = [json.loads((folder / "result.json").read_text()) for folder in out.iterdir()
               if (folder / "result.json").is_file()]
    by_line = {record["line"]: record for record in records}
    assert len(by_line) == len(records), "a job has two result folders"
    return by_line


def wait_for_results(out, count: int, timeout: float = 300) -> dict[int, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if out.is_dir() and len(found := results(out)) >= count:
            return found
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} results after {timeout} s")


def assert_same_frames_as_the_cli(out, edits):
    entries, expected = edits
    for line, record in results(out).items():
        folder = out / record["id"]
        assert {path.name for path in folder.iterdir()} == {"edited.mp4", "first_frame.png", "result.json"}
        assert torch.equal(read_frames(folder / "edited.mp4")[0], expected[line - 1]), f"line {line}"


def test_a_killed_actor_and_an_interrupted_driver_lose_nothing_and_change_no_frame(ray_cluster, edits, tmp_path):
    entries, _ = edits
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", entries)
    out = tmp_path / "out"
    killed = []

    def kill_an_actor_mid_job_then_interrupt_the_driver():
        # both actors start with an inversion; when the first is cached on disk, no job has ended yet
        deadline = time.monotonic() + 300
        while not list(out.glob("inversions/*.safetensors")) and time.monotonic() < deadline:
            time.sleep(0.01)
        victim = min(name for name in ray.util.list_named_actors() if name.startswith("anyv2v-batch-"))
        ray.kill(ray.get_actor(victim))
        killed.append(victim)
        wait_for_results(out, 3)
        _thread.interrupt_main()  # what Ctrl-C does to the driver

    chaos = threading.Thread(target=kill_an_actor_mid_job_then_interrupt_the_driver)
    chaos.start()
    first = run_batch(jobs_file, out, inversion_cache=out / "inversions", ray_address="auto", workers=2, stream=None)
    chaos.join()
    finished = {line: (out / record["id"] / "result.json").stat().st_mtime_ns for line, record in results(out).items()}
    assert killed and first.replaced_workers == 1
    assert first.interrupted and 3 <= len(finished) < 8 and first.failed == 0

    second = run_batch(jobs_file, out, inversion_cache=out / "inversions", ray_address="auto", workers=2, stream=None)
    assert not second.interrupted
    assert (second.finished_before, second.done, second.failed) == (len(finished), 8 - len(finished), 0)
    assert sorted(results(out)) == list(range(1, 9))
    assert {line: (out / results(out)[line]["id"] / "result.json").stat().st_mtime_ns for line in finished} == finished
    assert not list(out.glob(".partial-*")), "a partial result was left behind"
    assert killed[0] not in {record["worker"] for record in results(out).values()}, "killed after its job ended"
    assert_same_frames_as_the_cli(out, edits)

    # invert once, edit many: per actor and video, one job inverts (or loads the cached inversion)
    inverted_by = {}
    for line, record in results(out).items():
        calls, origin = record["model_calls"]["inversion"], record["inversion"]["origin"]
        assert calls == (SMALL["inversion_steps"] if origin == "computed" else 0), f"line {line}"
        if origin != "memory":
            pair = (record["worker"], entries[line - 1]["video"])
            assert pair not in inverted_by, f"{pair} inverted twice (lines {inverted_by.get(pair)} and {line})"
            inverted_by[pair] = line
    assert {video for _, video in inverted_by} == {entry["video"] for entry in entries}
