"""The noise path of DDPM-trained models (I2VGen-XL, ConsistI2V, SEINE): integer timesteps,
alphas_cumprod, and the two moves AnyV2V needs, DDIM (deterministic, used both ways) and the
ancestral DDPM step.

The math is written out here instead of calling diffusers' scheduler objects so the inversion
quirk of the reference (see `DDIMInversionStep`) is visible in one place and the loops can keep
latents in float32 whatever dtype the UNet runs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import AnyV2VError
from .schedule import Evaluate, InversionStep, NoiseSchedule, NoiseSource, SamplingStep


@dataclass(frozen=True)
class TimestepSpacing:
    """Which timesteps a number of steps visits ("leading" spacing plus an offset). Every supported
    DDPM backbone has 1000 training timesteps and offset 1, so settings can be checked before loading."""

    num_train_timesteps: int = 1000
    steps_offset: int = 1
    orders = (1,)  # solver orders (NoiseSchedule.orders), known before the model loads

    def step_ratio(self, num_steps: int) -> int:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise AnyV2VError(f"the number of steps must be an integer >= 1 (got {num_steps!r})")
        if num_steps > self.num_train_timesteps:
            raise AnyV2VError(
                f"{num_steps} steps is more than the model's {self.num_train_timesteps} training timesteps; "
                f"use at most {self.num_train_timesteps}"
            )
        return self.num_train_timesteps // num_steps

    def timesteps(self, num_steps: int) -> list[int]:
        """Sampling timesteps, descending, with "leading" spacing (981, 961, ..., 1 for 50 steps)."""
        ratio = self.step_ratio(num_steps)
        return [k * ratio + self.steps_offset for k in reversed(range(num_steps))]

    def inversion_timesteps(self, num_steps: int) -> list[int]:
        """Inversion targets, ascending (1, 11, ..., 991 for 100 steps)."""
        return list(reversed(self.timesteps(num_steps)))

    def check_inversion_steps(self, inversion_steps: int, sampling_steps: int, order: int = 1) -> None:
        """Every sampling timestep must be an inversion target, else the source branch has no latent there."""
        if order != 1:
            raise AnyV2VError(f"DDIM inversion is first order (got order {order!r}); second-order inversion is for "
                              "rectified-flow backbones such as Wan")
        missing = sorted(set(self.timesteps(sampling_steps)) - set(self.inversion_timesteps(inversion_steps)))
        if missing:
            valid = [n for n in range(sampling_steps, self.num_train_timesteps + 1, sampling_steps)
                     if not set(self.timesteps(sampling_steps)) - set(self.inversion_timesteps(n))]
            raise AnyV2VError(
                f"{inversion_steps} inversion steps do not reach sampling timestep(s) {missing[:3]} of "
                f"{sampling_steps} sampling steps; use an inversion step count among {valid[:6]}"
            )


@dataclass(frozen=True, kw_only=True)
class DiffusionSchedule(TimestepSpacing, NoiseSchedule):
    """alphas_cumprod of a diffusion model plus how its timesteps are spaced.

    Built from a diffusers scheduler config (`from_scheduler_config`) so zero-terminal-SNR
    rescaling and beta schedules are computed exactly as the model was trained.
    """

    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float32
    prediction_type: str  # "epsilon" or "v_prediction"
    # alpha used where a step runs past t=0: 1.0 with set_alpha_to_one, else alphas_cumprod[0]
    boundary_alpha_cumprod: float
    samplers = ("ddim", "ddpm")

    @classmethod
    def from_scheduler_config(cls, config: dict, **overrides) -> "DiffusionSchedule":
        from diffusers import DDIMScheduler

        config = {**dict(config), **overrides}
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise AnyV2VError(
                f"scheduler prediction_type {prediction_type!r} is not supported; "
                "use a model whose scheduler predicts 'epsilon' or 'v_prediction'"
            )
        scheduler = DDIMScheduler.from_config(config)
        alphas_cumprod = scheduler.alphas_cumprod.to(torch.float32).clone()
        set_alpha_to_one = bool(config.get("set_alpha_to_one", True))
        return cls(
            num_train_timesteps=int(alphas_cumprod.shape[0]),
            alphas_cumprod=alphas_cumprod,
            prediction_type=prediction_type,
            steps_offset=int(config.get("steps_offset", 0)),
            boundary_alpha_cumprod=1.0 if set_alpha_to_one else float(alphas_cumprod[0]),
        )

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else self.boundary_alpha_cumprod

    def split(self, model_output: torch.Tensor, x: torch.Tensor, alpha_x: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted x0, predicted noise) from the model output for latents x at noise level alpha_x."""
        sqrt_a, sqrt_1ma = alpha_x**0.5, (1 - alpha_x) ** 0.5
        if self.prediction_type == "v_prediction":
            return sqrt_a * x - sqrt_1ma * model_output, sqrt_a * model_output + sqrt_1ma * x
        return (x - sqrt_1ma * model_output) / sqrt_a, model_output

    def ddim_move(self, model_output: torch.Tensor, x: torch.Tensor, alpha_x: float, alpha_target: float) -> torch.Tensor:
        """Deterministic DDIM move (eta 0) of x from noise level alpha_x to alpha_target.

        Used both ways: denoising (alpha_target > alpha_x) and inversion (alpha_target < alpha_x).
        """
        x0, eps = self.split(model_output, x, alpha_x)
        return (alpha_target**0.5) * x0 + ((1 - alpha_target) ** 0.5) * eps

    def ddpm_move(self, model_output: torch.Tensor, x: torch.Tensor, t: int, t_prev: int,
                  noise: torch.Tensor | None) -> torch.Tensor:
        """One ancestral DDPM step of x from t to t_prev: the posterior mean given the predicted x0,
        plus the "fixed_small" posterior std times `noise` ~ N(0, 1) (none on the last step, t_prev < 0)."""
        alpha_t = self.alpha(t)
        alpha_prev = self.alpha(t_prev) if t_prev >= 0 else 1.0
        alpha_step = alpha_t / alpha_prev
        x0, _ = self.split(model_output, x, alpha_t)
        mean = ((alpha_prev**0.5) * (1 - alpha_step) / (1 - alpha_t)) * x0 + (
            (alpha_step**0.5) * (1 - alpha_prev) / (1 - alpha_t)
        ) * x
        if t_prev < 0:
            return mean
        std = max((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_step), 1e-20) ** 0.5
        return mean + std * noise

    def sampling_steps(self, steps: int, *, sampler: str | None = None, order: int = 1) -> list[SamplingStep]:
        self.check_method(sampler, order)
        ratio = self.step_ratio(steps)
        if sampler == "ddpm":
            # diffusers' DDPMScheduler of the version the SEINE reference pins (0.15) ignores
            # `steps_offset`: step i runs the UNet at timesteps(steps)[i] - steps_offset (980..0)
            # and still reads the source latent inverted at timesteps(steps)[i]
            return [DDPMStep(self, t, t - self.steps_offset, ratio) for t in self.timesteps(steps)]
        return [DDIMStep(self, t, ratio) for t in self.timesteps(steps)]

    def inversion_steps(self, inversion_steps: int, sampling_steps: int, order: int = 1) -> list[InversionStep]:
        self.check_inversion_steps(inversion_steps, sampling_steps, order)
        ratio = self.step_ratio(inversion_steps)
        return [DDIMInversionStep(self, t, ratio) for t in self.inversion_timesteps(inversion_steps)]


