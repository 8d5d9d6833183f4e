"""How far fp16 and bf16 weights drift from float32 over a whole AnyV2V edit, on the CPU.

    python benchmarks/precision.py [--backbones toy i2vgen-xl consisti2v seine] [--inversion-steps N]

For each backbone, one edit (DDIM inversion of the source, injected sampling from the edited
first frame, decoding) runs with the weights in float32, fp16 and bf16, with each backbone's
reference settings (cfg 9 for I2VGen-XL, 35 for ConsistI2V, SEINE's DDPM sampler with cfg 4; the
toy's demo settings, cfg 3). Reported against the float32 run: the relative L2 error of the
inverted latent that sampling starts from, of the final latents, and the PSNR of the decoded
frames (float32 frames as the reference, in dB; higher is closer).

Backbones: the shipped toy I2VGen-XL (trained weights; its demo clip) and the tiny random-weight
parity oracles of ../shared/oracle (their own source clip and edited frame). Random weights are
not a trained model: read the table as how each precision's rounding accumulates through the
same loops, not as image quality. Half precision on the CPU rounds every operation's output to
the weight dtype as a GPU does, while accumulating inside matrix products in float32 as tensor
cores do; the kernels differ, so the absolute numbers may differ on a GPU, the ordering should not.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from overhead import markdown  # noqa: E402  (benchmarks/ is this script's folder)

from anyv2v_core.pipeline import edit  # noqa: E402
from anyv2v_core.plan import EditSettings  # noqa: E402
from anyv2v_core.video import read_frames  # noqa: E402

ORACLES = Path(os.environ.get("ANYV2V_ORACLE_DIR", Path(__file__).resolve().parents[2] / "shared" / "oracle"))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EDIT_PROMPT = "a blue square moving over a gradient"


def read_png(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def case(name: str, dtype: torch.dtype):
    """(backbone, source frames, edited first frame, prompt, settings) of one backbone."""
    if name == "toy":
        from anyv2v_core.loading import load_backbone
        from anyv2v_core.toy import world
        from anyv2v_core.toy.demo import DEMO_SEED, SETTINGS, WEIGHTS

        scene = world.make_scene(DEMO_SEED, max_objects=2)
        index = len(scene.objects) - 1
        edited = world.recolour(scene, index, world.unused_colour(scene, index))
        return (load_backbone(WEIGHTS, dtype=dtype), torch.from_numpy(world.render(scene)),
                torch.from_numpy(world.edited_first_frame(edited))[None], edited.caption(), SETTINGS)
    if name == "i2vgen-xl":
        from anyv2v_core.loading import load_backbone

        folder = ORACLES / "anyv2v-i2vgenxl"
        backbone = load_backbone(folder / "model", dtype=dtype)
        source = read_frames(folder / "source_frames")[0]
        edited = read_png(folder / "edited_first_frame.png")[None]
    elif name == "consisti2v":
        from anyv2v_core.backbones.consisti2v import ConsistI2VBackbone

        folder = ORACLES / "anyv2v-consisti2v"
        backbone = ConsistI2VBackbone.from_folder(folder / "model", dtype=dtype)
        source = read_frames(folder / "source_frames")[0]
        edited = read_png(folder / "edited_first_frame.png")[None]
    else:
        from anyv2v_core.backbones.seine import load_seine

        folder = ORACLES / "anyv2v-seine"
        model = folder / "model"
        backbone = load_seine(model / "stable-diffusion-v1-4", model / "seine_ema.safetensors", dtype=dtype)
        source = read_frames(folder / "pipeline" / "source_frames")[0]
        edited = read_png(folder / "pipeline" / "edited_first_frame.png")[None]
    size_wh = (int(source.shape[2]), int(source.shape[1]))
    return backbone, source, edited, EDIT_PROMPT, EditSettings(size_wh=size_wh, num_frames=int(source.shape[0]))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).norm() / expected.norm())


def psnr(actual: torch.Tensor, expected: torch.Tensor) -> float:
    mse = float(((actual - expected) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


SMOKE = ["--backbones", "toy", "--inversion-steps", "1", "--steps", "1"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["toy", "i2vgen-xl", "consisti2v", "seine"])
    parser.add_argument("--inversion-steps", type=int, default=None,
                        help="default: each backbone's (500; the toy demo's 100)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: each backbone's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    torch.set_num_threads(args.threads)

    header = ["backbone", "inversion steps", "dtype", "inverted start rel. error", "final latents rel. error",
              "frames PSNR dB", "s"]
    print(markdown(header, []), flush=True)
    for name in args.backbones:
        results = {}
        for label, dtype in DTYPES.items():
            backbone, source, edited, prompt, settings = case(name, dtype)
            if args.inversion_steps:
                settings = dataclasses.replace(settings, inversion_steps=args.inversion_steps)
            if args.steps:
                settings = dataclasses.replace(settings, steps=args.steps)
            started = time.perf_counter()
            result = edit(backbone, source, edited, prompt=prompt, settings=settings)
            results[label] = result
            reference = results["fp32"]
            steps = result.inversion.inversion_steps
            row = [name, steps, label, relative_error(result.inverted_start, reference.inverted_start),
                   relative_error(result.latents, reference.latents), psnr(result.frames, reference.frames),
                   time.perf_counter() - started]
            print(markdown(header, [row]).splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
