"""How much device memory an edit needs, and what happens when it runs out.

The offload policies' names and which components each lets share the device (`offload.py` applies
them); the bytes of weights and of activations (from a backbone's measured `ActivationProfile`),
each policy's peak (`policy_peaks`), the memory an edit may count on (`available_memory`) and the
fastest policy that fits in it (`auto_policy`).

`guard_out_of_memory` turns an accelerator out-of-memory error (setup, inversion, sampling,
decoding) into `AnyV2VOutOfMemory`, whose message names these policies and the other options
that help.
"""

from __future__ import annotations

import gc
import logging
import traceback
from contextlib import ContextDecorator
from dataclasses import dataclass

import torch

from .errors import AnyV2VOutOfMemory

logger = logging.getLogger("AnyV2V")

OFFLOAD_POLICIES = ("none", "model", "sequential")
ENCODERS = ("text_encoder", "image_encoder")  # used only to compute the conditioning
DENOISERS = ("unet", "transformer", "transformer_2")  # the networks of the denoising loop (Wan: two experts)


def callable_children(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Direct children whose forward is called, looking through ModuleLists/ModuleDicts."""
    children = []
    for child in module.children():
        if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            children.extend(callable_children(child))
        else:
            children.append(child)
    return children


def execution_device(device: torch.device | str) -> torch.device:
    """`device` with its index ("cuda" is the current CUDA device, "cuda:0" usually)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def nbytes(tensors) -> int:
    """Bytes of the distinct tensors in `tensors`."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


# ---------------------------------------------------------------------------------------------- how much memory

RESERVED_BYTES = 2**30  # the CUDA context and kernel workspaces: not in the estimates
FRAGMENTATION = 1.1  # the caching allocator's blocks hold about this much more than the live tensors


def weight_bytes(module: torch.nn.Module) -> int:
    return nbytes([*module.parameters(), *module.buffers()])


def streamed_denoiser_bytes(denoiser: torch.nn.Module) -> int:
    """Weights on the device at once while a denoiser is streamed block by block: its own (and shared)
    weights and its two largest blocks (the running one and the next, prefetched)."""
    blocks = sorted((weight_bytes(child) for child in callable_children(denoiser)), reverse=True)
    return weight_bytes(denoiser) - sum(blocks) + sum(blocks[:2])


def policy_peaks(components: dict[str, torch.nn.Module], unet_activations: int = 0,
                 vae_activations: int = 0) -> dict[str, int]:
    """Peak device bytes of an edit under each policy: the weights each policy holds on the device at
    the worst moment plus the activations then (times FRAGMENTATION; the encoders' own activations
    are a few MB). `unet_activations` are those of one call of a denoiser (UNet or transformer)."""
    weights = {name: weight_bytes(module) for name, module in components.items()}
    unet_activations, vae_activations = int(unet_activations * FRAGMENTATION), int(vae_activations * FRAGMENTATION)
    resident = sum(size for name, size in weights.items() if name not in ENCODERS)
    encoders = [size for name, size in weights.items() if name in ENCODERS]
    vae = weights.get("vae", 0) + vae_activations
    denoisers = {name: size for name, size in weights.items() if name in DENOISERS}
    streamed = {name: streamed_denoiser_bytes(components[name]) for name in denoisers}
    return {
        "none": max(resident + unet_activations, resident + vae_activations, resident + sum(encoders)),
        "model": max(*(size + unet_activations for size in denoisers.values()), vae, *encoders),
        "sequential": max(*(size + unet_activations for size in streamed.values()), vae, *encoders),
    }


def available_memory(free_bytes: int, freeable_bytes: int = 0, reserve_bytes: int = RESERVED_BYTES) -> int:
    """Device bytes an edit may count on: what is free now, plus what its host can unload for it
    (ComfyUI's other models), minus what must stay free (the host's reserve; alone, the CUDA context
    and kernel workspaces' RESERVED_BYTES). The budget `auto_policy` fits a policy into: not the
    card's total memory, of which the desktop, other programs and other models hold part."""
    return max(0, int(free_bytes) + int(freeable_bytes) - int(reserve_bytes))


def auto_policy(backbone, available_bytes: int, *, frames: int | None = None, size_wh: tuple[int, int] | None = None,
                rows: int = 3, decode_chunk_size: int = 1) -> str:
    """The fastest policy whose peak fits in `available_bytes` (`available_memory`), for `rows`
    batch rows of `frames` frames per denoiser call at `size_wh` (default: the backbone's native frame
    count and size); "sequential" (the least memory) when none does."""
    defaults = backbone.defaults
    activations = activation_bytes(backbone, frames=frames or defaults.num_frames, size_wh=size_wh or defaults.size_wh,
                                   rows=rows, decode_chunk_size=decode_chunk_size)
    peaks = policy_peaks(backbone.modules(), *activations)
    policy = next((p for p in OFFLOAD_POLICIES if peaks[p] <= available_bytes), "sequential")
    logger.info("memory: %s needs %s GiB (none / model / sequential); offload policy %s with %.1f GiB available",
                backbone.name, " / ".join(f"{peaks[p] / 2**30:.1f}" for p in OFFLOAD_POLICIES), policy,
                available_bytes / 2**30)
    return policy


@dataclass(frozen=True)
class ActivationProfile:
    """A backbone's peak activation bytes per element and per byte of the weight dtype, measured on
    its real architecture (benchmarks/memory_table.py); linear in rows, frames and pixels, since
    attention runs as a fused kernel (fp16 on any CUDA GPU, bf16 from compute capability 8.0)."""

    unet: float  # one denoiser call, per row x latent frame x latent pixel
    vae: float  # one VAE encode or decode, per frame x pixel
    # rows one at a time (`Backbone.one_row_at_a_time`): the source row's injected Q and K of one
    # block, held while the edit rows run it, per latent frame x latent pixel
    held_source_row: float = 0.0


def activation_bytes(backbone, *, frames: int, size_wh: tuple[int, int], rows: int,
                     decode_chunk_size: int = 1) -> tuple[int, int]:
    """(denoiser, VAE) peak activation bytes of a run of `backbone` on `frames` video frames per
    denoiser call (the window length with temporal windows) at `size_wh`, `rows` batch rows per
    call (run one at a time when the backbone does, plus the source row's Q/K held meanwhile)."""
    profile, itemsize = backbone.activation_profile, backbone.dtype.itemsize
    if profile is None:  # not measured for this family: the estimates count the weights only
        return 0, 0
    width, height = size_wh
    latent_frames = (frames - 1) // backbone.defaults.frame_stride + 1
    latent_elements = latent_frames * (width // backbone.vae_scale_factor) * (height // backbone.vae_scale_factor)
    if backbone.one_row_at_a_time:
        denoiser = (profile.unet + profile.held_source_row) * latent_elements
    else:
        denoiser = profile.unet * rows * latent_elements
    return int(denoiser * itemsize), int(profile.vae * max(1, decode_chunk_size) * width * height * itemsize)


def standalone_available_memory(device: torch.device) -> int | None:
    """`available_memory` without a host to unload anything: CUDA's free memory as the driver reports
    it (other processes' use taken off) less the engine's reserve; None where there is no device
    memory to fit (the CPU, or a device torch cannot measure)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return available_memory(torch.cuda.mem_get_info(execution_device(device))[0])


# ---------------------------------------------------------------------------------------------- out of memory

OUT_OF_MEMORY_ADVICE = (
    "To lower peak memory: load the model with offload 'model' or 'sequential' (node memory mode, CLI --offload), "
    "use fp16/bf16 weights, edit fewer frames, use temporal windows (node window_length, CLI --window 16), "
    "choose a smaller working size, or decode fewer frames at once (decode chunk size 1)"
)
# allocation failures that libraries report in their own words
OUT_OF_MEMORY_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                          "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE", "HIPBLAS_STATUS_ALLOC_FAILED")


class OutOfMemory(AnyV2VOutOfMemory, torch.OutOfMemoryError):
    """The error `guard_out_of_memory` raises: an AnyV2VOutOfMemory that hosts also recognise as
    torch's (ComfyUI then unloads its own models too); errors.py stays free of torch."""


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (CUDA, XPU), or a RuntimeError saying so (MPS, ROCm, cuBLAS/cuDNN workspaces)."""
    if isinstance(error, AnyV2VOutOfMemory):
        return False
    text = str(error).lower()
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(message.lower() in text for message in OUT_OF_MEMORY_MESSAGES))


def release_memory() -> None:
    """Return cached accelerator blocks to the driver once the tensors of a failed step are gone."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class guard_out_of_memory(ContextDecorator):
    """Turn an out-of-memory error inside the block into `AnyV2VOutOfMemory`, after freeing memory.

    Inner context managers (the injection hooks) have already restored the model when the error
    reaches this guard. The failed step's tensors stay alive as long as the traceback's frames
    do, so their locals are cleared before the cache is emptied; the new error keeps only the
    original message.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def __enter__(self) -> "guard_out_of_memory":
        return self

    def __exit__(self, error_type, error, tb) -> bool:
        if error is None or not is_out_of_memory(error):
            return False
        detail = (str(error).strip().splitlines() or ["out of memory"])[0][:300]
        traceback.clear_frames(tb)
        release_memory()
        raise OutOfMemory(f"out of memory during {self.stage} ({detail}). {OUT_OF_MEMORY_ADVICE}") from None
