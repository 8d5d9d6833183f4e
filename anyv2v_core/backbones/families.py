"""The backbone families, registered once: which backbones each builds, how its model folders are
recognised, how it loads, its defaults and the load options it takes.

The loader (`loading.load_backbone`), the CLI's help, the nodes' model lists and the tests iterate
over `FAMILIES`; a new family is a new entry here (and its module under `backbones/`). Importing
this module is cheap: each entry imports its backbone module when it is asked to load or describe
a backbone.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelLoadError
from .folders import check_components, pick_variant, read_model_index

if TYPE_CHECKING:
    import torch

    from .base import Backbone, BackboneDefaults


class BackboneFamily(ABC):
    """One family of backbones. A folder is this family's when it holds one of `marker_files`
    (checked first, before model_index.json is read) or when its model_index.json declares one of
    `pipeline_classes`; `name_in` then says which of the family's backbones it holds."""

    names: tuple[str, ...]  # the backbones it builds (`Backbone.name`)
    label: str  # how messages name its models
    pipeline_classes: tuple[str, ...] = ()  # model_index.json `_class_name`s of its folders
    marker_files: tuple[str, ...] = ()  # files that make a folder the family's without a model_index.json
    load_options: frozenset[str] = frozenset()  # `load_backbone` options only this family takes
    rows_one_at_a_time: bool = False  # whether its backbones can run a step's rows one at a time

    def find_layout(self, folder: Path) -> object | None:
        """Where the parts of a folder recognised by `marker_files` are, or None where it has none of them."""
        return None

    def name_in(self, folder: Path, model_index: dict) -> str:
        """The backbone a folder of this family holds (read from its configs, no weights)."""
        return self.names[0]

    @abstractmethod
    def backbone_class(self, name: str) -> type[Backbone]:
        """The class of backbone `name`, without loading any weights."""

    def defaults(self, name: str, folder: Path | None = None) -> BackboneDefaults:
        """The reference settings of backbone `name` (of the model in `folder`, where given)."""
        return self.backbone_class(name).defaults

    @abstractmethod
    def load(self, folder: Path, *, dtype: torch.dtype, device: torch.device, variant: str | None,
             allow_pickle: bool, **options) -> Backbone:
        """The backbone in `folder`, its weights read onto `device` in `dtype`, in eval mode."""


class I2VGenXLFamily(BackboneFamily):
    names = ("i2vgen-xl",)
    label = "I2VGen-XL"
    pipeline_classes = ("I2VGenXLPipeline",)
    # component -> weight file stem; tokenizer, feature_extractor and scheduler hold no weights
    components = {
        "unet": "diffusion_pytorch_model",
        "vae": "diffusion_pytorch_model",
        "text_encoder": "model",
        "image_encoder": "model",
        "tokenizer": None,
        "feature_extractor": None,
        "scheduler": None,
    }

    def backbone_class(self, name: str) -> type[Backbone]:
        from .i2vgen_xl import I2VGenXLBackbone

        return I2VGenXLBackbone

    def load(self, folder, *, dtype, device, variant, allow_pickle, **options):
        from .i2vgen_xl import I2VGenXLBackbone

        variant = pick_variant(folder, variant, dtype)
        only_safetensors = check_components(folder, self.components, variant=variant, allow_pickle=allow_pickle)
        # None lets diffusers/transformers prefer safetensors per component and fall back to the allowed pickles
        return I2VGenXLBackbone.from_folder(folder, dtype=dtype, device=device, variant=variant,
                                            use_safetensors=True if only_safetensors else None, **options)


class ConsistI2VFamily(BackboneFamily):
    names = ("consisti2v",)
    label = "ConsistI2V"
    pipeline_classes = ("ConditionalAnimationPipeline",  # TIGER-Lab/ConsistI2V
                        "ConditionalVideoEditingPipeline")  # AnyV2V's copy of it
    load_options = frozenset({"source_branch_first_frame"})

    def backbone_class(self, name: str) -> type[Backbone]:
        from .consisti2v import ConsistI2VBackbone

        return ConsistI2VBackbone

    def load(self, folder, *, dtype, device, variant, allow_pickle, **options):
        from .consisti2v import ConsistI2VBackbone

        return ConsistI2VBackbone.from_folder(folder, dtype=dtype, device=device, allow_pickle=allow_pickle, **options)


