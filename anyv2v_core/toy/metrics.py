"""Scores of generated toy videos against what the toy world says they should be.

All frames are [F, H, W, 3] float arrays in 0..1; centroids are (x, y) pixels. A shape is found
in a generated frame by colour: the pixels within `COLOUR_RADIUS` (Euclidean RGB distance) of
its palette colour. The palette colours are at least 0.7 apart and the muted backgrounds at
least ~0.4 from every palette colour, so the radius separates them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import world

COLOUR_RADIUS = 0.3
MIN_AREA = 4.0  # pixels; fewer means the shape is gone from that frame
MISSING_PENALTY = 32.0  # pixels of centroid error charged for a frame where the shape is gone


def colour_mask(frames: np.ndarray, rgb) -> np.ndarray:
    """[F, H, W] bool: pixels within COLOUR_RADIUS of `rgb`."""
    return np.linalg.norm(frames - np.asarray(rgb, np.float32), axis=-1) < COLOUR_RADIUS


def locate(frames: np.ndarray, rgb) -> tuple[np.ndarray, np.ndarray]:
    """(centroids [F, 2] with NaN where the colour is absent, areas [F] in pixels) of the pixels of colour `rgb`."""
    mask = colour_mask(frames, rgb)
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]].astype(np.float32) + 0.5
    areas = mask.sum(axis=(1, 2)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (mask * xs).sum(axis=(1, 2)) / areas
        cy = (mask * ys).sum(axis=(1, 2)) / areas
    centroids = np.stack([cx, cy], axis=1)
    centroids[areas < MIN_AREA] = np.nan
    return centroids, areas


def shape_masks(scene: world.Scene, index: int, *, grow: float = 0.0) -> np.ndarray:
    """[F, H, W] bool: where object `index` covers at least half a pixel, its size grown by `grow` px."""
    spec = scene.objects[index]
    spec = replace(spec, size=spec.size + 2 * grow)
    return np.stack([world._coverage(spec, c, scene.size) >= 0.5 for c in scene.centroids(index)])


@dataclass(frozen=True)
class EditScores:
    centroid_error: float  # px, mean over frames 1..F-1 (a lost shape costs MISSING_PENALTY)
    detected: float  # fraction of frames 1..F-1 where the edited colour is found
    colour_error: float  # RGB distance (0..1 scale) of the shape's interior to the edited colour
    background_flicker: float  # mean |frame_t+1 - frame_t| over pixels no object touches (0..1 scale)
    background_error: float  # mean |output - ideal| over pixels no object touches (0..1 scale): background kept
    psnr_to_ideal: float  # dB against the ideal edit rendered by the world


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def score_edit(output: np.ndarray, edited_scene: world.Scene, index: int) -> EditScores:
    """How well `output` [F, H, W, 3] realises `edited_scene`: object `index` edited in appearance,
    every object moving as in the source (the edited scene keeps the source's motion)."""
    spec = edited_scene.objects[index]
    truth = edited_scene.centroids(index)[1:]
    found, _ = locate(output[1:], spec.rgb)
    lost = np.isnan(found[:, 0])
    errors = np.linalg.norm(found - truth, axis=1)
    errors[lost] = MISSING_PENALTY
    # appearance: the interior of the shape where it should be (motion errors also cost here)
    interior = shape_masks(edited_scene, index, grow=-2.0)[1:]
    # later objects may cover the edited one; judge only its visible interior
    for other in range(index + 1, len(edited_scene.objects)):
        interior &= ~shape_masks(edited_scene, other, grow=1.0)[1:]
    inside = output[1:][interior]
    colour_error = float(np.linalg.norm(inside.mean(axis=0) - np.asarray(spec.rgb))) if len(inside) else float("nan")
    background = np.ones(output.shape[:3], bool)
    for other in range(len(edited_scene.objects)):
        background &= ~shape_masks(edited_scene, other, grow=3.0)
    still = background[1:] & background[:-1]
    flicker = float(np.abs(output[1:] - output[:-1]).mean(axis=-1)[still].mean())
    ideal = world.render(edited_scene)
    return EditScores(
        centroid_error=float(errors.mean()), detected=float(1 - lost.mean()), colour_error=colour_error,
        background_flicker=flicker, background_error=float(np.abs(output - ideal).mean(axis=-1)[background].mean()),
        psnr_to_ideal=psnr(output, ideal),
    )
