"""FirstFrameEditor: the source's first frame at the working size, edited or not.

AnyV2V edits a video by editing only its first frame with any image method; this node is where
that frame leaves and (optionally) comes back into the graph. In "passthrough" mode it only
gives the first frame at the working size, for any external image-editing graph to change. In
"instruct-pix2pix" mode it edits the frame itself with an InstructPix2Pix model (diffusers
format, from ComfyUI's diffusers folders), for users who have no editing graph.
"""

from __future__ import annotations

from . import host
from .inversion import RESIZE_POLICIES, RESIZE_TOOLTIP, size_inputs

PASSTHROUGH, INSTRUCT_PIX2PIX = "passthrough", "instruct-pix2pix"
MODES = (PASSTHROUGH, INSTRUCT_PIX2PIX)
IP2P_PIPELINE = "StableDiffusionInstructPix2PixPipeline"
# an SD-1.5 UNet on InstructPix2Pix's 3 rows and the VAE decode at 512x512 peak well under this (fp16)
IP2P_ACTIVATIONS_AT_512 = 2**30
IP2P_HINT = host.download_hint("timbrooks/instruct-pix2pix", "instruct-pix2pix",
                               '"*.json" "*.txt" "unet/*.safetensors" "vae/*.safetensors" "text_encoder/*.safetensors"')


def check_instruct_pix2pix_model(model: str) -> str:
    """The model's folder; raises ValueError saying how to get a usable InstructPix2Pix model."""
    hint = f"the {INSTRUCT_PIX2PIX} mode needs an InstructPix2Pix model: {IP2P_HINT}; or use the {PASSTHROUGH} mode"
    folder = host.resolve_model_folder(model, hint)
    class_name = host.model_class_name(folder)
    if class_name != IP2P_PIPELINE:
        raise ValueError(f"model {model!r} holds a {class_name} pipeline, not {IP2P_PIPELINE}; {hint}")
    return folder


class FirstFrameEditor:
    DESCRIPTION = (
        "Gives the source video's first frame at the working size. passthrough: edit it with any image graph "
        "(inpainting, style transfer, a hand-edited LoadImage...) and connect the result to InjectedSampler. "
        "instruct-pix2pix: edits it here from an instruction (e.g. 'turn the car red') with an InstructPix2Pix "
        "model from models/diffusers."
    )
    CATEGORY = "AnyV2V/first frame"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("first_frame",)
    OUTPUT_TOOLTIPS = ("The (edited) first frame at the working size: connect it to InjectedSampler's "
                       "edited_first_frame, or to your own image-editing nodes.",)
    FUNCTION = "edit"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "source_frames": ("IMAGE", {"tooltip": "The source video's frames; only the first one is used."}),
                **size_inputs(),
                "resize": (RESIZE_POLICIES, {"default": "stretch",
                                             "tooltip": RESIZE_TOOLTIP + " Use the same as DDIMInvertVideo."}),
                "mode": (MODES, {
                    "default": PASSTHROUGH,
                    "tooltip": "passthrough: no edit here (edit the frame with other nodes). instruct-pix2pix: edit it "
                               "with the instruction below."}),
                "instruction": ("STRING", {"default": "", "multiline": True,
                                           "tooltip": "instruct-pix2pix only: the edit, as an instruction "
                                                      "(e.g. 'make it a watercolor painting')."}),
                "model": (host.model_options(), {
                    "tooltip": "instruct-pix2pix only: an InstructPix2Pix diffusers folder under "
                               "ComfyUI/models/diffusers; " + IP2P_HINT + "."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200,
                                  "tooltip": "instruct-pix2pix only: denoising steps (20-50)."}),
                "image_guidance": ("FLOAT", {"default": 1.5, "min": 1.0, "max": 5.0, "step": 0.05,
                                             "tooltip": "instruct-pix2pix only: how closely to follow the original "
                                                        "frame (higher = smaller edit)."}),
                "guidance": ("FLOAT", {"default": 7.5, "min": 1.0, "max": 30.0, "step": 0.1,
                                       "tooltip": "instruct-pix2pix only: how strongly to follow the instruction."}),
                "edit_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                      "tooltip": "instruct-pix2pix only: the noise seed of the edit; change it for "
                                                 "another variant. (Not named 'seed' on purpose: ComfyUI would "
                                                 "randomize it on every queue and re-run the video edit.)"}),
            }
        }

    # ComfyUI files a failed VALIDATE_INPUTS under every input the method takes: only mode and model here,
    # the inputs a model error is about. Width and height get ComfyUI's own min/max checks, each under its
    # input; the frontend snaps them to their step, and `edit` checks the rest before any model work.
    @classmethod
    def VALIDATE_INPUTS(cls, mode, model):
        if mode not in MODES:  # ComfyUI leaves the check of a combo that VALIDATE_INPUTS takes to it
            return f"mode {mode!r} is unknown; use {' or '.join(MODES)}"
        if mode == INSTRUCT_PIX2PIX:
            try:
                check_instruct_pix2pix_model(model)
            except ValueError as error:
                return str(error)
        return True

    def edit(self, source_frames, width, height, resize, mode, instruction, model, steps, image_guidance, guidance,
             edit_seed):
        from anyv2v_core.video import check_frames, prepare_first_frame

        first_frame = prepare_first_frame(check_frames(source_frames, "source frames")[:1], size_wh=(width, height),
                                          resize=resize)
        if mode == PASSTHROUGH:
            return (first_frame,)
        return (run_instruct_pix2pix(check_instruct_pix2pix_model(model), first_frame, instruction, steps=steps,
                                     image_guidance=image_guidance, guidance=guidance, seed=edit_seed),)


