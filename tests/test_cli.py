"""The CLI: bad input gives one clear line and exit status 2, before any model is loaded."""

import subprocess
import sys

import pytest

from anyv2v_core.cli import main
from anyv2v_core.testing.tiny_models import moving_square_video
from anyv2v_core.video import write_image, write_video


@pytest.fixture
def inputs(tmp_path):
    frames = moving_square_video(6)
    video = write_video(tmp_path / "source.mp4", frames, fps=8)
    first = write_image(tmp_path / "first.png", frames[0])
    return {"video": video, "first": first, "dir": tmp_path}


def edit_args(inputs, model, *extra):
    return ["edit", "--model", str(model), "--video", str(inputs["video"]), "--edited-first-frame", str(inputs["first"]),
            "--prompt", "a blue square", "--out", str(inputs["dir"] / "out.mp4"), *extra]


@pytest.fixture
def model_must_not_load(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr("anyv2v_core.loading.load_backbone", fail)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "500x512"], "multiples of 8"),
        (["--steps", "0"], "steps must be"),
        (["--start-index", "50"], "start index"),
        (["--cfg", "0"], "cfg must be"),
        (["--inversion-steps", "30", "--steps", "50"], "inversion steps do not reach"),
    ],
)
def test_bad_settings_fail_before_loading(inputs, tiny_model_dir, capsys, model_must_not_load, extra, message):
    assert main(edit_args(inputs, tiny_model_dir, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_existing_output_is_never_overwritten(inputs, tiny_model_dir, capsys, model_must_not_load):
    out = inputs["dir"] / "out.mp4"
    out.write_bytes(b"precious")
    assert main(edit_args(inputs, tiny_model_dir)) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"


def test_missing_model_folder_is_one_line(inputs, tmp_path, capsys):
    assert main(edit_args(inputs, tmp_path / "no-model")) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_edit_runs_end_to_end_as_a_module(inputs, tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "anyv2v_core", *edit_args(inputs, tiny_model_dir, "--size", "32x32", "--steps", "5",
                                                          "--inversion-steps", "10")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (inputs["dir"] / "out.mp4").stat().st_size > 0
    assert "Traceback" not in result.stderr
