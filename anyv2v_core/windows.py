"""Temporal context windows: videos longer than the backbone's training length.

An I2V backbone is trained on a fixed number of frames (16 for I2VGen-XL) and its temporal
attention costs memory quadratic in the frame count. With windows, every UNet evaluation of the
inversion and of the sampling loop runs on overlapping windows of `length` frames; the model
outputs are blended where windows overlap (linear cross-fades, so no seam), and injection
applies per window because every window is one UNet call on the full [source, uncond, cond]
batch. Peak activation memory then depends on `length`, not on the video's length.

Conditioning with a frame axis (I2VGen-XL's image latents, SEINE's mask and masked latents) is
sliced with the window: the first-frame conditioning sits in the first window only, later
windows take the edit through the overlaps, the injected source features and the inverted latents.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .backbones.base import Backbone, RowCondition
from .errors import AnyV2VError

logger = logging.getLogger("AnyV2V")


@dataclass(frozen=True)
class ContextWindows:
    """Windows of `length` frames, neighbours sharing `overlap` frames."""

    length: int = 16
    overlap: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.length, int) or self.length < 2:
            raise AnyV2VError(f"window length must be an integer >= 2 (got {self.length!r}); 16 suits I2VGen-XL")
        if not isinstance(self.overlap, int) or not 0 <= self.overlap < self.length:
            raise AnyV2VError(f"window overlap must be in 0..{self.length - 1} (got {self.overlap!r}); try {self.length // 4}")

    def spans(self, num_frames: int) -> list[tuple[int, int]]:
        """[start, end) of each window: the fewest windows that share at least `overlap` frames
        with their neighbours, spread evenly from the first frame to the last."""
        if num_frames <= self.length:
            return [(0, num_frames)]
        count = math.ceil((num_frames - self.overlap) / (self.length - self.overlap))
        starts = [round(i * (num_frames - self.length) / (count - 1)) for i in range(count)]
        return [(start, start + self.length) for start in starts]

    def blend_weights(self, num_frames: int) -> list[torch.Tensor]:
        """Per-window frame weights [length]: 1 + the distance to the window's nearer edge.

        Normalised by their sum over windows, they cross-fade linearly wherever windows share
        frames (j / (shared + 1) for two windows), so neighbouring windows never meet in a step.
        """
        weights = []
        for start, end in self.spans(num_frames):
            position = torch.arange(end - start, dtype=torch.float32)
            weights.append(torch.minimum(position + 1, (end - start) - position))
        return weights


# Frames per UNet call, as multiples of the backbone's training length: above WARN_FACTOR the
# temporal layers see clips much longer than any they were trained on (quality drops); above
# MAX_FACTOR the call is refused, since no accelerator holds it and the result would be unusable.
WARN_FACTOR, MAX_FACTOR = 2, 8


def check_frame_count(backbone: Backbone, num_frames: int, windows: ContextWindows | None) -> None:
    """Refuse (or warn about) more frames per UNet call than the backbone can handle, naming the windows option."""
    native = backbone.defaults.num_frames
    per_call = num_frames if windows is None else min(num_frames, windows.length)
    if per_call <= WARN_FACTOR * native:
        return
    if windows is None:
        fix = (f"edit the clip in temporal windows of {native} frames (node window_length {native}, CLI --window {native}, "
               f"windows=ContextWindows({native}, 4)) or edit fewer frames")
        what = f"{num_frames} frames at once"
    else:
        fix = f"use windows of {native} frames, the length {backbone.name} was trained on"
        what = f"windows of {windows.length} frames"
    message = f"{what} exceed {{}}x the {native} frames {backbone.name} was trained on; {fix}"
    if per_call > MAX_FACTOR * native:
        raise AnyV2VError(message.format(MAX_FACTOR))
    logger.warning(message.format(WARN_FACTOR) + " (quality drops and memory grows with the frame count)")


def window_row(row: RowCondition, start: int, end: int) -> RowCondition:
    """The row's conditioning for frames [start, end): fields named in `frame_fields` are sliced."""
    sliced = {name: getattr(row, name)[:, :, start:end] for name in row.frame_fields}
    return dataclasses.replace(row, **sliced)


def predict_in_windows(backbone: Backbone, latents: torch.Tensor, timestep: int, rows: Sequence[RowCondition],
            windows: ContextWindows | None) -> torch.Tensor:
    """`backbone.predict`, over temporal windows when `windows` is set. Latents [B, C, F, h, w]."""
    num_frames = latents.shape[2]
    if windows is None or num_frames <= windows.length:
        return backbone.predict(latents, timestep, rows)
    blended = torch.zeros_like(latents)
    total = torch.zeros(num_frames, device=latents.device)
    for (start, end), weight in zip(windows.spans(num_frames), windows.blend_weights(num_frames)):
        output = backbone.predict(latents[:, :, start:end], timestep, [window_row(row, start, end) for row in rows])
        weight = weight.to(latents.device)
        blended[:, :, start:end] += output.to(latents.device) * weight[None, None, :, None, None]
        total[start:end] += weight
    return blended / total[None, None, :, None, None]
