"""LoadI2VBackbone: an image-to-video model from ComfyUI's diffusers folders (or a Hub repo id)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from . import host

BACKBONE = "ANYV2V_BACKBONE"
DTYPES = ("auto", "fp16", "bf16", "fp32")
# memory choice -> (engine offload policy while a node runs, weights stay on the GPU between nodes).
# Weights left on the GPU are ComfyUI's to evict when it needs the memory (host.on_compute_device).
MEMORY_MODES = {
    "auto": ("auto", True),
    "keep loaded": ("none", True),
    "offload after each node": ("none", False),
    "model offload (less VRAM)": ("model", False),
    "sequential offload (least VRAM, slowest)": ("sequential", False),
}
I2VGENXL_HINT = host.download_hint("ali-vilab/i2vgen-xl", "i2vgen-xl", '"*.json" "*.txt" "*.fp16.safetensors"')


@dataclass
class BackboneHandle:
    """What flows on an ANYV2V_BACKBONE link: the engine backbone and the user's memory policy."""

    backbone: object  # anyv2v_core.backbones.base.Backbone
    offload: str  # the engine's offload policy while a node runs: none, model, sequential or auto
    keep_loaded: bool
    source: str
    patcher: object = None  # the backbone in ComfyUI's model management (host.backbone_patcher), made on first use


def check_repo_id(repo_id: str) -> str | None:
    """An error message for a repo id that is not one (None when it is fine)."""
    from anyv2v_core.backbones.folders import REPO_ID

    if not REPO_ID.match(repo_id) or ".." in repo_id:
        return f"repo_id {repo_id!r} is not a Hugging Face repo id like ali-vilab/i2vgen-xl; leave it empty to use the model list"
    if os.path.exists(repo_id):
        return (f"repo_id {repo_id!r} names a local folder; put local models under ComfyUI/models/diffusers/ "
                "and pick them in the model list")
    return None


class LoadI2VBackbone:
    DESCRIPTION = (
        "Loads the image-to-video model AnyV2V edits with (I2VGen-XL, the paper's main model; ConsistI2V or "
        "SEINE also work) from ComfyUI's models/diffusers folders, or from the Hugging Face Hub when a repo id "
        "is given. Only safetensors weights are loaded and no remote code runs."
    )
    CATEGORY = "AnyV2V/loaders"
    RETURN_TYPES = (BACKBONE,)
    RETURN_NAMES = ("backbone",)
    OUTPUT_TOOLTIPS = ("The loaded image-to-video model, for DDIMInvertVideo and InjectedSampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (host.model_options(), {
                    "tooltip": "An image-to-video model folder under ComfyUI/models/diffusers: I2VGen-XL or ConsistI2V "
                               "(diffusers format, with a model_index.json) or SEINE (seine.safetensors beside its "
                               "stable-diffusion-v1-4 folder). For I2VGen-XL, " + I2VGENXL_HINT + ". Folders with only "
                               "the fp16 weights are fine."}),
                "dtype": (DTYPES, {
                    "default": "auto",
                    "tooltip": "Weight precision. auto: fp16 on a GPU where ComfyUI uses fp16 (the references ran "
                               "fp16; bf16 where ComfyUI allows only that), fp32 on the CPU or with --force-fp32. "
                               "bf16 needs an RTX 30xx / A100 or newer. fp32 is the exact reference."}),
                "memory": (tuple(MEMORY_MODES), {
                    "default": "auto",
                    "tooltip": "auto: the fastest mode that fits this GPU for each run (its frames and size); the "
                               "model stays loaded and ComfyUI unloads it when another model needs the room. keep "
                               "loaded: the whole model on the GPU, kept there the same way. offload after each node: "
                               "the whole model runs on the GPU, then goes back to the CPU. model offload: one "
                               "component (UNet, VAE, encoders) on the GPU at a time. sequential offload: the UNet "
                               "streamed block by block (for small GPUs; much slower). The text and image encoders "
                               "leave the GPU before the UNet runs in every mode."}),
            },
            "optional": {
                "repo_id": ("STRING", {
                    "default": "",
                    "tooltip": "Optional Hugging Face repo id (e.g. ali-vilab/i2vgen-xl) to download and use instead of "
                               "the model list; needs internet. Leave empty to use the model list."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, model, repo_id=""):
        repo_id = (repo_id or "").strip()
        if repo_id:
            return check_repo_id(repo_id) or True
        from anyv2v_core.backbones.families import detect_backbone

        try:
            detect_backbone(Path(host.resolve_model_folder(model, I2VGENXL_HINT)))  # reads model_index.json only
        except ValueError as error:
            return str(error)
        return True

    def load(self, model, dtype, memory, repo_id=""):
        from anyv2v_core.errors import ModelLoadError
        from anyv2v_core.backbones.families import backbone_class, detect_backbone
        from anyv2v_core.loading import HALF_DTYPES, load_backbone, resolve_dtype

        repo_id = (repo_id or "").strip()
        if repo_id:
            problem = check_repo_id(repo_id)
            if problem:
                raise ModelLoadError(problem)
            source, half_dtypes = repo_id, HALF_DTYPES  # the family is known once downloaded; all share this order
        else:
            source = host.resolve_model_folder(model, I2VGENXL_HINT)
            half_dtypes = backbone_class(detect_backbone(Path(source))).half_dtypes
        offload, keep_loaded = MEMORY_MODES[memory]
        device = host.compute_device()
        torch_dtype = resolve_dtype(host.weight_dtype(dtype, device, half_dtypes), device, half_dtypes)  # checked for the GPU
        # read on the offload device; the nodes place the weights through ComfyUI's model management
        backbone = load_backbone(source, dtype=torch_dtype, device=host.offload_device())
        host.logger.info("loaded %s from %s (%s, memory %s)", backbone.name, source, backbone.dtype, memory)
        return (BackboneHandle(backbone=backbone, offload=offload, keep_loaded=keep_loaded, source=source),)


NODE_CLASS_MAPPINGS = {"LoadI2VBackbone": LoadI2VBackbone}
NODE_DISPLAY_NAME_MAPPINGS = {"LoadI2VBackbone": "AnyV2V Load I2V Backbone"}
