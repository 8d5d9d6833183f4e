"""AnyV2V for Wan (rectified-flow video transformers), on the models a ComfyUI graph already loads.

- AnyV2VWanModel: a backbone from the core loaders' MODEL (+ the low-noise MODEL of Wan 2.2 A14B)
  and VAE; ComfyUI keeps placing and offloading them.
- AnyV2VFlowInvertVideo: inverts the source clip along the flow (first or second order); takes that
  backbone, or a Wan diffusers folder from LoadI2VBackbone. Outputs the inversion for
  CaptureFeatures, and the inverted latent as NOISE for any core sampler.
- AnyV2VWanSampler: the injected edit from the positive / negative CONDITIONING and the
  CLIP_VISION_OUTPUT the graph made, and the edited first frame; a LATENT for VAEDecode.

CaptureFeatures (attention_tau) sits between the two, as for the UNet backbones.
"""

from __future__ import annotations

from . import host
from .injection import FEATURES
from .inversion import INVERSION, RESIZE_POLICIES, RESIZE_TOOLTIP, SourceInversion, context_windows
from .loaders import BACKBONE, BackboneHandle

ORDERS = {"2 (midpoint, recommended)": 2, "1 (euler)": 1}
ROW_MODES = ("batched", "one at a time (less memory)")
COMFYUI_MANAGED = "comfyui"  # BackboneHandle.offload of a backbone whose weights ComfyUI places
WAN_SIZE_MULTIPLE = 16  # Wan 2.1 and 2.2 A14B; TI2V (32) is checked when the model is known


class InvertedNoise:
    """The inverted source latent as a NOISE for core samplers (SamplerCustomAdvanced): sampled from
    sigma 1 it regenerates the source, or, with other conditioning, edits it without injection."""

    seed = 0

    def __init__(self, latents) -> None:
        self.latents = latents  # [1, C, F', h, w], the model's latent space

    def generate_noise(self, input_latent):
        samples = input_latent["samples"]
        if tuple(samples.shape[-3:]) != tuple(self.latents.shape[-3:]):
            from anyv2v_core.errors import AnyV2VError

            raise AnyV2VError(f"the inverted noise is {list(self.latents.shape)} but the latent to sample is "
                              f"{list(samples.shape)}: use a latent of the inversion's frame count and size")
        return self.latents.to(samples.device, samples.dtype)


class AnyV2VWanModel:
    DESCRIPTION = (
        "AnyV2V's backbone from the Wan model your graph already loads (Load Diffusion Model: Wan 2.1 I2V, Wan 2.2 "
        "TI2V 5B, or Wan 2.2 I2V A14B's high-noise model with its low-noise model below), in any weight format "
        "ComfyUI runs, with its LoRAs and patches (e.g. ModelSamplingSD3's shift). ComfyUI keeps managing its memory."
    )
    CATEGORY = "AnyV2V/loaders"
    RETURN_TYPES = (BACKBONE,)
    RETURN_NAMES = ("backbone",)
    OUTPUT_TOOLTIPS = ("The Wan model as AnyV2V's backbone, for AnyV2V Flow Invert Video and AnyV2V Wan Sampler.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Wan image-to-video MODEL (UNETLoader), patched as you like. For Wan 2.2 "
                                               "I2V A14B: the high-noise expert."}),
                "vae": ("VAE", {"tooltip": "The model's VAE (wan_2.1_vae for Wan 2.1 and 2.2 A14B, wan2.2_vae for TI2V 5B)."}),
                "attention_blocks": ("STRING", {
                    "default": "all",
                    "tooltip": "Transformer blocks whose self-attention Q/K the source injects: all (default), early, "
                               "late, or indices like 0-9,20."}),
                "rows": (ROW_MODES, {
                    "default": ROW_MODES[0],
                    "tooltip": "How the source, negative and positive rows of a sampling step run: batched (fastest) or "
                               "one at a time through each block (a third of the activation memory: Wan 2.1 14B at "
                               "480p x 81 frames on a 24 GB GPU needs it with fp8 weights)."}),
            },
            "optional": {
                "model_low_noise": ("MODEL", {"tooltip": "Wan 2.2 I2V A14B only: the low-noise expert, used below the "
                                                         "boundary."}),
                "boundary": ("FLOAT", {"default": 0.9, "min": 0.0, "max": 1.0, "step": 0.005,
                                       "tooltip": "Wan 2.2 I2V A14B only: the sigma at which the low-noise expert takes "
                                                  "over, in inversion and sampling alike (the model's 0.9)."}),
            },
        }

    def build(self, model, vae, attention_blocks, rows, model_low_noise=None, boundary=0.9):
        from .comfy_wan import native_wan_backbone

        backbone = native_wan_backbone(model, vae, model_low_noise=model_low_noise, boundary=boundary,
                                       attention_blocks=attention_blocks)
        backbone.one_row_at_a_time = rows == ROW_MODES[1]
        return (BackboneHandle(backbone=backbone, offload=COMFYUI_MANAGED, keep_loaded=True, source="ComfyUI MODEL"),)


