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
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from .errors import AnyV2VError

Row = TypeVar("Row")  # a backbone's RowCondition (`backbones/base.py`, which builds on this module)


class Predicts(Protocol):
    """The part of a backbone (`Backbone.predict`) that windows call."""

    def predict(self, latents: torch.Tensor, timestep: Any, rows: Sequence[Any]) -> torch.Tensor: ...


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


def window_row(row: Row, start: int, end: int) -> Row:
    """The row's conditioning for frames [start, end): fields named in `frame_fields` are sliced."""
    sliced = {name: getattr(row, name)[:, :, start:end] for name in row.frame_fields}
    return dataclasses.replace(row, **sliced)


def predict_in_windows(backbone: Predicts, latents: torch.Tensor, timestep: Any, rows: Sequence[Any],
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
