"""Loading an image-to-video backbone safely.

Rules: safetensors only unless the caller opts in to pickle weights (`allow_pickle=True`, and
even then transformers/diffusers load them without executing code where they can); never
`trust_remote_code`; no network unless `source` is a Hugging Face repo id given on purpose.
Every check that needs no weights runs before any weight is read.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch

from .backbones.base import Backbone, BackboneDefaults
from .errors import AnyV2VError, ModelLoadError
from .memory import OFFLOAD_POLICIES, auto_policy, available_memory, device_free_memory

logger = logging.getLogger("AnyV2V")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")

# pipeline class in model_index.json -> backbone name
PIPELINE_CLASSES = {
    "I2VGenXLPipeline": "i2vgen-xl",
    "ConditionalAnimationPipeline": "consisti2v",  # TIGER-Lab/ConsistI2V
    "ConditionalVideoEditingPipeline": "consisti2v",  # AnyV2V's copy of it
}
WAN_BACKBONES = ("wan2.1-i2v", "wan2.2-i2v-a14b", "wan2.2-ti2v")
BACKBONES = ("i2vgen-xl", "consisti2v", "seine", *WAN_BACKBONES)
WAN_OPTIONS = {"shift", "attention_blocks"}  # load options only Wan backbones take

# component -> (subfolder, weight file stem); tokenizer, feature_extractor and scheduler hold no weights
I2VGENXL_COMPONENTS = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "image_encoder": "model",
    "tokenizer": None,
    "feature_extractor": None,
    "scheduler": None,
}
CONFIG_FILES = {"tokenizer": "tokenizer_config.json", "feature_extractor": "preprocessor_config.json",
                "image_processor": "preprocessor_config.json", "scheduler": "scheduler_config.json"}


def wan_components(folder: Path) -> dict[str, str | None]:
    """The component folders a Wan folder must hold (the experts and the CLIP parts it declares)."""
    from .backbones.wan import inspect_wan_folder

    info = inspect_wan_folder(folder, read_model_index(folder))
    components: dict[str, str | None] = {name: "diffusion_pytorch_model" for name in info.experts}
    components.update(vae="diffusion_pytorch_model", text_encoder="model", tokenizer=None, scheduler=None)
    if info.image_encoder:
        components.update(image_encoder="model", image_processor=None)
    return components


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


def resolve_source(source: str | os.PathLike, *, fp16_weights_only: bool = False) -> Path:
    """A local folder, or a Hugging Face repo id downloaded (safetensors and configs only).

    `fp16_weights_only` downloads just the `*.fp16.safetensors` weights where the repo has them
    (I2VGen-XL: 5 GB instead of 15 GB with its fp32 copies); repos without them download whole.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; pass the model folder that contains model_index.json")
        return path
    text = str(source)
    if not REPO_ID.match(text):
        raise ModelLoadError(f"model folder {path} does not exist; pass a diffusers model folder or a repo id like ali-vilab/i2vgen-xl")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelLoadError(f"{text} is not a local folder and HF_HUB_OFFLINE=1 forbids downloading it; "
                             "download it once (huggingface-cli download) and pass the folder")
    import huggingface_hub

    configs = ["*.json", "*.txt", "*.model"]
    try:
        weights = ["*.safetensors"]
        if fp16_weights_only and any(f.endswith(".fp16.safetensors") for f in huggingface_hub.list_repo_files(text)):
            weights = ["*.fp16.safetensors"]
        logger.info("downloading %s (%s and configs) from the Hugging Face Hub", text, weights[0])
        return Path(huggingface_hub.snapshot_download(text, allow_patterns=configs + weights))
    except Exception as error:  # the hub raises many types; the user needs one message
        raise ModelLoadError(f"could not download {text}: {error}") from None


def read_model_index(folder: Path) -> dict:
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelLoadError(f"{folder} has no model_index.json: it is not a diffusers model folder "
                             "(download the whole repository, e.g. huggingface-cli download ali-vilab/i2vgen-xl --local-dir ...)")
    try:
        return json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{index_file} is not valid JSON ({error}); download it again") from None


def detect_backbone(folder: Path) -> str:
    """The backbone in a folder: a SEINE checkpoint beside SD-1.4 components, else model_index.json's class."""
    from .backbones.seine import find_seine_layout

    if find_seine_layout(folder) is not None:
        return "seine"
    pipeline_class = read_model_index(folder).get("_class_name")
    if pipeline_class == "StableDiffusionPipeline":
        raise ModelLoadError(
            f"{folder} is a Stable Diffusion folder, not an image-to-video model. For SEINE, put seine.pt (or the "
            "converted seine.safetensors) in a folder with this one as its stable-diffusion-v1-4/ subfolder"
        )
    if pipeline_class in ("WanImageToVideoPipeline", "WanPipeline"):
        from .backbones.wan import inspect_wan_folder

        return inspect_wan_folder(folder, read_model_index(folder)).kind
    if pipeline_class not in PIPELINE_CLASSES:
        raise ModelLoadError(
            f"{folder} holds a {pipeline_class} model; AnyV2V needs an image-to-video backbone "
            f"({', '.join(BACKBONES)}): point it at an I2VGen-XL folder such as models/diffusers/i2vgen-xl"
        )
    return PIPELINE_CLASSES[pipeline_class]


def pick_variant(folder: Path, variant: str | None, dtype: torch.dtype, denoiser: str = "unet") -> str | None:
    """Resolve variant="auto": the fp16 files where they are all the folder has (the recommended
    download) or where half precision is wanted anyway; else the full-precision files."""
    if variant != "auto":
        return variant
    weights = folder / denoiser / "diffusion_pytorch_model"
    has_full = any(Path(f"{weights}{suffix}").is_file() for suffix in (".safetensors", ".safetensors.index.json"))
    has_fp16 = any(Path(f"{weights}.fp16{suffix}").is_file() for suffix in (".safetensors", ".safetensors.index.json"))
    return "fp16" if has_fp16 and (dtype.itemsize == 2 or not has_full) else None


