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

import torch

from .backbones.base import Backbone, RowCondition
from .injection import injected, rows_in_sequence
from .inversion import Inversion, Progress, check_finite
from .memory import guard_out_of_memory
from .plan import SamplingPlan, plan_sampling
from .schedule import Level, NoiseSource
from .windows import predict_in_windows


def sample_edit(
    backbone: Backbone,
    inversion: Inversion,
    edited_first_frame: torch.Tensor,
    *,
    progress: Progress | None = None,
    edit_rows: tuple[RowCondition, RowCondition] | None = None,
    **settings,
) -> torch.Tensor:
    """Edited latents [1, C, F, h, w] float32 from an inversion and an edited first frame [1, H, W, 3]:
    `plan.plan_sampling` checks the edit's `settings` (prompt, negative_prompt, injection, cfg,
    start_index, sampler, seed, ...) and `run_sampling` runs the plan."""
    plan = plan_sampling(backbone, inversion, edited_first_frame, **settings)
    return run_sampling(backbone, inversion, plan, progress=progress, edit_rows=edit_rows)


@guard_out_of_memory("sampling")
def run_sampling(
    backbone: Backbone,
    inversion: Inversion,
    plan: SamplingPlan,
    *,
    progress: Progress | None = None,
    edit_rows: tuple[RowCondition, RowCondition] | None = None,
) -> torch.Tensor:
    """Run a checked sampling plan from `inversion` (the one it was planned with).

    `edit_rows` (negative row, positive row) are the edit's conditioning when the caller built it
    (a host whose own nodes encode the prompts); None: the backbone conditions the edited first
    frame with the plan's negative prompt and prompt.
    """
    if edit_rows is None:
        condition_args = dict(num_frames=inversion.num_frames, fps=inversion.fps)
        uncond = backbone.condition(plan.first_frame, plan.negative_prompt, unconditional=True, **condition_args)
        cond = backbone.condition(plan.first_frame, plan.prompt, **condition_args)
    else:
        uncond, cond = edit_rows
    source = backbone.source_row_for_edit(inversion.source_condition, cond)

    start = inversion.latent_at(plan.start) if plan.initial_latents is None else plan.initial_latents
    latents = start.to(backbone.device, torch.float32)
    noise_source = NoiseSource(plan.seed, plan.noise)
    blocks = backbone.row_blocks() if backbone.one_row_at_a_time else []
    with torch.inference_mode(), injected(backbone.denoiser, plan.injection) as injector, \
            rows_in_sequence(blocks, injector):
        for done, (index, step) in enumerate(enumerate(plan.steps, start=plan.start_index), start=1):
            active = plan.injection.active_kinds(index)

            def guided(x: torch.Tensor, time: float, level: Level) -> torch.Tensor:
                """Classifier-free guided prediction for x; the source row, while needed, holds the
                inverted latent at `level` and feeds the injection hooks."""
                if active or plan.keep_source_row:
                    rows = [source, uncond, cond]
                    batch = torch.cat([inversion.latent_at(level).to(x.device), x, x])
                else:
                    rows = [uncond, cond]
                    batch = torch.cat([x, x])
                injector.set_step(active, num_rows=len(rows))
                model_output = predict_in_windows(backbone, batch, time, rows, inversion.windows)
                output_uncond, output_cond = model_output[-2:-1], model_output[-1:]
                return output_uncond + plan.cfg * (output_cond - output_uncond)

            latents = step.denoise(latents, guided, noise_source)
            if progress is not None:
                progress(done, len(plan.steps))
    check_finite(latents, "the edit's sampling", backbone)
    return backbone.video_latents(latents, cond)
