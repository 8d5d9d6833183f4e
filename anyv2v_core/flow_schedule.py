"""The noise path of rectified-flow models (Wan): x_sigma = (1 - sigma) * x_0 + sigma * noise, with
sigma from 0 (clean) to 1 (noise); the model predicts the velocity dx/dsigma = noise - x_0.

Sampling and inversion integrate the same ODE in opposite directions over the model's sigma grid
(uniform in [0, 1], bent towards noise by the model's `shift`). Order 1 is Euler's method, one
model call per step. Order 2 is the midpoint method (RF-Solver's second-order step, which reduces
to it): the velocity at the half-step point, two model calls per step, far smaller inversion
error at the same number of model calls (`benchmarks/flow_round_trip.py`). Sampling always uses
the order the inversion used, so the source branch finds an inverted latent at every point it
evaluates, half-step points included.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch

from .errors import AnyV2VError
from .schedule import Evaluate, InversionStep, NoiseSchedule, NoiseSource, SamplingStep


def as_float32(value: float) -> float:
    """`value` rounded to float32, as sigmas and timesteps are stored by diffusers and ComfyUI."""
    return float(torch.tensor(value, dtype=torch.float32))


def between(low: float, high: float, fraction: Fraction) -> float:
    """The sigma a `fraction` of the way from `low` to `high` (float32). Every sub-grid point and
    half-step point is computed by this one expression, so the inversion and the sampler agree on
    them to the bit and can use them as keys."""
    return as_float32(low + (high - low) * float(fraction))


@dataclass(frozen=True)
class SigmaSpacing:
    """How many steps reach which sigmas; checkable before any model loads."""

    num_train_timesteps: int = 1000
    orders = (1, 2)  # Euler and midpoint (NoiseSchedule.orders), known before the model loads

    def check_inversion_steps(self, inversion_steps: int, sampling_steps: int, order: int = 1) -> None:
        for name, value in (("inversion steps", inversion_steps), ("sampling steps", sampling_steps)):
            if not isinstance(value, int) or value < 1:
                raise AnyV2VError(f"{name} must be an integer >= 1 (got {value!r})")
        if order not in (1, 2):
            raise AnyV2VError(f"the inversion order must be 1 (Euler) or 2 (midpoint), got {order!r}")
        per_step, remainder = divmod(inversion_steps, sampling_steps)
        if remainder or per_step < 1:
            raise AnyV2VError(
                f"{inversion_steps} inversion steps do not reach every sigma of {sampling_steps} sampling steps; "
                f"use a multiple of {sampling_steps} (usually {sampling_steps} itself: the same grid)")
        if order == 2 and per_step > 1 and per_step % 2:
            raise AnyV2VError(
                f"second-order sampling reads the inverted latents at its half steps: with {sampling_steps} sampling "
                f"steps use {sampling_steps} inversion steps or an even multiple ({2 * sampling_steps}, "
                f"{4 * sampling_steps}...), not {inversion_steps}")


@dataclass(frozen=True, kw_only=True)
class FlowMatchingSchedule(SigmaSpacing, NoiseSchedule):
    """Sigmas sigma_k = shift * s / (1 + (shift - 1) * s) for s = 1 - k / steps, k = 0..steps
    (from 1 to 0; ComfyUI's "simple" scheduler and the Wan reference grid for step counts that
    divide 1000). Model time = sigma * num_train_timesteps."""

    shift: float = 1.0
    prediction_type = "flow"

    def __post_init__(self) -> None:
        if not isinstance(self.shift, (int, float)) or not 0 < self.shift < 1000:
            raise AnyV2VError(f"shift must be a positive number (got {self.shift!r}); Wan uses 3.0 at 480p, 5.0 at 720p")

    def sigmas(self, steps: int) -> list[float]:
        """steps + 1 sigmas, descending from 1 to 0, float32 values."""
        sigmas = []
        for k in range(steps + 1):
            s = float(Fraction(steps - k, steps))
            sigmas.append(as_float32(self.shift * s / (1 + (self.shift - 1) * s)))
        return sigmas

    def model_time(self, sigma: float) -> float:
        return float(torch.tensor(sigma, dtype=torch.float32) * self.num_train_timesteps)

    def sampling_steps(self, steps: int, *, sampler: str | None = None, order: int = 1) -> list[SamplingStep]:
        self.check_method(sampler, order)
        sigmas = self.sigmas(steps)
        return [FlowStep(self, high, low, order) for high, low in zip(sigmas, sigmas[1:])]

    def inversion_steps(self, inversion_steps: int, sampling_steps: int, order: int = 1) -> list[InversionStep]:
        self.check_inversion_steps(inversion_steps, sampling_steps, order)
        per_step = inversion_steps // sampling_steps
        coarse = self.sigmas(sampling_steps)[::-1]  # ascending from 0 to 1
        fine = [between(low, high, Fraction(j, per_step)) if j else low
                for low, high in zip(coarse, coarse[1:]) for j in range(per_step)] + [coarse[-1]]
        return [FlowStep(self, low, high, order) for low, high in zip(fine, fine[1:])]


class FlowStep(SamplingStep, InversionStep):
    """One step of the flow ODE from sigma `start` to `end`: towards data when sampling, towards noise
    when inverting. Order 1 is Euler's step; order 2 takes the velocity at the half-step point."""

    def __init__(self, schedule: FlowMatchingSchedule, start: float, end: float, order: int) -> None:
        self.schedule, self.start, self.end, self.order = schedule, start, end, order
        self.middle = between(min(start, end), max(start, end), Fraction(1, 2))
        self.source_levels = (start,) if order == 1 else (start, self.middle)

    def move(self, latents: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        time = self.schedule.model_time
        velocity = evaluate(latents, time(self.start), self.start)
        if self.order == 2:
            halfway = latents + (self.middle - self.start) * velocity
            velocity = evaluate(halfway, time(self.middle), self.middle)
        return latents + (self.end - self.start) * velocity

    def denoise(self, latents: torch.Tensor, evaluate: Evaluate, noise: NoiseSource) -> torch.Tensor:
        return self.move(latents, evaluate)

    def invert(self, latents: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        return self.move(latents, evaluate)
