"""Frames: validation, resize policies, file I/O that never overwrites silently."""

import pytest
import torch

from anyv2v_core.errors import AnyV2VError
from anyv2v_core.testing.tiny_models import moving_square_video
from anyv2v_core.video import (
    prepare_first_frame,
    prepare_frames,
    read_frames,
    read_image,
    resize_frames,
    write_image,
    write_video,
)


def test_stretch_crop_pad_geometry():
    frames = torch.zeros(2, 40, 80, 3)
    frames[:, :, 20:60] = 1.0  # a white band in the middle half of a 2:1 frame
    assert resize_frames(frames, (32, 32), "stretch").shape == (2, 32, 32, 3)
    cropped = resize_frames(frames, (32, 32), "crop")
    assert cropped.shape == (2, 32, 32, 3) and cropped.mean() > 0.95  # the centre square is all band
    padded = resize_frames(frames, (32, 32), "pad")
    assert padded.shape == (2, 32, 32, 3)
    assert padded[:, :8].max() == 0 and padded[:, -8:].max() == 0  # black bars above and below
    assert torch.equal(resize_frames(frames, (80, 40), "crop"), frames)  # same size: untouched


@pytest.mark.parametrize(
    "frames, message",
    [
        (torch.zeros(0, 32, 32, 3), "at least 2"),
        (torch.zeros(1, 32, 32, 3), "at least 2"),
        (torch.zeros(4, 3, 32, 32), "channels first"),
        (torch.zeros(4, 32, 32, 4), "alpha"),
        (torch.full((4, 32, 32, 3), float("nan")), "NaN"),
        (torch.full((4, 32, 32, 3), 255.0), "0..1"),
    ],
)
def test_bad_frames_are_rejected(frames, message):
    with pytest.raises(AnyV2VError, match=message):
        prepare_frames(frames, size_wh=(32, 32))


def test_sizes_must_be_multiples_of_8():
    with pytest.raises(AnyV2VError, match="multiples of 8"):
        prepare_frames(moving_square_video(), size_wh=(30, 32))


def test_frame_count_is_checked_and_trims():
    assert prepare_frames(moving_square_video(6), size_wh=(32, 32), num_frames=4).shape[0] == 4
    with pytest.raises(AnyV2VError, match="at most 6"):
        prepare_frames(moving_square_video(6), size_wh=(32, 32), num_frames=8)


def test_edited_first_frame_takes_the_source_policy():
    image = torch.rand(1, 24, 48, 3)
    assert prepare_first_frame(image, size_wh=(32, 32), resize="pad").shape == (1, 32, 32, 3)
    with pytest.raises(AnyV2VError, match="one image"):
        prepare_first_frame(torch.rand(2, 32, 32, 3), size_wh=(32, 32))


def test_video_round_trip_and_no_silent_overwrite(tmp_path):
    frames = moving_square_video(6)
    path = write_video(tmp_path / "clip.mp4", frames, fps=8)
    read_back, fps = read_frames(path)
    assert read_back.shape == frames.shape and fps == pytest.approx(8)
    assert (read_back - frames).abs().mean() < 0.05  # lossy codec, same picture
    before = path.read_bytes()
    with pytest.raises(AnyV2VError, match="already exists"):
        write_video(path, frames * 0, fps=8)
    assert path.read_bytes() == before
    write_video(path, frames * 0, fps=8, overwrite=True)
    assert path.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]  # no temp files left behind


def test_frame_folder_and_images(tmp_path):
    frames = moving_square_video(3)
    for i, frame in enumerate(frames):
        write_image(tmp_path / f"{i:05d}.png", frame)
    read_back, fps = read_frames(tmp_path)
    assert fps is None and torch.allclose(read_back, frames, atol=1 / 255)
    assert read_image(tmp_path / "00000.png").shape == (1, 32, 32, 3)


@pytest.mark.parametrize("name, content", [("broken.mp4", b"not a video"), ("broken.png", b"\x89PNG garbage")])
def test_corrupt_files_give_clear_errors(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    reader = read_frames if name.endswith(".mp4") else read_image
    with pytest.raises(AnyV2VError, match="could not read"):
        reader(tmp_path / name)


def test_output_folder_must_exist(tmp_path):
    with pytest.raises(AnyV2VError, match="does not exist"):
        write_video(tmp_path / "missing" / "clip.mp4", moving_square_video(2), fps=8)
