"""Frame-by-frame VAE encoding and decoding of videos with an image VAE (diffusers AutoencoderKL).

Video latent diffusion models of the Stable Diffusion lineage encode each frame separately with
the SD VAE; going one frame (or chunk) at a time keeps the VAE's peak memory independent of F.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ..memory import guard_out_of_memory

logger = logging.getLogger("AnyV2V")


@torch.inference_mode()
def encode_frames(vae, frames: torch.Tensor, *, scaling_factor: float, device: torch.device,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents [1, C, F, h, w] float32 (times `scaling_factor`) of frames [F, H, W, 3] in 0..1.

    The posterior mean, unless `generator` is given: then the posterior is sampled with it. A frame
    whose half-precision encoding is not finite is encoded again in float32 (`Float32Redo`).
    """
    latents, redo = [], Float32Redo(vae, "encode")
    for index, frame in enumerate(frames):
        pixels = (frame.permute(2, 0, 1).unsqueeze(0) * 2 - 1).to(device)
        posterior = redo(lambda model, x: model.encode(x).latent_dist, pixels, f"frame {index}",
                         values=lambda posterior: posterior.parameters)
        latent = posterior.mean if generator is None else posterior.sample(generator)
        latents.append(latent.to(torch.float32) * scaling_factor)
    return torch.stack(latents, dim=2)


class FirstFrameLatent:
    """The encoding of the last first frame encoded (on the CPU): an edit's negative and positive rows
    are conditioned on the same edited frame, which is then encoded once."""

    def __init__(self) -> None:
        self._frame: torch.Tensor | None = None
        self._key: tuple = ()
        self._latent: torch.Tensor | None = None

    def get(self, frame: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor], key: tuple = ()) -> torch.Tensor:
        """`encode(frame)` for `frame` [1, H, W, 3] (a latent, or any encoding of it), unless it is the
        last frame seen with the same `key` (what else the encoding depends on, e.g. a frame count)."""
        frame = frame.cpu()
        if (self._frame is None or self._key != key or self._frame.shape != frame.shape
                or not torch.equal(self._frame, frame)):
            self._latent = encode(frame).cpu()
            self._frame, self._key = frame.clone(), key
        return self._latent


class Float32Redo:
    """A half-precision VAE's calls, each run again in float32 where its output is not finite (the SD
    VAE's activations can exceed fp16's range) rather than clamped into a wrong image. The float32
    copy is built at the first overflow, once, and the VAE itself is left as it was."""

    def __init__(self, vae, action: str) -> None:
        self.vae, self.action, self._float32 = vae, action, None

    def __call__(self, call: Callable, inputs: torch.Tensor, where: str, values: Callable = lambda output: output):
        """`call(vae, inputs)`, or `call(float32 copy, inputs)` when `values(output)` is not finite."""
        output = call(self.vae, inputs.to(self.vae.dtype))
        if self.vae.dtype == torch.float32 or torch.isfinite(values(output)).all():
            return output
        logger.warning("the %s VAE %s of %s overflowed; doing it again in float32",
                       str(self.vae.dtype).removeprefix("torch."), self.action, where)
        del output
        if self._float32 is None:
            self._float32 = self.float32_copy()
        return call(self._float32, inputs.to(torch.float32))

    def float32_copy(self):
        """A float32 copy of the VAE on the same device (built on the meta device: no random initialisation)."""
        with torch.device("meta"):
            copy = type(self.vae).from_config(self.vae.config)
        copy.load_state_dict({key: value.to(torch.float32) for key, value in self.vae.state_dict().items()},
                             assign=True)
        return copy.eval().requires_grad_(False)


@guard_out_of_memory("decoding")
@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor, *, scaling_factor: float, device: torch.device,
                   chunk_size: int = 1, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Frames [F, H, W, 3] float32 in 0..1 on the CPU from latents [1, C, F, h, w], `chunk_size` frames at a time.

    A chunk whose half-precision decode is not finite is decoded again in float32 (`Float32Redo`).
    `progress(frames done, frames)` is called after each chunk; it may raise to cancel."""
    frames_latents = latents[0].permute(1, 0, 2, 3) / scaling_factor  # [F, C, h, w]
    chunk_size = max(1, int(chunk_size))
    frames, redo = [], Float32Redo(vae, "decode")
    for start in range(0, frames_latents.shape[0], chunk_size):
        chunk = frames_latents[start : start + chunk_size].to(device)
        pixels = redo(lambda model, x: model.decode(x, return_dict=False)[0], chunk,
                      f"frames {start}-{start + chunk.shape[0] - 1}")
        frames.append((pixels.to(torch.float32) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu())
        if progress is not None:
            progress(start + chunk.shape[0], frames_latents.shape[0])
    return torch.cat(frames)