class SeineFamily(BackboneFamily):
    """SEINE: its checkpoint beside (or above, in `stable-diffusion-v1-4/`) the SD-1.4 components
    its UNet layout, VAE and text encoder come from."""

    names = ("seine",)
    label = "SEINE"
    marker_files = ("seine.safetensors", "seine.pt")
    # a bare SD-1.4 folder: SEINE's components without its checkpoint (`name_in` says where it goes)
    pipeline_classes = ("StableDiffusionPipeline",)
    sd_subfolder = "stable-diffusion-v1-4"

    def find_layout(self, folder: str | os.PathLike) -> tuple[Path, Path] | None:
        """(SD-1.4 folder, SEINE checkpoint) of a SEINE model folder, or None if `folder` is not one.

        A SEINE model folder holds `seine.safetensors` or `seine.pt` and the SD-1.4 components, either
        beside the checkpoint or in a `stable-diffusion-v1-4/` subfolder:

            seine/                         seine/
              seine.pt                       seine.safetensors
              stable-diffusion-v1-4/         vae/ text_encoder/ tokenizer/ scheduler/ unet/config.json
                vae/ text_encoder/ ...
        """
        folder = Path(folder)
        checkpoint = next((folder / name for name in self.marker_files if (folder / name).is_file()), None)
        if checkpoint is None:
            return None
        for sd_folder in (folder / self.sd_subfolder, folder):
            if (sd_folder / "unet" / "config.json").is_file() and (sd_folder / "vae").is_dir():
                return sd_folder, checkpoint
        raise ModelLoadError(
            f"{folder} holds a SEINE checkpoint ({checkpoint.name}) but no Stable Diffusion 1.4 components: put the "
            f"CompVis/stable-diffusion-v1-4 folder (vae/, text_encoder/, tokenizer/, scheduler/, unet/config.json) "
            f"in {folder / self.sd_subfolder}"
        )

    def name_in(self, folder: Path, model_index: dict) -> str:
        raise ModelLoadError(
            f"{folder} is a Stable Diffusion folder, not an image-to-video model. For SEINE, put seine.pt (or the "
            "converted seine.safetensors) in a folder with this one as its stable-diffusion-v1-4/ subfolder"
        )

    def backbone_class(self, name: str) -> type[Backbone]:
        from .seine import SeineBackbone

        return SeineBackbone

    def load(self, folder, *, dtype, device, variant, allow_pickle, **options):
        from .seine import load_seine

        layout = self.find_layout(folder)
        if layout is None:
            raise ModelLoadError(f"{folder} holds no seine.pt or seine.safetensors; put the SEINE checkpoint there")
        return load_seine(*layout, dtype=dtype, device=device, allow_pickle=allow_pickle, **options)


class WanFamily(BackboneFamily):
    """Wan 2.1 I2V, Wan 2.2 I2V A14B and Wan 2.2 TI2V 5B: one diffusers layout, told apart by their
    configs (`wan.inspect_wan_folder`)."""

    names = ("wan2.1-i2v", "wan2.2-i2v-a14b", "wan2.2-ti2v")
    label = "Wan (rectified-flow)"
    pipeline_classes = ("WanImageToVideoPipeline", "WanPipeline")
    load_options = frozenset({"shift", "attention_blocks"})
    rows_one_at_a_time = True

    def name_in(self, folder: Path, model_index: dict) -> str:
        from .wan import inspect_wan_folder

        return inspect_wan_folder(folder, model_index).kind

    def backbone_class(self, name: str) -> type[Backbone]:
        from .wan import WanBackbone, WanTI2VBackbone

        return WanTI2VBackbone if name == "wan2.2-ti2v" else WanBackbone

    def defaults(self, name: str, folder: Path | None = None) -> BackboneDefaults:
        from .wan import WAN_DEFAULTS, wan_defaults

        return WAN_DEFAULTS[name] if folder is None else wan_defaults(folder)

    def load(self, folder, *, dtype, device, variant, allow_pickle, **options):
        from .wan import inspect_wan_folder, load_wan

        model_index = read_model_index(folder)
        variant = pick_variant(folder, variant, dtype, denoiser="transformer")
        only_safetensors = check_components(folder, inspect_wan_folder(folder, model_index).components,
                                            variant=variant, allow_pickle=allow_pickle)
        return load_wan(folder, model_index, dtype=dtype, device=device, variant=variant,
                        use_safetensors=True if only_safetensors else None, **options)


I2VGEN_XL, CONSISTI2V, SEINE, WAN = I2VGenXLFamily(), ConsistI2VFamily(), SeineFamily(), WanFamily()
FAMILIES: tuple[BackboneFamily, ...] = (I2VGEN_XL, CONSISTI2V, SEINE, WAN)
BACKBONES = tuple(name for family in FAMILIES for name in family.names)
# files that make a folder a model: a diffusers pipeline's index, or a family's own marker
MODEL_MARKERS = ("model_index.json", *(marker for family in FAMILIES for marker in family.marker_files))


def family_of(name: str) -> BackboneFamily:
    """The family that builds backbone `name`."""
    for family in FAMILIES:
        if name in family.names:
            return family
    raise ModelLoadError(f"backbone {name!r} is not supported; use one of: {', '.join(BACKBONES)}")


def detect_backbone(folder: Path) -> str:
    """The backbone in a folder: a family's marker files (SEINE's checkpoint), else model_index.json's class."""
    for family in FAMILIES:
        if family.find_layout(folder) is not None:
            return family.names[0]
    model_index = read_model_index(folder)
    pipeline_class = model_index.get("_class_name")
    for family in FAMILIES:
        if pipeline_class in family.pipeline_classes:
            return family.name_in(folder, model_index)
    raise ModelLoadError(
        f"{folder} holds a {pipeline_class} model; AnyV2V needs an image-to-video backbone "
        f"({', '.join(BACKBONES)}): point it at an I2VGen-XL folder such as models/diffusers/i2vgen-xl"
    )


def backbone_class(name: str) -> type[Backbone]:
    """The class of a backbone, without loading any weights."""
    return family_of(name).backbone_class(name)


def backbone_defaults(name: str, folder: Path | None = None) -> BackboneDefaults:
    """The reference settings of a backbone (of the model in `folder`, where given), without loading any weights."""
    return family_of(name).defaults(name, folder)
