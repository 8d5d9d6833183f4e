"""Temporal context windows: one window equals all-frames sampling, blends without seams."""

import pytest
import torch

from anyv2v_core.errors import AnyV2VError
from anyv2v_core.injection import InjectionSettings
from anyv2v_core.inversion import invert_video
from anyv2v_core.sampling import sample_edit
from anyv2v_core.testing.tiny_models import moving_square_video
from anyv2v_core.windows import ContextWindows, predict_in_windows, window_row


class Identity:
    """A stand-in backbone whose prediction is its input."""

    def predict(self, latents, timestep, rows):
        return latents


def test_spans_cover_every_frame_and_the_blend_is_a_partition_of_unity():
    windows = ContextWindows(length=16, overlap=4)
    assert windows.spans(16) == [(0, 16)]
    assert windows.spans(40) == [(0, 16), (12, 28), (24, 40)]
    assert windows.spans(30) == [(0, 16), (7, 23), (14, 30)]
    for num_frames in range(17, 70):
        spans = windows.spans(num_frames)
        assert spans[0][0] == 0 and spans[-1][1] == num_frames and all(e - s == 16 for s, e in spans)
        assert all(a[1] - b[0] >= 4 for a, b in zip(spans, spans[1:]))  # neighbours share >= overlap frames
        latents = torch.randn(1, 2, num_frames, 2, 2)
        torch.testing.assert_close(predict_in_windows(Identity(), latents, 1, [], windows), latents)


@pytest.mark.parametrize("length, overlap", [(1, 0), (8, 8), (8, -1)])
def test_bad_windows_are_rejected(length, overlap):
    with pytest.raises(AnyV2VError, match="window"):
        ContextWindows(length, overlap)


def test_one_window_covering_all_frames_equals_unwindowed_sampling(tiny_backbone):
    source = moving_square_video(6)
    edited = source[:1].flip(-1)
    args = dict(inversion_steps=10, sampling_steps=5, fps=8)
    plain = invert_video(tiny_backbone, source, **args)
    windowed = invert_video(tiny_backbone, source, windows=ContextWindows(length=6, overlap=2), **args)
    assert all(torch.equal(plain.latents[t], windowed.latents[t]) for t in plain.latents)
    edit = dict(prompt="a square", negative_prompt="", injection=InjectionSettings(0.4, 0.4, 0.6), cfg=4.0)
    torch.testing.assert_close(sample_edit(tiny_backbone, windowed, edited, **edit),
                               sample_edit(tiny_backbone, plain, edited, **edit), atol=0, rtol=0)


class DisagreeingWindows:
    """A stand-in backbone whose prediction on a smooth video is the input plus an offset that
    differs per window: the worst case for seams, where neighbouring windows disagree."""

    def predict(self, latents, timestep, rows):
        return latents + 0.5 * float(latents[0, 0, 0, 0, 0] * 100)  # offset depends on the window's first frame


def test_overlapping_windows_blend_without_seams():
    """On a smooth video, the cross-fade spreads the windows' disagreement over the shared frames:
    no frame-to-frame jump exceeds half the disagreement of neighbouring windows (plus the video's
    own step), where a hard cut would jump by the whole disagreement."""
    num_frames, windows = 20, ContextWindows(length=8, overlap=3)
    video_step = 0.01
    latents = (torch.arange(num_frames) * video_step)[None, None, :, None, None].expand(1, 4, num_frames, 2, 2)
    output = predict_in_windows(DisagreeingWindows(), latents, 1, [], windows)
    jumps = (output[0, 0, 1:, 0, 0] - output[0, 0, :-1, 0, 0]).abs()
    spans = windows.spans(num_frames)
    disagreement = max(0.5 * 100 * video_step * (b[0] - a[0]) for a, b in zip(spans, spans[1:]))
    assert disagreement > 0.1  # the stand-in really disagrees across windows
    assert float(jumps.max()) <= disagreement / 2 + video_step + 1e-6


def test_window_row_slices_only_frame_fields(tiny_backbone):
    row = tiny_backbone.condition(moving_square_video(2)[:1], "a", num_frames=10, fps=8)
    part = window_row(row, 4, 8)
    assert part.image_latents.shape[2] == 4 and torch.equal(part.image_latents, row.image_latents[:, :, 4:8])
    assert part.text_embeddings is row.text_embeddings
