"""InjectedSampler: the edited video from the edited first frame, with the source's structure and motion."""

from __future__ import annotations

from . import host
from .injection import FEATURES
from .loaders import BACKBONE


SAMPLERS = ("auto", "ddim", "ddpm")
# The widgets' defaults: the backbone's reference settings (BackboneDefaults), whichever model is connected
MODEL_NEGATIVE_PROMPT = "(the model's default)"
MODEL_CFG = 0.0


class InjectedSampler:
    DESCRIPTION = (
        "Regenerates the clip from the edited first frame and the prompt with the image-to-video model, while "
        "the source branch's injected features keep the original structure and motion (AnyV2V). Sampling "
        "starts from the inverted source latents; with DDIM (I2VGen-XL's sampler) it is deterministic. Outputs "
        "the edited frames and their frame rate, ready for CreateVideo -> SaveVideo."
    )
    CATEGORY = "AnyV2V/sampling"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("frames", "fps")
    OUTPUT_TOOLTIPS = ("The edited video as an IMAGE batch, at the working size.",
                       "The frame rate the model generated the clip for (DDIMInvertVideo's fps).")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "backbone": (BACKBONE, {"tooltip": "The same model that made the inversion (LoadI2VBackbone)."}),
                "features": (FEATURES, {"tooltip": "The injection plan from CaptureFeatures."}),
                "edited_first_frame": ("IMAGE", {
                    "tooltip": "The first frame after your edit (FirstFrameEditor or any image graph). One image; "
                               "if its size differs from the working size it is resized with the same resize "
                               "policy as the source frames."}),
                "prompt": ("STRING", {"default": "", "multiline": True,
                                      "tooltip": "Describes the edited video (e.g. 'a car driving, in Van Gogh style')."}),
                "negative_prompt": ("STRING", {
                    "default": MODEL_NEGATIVE_PROMPT, "multiline": True,
                    "tooltip": f"What to avoid. {MODEL_NEGATIVE_PROMPT}: the connected model's reference negative "
                               "prompt (I2VGen-XL, ConsistI2V, SEINE: the AnyV2V paper's; Wan: none)."}),
                "cfg": ("FLOAT", {"default": MODEL_CFG, "min": 0.0, "max": 30.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale; 0: the connected model's reference scale "
                                             "(I2VGen-XL 9.0 as in the paper, Wan 2.1 5.0, Wan 2.2 A14B 3.5, TI2V 5.0)."}),
                "decode_chunk_size": ("INT", {"default": 1, "min": 1, "max": 128,
                                              "tooltip": "Frames the VAE decodes at once: 1 needs the least memory, "
                                                         "more can be faster on a large GPU."}),
                "sampler": (SAMPLERS, {"default": "auto",
                                       "tooltip": "auto: the model's reference sampler (DDIM for I2VGen-XL and "
                                                  "ConsistI2V, DDPM for SEINE). ddim is deterministic; ddpm adds "
                                                  "fresh noise at each step."}),
                "ddpm_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF,
                                      "tooltip": "Seed of the DDPM sampler's noise; DDIM has no noise and ignores it. "
                                                 "(Not named 'seed' on purpose: ComfyUI would randomize it on every "
                                                 "queue and re-run the edit.)"}),
            }
        }

    def sample(self, backbone, features, edited_first_frame, prompt, negative_prompt, cfg, decode_chunk_size,
               sampler, ddpm_seed):
        from anyv2v_core.plan import plan_sampling, video_frames_per_call
        from anyv2v_core.sampling import run_sampling
        from anyv2v_core.video import prepare_first_frame

        defaults = backbone.backbone.defaults
        cfg = defaults.cfg if cfg == MODEL_CFG else cfg
        negative_prompt = defaults.negative_prompt if negative_prompt == MODEL_NEGATIVE_PROMPT else negative_prompt
        inversion = features.source.inversion
        first_frame = prepare_first_frame(edited_first_frame, size_wh=inversion.size_wh, resize=features.source.resize,
                                          source_wh=features.source.source_wh)
        plan = plan_sampling(backbone.backbone, inversion, first_frame, prompt=prompt, negative_prompt=negative_prompt,
                             injection=features.injection_for(backbone.backbone), cfg=cfg,
                             start_index=features.start_index, sampler=None if sampler == "auto" else sampler,
                             seed=ddpm_seed)
        frames = video_frames_per_call(backbone.backbone, inversion)
        with host.on_compute_device(backbone, frames=frames, size_wh=inversion.size_wh, rows=3,
                                    decode_chunk_size=decode_chunk_size) as model:
            latents = run_sampling(model, inversion, plan, progress=host.progress_bar(len(plan.steps)))
            host.check_interrupted()
            frames = model.decode(latents, decode_chunk_size, progress=host.progress_bar(latents.shape[2]))
        return (frames, float(inversion.fps))


NODE_CLASS_MAPPINGS = {"InjectedSampler": InjectedSampler}
NODE_DISPLAY_NAME_MAPPINGS = {"InjectedSampler": "AnyV2V Injected Sampler"}
