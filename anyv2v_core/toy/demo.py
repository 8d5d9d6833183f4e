"""The offline demo: a real AnyV2V edit on the shipped toy Wan (a Wan 2.2 TI2V-layout
transformer trained on the flow world, `wan_train.py`), on a CPU, in seconds.

A held-out clip of the flow world is generated, its shape is recoloured in the first frame (what a
user would do in an image editor), and the whole pipeline at the toy's defaults (rectified-flow
inversion of the source, injected sampling from the edited first frame, decoding) produces the
edited video. `python -m anyv2v_core demo --out demo_out` calls `run_demo`.

`WEIGHTS` / `SETTINGS` are the older toy I2VGen-XL and its settings (`benchmarks/toy_eval.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..injection import InjectionSettings
from ..pipeline import EditSettings, edit
from . import world
from .metrics import EditScores, score_edit
from .wan_train import HELD_OUT_SEED

WEIGHTS = Path(__file__).resolve().parent / "weights"
WAN_WEIGHTS = Path(__file__).resolve().parent / "wan_weights"
DEMO_SEED = HELD_OUT_SEED + 900_000  # demo clips are held out from training and from the evaluation
DISPLAY_SCALE = 8  # the 32x32 clips are written 8x larger (nearest neighbour) so they can be seen
STRIP_FRAMES = (0, 2, 4, 6, 8)  # the frames the strip image shows

# The toy I2VGen-XL's settings: the paper's except two (benchmarks/toy_eval.py measures both):
# - 100 inversion steps instead of 500: on that model more steps reconstruct no better;
# - classifier-free guidance 3 instead of 9: the tiny model's guidance direction is not
#   calibrated for 9, which wrecks the later frames (background and shapes dissolve).
SETTINGS = EditSettings(size_wh=(64, 64), inversion_steps=100, steps=50, cfg=3.0, start_index=0,
                        injection=InjectionSettings(conv_tau=0.2, spatial_tau=0.2, temporal_tau=0.5))


@dataclass
class DemoResult:
    source: np.ndarray  # [F, H, W, 3] the source clip
    edited: np.ndarray  # [F, H, W, 3] AnyV2V's output
    ideal: np.ndarray  # [F, H, W, 3] the world's rendering of the edited scene (what a perfect edit gives)
    prompt: str
    scores: EditScores
    files: list[Path]


def demo_edit(scene: world.Scene, *, backbone=None, settings: EditSettings = EditSettings()):
    """(edited scene, AnyV2V output [F, H, W, 3]) for a recolour of the scene's shape, at the toy
    Wan's defaults unless `settings` says otherwise (the toy was trained on the empty prompt)."""
    from ..loading import load_backbone

    backbone = backbone or load_backbone(WAN_WEIGHTS)
    edited_scene = world.recolour(scene, 0, world.unused_colour(scene, 0))
    result = edit(backbone, torch.from_numpy(world.render(scene)),
                  torch.from_numpy(world.edited_first_frame(edited_scene))[None], prompt="", settings=settings)
    return edited_scene, result.frames.numpy()


def run_demo(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False) -> DemoResult:
    """Edit flow-world clip `seed` and write source.mp4, edited_first_frame.png, edited.mp4 and
    strip.png (source frames above, edited frames below) into `out_dir` (created if missing)."""
    from ..video import check_output_path, write_image, write_video

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / name for name in ("source.mp4", "edited_first_frame.png", "edited.mp4", "strip.png")]
    for path in paths:  # fail before any work
        check_output_path(path, overwrite=overwrite)
    scene = world.make_flow_scene(DEMO_SEED + seed)
    edited_scene, edited = demo_edit(scene)
    source = world.render(scene)

    def big(frames: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(frames).repeat_interleave(DISPLAY_SCALE, 1).repeat_interleave(DISPLAY_SCALE, 2)

    fps = 8
    write_video(paths[0], big(source), fps, overwrite=overwrite)
    write_image(paths[1], big(world.edited_first_frame(edited_scene)[None])[0], overwrite=overwrite)
    write_video(paths[2], big(edited), fps, overwrite=overwrite)
    rows = [np.concatenate([frames[i] for i in STRIP_FRAMES], axis=1) for frames in (source, edited)]
    write_image(paths[3], big(np.concatenate(rows, axis=0)[None])[0], overwrite=overwrite)
    return DemoResult(source=source, edited=edited, ideal=world.render(edited_scene), prompt="",
                      scores=score_edit(edited, edited_scene, 0), files=paths)
