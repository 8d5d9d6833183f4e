"""The batch runner in this process (no Ray): job lines are the `edit` options, every bad line is
reported with the CLI's own message before any model loads and the good ones run, a rerun skips
what is finished, and a job's id follows its inputs' content and its settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from anyv2v_core.batch.jobs import read_jobs
from anyv2v_core.batch.runner import run_batch
from anyv2v_core.cli import main
from anyv2v_core.inversion_store import load_inversion
from anyv2v_core.testing.tiny_models import moving_square_video
from anyv2v_core.video import write_image, write_video

SMALL = {"size": "32x32", "steps": 2, "inversion_steps": 4}


@pytest.fixture
def inputs(tmp_path, tiny_model_dir):
    frames = moving_square_video(4)
    video = write_video(tmp_path / "source.mp4", frames, fps=8)
    first = write_image(tmp_path / "first.png", frames[0].flip(-1))
    return {"model": str(tiny_model_dir), "video": str(video), "edited_first_frame": str(first)}


def write_jobs(path, entries):
    path.write_text("".join((entry if isinstance(entry, str) else json.dumps(entry)) + "\n" for entry in entries))
    return path


def cli_error(capsys, entry, tmp_path) -> str:
    """What `python -m anyv2v_core edit` prints after "error: " for the options of a job line."""
    argv = ["edit", "--out", str(tmp_path / "cli.mp4")]
    for key, value in entry.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's errors exit
        status = exit.code
    assert status == 2
    return capsys.readouterr().err.strip().splitlines()[-1].split("error: ", 1)[1]


def test_bad_lines_are_reported_before_any_model_loads_and_the_good_ones_run(inputs, tmp_path, capsys, monkeypatch):
    good = [{**inputs, **SMALL, "prompt": "a blue square"}, {**inputs, **SMALL, "prompt": "a green square"}]
    bad_options = {
        "missing video": {**good[0], "video": str(tmp_path / "missing.mp4")},
        "missing first frame": {**good[0], "edited_first_frame": str(tmp_path / "missing.png")},
        "zero steps": {**good[0], "steps": 0},
        "size not a multiple of 8": {**good[0], "size": "30x32"},
        "tau out of range": {**good[0], "conv_tau": 1.5},
        "missing prompt": {key: value for key, value in good[0].items() if key != "prompt"},
    }
    expected = {name: cli_error(capsys, entry, tmp_path) for name, entry in bad_options.items()}
    not_edit_options = {'{"prompt": "x"': "not valid JSON", '["a", "list"]': "not an object",
                        json.dumps({**good[0], "out": "x.mp4"}): "out is not a job key",
                        json.dumps({**good[0], "colour": "blue"}): "unrecognized arguments: --colour=blue"}
    lines = [good[0], *bad_options.values(), *not_edit_options, good[1]]
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", lines)
    out = tmp_path / "out"

    import anyv2v_core.loading

    real_load, loads = anyv2v_core.loading.load_backbone, []

    def load_after_every_check(*args, **kwargs):
        reported = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
        assert len(reported) == len(bad_options) + len(not_edit_options), "a bad line was reported after a model loaded"
        loads.append(args)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(anyv2v_core.loading, "load_backbone", load_after_every_check)
    summary = run_batch(jobs_file, out, inversion_cache=out / "inversions", stream=None)

    assert (summary.done, summary.failed, summary.invalid) == (2, 0, len(bad_options) + len(not_edit_options))
    assert len(loads) == 1
    reported = {record["line"]: record for record in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    for line, name in enumerate(bad_options, start=2):
        assert reported[line]["error"] == expected[name], name
        assert reported[line]["attempts"] == 0
    for line, message in enumerate(not_edit_options.values(), start=2 + len(bad_options)):
        assert message in reported[line]["error"]
    results = sorted(path for path in out.iterdir() if (path / "result.json").is_file())
    assert len(results) == 2
    for result in results:
        assert {path.name for path in result.iterdir()} == {"edited.mp4", "first_frame.png", "result.json"}

    # the same file again: nothing left to run, no model loads, the bad lines reported again
    summary = run_batch(jobs_file, out, inversion_cache=out / "inversions", stream=None)
    assert (summary.finished_before, summary.done, summary.invalid) == (2, 0, len(reported))
    assert len(loads) == 1
    assert len((out / "failures.jsonl").read_text().splitlines()) == len(reported)


def test_job_ids_follow_content_and_settings_groups_follow_the_inversion(inputs, tmp_path, monkeypatch):
    copy = shutil.copy(inputs["video"], tmp_path / "copy of the source.mp4")
    other = write_video(tmp_path / "other.mp4", moving_square_video(4, colour=(0.1, 0.9, 0.1)), fps=8)
    base = {**inputs, **SMALL, "prompt": "a blue square"}
    monkeypatch.chdir(tmp_path)
    variants = {
        "base": base,
        "the same video copied elsewhere": {**base, "video": str(copy)},
        "a relative path": {**base, "video": "source.mp4"},
        "numbers as strings": {**base, "steps": "2", "inversion_steps": "4"},
        "the model folder spelled with ..": {**base, "model": str(Path(base["model"]) / ".." / Path(base["model"]).name)},
        "another prompt": {**base, "prompt": "a green square"},
        "another seed": {**base, "seed": 3},
        "another video": {**base, "video": str(other)},
        "other steps": {**base, "steps": 1},
    }
    jobs, failures = read_jobs(write_jobs(tmp_path / "jobs.jsonl", variants.values()))
    assert failures == []
    by_line = {job.line: job for job in jobs}  # a repeated job is kept once, at its first line
    names = list(variants)
    same_as_base = [name for i, name in enumerate(names, start=1) if i not in by_line]
    assert same_as_base == ["the same video copied elsewhere", "a relative path", "numbers as strings",
                            "the model folder spelled with .."]
    kept = {names[line - 1]: job for line, job in by_line.items()}
    assert len({job.id for job in kept.values()}) == len(kept)
    assert kept["another prompt"].group == kept["another seed"].group == kept["base"].group
    assert kept["another video"].group != kept["base"].group and kept["other steps"].group != kept["base"].group


def test_a_damaged_cached_inversion_is_inverted_again(inputs, tmp_path):
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{**inputs, **SMALL, "prompt": "a blue square"}])
    out = tmp_path / "out"
    assert run_batch(jobs_file, out, inversion_cache=out / "inversions", stream=None).done == 1
    (result,) = [path.parent for path in out.glob("*/result.json")]
    first = json.loads((result / "result.json").read_text())
    (cached,) = (out / "inversions").glob("*.safetensors")
    cached.write_bytes(b"half a file")
    shutil.rmtree(result)

    assert run_batch(jobs_file, out, inversion_cache=out / "inversions", stream=None).done == 1
    again = json.loads((result / "result.json").read_text())
    assert again["inversion"] == first["inversion"] == {"key": cached.stem, "origin": "computed"}
    assert again["model_calls"]["inversion"] == SMALL["inversion_steps"]
    assert load_inversion(cached).inversion_steps == SMALL["inversion_steps"]  # saved again, whole


def test_the_batch_command_exit_status_and_summary(inputs, tmp_path, capsys):
    jobs_file = write_jobs(tmp_path / "jobs.jsonl", [{**inputs, **SMALL, "steps": 0, "prompt": "x"}])
    out = tmp_path / "out"
    assert main(["batch", str(jobs_file), "--out", str(out), "--workers", "2"]) == 2
    assert "--workers and --gpus-per-worker need --ray" in capsys.readouterr().err
    assert not out.exists()

    assert main(["batch", str(jobs_file), "--out", str(out)]) == 1  # no job done, one failed
    captured = capsys.readouterr()
    assert "line 1: error: steps must be an integer >= 1 (got 0)" in captured.err
    assert captured.out.strip() == f"1 jobs: 0 done now, 0 done before, 1 failed (see {out / 'failures.jsonl'})"


def test_options_added_for_wan_work_in_a_batch_and_share_an_inversion_only_where_it_is_the_same(tmp_path):
    from anyv2v_core.testing.tiny_models import build_tiny_wan

    model = build_tiny_wan(tmp_path / "tiny-wan", "wan2.1-i2v")
    source = moving_square_video(11, 32)
    write_video(tmp_path / "source.mp4", source, fps=16)
    write_image(tmp_path / "first.png", source[0].flip(-1))
    base = {"model": str(model), "video": str(tmp_path / "source.mp4"), "edited_first_frame": str(tmp_path / "first.png"),
            "prompt": "a blue square", "size": "32x32", "steps": 2, "inversion_steps": 2, "inversion_order": 1,
            "shift": 5, "attention_blocks": "late"}
    lines = [base, {**base, "attention_tau": 0.2}, {**base, "shift": 3}, {**base, "inversion_order": 2}]
    out = tmp_path / "out"
    summary = run_batch(write_jobs(tmp_path / "jobs.jsonl", lines), out, inversion_cache=out / "inversions", stream=None)

    assert (summary.done, summary.failed) == (4, 0)
    records = {record["line"]: record for record in map(json.loads, map(Path.read_text, out.glob("*/result.json")))}
    # the attention tau only steers sampling; the schedule's shift and the solver order change the inversion
    assert {line: records[line]["inversion"]["origin"] for line in records} == \
        {1: "computed", 2: "memory", 3: "computed", 4: "computed"}
    assert {records[line]["frames"] for line in records} == {9}  # 11 source frames -> 4k + 1


def test_the_engine_the_cli_and_the_in_process_batch_never_import_ray():
    import subprocess
    import sys

    code = ("import sys, anyv2v_core.cli, anyv2v_core.pipeline, anyv2v_core.inversion_store, anyv2v_core.batch.runner; "
            "print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
