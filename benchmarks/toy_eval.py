"""AnyV2V's quality claims measured on the shipped toy I2VGen-XL.

    python benchmarks/toy_eval.py [--clips 12] [--inversion-clips 6]

Held-out clips of the toy world (seeds from `HELD_OUT_SEED`, never seen in training) and one
edit per clip: the top-most shape recoloured in the first frame, prompt = the edited caption.
Settings are the demo's (`anyv2v_core/toy/demo.py`) unless a table varies them: the paper's
50 DDIM sampling steps, injection windows of the reference template (conv 0.2, spatial 0.2,
temporal 0.5) and fps 8, but classifier-free guidance 3 instead of 9 (Table 3 shows why).

Table 1, inversion reconstruction: the source inverted with N DDIM steps, then the AnyV2V
pipeline re-run with the *unedited* first frame and the source caption, started at sampling
step `start_index`; PSNR against the source. The VAE round trip is the ceiling.

Table 2, edit quality (`anyv2v_core/toy/metrics.py`):
- motion fidelity: centroid error (px) of the edited shape in frames 1..F-1 against the
  source's trajectory, and the fraction of frames where it is found at all;
- appearance fidelity: RGB distance (0..1) of the shape's interior to the edited colour;
- temporal consistency: mean |frame t+1 - frame t| outside every shape (the background is
  static, so this is flicker);
- PSNR against the ideal edit, rendered by the world (same motion, new colour).
Rows: full AnyV2V and the paper's ablations (no temporal injection; no spatial injection =
neither conv nor spatial attention; random initial noise instead of the inverted latent), plus
no injection at all and injection at every step (all three taus 1: the most structure injection
can impose). The inversion (100 steps) is shared by all rows of a clip.

Table 3, guidance: full AnyV2V at several cfg scales, scored as in Table 2.

Table 4, can injection carry structure at all: how peaked the self-attention maps of the injected
layers are on the source clips (entropy over the uniform map's; 1 means every query attends
evenly, so swapping in the source's queries and keys changes nothing).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from anyv2v_core.backbones.i2vgen_xl import NEGATIVE_PROMPT  # noqa: E402
from anyv2v_core.injection import InjectionSettings  # noqa: E402
from anyv2v_core.inversion import invert_video  # noqa: E402
from anyv2v_core.loading import load_backbone  # noqa: E402
from anyv2v_core.sampling import sample_edit  # noqa: E402
from anyv2v_core.toy import world  # noqa: E402
from anyv2v_core.toy.demo import SETTINGS, WEIGHTS  # noqa: E402
from anyv2v_core.toy.metrics import psnr, score_edit  # noqa: E402
from anyv2v_core.toy.train import FPS, HELD_OUT_SEED  # noqa: E402

STEPS, CFG, FULL = SETTINGS.steps, SETTINGS.cfg, SETTINGS.injection
ABLATIONS = {  # name -> (injection, start from random noise)
    "full AnyV2V": (FULL, False),
    "no temporal injection": (replace(FULL, temporal_tau=0.0), False),
    "no spatial injection (conv + attn)": (replace(FULL, conv_tau=0.0, spatial_tau=0.0), False),
    "random initial noise": (FULL, True),
    "no injection at all": (InjectionSettings(0.0, 0.0, 0.0), False),
    "injection at every step": (InjectionSettings(1.0, 1.0, 1.0), False),  # the most injection can impose
}


def edit_frames(backbone, inversion, first_frame: np.ndarray, prompt: str, injection: InjectionSettings, *,
                start_index: int = 0, noise_seed: int | None = None, cfg: float = CFG) -> np.ndarray:
    initial = None
    if noise_seed is not None:
        start = inversion.latent_at(backbone.schedule.timesteps(STEPS)[start_index])
        initial = torch.randn(start.shape, generator=torch.Generator().manual_seed(noise_seed))
    latents = sample_edit(backbone, inversion, torch.from_numpy(first_frame)[None], prompt=prompt,
                          negative_prompt=NEGATIVE_PROMPT, injection=injection, cfg=cfg, start_index=start_index,
                          initial_latents=initial)
    return backbone.decode(latents).numpy()


def inversion_table(backbone, clips: int, steps_list: list[int], starts: list[int]) -> None:
    psnrs = {(n, s): [] for n in steps_list for s in starts}
    ceiling = []
    for k in range(clips):
        scene = world.make_scene(HELD_OUT_SEED + k)
        source = world.render(scene)
        frames = torch.from_numpy(source)
        ceiling.append(psnr(backbone.decode(backbone.encode_video(frames)).numpy(), source))
        for n in steps_list:
            inversion = invert_video(backbone, frames, inversion_steps=n, sampling_steps=STEPS, fps=FPS)
            for s in starts:
                out = edit_frames(backbone, inversion, source[0], scene.caption(), FULL, start_index=s)
                psnrs[(n, s)].append(psnr(out, source))
    print(f"\nTable 1: reconstruction PSNR (dB) of the source with its unedited first frame, {clips} clips "
          f"(VAE round trip ceiling {np.mean(ceiling):.2f} dB)\n")
    print("| inversion steps | " + " | ".join(f"start index {s}" for s in starts) + " |")
    print("|---|" + "---|" * len(starts))
    for n in steps_list:
        print(f"| {n} | " + " | ".join(f"{np.mean(psnrs[(n, s)]):.2f}" for s in starts) + " |")


def edit_tables(backbone, clips: int, inversion_steps: int, cfgs: list[float]) -> None:
    """Tables 2 and 3, which share each clip's inversion."""
    variants = {name: (injection, from_noise, CFG) for name, (injection, from_noise) in ABLATIONS.items()}
    variants.update({f"cfg {cfg:g}": (FULL, False, cfg) for cfg in cfgs if cfg != CFG})
    scores = {name: [] for name in variants}
    for k in range(clips):
        scene = world.make_scene(HELD_OUT_SEED + k)
        index = len(scene.objects) - 1
        edited = world.recolour(scene, index, world.unused_colour(scene, index))
        inversion = invert_video(backbone, torch.from_numpy(world.render(scene)), inversion_steps=inversion_steps,
                                 sampling_steps=STEPS, fps=FPS)
        first_frame = world.edited_first_frame(edited)
        for name, (injection, from_noise, cfg) in variants.items():
            out = edit_frames(backbone, inversion, first_frame, edited.caption(), injection,
                              noise_seed=k if from_noise else None, cfg=cfg)
            scores[name].append(asdict(score_edit(out, edited, index)))
    setup = f"{clips} held-out clips, inversion {inversion_steps} steps, {STEPS} sampling steps"
    print_scores(f"Table 2: recolour edits of {setup}, cfg {CFG:g}", {name: scores[name] for name in ABLATIONS})
    by_cfg = {f"cfg {cfg:g}": scores["full AnyV2V" if cfg == CFG else f"cfg {cfg:g}"] for cfg in sorted(set(cfgs))}
    print_scores(f"Table 3: full AnyV2V against the guidance scale, {setup}", by_cfg)