class DDIMStep(SamplingStep):
    def __init__(self, schedule: DiffusionSchedule, t: int, ratio: int) -> None:
        self.schedule, self.start, self.ratio = schedule, t, ratio
        self.source_levels = (t,)

    def denoise(self, latents: torch.Tensor, evaluate: Evaluate, noise: NoiseSource) -> torch.Tensor:
        t = self.start
        model_output = evaluate(latents, t, t)
        return self.schedule.ddim_move(model_output, latents, self.schedule.alpha(t), self.schedule.alpha(t - self.ratio))


class DDPMStep(SamplingStep):
    def __init__(self, schedule: DiffusionSchedule, source_t: int, t: int, ratio: int) -> None:
        self.schedule, self.start, self.t, self.t_prev = schedule, source_t, t, t - ratio
        self.source_levels = (source_t,)
        self.draws_noise = self.t_prev >= 0

    def denoise(self, latents: torch.Tensor, evaluate: Evaluate, noise: NoiseSource) -> torch.Tensor:
        model_output = evaluate(latents, self.t, self.start)
        step_noise = noise.draw(latents) if self.draws_noise else None
        return self.schedule.ddpm_move(model_output, latents, self.t, self.t_prev, step_noise)


class DDIMInversionStep(InversionStep):
    """DDIM inversion towards target timestep t.

    The reference (diffusers' DDIMInverseScheduler) evaluates the UNet at the *target* t on
    latents that are still at t - ratio; the first step starts from the clean latents, whose
    alpha is the boundary value.
    """

    def __init__(self, schedule: DiffusionSchedule, t: int, ratio: int) -> None:
        self.schedule, self.end, self.ratio = schedule, t, ratio

    def invert(self, latents: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        t, t_now = self.end, self.end - self.ratio
        model_output = evaluate(latents, t, t_now)
        return self.schedule.ddim_move(model_output, latents, self.schedule.alpha(t_now), self.schedule.alpha(t))
