"""The noise path of a model family: where sampling and inversion evaluate the model, and how
latents move between two noise levels. Inversion (`inversion.py`) and injected sampling
(`sampling.py`) are one loop each, written against this interface; each family is one module:

- `diffusion_schedule.py`: DDPM-trained models (I2VGen-XL, ConsistI2V, SEINE); levels are integer
  timesteps, moves are DDIM (deterministic, also for inversion) or ancestral DDPM;
- `flow_schedule.py`: rectified-flow models (Wan); levels are sigmas in [0, 1], the model predicts
  a velocity, moves are Euler (order 1) or midpoint (order 2, RF-Solver) steps of the flow ODE.

A step never calls the model itself: it calls `evaluate(latents, time, level)`, which the loop
provides. `time` is what the model is conditioned on; `level` names the noise level the latents
are at, which is where the inversion stores them and which inverted latent the source branch
reads during sampling. The two differ only where a reference evaluates the model at a shifted
timestep (SEINE's DDPM sampler).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Union

import torch

from .errors import AnyV2VError

Level = Union[int, float]  # a point of the noise path: a DDPM timestep, or a flow sigma
Evaluate = Callable[[torch.Tensor, float, Level], torch.Tensor]  # (latents, model time, level) -> model output


class NoiseSource:
    """Fresh Gaussian noise for stochastic steps, from a seeded CPU generator or replayed from
    `replay` [n, ...] in order (the reference's recorded draws)."""

    def __init__(self, seed: int, replay: torch.Tensor | None = None) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.replay, self.drawn = replay, 0

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        if self.replay is not None:  # sample_edit checked that there are enough
            noise = self.replay[self.drawn]
        else:
            noise = torch.randn(like.shape, generator=self.generator)
        self.drawn += 1
        return noise.to(like.device, torch.float32)


class SamplingStep(ABC):
    """One denoising step from noise level `start`; `source_levels` are the inverted latents the
    source branch reads while it runs (one per model evaluation, `start` first)."""

    start: Level
    source_levels: tuple[Level, ...]
    draws_noise: bool = False  # True for stochastic steps, which take one `NoiseSource.draw`

    @abstractmethod
    def denoise(self, latents: torch.Tensor, evaluate: Evaluate, noise: NoiseSource) -> torch.Tensor:
        """The latents one step less noisy (float32, same shape)."""


class InversionStep(ABC):
    """One inversion step towards more noise, ending at noise level `end`."""

    end: Level

    @abstractmethod
    def invert(self, latents: torch.Tensor, evaluate: Evaluate) -> torch.Tensor:
        """The latents one step noisier (float32, same shape)."""


class NoiseSchedule(ABC):
    """What the inversion and sampling loops need from a model family's noise path."""

    num_train_timesteps: int
    prediction_type: str
    # solver orders this family inverts and samples with (1: one model call per step; 2: two)
    orders: tuple[int, ...] = (1,)
    # named sampling methods of this family ("ddim", "ddpm"); empty: the order decides
    samplers: tuple[str, ...] = ()

    @abstractmethod
    def check_inversion_steps(self, inversion_steps: int, sampling_steps: int, order: int = 1) -> None:
        """Raise AnyV2VError unless the inversion visits every level sampling will read."""

    @abstractmethod
    def sampling_steps(self, steps: int, *, sampler: str | None = None, order: int = 1) -> list[SamplingStep]:
        """The `steps` denoising steps of a sampling run, noisiest first."""

    @abstractmethod
    def inversion_steps(self, inversion_steps: int, sampling_steps: int, order: int = 1) -> list[InversionStep]:
        """The inversion's steps from the clean latents to the noisiest level, least noisy first."""

    def check_method(self, sampler: str | None, order: int) -> None:
        if order not in self.orders:
            raise AnyV2VError(f"solver order {order!r} is not available for this model family; use one of "
                              f"{', '.join(map(str, self.orders))}")
        if sampler is not None and sampler not in self.samplers:
            choices = (f"one of {', '.join(self.samplers)}" if self.samplers
                       else "none: this model family samples with the solver of the inversion order")
            raise AnyV2VError(f"sampler {sampler!r} does not apply to this model family; use {choices}")

    def source_levels(self, sampling_steps: int, *, sampler: str | None = None, order: int = 1) -> set[Level]:
        """Every inverted latent a sampling run of `sampling_steps` reads."""
        steps = self.sampling_steps(sampling_steps, sampler=sampler, order=order)
        return {level for step in steps for level in step.source_levels}
