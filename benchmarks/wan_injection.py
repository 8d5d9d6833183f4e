"""How strongly each block set and attention tau ties a Wan edit to the source (tiny random model).

    python benchmarks/wan_injection.py [--kind wan2.1-i2v] [--steps 8]

For the edit of a tiny clip (a recoloured first frame), prints per injected block set
(none, early half, late half, all) and attention tau the distance of the edited latents from
the edit without injection and from the source's own reconstruction, and the hooks and source
rows it costs. "pull" = how far injection moved the edit from the plain I2V result towards the
source's layout, as a fraction of the distance between the two. Random weights carry no learned
structure, so this measures the mechanism's reach per block set, not edit quality (docs/wan.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyv2v_core.backbones.wan import attention_block_indices, injection_layers_for  # noqa: E402
from anyv2v_core.injection import InjectionSettings  # noqa: E402
from anyv2v_core.inversion import invert_video  # noqa: E402
from anyv2v_core.loading import load_backbone  # noqa: E402
from anyv2v_core.sampling import sample_edit  # noqa: E402
from anyv2v_core.testing.tiny_models import build_tiny_wan, moving_square_video  # noqa: E402


SMOKE = ["--steps", "2"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", default="wan2.1-i2v")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--qk-scale", type=float, default=1.0,
                        help="multiply every self-attention's Q and K norm weights by this, for the peaked attention maps "
                             "of a trained model (random weights give near-uniform maps, which carry nothing)")
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        backbone = load_backbone(build_tiny_wan(Path(scratch) / "wan", args.kind), dtype="fp32")
        with torch.no_grad():
            for name, module in backbone.denoiser.named_modules():
                if name.endswith("attn1.norm_q") or name.endswith("attn1.norm_k"):  # Q/K are RMS-normalised
                    module.weight.mul_(args.qk_scale)
        size = backbone.defaults.size_multiple * 2
        frames = moving_square_video(9, size)
        edited = moving_square_video(1, size, colour=(0.1, 0.2, 0.9))
        inversion = invert_video(backbone, frames, inversion_steps=args.steps, sampling_steps=args.steps)

        def run(blocks: str | None, tau: float) -> torch.Tensor:
            layers = None if blocks is None else injection_layers_for(
                list(backbone.transformers), attention_block_indices(blocks, backbone.transformers["transformer"].config.num_layers))
            injection = InjectionSettings(attention_tau=tau if blocks else 0.0, layers=layers)
            return sample_edit(backbone, inversion, edited, prompt="a blue square", negative_prompt="", cfg=3.0,
                               injection=injection)

        plain = run(None, 0.0)
        source = sample_edit(backbone, inversion, frames[:1], prompt="", negative_prompt="", cfg=1.0,
                             injection=InjectionSettings(attention_tau=0.0))
        span = float((source - plain).norm())
        print(f"{backbone.name}, {args.steps} steps (order {inversion.order}), Q/K norm weights x{args.qk_scale}; "
              f"|source - plain edit| = {span:.3f}")
        print("| blocks | attention tau | hooked modules | steps with a source row | pull towards the source |")
        print("|---|---|---|---|---|")
        num_blocks = backbone.transformers["transformer"].config.num_layers
        for blocks in ("early", "late", "all"):
            for tau in (0.25, 0.5, 1.0):
                edit = run(blocks, tau)
                pull = float(((edit - plain) * (source - plain)).sum()) / span**2
                hooked = 2 * len(attention_block_indices(blocks, num_blocks)) * len(backbone.transformers)
                print(f"| {blocks} | {tau} | {hooked} | {int(args.steps * tau)} of {args.steps} | {pull:+.3f} |",
                      flush=True)


if __name__ == "__main__":
    main()
