"""Inversion of the source video (AnyV2V's starting point and the source branch's input).

The reference recipe: no classifier-free guidance, the empty prompt, conditioned on the
*source* first frame, deterministic moves towards noise (DDIM for DDPM-trained models, the flow
ODE for rectified-flow ones: see `schedule.py`). The reference writes every inversion step to
disk; we keep in memory only the latents at the noise levels that sampling will read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .backbones.base import Backbone, RowCondition
from .errors import AnyV2VError
from .memory import guard_out_of_memory
from .plan import InversionPlan, plan_inversion
from .schedule import Level
from .windows import ContextWindows, predict_in_windows

Progress = Callable[[int, int], None]


@dataclass
class Inversion:
    """The inverted source video, ready for injected sampling.

    latents: {noise level: [1, C, F, h, w] float32 on the CPU}, one per level sampling reads
    (a DDPM timestep or a flow sigma; the half-step levels too for second-order sampling).
    source_condition: the source row's conditioning (empty prompt, source first frame).
    """

    latents: dict[Level, torch.Tensor]
    source_condition: RowCondition
    source_first_frame: torch.Tensor  # [1, H, W, 3]
    backbone_name: str
    num_frames: int
    fps: int
    inversion_steps: int
    sampling_steps: int
    windows: ContextWindows | None = None  # latent-frame windows used here and by sampling; None: all frames at once
    order: int = 1  # solver order of the inversion; sampling uses the same

    @property
    def size_wh(self) -> tuple[int, int]:
        return int(self.source_first_frame.shape[2]), int(self.source_first_frame.shape[1])

    def latent_at(self, level: Level) -> torch.Tensor:
        if level not in self.latents:
            raise AnyV2VError(
                f"the inversion holds no latent for noise level {level}: it was made for {self.sampling_steps} "
                f"sampling steps of order {self.order}; invert again with the sampling settings you use"
            )
        return self.latents[level]


def check_finite(latents: torch.Tensor, stage: str, backbone: Backbone) -> None:
    """Raise AnyV2VError when `latents` hold NaN or inf: decoded they would be a black or noise video
    with no word of why (a half-precision overflow, or a GPU whose fp16 is broken)."""
    if not bool(torch.isfinite(latents).all()):
        precision = str(backbone.dtype).removeprefix("torch.")
        raise AnyV2VError(
            f"{stage} of {backbone.name} gave NaN/inf latents in {precision}: the model overflowed its precision. "
            "Load it in another precision (dtype bf16 on GPUs from compute capability 8.0, else fp32); "
            "fewer steps or a lower cfg do not help")


def invert_video(
    backbone: Backbone,
    frames: torch.Tensor,
    *,
    progress: Progress | None = None,
    generator: torch.Generator | None = None,
    source_row: RowCondition | None = None,
    **settings,
) -> Inversion:
    """Invert prepared frames [F, H, W, 3] (already at the working size) towards noise:
    `plan.plan_inversion` checks the `settings` (inversion_steps, sampling_steps, fps, windows,
    order) and `run_inversion` runs the plan."""
    return run_inversion(backbone, plan_inversion(backbone, frames, **settings), progress=progress,
                         generator=generator, source_row=source_row)


@guard_out_of_memory("inversion")
def run_inversion(
    backbone: Backbone,
    plan: InversionPlan,
    *,
    progress: Progress | None = None,
    generator: torch.Generator | None = None,
    source_row: RowCondition | None = None,
) -> Inversion:
    """Run a checked inversion plan.

    `generator` samples the VAE posterior instead of taking its mean (the reference samples it
    from the global RNG; the mean is the deterministic default). `source_row` is the source
    branch's conditioning when the caller built it (a host whose own nodes encode the empty
    prompt); None: the backbone conditions the first frame and "".
    """
    source_first_frame = plan.frames[:1]
    source_condition = source_row or backbone.condition(source_first_frame, "", num_frames=plan.num_frames,
                                                        fps=plan.fps)
    kept: dict[Level, torch.Tensor] = {}

    def evaluate(latents: torch.Tensor, time: float, level: Level) -> torch.Tensor:
        if level in plan.keep:
            kept[level] = latents.to("cpu", copy=True)
        return predict_in_windows(backbone, latents, time, [source_condition], plan.windows)

    # the sampling state: latent frames the model generates (conditioning frames are not inverted)
    latents = backbone.encode_video(plan.frames, generator=generator)[:, :, backbone.conditioning_frames:]
    with torch.inference_mode():
        for done, step in enumerate(plan.steps, start=1):
            latents = step.invert(latents, evaluate)
            if progress is not None:
                progress(done, len(plan.steps))
    check_finite(latents, "the inversion", backbone)
    if plan.steps[-1].end in plan.keep:
        kept[plan.steps[-1].end] = latents.to("cpu", copy=True)
    return Inversion(
        latents=kept,
        source_condition=source_condition,
        source_first_frame=source_first_frame,
        backbone_name=backbone.name,
        num_frames=plan.num_frames,
        fps=plan.fps,
        inversion_steps=plan.inversion_steps,
        sampling_steps=plan.sampling_steps,
        windows=plan.windows,
        order=plan.order,
    )
