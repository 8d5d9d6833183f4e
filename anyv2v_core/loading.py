"""Loading an image-to-video backbone safely.

Rules: safetensors only unless the caller opts in to pickle weights (`allow_pickle=True`, and
even then transformers/diffusers load them without executing code where they can); never
`trust_remote_code`; no network unless `source` is a Hugging Face repo id given on purpose.
Every check that needs no weights runs before any weight is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .backbones.base import Backbone
from .backbones.families import FAMILIES, detect_backbone, family_of
from .backbones.folders import resolve_source
from .errors import AnyV2VError, ModelLoadError
from .memory import OFFLOAD_POLICIES, auto_policy, standalone_available_memory

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HALF_DTYPES = (torch.float16, torch.bfloat16)  # the UNet backbones' order of preference (Backbone.half_dtypes)
BF16_COMPUTE_CAPABILITY = (8, 0)  # Ampere: bf16 tensor cores; before it PyTorch emulates bf16
FP16_COMPUTE_CAPABILITY = (7, 0)  # Volta: fp16 tensor cores; Pascal computes fp16 no faster than fp32
# Turing cards without tensor cores whose fp16 gives NaN / black frames (the same cards ComfyUI's
# model management runs in fp32): GTX 16xx, MX450/550, the T400-T1200 workstation parts, CMP 30HX
BROKEN_FP16_GPUS = ("GTX 16", "1660", "1650", "1630", "MX450", "MX550", "T500", "T550", "T600", "T1000", "T1200",
                    "T2000", "CMP 30HX")


def runs_natively(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a CUDA GPU computes in `dtype` with its own kernels. `torch.cuda.is_bf16_supported()`
    also counts emulation (T4, V100, RTX 20xx, GTX 16xx/10xx), where bf16 is slow and attention gets
    no fused kernel; the compute capability tells them apart."""
    if dtype == torch.bfloat16:
        return torch.cuda.get_device_capability(device) >= BF16_COMPUTE_CAPABILITY
    return True


def fp16_is_broken(device: torch.device) -> bool:
    return any(name in torch.cuda.get_device_name(device) for name in BROKEN_FP16_GPUS)


def recommended(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether dtype "auto" may pick the half precision `dtype` on a CUDA GPU: bf16 where it runs
    natively, fp16 from Volta on (not on Pascal, nor on the cards whose fp16 is broken). The same
    rules ComfyUI's model management applies, so a model loads in one precision with or without it."""
    if dtype == torch.float16:
        return torch.cuda.get_device_capability(device) >= FP16_COMPUTE_CAPABILITY and not fp16_is_broken(device)
    return runs_natively(dtype, device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device,
                  half_dtypes: tuple[torch.dtype, ...] = HALF_DTYPES) -> torch.dtype:
    """The weight dtype for `device`.

    "auto": float32 except on a CUDA GPU, where it is the first of `half_dtypes` (a backbone
    family's preference, `Backbone.half_dtypes`) that `recommended` allows (fp16 from compute
    capability 7.0 except on GTX 16xx-class cards, bf16 from 8.0), float32 if none. An explicit bf16
    on an older GPU, or fp16 on a card whose fp16 is broken, is refused.
    """
    device = torch.device(device)
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return next((half for half in half_dtypes if recommended(half, device)), torch.float32)
    if not isinstance(dtype, torch.dtype) and dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is unknown; use auto, {', '.join(DTYPES)}")
    dtype = DTYPES.get(dtype, dtype)
    if dtype not in DTYPES.values():
        raise ModelLoadError(f"dtype {dtype} cannot run the model; use torch.float32, torch.float16 or torch.bfloat16")
    if device.type == "cuda" and not runs_natively(dtype, device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ModelLoadError(
            f"this GPU ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor}) does not support bf16 "
            "natively (that starts with compute capability 8.0): PyTorch would emulate it, slowly and without fused "
            "attention; use fp16 or auto")
    if device.type == "cuda" and dtype == torch.float16 and fp16_is_broken(device):
        raise ModelLoadError(f"fp16 gives NaN / black frames on this GPU ({torch.cuda.get_device_name(device)}); "
                             "use fp32 or auto")
    return dtype


def load_backbone(
    source: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    variant: str | None = "auto",
    allow_pickle: bool = False,
    backbone: str = "auto",
    offload: str = "none",
    one_row_at_a_time: bool = False,
    **options,
) -> Backbone:
    """Load an image-to-video backbone from a diffusers folder or a Hugging Face repo id, in eval mode.

    `backbone` is detected from model_index.json unless given; `dtype` "auto" follows the
    backbone's `half_dtypes` (see `resolve_dtype`); `variant` "auto" reads the fp16 files where the
    folder has only those or half precision is asked for; `offload` is a policy of `memory.py`
    ("none", "model", "sequential") or "auto" (the fastest that fits the device's free memory at the
    backbone's native size, `memory.auto_policy`); `one_row_at_a_time` runs the rows of each
    sampling step one at a time through the transformer's blocks (Wan); `options` go to that
    backbone's loader (ConsistI2V: source_branch_first_frame="edited"|"source"; Wan: shift=...,
    attention_blocks="all"|...). The weights are read on the CPU and placed on `device` by the
    policy, each component at its first call.
    """
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)  # before the download: whether the fp16 files are enough
    if offload not in (*OFFLOAD_POLICIES, "auto"):
        raise ModelLoadError(f"offload policy {offload!r} is unknown; use auto or one of {', '.join(OFFLOAD_POLICIES)}")
    wants_fp16_files = variant == "fp16" or (variant == "auto" and torch_dtype.itemsize == 2)
    folder = resolve_source(source, fp16_weights_only=wants_fp16_files)
    name = detect_backbone(folder) if backbone == "auto" else backbone
    family = family_of(name)
    if one_row_at_a_time and not family.rows_one_at_a_time:
        raise ModelLoadError(f"{name} cannot run its rows one at a time (the Wan transformers can); run them batched")
    for other in FAMILIES:
        foreign = (set(options) & other.load_options) - family.load_options
        if foreign:
            raise ModelLoadError(f"{', '.join(sorted(foreign))} apply to {other.label} models; {folder} holds {name}")
    torch_dtype = resolve_dtype(dtype, device, family.backbone_class(name).half_dtypes)
    load_device = torch.device("cpu")  # the policy places the weights: the host copies are these
    try:
        loaded = family.load(folder, dtype=torch_dtype, device=load_device, variant=variant, allow_pickle=allow_pickle,
                             **options)
    except AnyV2VError:  # already says what to do
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load the model in {folder}: {error}") from error
    check_injection_targets(loaded, folder)
    loaded.one_row_at_a_time = one_row_at_a_time
    if offload == "auto":  # nothing to fit off an accelerator; on CUDA, into the memory free now
        available = standalone_available_memory(device)
        offload = "none" if available is None else auto_policy(loaded, available)
    loaded.set_offload(offload, device)
    return loaded


def check_injection_targets(backbone: Backbone, folder: Path) -> None:
    """Refuse a UNet built unlike its backbone's architecture: AnyV2V's injection layers must exist in it."""
    from .injection import missing_layers

    missing = missing_layers(backbone.denoiser, backbone.injection_layers)
    if missing:
        raise ModelLoadError(
            f"the denoiser in {folder} has no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} "
            f"({len(missing)} of the layers AnyV2V injects {backbone.name} features into): its config is not "
            f"{backbone.name}'s architecture (a UNet's up_block_types, layers_per_block; a transformer's num_layers); "
            "use the original model's config and weights"
        )
