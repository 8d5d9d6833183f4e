"""Inversion round trip on rectified-flow (Wan) backbones: invert the source, sample it back with
the source's own conditioning and no guidance, and compare with the source's clean latents.

    python benchmarks/flow_round_trip.py [--model FOLDER] [--steps 2 4 8 16 32] [--frames 9] [--size 32]

Without --model it builds the tiny random Wan 2.1 I2V model of the tests. Prints, per solver order
and step count, the model calls of the inversion and of the sampler, and the relative error
||x0' - x0|| / ||x0|| of the reconstructed latents: the table the default order was chosen from
(docs/wan.md). A perfect solver gives 0; the error is all discretisation error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyv2v_core.injection import InjectionSettings  # noqa: E402
from anyv2v_core.inversion import invert_video  # noqa: E402
from anyv2v_core.loading import load_backbone  # noqa: E402
from anyv2v_core.sampling import sample_edit  # noqa: E402
from anyv2v_core.testing.tiny_models import build_tiny_wan, moving_square_video  # noqa: E402

NO_INJECTION = InjectionSettings(conv_tau=0, spatial_tau=0, temporal_tau=0, attention_tau=0)


def round_trip_error(backbone, frames: torch.Tensor, steps: int, order: int) -> float:
    """Relative error of the clean latents after inverting `frames` and sampling them back."""
    inversion = invert_video(backbone, frames, inversion_steps=steps, sampling_steps=steps, order=order)
    latents = sample_edit(backbone, inversion, frames[:1], prompt="", negative_prompt="", cfg=1.0,
                          injection=NO_INJECTION)
    clean = backbone.video_latents(backbone.encode_video(frames)[:, :, backbone.conditioning_frames:],
                                   inversion.source_condition)
    return float((latents - clean).norm() / clean.norm())


SMOKE = ["--steps", "1", "2", "--frames", "5"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a Wan diffusers folder (default: the tiny test model)")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.model or build_tiny_wan(Path(scratch) / "tiny-wan", "wan2.1-i2v")
        backbone = load_backbone(folder, dtype="fp32", device=args.device)
        frames = moving_square_video(args.frames, args.size)
        print(f"{backbone.name}, {args.frames} frames at {args.size}x{args.size}, shift {backbone.schedule.shift}")
        print("| order | steps | model calls per direction | relative round-trip error |")
        print("|---|---|---|---|")
        for order in (1, 2):
            for steps in args.steps:
                error = round_trip_error(backbone, frames, steps, order)
                print(f"| {order} | {steps} | {order * steps} | {error:.2e} |", flush=True)


if __name__ == "__main__":
    main()
