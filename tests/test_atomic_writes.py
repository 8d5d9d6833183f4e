"""Files the pack writes: only the user's outputs (videos, images, --save-latents) and `convert`'s
safetensors. Each is written to a temp file beside the target and renamed into place, so a failure
or a cancel mid-write leaves an existing file intact and no temp file behind. Nothing else (no
inversion or feature cache) is written anywhere: see test_an_edit_writes_no_file.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from anyv2v_core.errors import AnyV2VError
from anyv2v_core.testing.tiny_models import moving_square_video
from anyv2v_core.video import _write_atomically, write_image, write_video

FRAMES = moving_square_video(4, 32)
ORIGINAL = b"the user's existing file"


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def half_written(tmp_name: str, error: BaseException):
    """A writer that gets half-way through the temp file, then fails."""
    Path(tmp_name).write_bytes(b"half a file")
    raise error


@pytest.mark.parametrize("error, raised", [
    (OSError(28, "No space left on device"), AnyV2VError),  # disk full: a user-facing error
    (RuntimeError("encoder crashed"), RuntimeError),  # anything else passes through unchanged
    (KeyboardInterrupt(), KeyboardInterrupt),  # a cancel mid-write
])
def test_a_failed_write_keeps_the_existing_file_and_leaves_no_temp_file(tmp_path, error, raised):
    target = tmp_path / "out.mp4"
    target.write_bytes(ORIGINAL)
    with pytest.raises(raised, match="No space left on device" if raised is AnyV2VError else None):
        _write_atomically(target, lambda tmp_name: half_written(tmp_name, error))
    assert target.read_bytes() == ORIGINAL
    assert files_in(tmp_path) == ["out.mp4"]


def test_a_failed_write_of_a_new_file_leaves_nothing(tmp_path):
    with pytest.raises(AnyV2VError, match="could not write"):
        _write_atomically(tmp_path / "new.png", lambda tmp_name: half_written(tmp_name, OSError(5, "I/O error")))
    assert files_in(tmp_path) == []


class FailingWriter:
    """An imageio writer that fails on its third frame, after writing the first ones."""

    def __init__(self, path, **kwargs):
        self.path, self.frames = path, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def append_data(self, frame):
        self.frames += 1
        with open(self.path, "ab") as handle:
            handle.write(frame.tobytes())
        if self.frames == 3:
            raise OSError(32, "Broken pipe")  # what a dying ffmpeg looks like


def test_video_overwrite_that_fails_mid_stream(tmp_path, monkeypatch):
    import imageio.v2 as imageio

    target = tmp_path / "edit.mp4"
    target.write_bytes(ORIGINAL)
    monkeypatch.setattr(imageio, "get_writer", lambda path, **kwargs: FailingWriter(path, **kwargs))
    with pytest.raises(AnyV2VError, match="could not write .*edit.mp4.*Broken pipe"):
        write_video(target, FRAMES, 8, overwrite=True)
    assert target.read_bytes() == ORIGINAL and files_in(tmp_path) == ["edit.mp4"]


def test_image_overwrite_that_fails(tmp_path, monkeypatch):
    from PIL import Image

    target = tmp_path / "first.png"
    target.write_bytes(ORIGINAL)
    monkeypatch.setattr(Image.Image, "save", lambda self, name, **kwargs: half_written(name, OSError(5, "I/O error")))
    with pytest.raises(AnyV2VError, match="I/O error"):
        write_image(target, FRAMES[0], overwrite=True)
    assert target.read_bytes() == ORIGINAL and files_in(tmp_path) == ["first.png"]


def test_a_successful_overwrite_replaces_the_file_in_one_rename(tmp_path):
    target = tmp_path / "edit.mp4"
    target.write_bytes(ORIGINAL)
    inode = os.stat(target).st_ino
    write_video(target, FRAMES, 8, overwrite=True)
    assert target.read_bytes()[4:8] == b"ftyp" and files_in(tmp_path) == ["edit.mp4"]
    assert os.stat(target).st_ino != inode  # a new file renamed over the old one, not rewritten in place


def test_convert_that_fails_mid_write_keeps_the_destination(tmp_path, monkeypatch):
    import safetensors.torch

    from anyv2v_core.backbones.checkpoints import convert_checkpoint_to_safetensors

    torch.save({"ema": {"w": torch.ones(3)}}, tmp_path / "seine.pt")
    target = tmp_path / "seine.safetensors"
    target.write_bytes(ORIGINAL)
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda tensors, name, metadata=None: half_written(name, RuntimeError("disk gone")))
    with pytest.raises(RuntimeError, match="disk gone"):
        convert_checkpoint_to_safetensors(tmp_path / "seine.pt", target, entry="ema", overwrite=True)
    assert target.read_bytes() == ORIGINAL and files_in(tmp_path) == ["seine.pt", "seine.safetensors"]


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: size, modification time and content."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_edit_writes_no_file(tiny_model_dir, tmp_path, monkeypatch):
    """Loading a model and a whole edit write nothing: not in the model folder (it is shared and
    must never change), not in the working folder, the home folder, the caches or the temp folder.
    Inversions live in memory; ComfyUI's output cache gives "invert once, edit many"."""
    import tempfile

    from anyv2v_core.loading import load_backbone
    from anyv2v_core.pipeline import edit
    from anyv2v_core.plan import EditSettings

    places = {name: tmp_path / name for name in ("cwd", "home", "cache", "hf", "tmp")}
    for place in places.values():
        place.mkdir()
    monkeypatch.chdir(places["cwd"])
    monkeypatch.setenv("HOME", str(places["home"]))
    monkeypatch.setenv("XDG_CACHE_HOME", str(places["cache"]))
    monkeypatch.setenv("HF_HOME", str(places["hf"]))
    monkeypatch.setattr(tempfile, "tempdir", str(places["tmp"]))
    model_before = snapshot(tiny_model_dir)
    torch.set_num_threads(1)  # the machine is shared: more threads only contend

    backbone = load_backbone(tiny_model_dir)
    result = edit(backbone, FRAMES, FRAMES[:1].flip(-1), prompt="a square",
                  settings=EditSettings(size_wh=(32, 32), inversion_steps=2, steps=2))
    assert result.frames.shape == FRAMES.shape
    assert snapshot(tiny_model_dir) == model_before
    assert {name: sorted(str(p) for p in place.rglob("*")) for name, place in places.items()} == \
        {name: [] for name in places}
