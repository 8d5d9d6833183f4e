"""Motion fidelity of a long edit on the toy backbone: all frames at once vs temporal windows.

    python benchmarks/toy_long_video.py [--frames 64] [--clips 4] [--window 8] [--overlap 2]

The toy I2VGen-XL was trained on 8-frame clips; here held-out toy clips of `--frames` frames are
edited (the top-most shape recoloured in the first frame, as in the demo) twice: the reference's
way (the UNet sees all frames at once) and with temporal context windows of the training length.
Scores as in `benchmarks/toy_eval.py` (`anyv2v_core/toy/metrics.py`), averaged over the clips.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyv2v_core.loading import load_backbone  # noqa: E402
from anyv2v_core.pipeline import edit  # noqa: E402
from anyv2v_core.toy import world  # noqa: E402
from anyv2v_core.toy.demo import SETTINGS, WEIGHTS  # noqa: E402
from anyv2v_core.toy.metrics import score_edit  # noqa: E402
from anyv2v_core.toy.train import HELD_OUT_SEED  # noqa: E402
from anyv2v_core.windows import ContextWindows  # noqa: E402

LONG_CLIP_SEEDS = HELD_OUT_SEED + 700_000  # held out from training, the evaluation and the demo


SMOKE = ["--frames", "6", "--clips", "1", "--window", "4", "--overlap", "2", "--inversion-steps", "1",
         "--steps", "1"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--window", type=int, default=8, help="window length (the toy's training length)")
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--inversion-steps", type=int, default=SETTINGS.inversion_steps)
    parser.add_argument("--steps", type=int, default=SETTINGS.steps, help="sampling steps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(WEIGHTS)
    settings = replace(SETTINGS, inversion_steps=args.inversion_steps, steps=args.steps)
    approaches = {"all frames at once": None, f"windows {args.window}/{args.overlap}": ContextWindows(args.window, args.overlap)}
    scores = {name: [] for name in approaches}
    seconds = {name: 0.0 for name in approaches}
    for clip in range(args.clips):
        scene = world.make_scene(LONG_CLIP_SEEDS + clip, num_frames=args.frames, max_objects=2)
        index = len(scene.objects) - 1
        edited_scene = world.recolour(scene, index, world.unused_colour(scene, index))
        for name, windows in approaches.items():
            started = time.perf_counter()
            result = edit(backbone, torch.from_numpy(world.render(scene)),
                          torch.from_numpy(world.edited_first_frame(edited_scene))[None],
                          prompt=edited_scene.caption(), settings=replace(settings, windows=windows))
            seconds[name] += time.perf_counter() - started
            scores[name].append(score_edit(result.frames.numpy(), edited_scene, index))

    print(f"\n{args.clips} held-out toy clips of {args.frames} frames, {settings.inversion_steps} inversion / "
          f"{settings.steps} sampling steps, taus {settings.injection.conv_tau}/{settings.injection.spatial_tau}/"
          f"{settings.injection.temporal_tau}\n")
    print("| approach | centroid error (px) | shape found | colour error | background flicker | PSNR to ideal (dB) | s per clip |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in scores.items():
        mean = {field: float(np.mean([getattr(r, field) for r in rows])) for field in
                ("centroid_error", "detected", "colour_error", "background_flicker", "psnr_to_ideal")}
        print(f"| {name} | {mean['centroid_error']:.2f} | {mean['detected']:.0%} | {mean['colour_error']:.3f} | "
              f"{mean['background_flicker']:.4f} | {mean['psnr_to_ideal']:.1f} | {seconds[name] / args.clips:.1f} |")


if __name__ == "__main__":
    main()
