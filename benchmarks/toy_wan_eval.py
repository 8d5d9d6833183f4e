"""AnyV2V's claims measured on the flow path: the toy Wan (`anyv2v_core/toy/wan_weights`) on held-out clips.

    python benchmarks/toy_wan_eval.py [--clips 32] [--rows defaults "no injection" ...]
    python benchmarks/toy_wan_eval.py --smoke     # one clip, two rows, few steps: the instrument runs

Each held-out clip of the flow world (`world.make_flow_scene`, seeds from `HELD_OUT_SEED`, never
seen in training: one shape, one of 16 velocities) gets one edit: the shape recoloured in the first
frame, empty prompt (the toy was trained on it). Every row of the table is a way of running
AnyV2V, scored per clip and averaged (+- the standard error over clips):
- motion: the edited shape's per-frame centroid (found by its new colour) against the source
  shape's trajectory, px, frames 1..F-1 (a frame where it is lost costs 32 px);
- appearance: RGB distance of the shape's interior to the edited colour, /255; background kept:
  mean |output - source| away from the shape, /255;
- reconstruction: the same row run with the source's own first frame must give back the source
  (PSNR, dB; the VAE round trip is the ceiling, printed above the table);
- cost: the transformer's forward calls of one edit (inversion + sampling; a call counts once
  whatever rows it batches) and their rows, and the calls relative to generating the clip with
  `GENERATION_STEPS` Euler steps (the toy's stand-in for an official sampler).
Rows: the defaults; no injection (tau 0); a random-noise start instead of the inversion; order 1 at
the defaults' calls; attention tau 0.25 / 0.75 / 1; early and late blocks only; fewer steps; and
the source row run at every step instead of only inside the injection window (same output, more
rows).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyv2v_core.backbones.wan import attention_block_indices, injection_layers_for  # noqa: E402
from anyv2v_core.injection import InjectionSettings  # noqa: E402
from anyv2v_core.inversion import invert_video  # noqa: E402
from anyv2v_core.loading import load_backbone  # noqa: E402
from anyv2v_core.sampling import sample_edit  # noqa: E402
from anyv2v_core.toy import world  # noqa: E402
from anyv2v_core.toy.metrics import psnr, score_edit  # noqa: E402
from anyv2v_core.toy.wan_train import HELD_OUT_SEED, WAN_WEIGHTS  # noqa: E402

GENERATION_STEPS = 20  # plain image-to-video sampling of a toy clip: 20 Euler steps, one call each


@dataclass(frozen=True)
class Variant:
    """One way of running the edit; None fields take the model's defaults."""

    steps: int | None = None  # sampling steps = inversion steps
    order: int | None = None
    attention_tau: float = 0.5
    blocks: str = "all"
    random_start: bool = False
    keep_source_row: bool = False


