"""The noise schedule and the two DDIM moves AnyV2V needs: denoise (sampling) and invert.

The math is written out here instead of calling diffusers' scheduler objects so the
inversion quirk of the reference (see `inversion_alphas`) is visible in one place and
the loops can keep latents in float32 whatever dtype the UNet runs in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import AnyV2VError


@dataclass(frozen=True)
class TimestepSpacing:
    """Which timesteps a number of steps visits ("leading" spacing plus an offset). Every supported
    backbone has 1000 training timesteps and offset 1, so settings can be checked before loading."""

    num_train_timesteps: int = 1000
    steps_offset: int = 1

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

    def check_inversion_steps(self, inversion_steps: int, sampling_steps: int) -> None:
        """Every sampling timestep must be an inversion target, else the source branch has no latent there."""
        missing = sorted(set(self.timesteps(sampling_steps)) - set(self.inversion_timesteps(inversion_steps)))
        if missing:
            valid = [n for n in range(sampling_steps, self.num_train_timesteps + 1, sampling_steps)
                     if not set(self.timesteps(sampling_steps)) - set(self.inversion_timesteps(n))]
            raise AnyV2VError(
                f"{inversion_steps} inversion steps do not reach sampling timestep(s) {missing[:3]} of "
                f"{sampling_steps} sampling steps; use an inversion step count among {valid[:6]}"
            )


@dataclass(frozen=True, kw_only=True)
class NoiseSchedule(TimestepSpacing):
    """alphas_cumprod of a diffusion model plus how its timesteps are spaced.

    Built from a diffusers scheduler config (`from_scheduler_config`) so zero-terminal-SNR
    rescaling and beta schedules are computed exactly as the model was trained.
    """

    alphas_cumprod: torch.Tensor  # [num_train_timesteps] float32
    prediction_type: str  # "epsilon" or "v_prediction"
    # alpha used where a step runs past t=0: 1.0 with set_alpha_to_one, else alphas_cumprod[0]
    boundary_alpha_cumprod: float

    @classmethod
    def from_scheduler_config(cls, config: dict, **overrides) -> "NoiseSchedule":
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

    def sampling_alphas(self, t: int, num_steps: int) -> tuple[float, float]:
        """(alpha of x_t, alpha of the previous, less noisy timestep) for one DDIM sampling step."""
        return self.alpha(t), self.alpha(t - self.step_ratio(num_steps))

    def ddpm_timesteps(self, num_steps: int) -> list[int]:
        """DDPM sampling timesteps, descending (980, 960, ..., 0 for 50 steps).

        diffusers' DDPMScheduler of the version the SEINE reference pins (0.15) ignores
        `steps_offset`, so step i runs at `timesteps(num_steps)[i] - steps_offset`.
        """
        ratio = self.step_ratio(num_steps)
        return [k * ratio for k in reversed(range(num_steps))]

    def ddpm_move(self, model_output: torch.Tensor, x: torch.Tensor, t: int, num_steps: int,
                  noise: torch.Tensor | None) -> torch.Tensor:
        """One ancestral DDPM step of x from t to t - ratio: the posterior mean given the predicted x0,
        plus the "fixed_small" posterior std times `noise` ~ N(0, 1) (not used on the last step)."""
        t_prev = t - self.step_ratio(num_steps)
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

    def inversion_alphas(self, t: int, num_steps: int) -> tuple[float, float]:
        """(alpha of the current latents, alpha of target t) for the inversion step whose target is t.

        The reference (diffusers' DDIMInverseScheduler) evaluates the UNet at the *target* t on
        latents that are still at t - ratio; the first step starts from the clean latents, whose
        alpha is the boundary value.
        """
        return self.alpha(t - self.step_ratio(num_steps)), self.alpha(t)