def check_components(folder: Path, components: dict[str, str | None], *, variant: str | None, allow_pickle: bool) -> bool:
    """Validate the component folders; returns True when the weights are safetensors."""
    problems, pickled = [], []
    for component, stem in components.items():
        sub = folder / component
        if not sub.is_dir():
            problems.append(f"{component}/ is missing")
            continue
        if stem is None:
            if not (sub / CONFIG_FILES[component]).is_file():
                problems.append(f"{component}/{CONFIG_FILES[component]} is missing")
            continue
        if not (sub / "config.json").is_file():
            problems.append(f"{component}/config.json is missing")
        names = [stem + (f".{variant}" if variant else "")]
        safetensors = any((sub / f"{name}.safetensors").is_file() or (sub / f"{name}.safetensors.index.json").is_file()
                          for name in names)
        if safetensors:
            continue
        if any((sub / f"{name}{suffix}").is_file() for name in names for suffix in PICKLE_SUFFIXES):
            pickled.append(component)
        else:
            wanted = f"{names[0]}.safetensors"
            problems.append(f"{component}/{wanted} is missing" + (" (drop --variant?)" if variant else ""))
    if problems:
        raise ModelLoadError(f"model folder {folder} is incomplete: {'; '.join(problems)}; download the missing files")
    if pickled and not allow_pickle:
        raise ModelLoadError(
            f"{', '.join(pickled)} in {folder} have only pickle weights (.bin), which can run code when loaded; "
            "convert them to safetensors, or opt in with allow_pickle=True (CLI: --allow-pickle) if you trust the files"
        )
    return not pickled


def backbone_class(name: str) -> type[Backbone]:
    """The class of a backbone, without loading any weights."""
    if name in WAN_BACKBONES:
        from .backbones.wan import WanBackbone, WanTI2VBackbone

        return WanTI2VBackbone if name == "wan2.2-ti2v" else WanBackbone
    if name == "consisti2v":
        from .backbones.consisti2v import ConsistI2VBackbone as backbone
    elif name == "seine":
        from .backbones.seine import SeineBackbone as backbone
    else:
        from .backbones.i2vgen_xl import I2VGenXLBackbone as backbone
    return backbone


def backbone_defaults(name: str, folder: Path | None = None) -> BackboneDefaults:
    """The reference settings of a backbone (of the model in `folder`, where given), without loading any weights."""
    if name in WAN_BACKBONES:
        from .backbones.wan import WAN_DEFAULTS, wan_defaults

        return WAN_DEFAULTS[name] if folder is None else wan_defaults(folder)
    return backbone_class(name).defaults


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
    if name not in BACKBONES:
        raise ModelLoadError(f"backbone {name!r} is not supported; use one of: {', '.join(BACKBONES)}")
    if one_row_at_a_time and name not in WAN_BACKBONES:
        raise ModelLoadError(f"{name} cannot run its rows one at a time (the Wan transformers can); run them batched")
    if name not in WAN_BACKBONES and set(options) & WAN_OPTIONS:
        raise ModelLoadError(f"{', '.join(sorted(set(options) & WAN_OPTIONS))} apply to Wan (rectified-flow) models; "
                             f"{folder} holds {name}")
    torch_dtype = resolve_dtype(dtype, device, backbone_class(name).half_dtypes)
    load_device = torch.device("cpu")  # the policy places the weights: the host copies are these
    try:
        if name == "consisti2v":
            from .backbones.consisti2v import ConsistI2VBackbone

            loaded = ConsistI2VBackbone.from_folder(folder, dtype=torch_dtype, device=load_device,
                                                    allow_pickle=allow_pickle, **options)
        elif name == "seine":
            from .backbones.seine import find_seine_layout, load_seine

            layout = find_seine_layout(folder)
            if layout is None:
                raise ModelLoadError(f"{folder} holds no seine.pt or seine.safetensors; put the SEINE checkpoint there")
            loaded = load_seine(*layout, dtype=torch_dtype, device=load_device, allow_pickle=allow_pickle, **options)
        elif name in WAN_BACKBONES:
            from .backbones.wan import load_wan

            variant = pick_variant(folder, variant, torch_dtype, denoiser="transformer")
            only_safetensors = check_components(folder, wan_components(folder), variant=variant,
                                                allow_pickle=allow_pickle)
            loaded = load_wan(folder, read_model_index(folder), dtype=torch_dtype, device=load_device, variant=variant,
                              use_safetensors=True if only_safetensors else None, **options)
        else:
            from .backbones.i2vgen_xl import I2VGenXLBackbone

            variant = pick_variant(folder, variant, torch_dtype)
            only_safetensors = check_components(folder, I2VGENXL_COMPONENTS, variant=variant, allow_pickle=allow_pickle)
            # None lets diffusers/transformers prefer safetensors per component and fall back to the allowed pickles
            loaded = I2VGenXLBackbone.from_folder(folder, dtype=torch_dtype, device=load_device, variant=variant,
                                                  use_safetensors=True if only_safetensors else None, **options)
    except AnyV2VError:  # already says what to do
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"could not load the model in {folder}: {error}") from error
    check_injection_targets(loaded, folder)
    loaded.one_row_at_a_time = one_row_at_a_time
    if offload == "auto":  # nothing to fit off an accelerator; on CUDA, into the memory free now
        offload = "none" if device.type != "cuda" else auto_policy(loaded, available_memory(device_free_memory(device)))
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
