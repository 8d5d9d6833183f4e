"""What an edit costs in model calls, next to generating the same clip with the model's own sampler.

    python benchmarks/model_calls.py [--kinds wan2.1-i2v wan2.2-i2v-a14b wan2.2-ti2v i2vgen-xl]

For each backbone at its defaults (and Wan at inversion order 1 for comparison) it runs a whole
edit on the tiny random model of the tests (CPU, one thread), counting the denoiser's forward calls
and the rows they process (a call with the source, negative and positive rows counts 3 rows), and
reports the wall time and the process's peak resident memory. Each configuration runs in its own
process, so the peak memory is its own.

"generation" is plain image-to-video sampling of the clip at the official settings, classifier-free
guided: Wan's official samplers take 40 (Wan 2.1 I2V, 2.2 A14B) or 50 (TI2V) steps, I2VGen-XL's 50,
each one call of 2 rows when the negative and positive rows are batched (ComfyUI), or 2 calls of 1
row (diffusers). The goal for Wan: an edit costs at most twice the calls of a generation.
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
GENERATION_STEPS = {"wan2.1-i2v": 40, "wan2.2-i2v-a14b": 40, "wan2.2-ti2v": 50, "i2vgen-xl": 50}


def run_one(kind: str, order: int | None, steps: int | None) -> dict:
    """Child process: one edit at the backbone's defaults (small frames and size); prints the counts as JSON."""
    import torch

    sys.path.insert(0, str(REPO))
    from anyv2v_core.loading import load_backbone
    from anyv2v_core.pipeline import edit
    from anyv2v_core.plan import EditSettings
    from anyv2v_core.testing.tiny_models import build_tiny_i2vgenxl, build_tiny_wan, moving_square_video

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        if kind == "i2vgen-xl":
            backbone = load_backbone(build_tiny_i2vgenxl(Path(scratch) / kind), dtype="fp32")
            frames, size = 8, 32
        else:
            backbone = load_backbone(build_tiny_wan(Path(scratch) / kind, kind), dtype="fp32")
            frames, size = 9, backbone.defaults.size_multiple * 2
        calls = {"calls": 0, "rows": 0}

        def count(module, args, kwargs):
            sample = args[0] if args else kwargs["hidden_states"]
            calls["calls"] += 1
            calls["rows"] += int(sample.shape[0])

        networks = list(backbone.transformers.values()) if kind != "i2vgen-xl" else [backbone.unet]
        for network in networks:
            network.register_forward_pre_hook(count, with_kwargs=True)
        source = moving_square_video(frames, size)
        settings = EditSettings(size_wh=(size, size), inversion_order=order, steps=steps, inversion_steps=steps)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        result = edit(backbone, source, source[:1].flip(-1), prompt="a square", settings=settings)
        elapsed = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        resolved = settings.resolved(backbone.defaults)
        return {**calls, "seconds": elapsed, "peak_mib": peak / 1024, "growth_mib": (peak - baseline) / 1024,
                "inversion_steps": resolved.inversion_steps, "steps": resolved.steps,
                "order": result.inversion.order}


SMOKE = ["--kinds", "wan2.2-ti2v", "--steps", "2"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["wan2.1-i2v", "wan2.2-i2v-a14b", "wan2.2-ti2v", "i2vgen-xl"])
    parser.add_argument("--steps", type=int, default=None,
                        help="inversion and sampling steps of every edit and generation (default: the models' own)")
    parser.add_argument("--one", nargs=3, metavar=("KIND", "ORDER", "STEPS"), help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    if args.one:
        kind, order, steps = args.one
        print(json.dumps(run_one(kind, None if order == "default" else int(order),
                                 None if steps == "default" else int(steps))))
        return
    print("| backbone | inversion | sampling | edit calls (rows) | generation calls (rows) | edit / generation calls "
          "| edit s | peak RSS growth MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        steps = str(args.steps) if args.steps else "default"
        configs = [("default", steps)]
        if kind != "i2vgen-xl":
            configs += [("1", steps), ("1", str(args.steps or GENERATION_STEPS[kind]))]
        for order, steps in configs:
            output = subprocess.run([sys.executable, __file__, "--one", kind, order, steps], capture_output=True,
                                    text=True, check=True, cwd=REPO).stdout
            result = json.loads(output.strip().splitlines()[-1])
            generation = GENERATION_STEPS[kind]
            print(f"| {kind} | {result['inversion_steps']} steps, order {result['order']} | {result['steps']} steps "
                  f"| {result['calls']} ({result['rows']}) | {generation} ({2 * generation}) "
                  f"| {result['calls'] / generation:.2f} | {result['seconds']:.1f} | {result['growth_mib']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