def run_instruct_pix2pix(folder: str, image, instruction: str, *, steps: int, image_guidance: float, guidance: float,
                         seed: int):
    """Edit one image [1, H, W, 3] with the InstructPix2Pix pipeline in `folder`; returns [1, H, W, 3] float 0..1.

    The pipeline is loaded for this call only and released afterwards, so it never holds GPU
    memory while the video model runs.
    """
    import torch
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    from anyv2v_core.errors import ModelLoadError
    from anyv2v_core.loading import HALF_DTYPES, resolve_dtype
    from anyv2v_core.memory import weight_bytes

    if not instruction.strip():
        raise ValueError(f"the {INSTRUCT_PIX2PIX} mode needs an instruction (e.g. 'make it snowy')")
    device = host.compute_device()
    try:
        pipeline = StableDiffusionInstructPix2PixPipeline.from_pretrained(
            folder, torch_dtype=resolve_dtype(host.weight_dtype("auto", device, HALF_DTYPES), device),
            use_safetensors=True, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the InstructPix2Pix model in {folder} (safetensors weights are "
                             f"required): {error}") from error
    weights = sum(weight_bytes(module) for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder))
    height, width = image.shape[1:3]
    host.free_device_memory(weights + IP2P_ACTIVATIONS_AT_512 * height * width // 512**2)  # ComfyUI frees what that needs
    pipeline.set_progress_bar_config(disable=True)
    report = host.progress_bar(steps)

    def on_step_end(_pipeline, step, _timestep, tensors):
        report(step + 1, steps)
        return tensors

    pixels = (image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    try:
        pipeline.to(device)
        result = pipeline(instruction, image=Image.fromarray(pixels), num_inference_steps=steps,
                          image_guidance_scale=image_guidance, guidance_scale=guidance,
                          generator=torch.Generator(device).manual_seed(seed), output_type="np",
                          callback_on_step_end=on_step_end).images  # [1, H, W, 3] float 0..1
    finally:
        del pipeline
        host.release_cached_memory()
    return torch.from_numpy(result).to(torch.float32).clamp(0, 1)


NODE_CLASS_MAPPINGS = {"FirstFrameEditor": FirstFrameEditor}
NODE_DISPLAY_NAME_MAPPINGS = {"FirstFrameEditor": "AnyV2V First Frame Editor"}
