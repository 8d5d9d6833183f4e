"""Injected sampling: regenerate the video from the edited first frame with the source's
structure and motion (AnyV2V, Sec. 3.3).

Sampling starts from the inverted latent at the noise level of step `start_index` (no added
noise; see `Backbone.start_timestep` for a backbone whose reference starts from a noisier one).
The steps are the model family's (`schedule.py`: DDIM/DDPM, or Euler/midpoint on a flow); every
model evaluation inside a step runs one batch of rows [source, uncond, cond]:
- source: the stored inverted latent at the evaluated level, conditioned on the source first
  frame and "";
- uncond: the current latent, the edited first frame, the negative prompt (no image embedding
  where the model supports it);
- cond: the current latent, the edited first frame, the edit prompt.
The source row's prediction is discarded: it exists only to provide the features that
`injection.py` copies into the other rows. Once every injection window has ended the source row
is dropped from the batch; it no longer influences anything, so the result is unchanged.
"""

from __future__ import annotations

import math

import torch

from .backbones.base import Backbone, RowCondition
from .errors import AnyV2VError
from .injection import InjectionPlan, InjectionSettings, injected, rows_in_sequence
from .inversion import Inversion, Progress, check_finite, start_level
from .memory import guard_out_of_memory
from .schedule import Level, NoiseSource
from .video import check_frames
from .windows import predict_in_windows

SAMPLERS = ("ddim", "ddpm")  # the named samplers of DDPM-family backbones; flow backbones follow the order


def check_sampling_settings(steps: int, cfg: float, start_index: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise AnyV2VError(f"sampling steps must be an integer >= 1 (got {steps!r})")
    if not isinstance(start_index, int) or not 0 <= start_index < steps:
        raise AnyV2VError(f"start index must be in 0..{steps - 1} for {steps} steps (got {start_index!r}); 0 is the paper's value")
    if not isinstance(cfg, (int, float)) or not 0 < cfg < math.inf:
        raise AnyV2VError(f"cfg must be positive and finite (got {cfg!r}); the paper uses 9.0 for I2VGen-XL")


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise AnyV2VError(f"seed must be an integer in 0..2**64-1 (got {seed!r})")


def check_edited_first_frame(image: torch.Tensor, inversion: Inversion) -> torch.Tensor:
    """The edited first frame [1, H, W, 3] validated against the inversion's working size."""
    image = check_frames(image, "edited first frame")
    size_wh = (int(image.shape[2]), int(image.shape[1]))
    if image.shape[0] != 1 or size_wh != inversion.size_wh:
        raise AnyV2VError(
            f"the edited first frame must be one image at the inversion's working size {inversion.size_wh[0]}x"
            f"{inversion.size_wh[1]}, got {image.shape[0]} image(s) of {size_wh[0]}x{size_wh[1]}; "
            "resize it with video.prepare_first_frame(image, size_wh=inversion.size_wh)"
        )
    return image


@guard_out_of_memory("sampling")
def sample_edit(
    backbone: Backbone,
    inversion: Inversion,
    edited_first_frame: torch.Tensor,
    *,
    prompt: str,
    negative_prompt: str,
    injection: InjectionSettings = InjectionSettings(),
    cfg: float = 9.0,
    start_index: int = 0,
    progress: Progress | None = None,
    initial_latents: torch.Tensor | None = None,
    sampler: str | None = None,
    seed: int = 0,
    noise: torch.Tensor | None = None,
    keep_source_row: bool = False,
    edit_rows: tuple[RowCondition, RowCondition] | None = None,
) -> torch.Tensor:
    """Edited latents [1, C, F, h, w] float32 from an inversion and an edited first frame [1, H, W, 3].

    Sampling integrates with the solver order the inversion used. `initial_latents` replaces the
    inverted start latent (the paper's "random noise" ablation). `sampler` names a sampler of
    DDPM-family backbones: "ddim" (deterministic) or "ddpm" (ancestral, as the SEINE reference
    edits); None takes the backbone's. DDPM draws its noise from a CPU generator seeded with
    `seed`, or replays `noise` [steps run - 1, 1, C, F, h, w] (the last step adds none).
    `keep_source_row` runs the source row at every step, as the reference does; the result is the
    same, at the cost of one more row per step after the last injection window.
    `edit_rows` (negative row, positive row) are the edit's conditioning when the caller built it
    (a host whose own nodes encode the prompts); None: the backbone conditions the edited first
    frame with `negative_prompt` and `prompt`.
    """
    steps = inversion.sampling_steps
    check_sampling_settings(steps, cfg, start_index)
    check_seed(seed)
    edited_first_frame = check_edited_first_frame(edited_first_frame, inversion)
    if inversion.backbone_name != backbone.name:
        raise AnyV2VError(f"this inversion was made with {inversion.backbone_name}, not {backbone.name}; invert again")
    sampler = sampler or backbone.sampler
    schedule = backbone.schedule
    todo = schedule.sampling_steps(steps, sampler=sampler, order=inversion.order)[start_index:]
    plan = InjectionPlan.build(steps, injection, backbone.injection_layers)
    noise_draws = sum(step.draws_noise for step in todo)
    if noise is not None and len(noise) < noise_draws:
        raise AnyV2VError(f"{len(noise)} replayed noise tensors are too few for {noise_draws} stochastic steps")

    if edit_rows is None:
        condition_args = dict(num_frames=inversion.num_frames, fps=inversion.fps)
        uncond = backbone.condition(edited_first_frame, negative_prompt, unconditional=True, **condition_args)
        cond = backbone.condition(edited_first_frame, prompt, **condition_args)
    else:
        uncond, cond = edit_rows
    source = backbone.source_row_for_edit(inversion.source_condition, cond)

    if initial_latents is None:
        start = inversion.latent_at(start_level(backbone, inversion.inversion_steps, steps, start_index, inversion.order))
    else:
        start = initial_latents
    latents = start.to(backbone.device, torch.float32)
    noise_source = NoiseSource(seed, noise)
    blocks = backbone.row_blocks() if backbone.one_row_at_a_time else []
    if backbone.one_row_at_a_time and not blocks:
        raise AnyV2VError(f"{backbone.name} cannot run its rows one at a time; run them batched")
    with torch.inference_mode(), injected(backbone.denoiser, plan) as injector, rows_in_sequence(blocks, injector):
        for done, (index, step) in enumerate(enumerate(todo, start=start_index), start=1):
            active = plan.active_kinds(index)

            def guided(x: torch.Tensor, time: float, level: Level) -> torch.Tensor:
                """Classifier-free guided prediction for x; the source row, while needed, holds the
                inverted latent at `level` and feeds the injection hooks."""
                if active or keep_source_row:
                    rows = [source, uncond, cond]
                    batch = torch.cat([inversion.latent_at(level).to(x.device), x, x])
                else:
                    rows = [uncond, cond]
                    batch = torch.cat([x, x])
                injector.set_step(active, num_rows=len(rows))
                model_output = predict_in_windows(backbone, batch, time, rows, inversion.windows)
                output_uncond, output_cond = model_output[-2:-1], model_output[-1:]
                return output_uncond + cfg * (output_cond - output_uncond)

            latents = step.denoise(latents, guided, noise_source)
            if progress is not None:
                progress(done, len(todo))
    check_finite(latents, "the edit's sampling", backbone)
    return backbone.video_latents(latents, cond)