class AnyV2VFlowInvertVideo:
    DESCRIPTION = (
        "Inverts the source clip along a Wan model's flow, conditioned on its own first frame and an empty prompt, "
        "with no guidance. Runs once per video: a new prompt, edited frame or injection setting reuses it. Second "
        "order (two model calls per step) reconstructs the source far better than first order at the same cost."
    )
    CATEGORY = "AnyV2V/inversion"
    RETURN_TYPES = (INVERSION, "NOISE")
    RETURN_NAMES = ("inversion", "inverted_noise")
    OUTPUT_TOOLTIPS = ("The inverted source video, for CaptureFeatures.",
                       "The inverted latent as noise for any core sampler (SamplerCustomAdvanced) from sigma 1.")
    FUNCTION = "invert"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backbone": (BACKBONE, {"tooltip": "AnyV2V Wan Model, or LoadI2VBackbone with a Wan diffusers folder."}),
                "source_frames": ("IMAGE", {"tooltip": "The video to edit, as an IMAGE batch (frames on the batch axis)."}),
                "width": ("INT", {"default": 832, "min": 32, "max": 2048, "step": WAN_SIZE_MULTIPLE,
                                  "tooltip": "Working width: a multiple of 16 (32 for Wan 2.2 TI2V 5B). 832x480 for "
                                             "480p models, 1280x720 (TI2V: 1280x704) for 720p."}),
                "height": ("INT", {"default": 480, "min": 32, "max": 2048, "step": WAN_SIZE_MULTIPLE,
                                   "tooltip": "Working height: a multiple of 16 (32 for Wan 2.2 TI2V 5B)."}),
                "resize": (RESIZE_POLICIES, {"default": "stretch", "tooltip": RESIZE_TOOLTIP}),
                "frame_count": ("INT", {"default": 81, "min": 5, "max": 1025, "step": 4,
                                        "tooltip": "Frames to edit from the first: 4k + 1 (81 = 5 s at 16 fps; TI2V: "
                                                   "121 at 24 fps). The source must have that many."}),
                "fps": ("INT", {"default": 16, "min": 1, "max": 60,
                                "tooltip": "The clip's frame rate for the output video (Wan 2.1 / A14B: 16, TI2V: 24)."}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 200,
                                  "tooltip": "Inversion and sampling steps (one grid for both). At order 2 each step "
                                             "costs two model calls: 20 steps cost what a 40-step generation does."}),
                "order": (tuple(ORDERS), {"default": next(iter(ORDERS)),
                                         "tooltip": "Solver order of the inversion and of the sampler that follows it."}),
                "window_length": ("INT", {"default": 0, "min": 0, "max": 1025,
                                          "tooltip": "0: all frames at once. Otherwise temporal windows of this many "
                                                     "frames (4k + 1) for clips longer than the model's 81 (121)."}),
                "window_overlap": ("INT", {"default": 8, "min": 0, "max": 1024, "step": 4,
                                           "tooltip": "Frames shared by neighbouring windows, a multiple of 4."}),
            },
            "optional": {
                "empty_prompt": ("CONDITIONING", {
                    "tooltip": "AnyV2V Wan Model only: CLIPTextEncode of an empty text (the source branch's prompt)."}),
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "Wan 2.1 I2V on AnyV2V Wan Model: CLIPVisionEncode of the source's first frame."}),
            },
        }

    # ComfyUI files a VALIDATE_INPUTS refusal under every input the method takes: it takes the frame
    # count alone; sizes and windows are checked against the model in `invert`, before any model work.
    @classmethod
    def VALIDATE_INPUTS(cls, frame_count):
        if frame_count is not None and (frame_count - 1) % 4:
            return f"frame_count {frame_count} must be 4k + 1 for Wan (e.g. {max(5, (frame_count - 1) // 4 * 4 + 1)})"
        return True

    def invert(self, backbone, source_frames, width, height, resize, frame_count, fps, steps, order, window_length,
               window_overlap, empty_prompt=None, clip_vision_output=None):
        from anyv2v_core.errors import AnyV2VError
        from anyv2v_core.flow_schedule import FlowMatchingSchedule
        from anyv2v_core.inversion import run_inversion
        from anyv2v_core.plan import plan_inversion, video_frames_per_call
        from anyv2v_core.video import prepare_frames

        model = backbone.backbone
        if not isinstance(model.schedule, FlowMatchingSchedule):
            raise AnyV2VError(f"backbone: {model.name} is not a rectified-flow model; invert it with DDIMInvertVideo")
        windows = context_windows(window_length, window_overlap)
        frames = prepare_frames(source_frames, size_wh=(width, height), resize=resize, num_frames=frame_count)
        # before the conditioning is encoded
        plan = plan_inversion(model, frames, inversion_steps=steps, sampling_steps=steps, fps=fps, order=ORDERS[order],
                              windows=windows)
        source_row = None
        if backbone.offload == COMFYUI_MANAGED:
            if empty_prompt is None:
                raise AnyV2VError("empty_prompt: connect CLIPTextEncode of an empty text (the source branch's prompt)")
            (source_row,) = model.rows_for(frames[:1], empty_prompt, num_frames=frame_count,
                                           clip_vision_output=clip_vision_output)
        with host.on_compute_device(backbone, frames=video_frames_per_call(model, plan),
                                    size_wh=(width, height), rows=1) as running:
            inversion = run_inversion(running, plan, source_row=source_row, progress=host.progress_bar(steps))
        start = inversion.latent_at(plan.start)
        noise = InvertedNoise(running.video_latents(start, inversion.source_condition))
        source_wh = (int(source_frames.shape[2]), int(source_frames.shape[1]))
        return (SourceInversion(inversion=inversion, resize=resize, source_wh=source_wh), noise)


