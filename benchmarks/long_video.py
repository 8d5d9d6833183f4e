"""Peak memory and time of long-video edits: all frames at once vs temporal context windows (CPU).

Each configuration runs in its own process, so the peak resident memory (ru_maxrss) belongs to it
alone. The model is the tiny random I2VGen-XL of `anyv2v_core.testing.tiny_models` at 64x64 pixels, where
activations dominate its weights, so memory growth with the frame count is visible.

    python benchmarks/long_video.py                  # 16/32/64/128 frames, windows of 16 (overlap 4)
    python benchmarks/long_video.py --frames 16 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_one(model: str, num_frames: int, window: int | None, overlap: int, steps: int, threads: int) -> dict:
    """Child process: one edit; prints its peak RSS and phase times as JSON."""
    import torch

    sys.path.insert(0, str(REPO))
    from anyv2v_core.injection import InjectionSettings
    from anyv2v_core.inversion import invert_video
    from anyv2v_core.loading import load_backbone
    from anyv2v_core.sampling import sample_edit
    from anyv2v_core.testing.tiny_models import moving_square_video
    from anyv2v_core.windows import ContextWindows

    torch.set_num_threads(threads)
    backbone = load_backbone(model)
    frames = moving_square_video(num_frames, size=64)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    windows = None if window is None else ContextWindows(window, overlap)
    started = time.perf_counter()
    inversion = invert_video(backbone, frames, inversion_steps=steps, sampling_steps=steps, windows=windows)
    inverted = time.perf_counter()
    latents = sample_edit(backbone, inversion, frames[:1].flip(-1), prompt="a square", negative_prompt="",
                          injection=InjectionSettings(1.0, 1.0, 1.0), cfg=4.0)
    sampled = time.perf_counter()
    backbone.decode(latents)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"inversion_s": inverted - started, "sampling_s": sampled - inverted,
            "peak_mib": peak / 1024, "growth_mib": (peak - baseline) / 1024}


SMOKE = ["--frames", "4", "--window", "3", "--overlap", "1", "--steps", "1"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--overlap", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="inversion and sampling steps (memory needs few)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    if args.child:
        print(json.dumps(run_one(**json.loads(args.child))))
        return

    sys.path.insert(0, str(REPO))
    from anyv2v_core.testing.tiny_models import build_tiny_i2vgenxl

    with tempfile.TemporaryDirectory() as scratch:
        model = str(build_tiny_i2vgenxl(Path(scratch) / "tiny"))
        print(f"| frames | mode | peak RSS (MiB) | growth during the edit (MiB) | inversion (s) | sampling (s) |")
        print("|---|---|---|---|---|---|")
        for num_frames in args.frames:
            for window in (None, args.window):
                child = {"model": model, "num_frames": num_frames, "window": window, "overlap": args.overlap,
                         "steps": args.steps, "threads": args.threads}
                result = subprocess.run([sys.executable, __file__, "--child", json.dumps(child)],
                                        capture_output=True, text=True)
                if result.returncode:
                    sys.exit(f"{num_frames} frames, window {window} failed:\n{result.stderr[-3000:]}")
                row = json.loads(result.stdout.strip().splitlines()[-1])
                mode = "all frames" if window is None else f"windows {window}/{args.overlap}"
                print(f"| {num_frames} | {mode} | {row['peak_mib']:.0f} | {row['growth_mib']:.0f} | "
                      f"{row['inversion_s']:.1f} | {row['sampling_s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
