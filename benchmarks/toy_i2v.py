"""Is the shipped toy backbone a real image-to-video model in its world?

    python benchmarks/toy_i2v.py [--clips 16] [--steps 50] [--cfg 9.0]

Plain I2VGen-XL sampling (no AnyV2V): from each held-out clip's first frame and caption,
sample a video from pure noise with DDIM and classifier-free guidance, then track every object
by its colour and compare with the world's ground truth clip:
- kept: fraction of frames 1..F-1 where the object's colour is found (it did not vanish or
  change colour);
- size: its area in frames 1..F-1 over its area in frame 0;
- speed: mean centroid displacement per frame (pixels; the world's speeds are 1.5-4);
- jerk: mean |c[t+1] - 2 c[t] + c[t-1]| (pixels; 0 for constant velocity, except at bounces);
- heading: cosine between the generated displacement over the clip and the true velocity (the
  caption names the direction; 0 would mean the direction is random).
The ground-truth clips themselves are scored the same way, as the ceiling.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyv2v_core.backbones.i2vgen_xl import NEGATIVE_PROMPT  # noqa: E402
from anyv2v_core.loading import load_backbone  # noqa: E402
from anyv2v_core.schedule import NoiseSource  # noqa: E402
from anyv2v_core.toy import world  # noqa: E402
from anyv2v_core.toy.metrics import locate  # noqa: E402
from anyv2v_core.toy.train import FPS, HELD_OUT_SEED  # noqa: E402

WEIGHTS = Path(__file__).resolve().parents[1] / "anyv2v_core" / "toy" / "weights"


@torch.inference_mode()
def sample_video(backbone, first_frame: torch.Tensor, prompt: str, *, num_frames: int, steps: int, cfg: float,
                 seed: int) -> torch.Tensor:
    """Frames [F, H, W, 3] sampled from pure noise given a first frame [1, H, W, 3] and a prompt."""
    condition = dict(num_frames=num_frames, fps=FPS)
    cond = backbone.condition(first_frame, prompt, **condition)
    uncond = backbone.condition(first_frame, NEGATIVE_PROMPT, unconditional=True, **condition)
    h, w = (s // backbone.vae_scale_factor for s in first_frame.shape[1:3])
    latents = torch.randn((1, 4, num_frames, h, w), generator=torch.Generator().manual_seed(seed))

    def guided(x: torch.Tensor, time: float, level) -> torch.Tensor:
        output = backbone.predict(torch.cat([x, x]), time, [uncond, cond])
        return output[:1] + cfg * (output[1:] - output[:1])

    for step in backbone.schedule.sampling_steps(steps):  # DDIM
        latents = step.denoise(latents, guided, NoiseSource(seed))
    return backbone.decode(latents)


def track_scores(frames: np.ndarray, info: world.ObjectInfo, velocity) -> dict[str, float]:
    centroids, areas = locate(frames, info.rgb)
    seen = ~np.isnan(centroids[:, 0])
    scores = {"kept": float(seen[1:].mean()), "size": float(areas[1:].mean() / max(areas[0], 1.0))}
    steps = np.linalg.norm(np.diff(centroids, axis=0), axis=1)
    scores["speed"] = float(np.nanmean(steps)) if np.isfinite(steps).any() else float("nan")
    jerk = np.linalg.norm(centroids[2:] - 2 * centroids[1:-1] + centroids[:-2], axis=1)
    scores["jerk"] = float(np.nanmean(jerk)) if np.isfinite(jerk).any() else float("nan")
    # heading over the first frames, before any bounce can turn the object around
    span = min(3, len(centroids) - 1)
    moved = centroids[span] - centroids[0]
    norm = np.linalg.norm(moved) * np.linalg.norm(velocity)
    scores["heading"] = float(moved @ np.asarray(velocity) / norm) if np.isfinite(norm) and norm > 0 else float("nan")
    return scores


SMOKE = ["--clips", "1", "--steps", "1"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cfg", type=float, default=9.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--strip", type=Path, default=None,
                        help="write a PNG: per clip, the true frames above the generated ones (first 4 clips)")
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.weights)
    rows = {"generated": [], "ground truth": []}
    strips = []
    started = time.time()
    for k in range(args.clips):
        scene = world.make_scene(HELD_OUT_SEED + k)
        truth = world.render(scene)
        generated = sample_video(backbone, torch.from_numpy(truth[:1]), scene.caption(), num_frames=scene.num_frames,
                                 steps=args.steps, cfg=args.cfg, seed=k).numpy()
        if k < 4:
            strips += [np.concatenate(list(truth), axis=1), np.concatenate(list(generated), axis=1)]
        for info, spec in zip(world.object_info(scene), scene.objects):
            rows["generated"].append(track_scores(generated, info, spec.velocity))
            rows["ground truth"].append(track_scores(truth, info, spec.velocity))
    print(f"toy I2V quality: {args.clips} held-out clips, {len(rows['generated'])} objects, DDIM {args.steps} steps, "
          f"cfg {args.cfg} ({time.time() - started:.0f} s)\n")
    if args.strip is not None:
        from anyv2v_core.video import write_image

        write_image(args.strip, torch.from_numpy(np.concatenate(strips, axis=0)), overwrite=True)
    keys = ("kept", "size", "speed", "jerk", "heading")
    print("| video | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, scores in rows.items():
        print(f"| {name} | " + " | ".join(f"{np.nanmean([s[k] for s in scores]):.3f}" for k in keys) + " |")


if __name__ == "__main__":
    main()