class AnyV2VWanSampler:
    DESCRIPTION = (
        "AnyV2V's injected edit on a Wan model: regenerates the clip from the inverted latent with your edited first "
        "frame and prompts, while the source branch's self-attention Q/K keep the original's layout and motion for "
        "the first attention_tau of the steps. Outputs a LATENT: VAEDecode -> CreateVideo (fps) -> SaveVideo."
    )
    CATEGORY = "AnyV2V/sampling"
    RETURN_TYPES = ("LATENT", "FLOAT")
    RETURN_NAMES = ("latent", "fps")
    OUTPUT_TOOLTIPS = ("The edited video's latent, for VAEDecode with the model's VAE.",
                       "The clip's frame rate (from AnyV2V Flow Invert Video), for CreateVideo.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backbone": (BACKBONE, {"tooltip": "The AnyV2V Wan Model that made the inversion."}),
                "features": (FEATURES, {"tooltip": "CaptureFeatures on the inversion (attention_tau sets the injection)."}),
                "positive": ("CONDITIONING", {"tooltip": "CLIPTextEncode of the edited video's description."}),
                "negative": ("CONDITIONING", {"tooltip": "CLIPTextEncode of what to avoid."}),
                "edited_first_frame": ("IMAGE", {"tooltip": "The first frame after your edit (any image graph). One image; "
                                                            "resized like the source frames if its size differs."}),
                "cfg": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance (Wan 2.1: 5, Wan 2.2 A14B: 3.5, TI2V: 5; 1 with "
                                             "distilled speed-up LoRAs)."}),
            },
            "optional": {
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "Wan 2.1 I2V: CLIPVisionEncode (clip_vision_h, crop none) of the edited first frame."}),
            },
        }

    def sample(self, backbone, features, positive, negative, edited_first_frame, cfg, clip_vision_output=None):
        from anyv2v_core.errors import AnyV2VError
        from anyv2v_core.plan import plan_sampling, video_frames_per_call
        from anyv2v_core.sampling import run_sampling
        from anyv2v_core.video import prepare_first_frame

        if backbone.offload != COMFYUI_MANAGED:
            raise AnyV2VError("backbone: this sampler takes the AnyV2V Wan Model's backbone; a model loaded with "
                              "LoadI2VBackbone samples with InjectedSampler (prompts as text)")
        if edited_first_frame.shape[0] != 1:
            raise AnyV2VError(f"edited_first_frame: one image expected, got a batch of {edited_first_frame.shape[0]}; "
                              "pick one (e.g. ImageFromBatch)")
        model, inversion = backbone.backbone, features.source.inversion
        first_frame = prepare_first_frame(edited_first_frame, size_wh=inversion.size_wh, resize=features.source.resize,
                                          source_wh=features.source.source_wh)
        plan = plan_sampling(model, inversion, first_frame, prompt="", negative_prompt="",
                             injection=features.injection_for(model), cfg=cfg, start_index=features.start_index)
        rows = model.rows_for(first_frame, positive, negative, num_frames=inversion.num_frames,
                              clip_vision_output=clip_vision_output)
        with host.on_compute_device(backbone, frames=video_frames_per_call(model, inversion),
                                    size_wh=inversion.size_wh, rows=3) as running:
            latents = run_sampling(running, inversion, plan, edit_rows=tuple(rows),
                                   progress=host.progress_bar(len(plan.steps)))
        return (running.latent_output(latents), float(inversion.fps))


NODE_CLASS_MAPPINGS = {"AnyV2VWanModel": AnyV2VWanModel, "AnyV2VFlowInvertVideo": AnyV2VFlowInvertVideo,
                       "AnyV2VWanSampler": AnyV2VWanSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"AnyV2VWanModel": "AnyV2V Wan Model (native)",
                              "AnyV2VFlowInvertVideo": "AnyV2V Flow Invert Video",
                              "AnyV2VWanSampler": "AnyV2V Wan Sampler (native)"}