@torch.inference_mode()
def attention_table(backbone, clips: int, timesteps=(901, 501, 101)) -> None:
    """Table 4: mean relative entropy of the injected self-attention maps, per kind and timestep."""
    modules = dict(backbone.unet.named_modules())
    kinds = {"spatial": backbone.injection_layers.spatial_attention,
             "temporal": backbone.injection_layers.temporal_attention}
    captured: dict[tuple[str, str], torch.Tensor] = {}

    def keep(name: str, role: str):
        def hook(module, inputs, output):
            captured[(name, role)] = output
        return hook

    handles = [getattr(modules[name], role).register_forward_hook(keep(name, role))
               for names in kinds.values() for name in names for role in ("to_q", "to_k")]
    entropy = {(kind, t): [] for kind in kinds for t in timesteps}
    try:
        for k in range(clips):
            scene = world.make_scene(HELD_OUT_SEED + k)
            frames = torch.from_numpy(world.render(scene))
            row = backbone.condition(frames[:1], scene.caption(), num_frames=scene.num_frames, fps=FPS)
            clean = backbone.encode_video(frames)  # [1, 4, F, h, w]
            for t in timesteps:
                alpha = backbone.schedule.alphas_cumprod[t]
                noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(k))
                backbone.predict(alpha.sqrt() * clean + (1 - alpha).sqrt() * noise, t, [row])
                for kind, names in kinds.items():
                    for name in names:
                        heads = modules[name].heads
                        q, key = (captured[(name, r)].unflatten(-1, (heads, -1)).transpose(1, 2) for r in ("to_q", "to_k"))
                        tokens = q.shape[-2]  # q, key: [batch, heads, tokens, head width]
                        maps = (q @ key.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
                        h = -(maps * maps.clamp_min(1e-12).log()).sum(-1).mean() / math.log(tokens)
                        entropy[(kind, t)].append(float(h))
    finally:
        for handle in handles:
            handle.remove()
    print(f"\nTable 4: entropy of the injected self-attention maps over the uniform map's (1 = uniform), "
          f"{clips} clips, noised source latents\n")
    print("| timestep | " + " | ".join(f"{kind} ({len(names)} layers)" for kind, names in kinds.items()) + " |")
    print("|---|" + "---|" * len(kinds))
    for t in timesteps:
        print(f"| {t} | " + " | ".join(f"{np.mean(entropy[(kind, t)]):.3f}" for kind in kinds) + " |")


def print_scores(title: str, scores: dict[str, list[dict]]) -> None:
    keys = ("centroid_error", "detected", "colour_error", "background_flicker", "psnr_to_ideal")
    print(f"\n{title}; means (lower is better, except shape found and PSNR)\n")
    print("| variant | centroid error px | shape found | colour error | bg flicker | PSNR to ideal dB |")
    print("|---|---|---|---|---|---|")
    for name, rows in scores.items():
        means = [np.nanmean([r[key] for r in rows if not math.isinf(r[key])]) for key in keys]
        print(f"| {name} | {means[0]:.2f} | {means[1]:.2f} | {means[2]:.3f} | {means[3]:.4f} | {means[4]:.2f} |")


SMOKE = ["--clips", "0", "--inversion-clips", "1", "--inversion-steps", "50", "--start-indices", "0",
         "--attention-clips", "0"]  # --smoke: tiny sizes, checks that this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS)
    parser.add_argument("--clips", type=int, default=12, help="held-out clips for the edit table")
    parser.add_argument("--inversion-clips", type=int, default=6, help="held-out clips for the inversion table")
    parser.add_argument("--inversion-steps", type=int, nargs="+", default=[50, 100, 250, 500])
    parser.add_argument("--start-indices", type=int, nargs="+", default=[0, 5, 10])
    parser.add_argument("--edit-inversion-steps", type=int, default=SETTINGS.inversion_steps)
    parser.add_argument("--cfgs", type=float, nargs="*", default=[1.0, 3.0, 9.0])
    parser.add_argument("--attention-clips", type=int, default=4, help="held-out clips for the attention table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="the tiny run of SMOKE, in seconds (the tests run it)")
    args = parser.parse_args()
    if args.smoke:
        args = parser.parse_args(SMOKE)
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.weights)
    started = time.time()
    print(f"toy AnyV2V evaluation on {args.weights}")
    if args.inversion_clips:
        inversion_table(backbone, args.inversion_clips, args.inversion_steps, args.start_indices)
    if args.clips:
        edit_tables(backbone, args.clips, args.edit_inversion_steps, args.cfgs)
    if args.attention_clips:
        attention_table(backbone, args.attention_clips)
    print(f"\n({time.time() - started:.0f} s, torch {torch.__version__}, {args.threads} thread(s))")


if __name__ == "__main__":
    main()