def variants(steps: int, order: int) -> dict[str, Variant]:
    """The table's rows, the defaults and the no-injection row first."""
    rows = {"defaults": Variant(), "no injection": Variant(attention_tau=0.0),
            "random-noise start": Variant(random_start=True)}
    if order == 2:
        rows[f"order 1, {2 * steps} steps (equal calls)"] = Variant(steps=2 * steps, order=1)
    rows.update({f"attention tau {tau:g}": Variant(attention_tau=tau) for tau in (0.25, 0.75, 1.0)})
    rows.update({"early blocks": Variant(blocks="early"), "late blocks": Variant(blocks="late")})
    for fewer in sorted({max(1, steps // 2), max(1, (3 * steps) // 4)} - {steps}):
        rows[f"{fewer} steps"] = Variant(steps=fewer)
    rows["order 1, defaults' steps"] = Variant(order=1)
    rows["source row at every step"] = Variant(keep_source_row=True)
    return rows


class CallCounter:
    """Forward calls of the backbone's transformers and the rows they processed."""

    def __init__(self, backbone) -> None:
        self.calls = self.rows = 0
        for network in backbone.transformers.values():
            network.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs) -> None:
        self.calls += 1
        self.rows += int(kwargs["hidden_states"].shape[0])

    def take(self) -> tuple[int, int]:
        counted = (self.calls, self.rows)
        self.calls = self.rows = 0
        return counted


def edit_clip(backbone, counter: CallCounter, variant: Variant, source: np.ndarray, first_frame: np.ndarray,
              seed: int) -> tuple[np.ndarray, int, int]:
    """(output [F, H, W, 3], calls, rows) of one edit of `source` from `first_frame` [H, W, 3]."""
    defaults = backbone.defaults
    steps = variant.steps or defaults.sampling_steps
    counter.take()
    inversion = invert_video(backbone, torch.from_numpy(source), inversion_steps=steps, sampling_steps=steps,
                             fps=defaults.fps, order=variant.order)
    layers = injection_layers_for(list(backbone.transformers),
                                  attention_block_indices(variant.blocks, len(backbone.row_blocks())))
    initial = None
    if variant.random_start:
        shape = next(iter(inversion.latents.values())).shape
        initial = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    latents = sample_edit(backbone, inversion, torch.from_numpy(first_frame)[None], prompt="", negative_prompt="",
                          injection=InjectionSettings(attention_tau=variant.attention_tau, layers=layers),
                          cfg=defaults.cfg, initial_latents=initial, keep_source_row=variant.keep_source_row)
    calls, rows = counter.take()
    return backbone.decode(latents).numpy(), calls, rows


def mean_and_error(values: list[float]) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def run_table(backbone, clips: int, names: list[str] | None, *, smoke: bool = False) -> list[dict]:
    defaults = backbone.defaults
    table = variants(defaults.sampling_steps, defaults.inversion_order)
    if names:
        unknown = sorted(set(names) - set(table))
        if unknown:
            raise SystemExit(f"unknown rows {unknown}; rows: {list(table)}")
        table = {name: table[name] for name in names}
    counter = CallCounter(backbone)
    scenes = [world.make_flow_scene(HELD_OUT_SEED + k) for k in range(clips)]
    sources = [world.render(scene) for scene in scenes]
    ceiling = [psnr(backbone.decode(backbone.encode_video(torch.from_numpy(s))).numpy(), s) for s in sources]
    print(f"toy Wan on {clips} held-out clips ({defaults.num_frames} frames, {defaults.size_wh[0]}x"
          f"{defaults.size_wh[1]}); defaults: {defaults.sampling_steps} steps of order {defaults.inversion_order}, "
          f"attention tau 0.5, all blocks, cfg {defaults.cfg:g}, shift {defaults.shift:g}; VAE round trip "
          f"{np.mean(ceiling):.2f} dB; generation = {GENERATION_STEPS} calls\n", flush=True)
    print("| row | motion error px | shape found | colour error /255 | background error /255 | "
          "reconstruction PSNR dB | calls (rows) | calls / generation |")
    print("|---|---|---|---|---|---|---|---|", flush=True)
    results = []
    for name, variant in table.items():
        scores, recon = [], []
        for k, (scene, source) in enumerate(zip(scenes, sources)):
            edited = world.recolour(scene, 0, world.unused_colour(scene, 0))
            output, calls, rows = edit_clip(backbone, counter, variant, source, world.edited_first_frame(edited), k)
            scores.append(asdict(score_edit(output, edited, 0)))
            if not smoke or k == 0:
                same, _, _ = edit_clip(backbone, counter, variant, source, source[0], k)
                recon.append(psnr(same, source))
        motion = mean_and_error([s["centroid_error"] for s in scores])
        colour = mean_and_error([255 * s["colour_error"] for s in scores if not math.isnan(s["colour_error"])])
        background = mean_and_error([255 * s["background_error"] for s in scores])
        found = float(np.mean([s["detected"] for s in scores]))
        reconstruction = mean_and_error(recon)
        print(f"| {name} | {motion[0]:.2f} +- {motion[1]:.2f} | {found:.2f} | {colour[0]:.1f} +- {colour[1]:.1f} | "
              f"{background[0]:.1f} | {reconstruction[0]:.2f} +- {reconstruction[1]:.2f} | {calls} ({rows}) | "
              f"{calls / GENERATION_STEPS:.2f} |", flush=True)
        results.append(dict(row=name, motion=motion, found=found, colour=colour, background=background,
                            reconstruction=reconstruction, calls=calls, rows=rows))
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=WAN_WEIGHTS)
    parser.add_argument("--clips", type=int, default=32, help="held-out clips")
    parser.add_argument("--rows", nargs="*", help="rows to run (default: all, in the table's order)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="one clip, the first two rows: checks the instrument")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.weights)
    started = time.time()
    clips, rows = (1, ["defaults", "no injection"]) if args.smoke else (args.clips, args.rows)
    results = run_table(backbone, clips, rows, smoke=args.smoke)
    print(f"\n({time.time() - started:.0f} s, torch {torch.__version__}, {args.threads} thread(s))")
    return results


if __name__ == "__main__":
    main()
