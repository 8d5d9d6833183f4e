"""Frame-by-frame VAE encoding and decoding of videos with an image VAE (diffusers AutoencoderKL).

Video latent diffusion models of the Stable Diffusion lineage encode each frame separately with
the SD VAE; going one frame (or chunk) at a time keeps the VAE's peak memory independent of F.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..memory import guard_out_of_memory


@torch.inference_mode()
def encode_frames(vae, frames: torch.Tensor, *, scaling_factor: float, device: torch.device,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents [1, C, F, h, w] float32 (times `scaling_factor`) of frames [F, H, W, 3] in 0..1.

    The posterior mean, unless `generator` is given: then the posterior is sampled with it.
    """
    latents = []
    for frame in frames:
        pixels = (frame.permute(2, 0, 1).unsqueeze(0) * 2 - 1).to(device, vae.dtype)
        posterior = vae.encode(pixels).latent_dist
        latent = posterior.mean if generator is None else posterior.sample(generator)
        latents.append(latent.to(torch.float32) * scaling_factor)
    return torch.stack(latents, dim=2)


@guard_out_of_memory("decoding")
@torch.inference_mode()
def decode_latents(vae, latents: torch.Tensor, *, scaling_factor: float, device: torch.device,
                   chunk_size: int = 1, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Frames [F, H, W, 3] float32 in 0..1 on the CPU from latents [1, C, F, h, w], `chunk_size` frames at a time.

    `progress(frames done, frames)` is called after each chunk; it may raise to cancel."""
    frames_latents = latents[0].permute(1, 0, 2, 3) / scaling_factor  # [F, C, h, w]
    chunk_size = max(1, int(chunk_size))
    frames = []
    for start in range(0, frames_latents.shape[0], chunk_size):
        chunk = frames_latents[start : start + chunk_size].to(device, vae.dtype)
        pixels = vae.decode(chunk, return_dict=False)[0]
        frames.append((pixels.to(torch.float32) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu())
        if progress is not None:
            progress(start + chunk.shape[0], frames_latents.shape[0])
    return torch.cat(frames)
