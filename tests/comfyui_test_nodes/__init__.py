"""Test-only ComfyUI nodes that stand in for Wan's encoders in the real-host tests.

ComfyUI builds the UMT5-XXL text encoder (5.7 B parameters) and the CLIP ViT-H vision encoder
(632 M) only at their published sizes, whatever the file holds, so the tests cannot load tiny ones
through CLIPLoader / CLIPVisionLoader. These nodes give the same output types with Wan's shapes,
deterministic in their input, so that different prompts and images condition differently:
- AnyV2VTestTextEncode: text -> CONDITIONING [1, 512, 4096] (zeros after the text's own tokens);
- AnyV2VTestClipVisionEncode: IMAGE -> CLIP_VISION_OUTPUT with penultimate_hidden_states [1, 257, 1280];
- AnyV2VTestAlwaysRun: passes a MODEL through and is re-run at every queue, so the nodes after it
  re-execute on the same loaded MODEL object.
"""

import hashlib

import torch


def seeded(text: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))


class AnyV2VTestTextEncode:
    CATEGORY = "_for_testing/anyv2v"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"default": "", "multiline": True})}}

    def encode(self, text):
        tokens = torch.zeros(1, 512, 4096)
        length = min(len(text.split()) + 1, 512)
        tokens[:, :length] = torch.randn(1, length, 4096, generator=seeded(text)) * 0.1
        return ([[tokens, {}]],)


class AnyV2VTestClipVisionEncode:
    CATEGORY = "_for_testing/anyv2v"
    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    def encode(self, image):
        import comfy.clip_vision

        pooled = torch.nn.functional.adaptive_avg_pool2d(image[:1].movedim(-1, 1), 4).flatten()  # [48]
        projection = torch.randn(pooled.shape[0], 257 * 1280, generator=seeded("clip vision projection"))
        output = comfy.clip_vision.Output()
        output["penultimate_hidden_states"] = (pooled @ projection).reshape(1, 257, 1280) * 0.1
        return (output,)


class AnyV2VTestAlwaysRun:
    CATEGORY = "_for_testing/anyv2v"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    @classmethod
    def IS_CHANGED(cls, model):
        return float("nan")  # never equal to itself: re-run at every queue

    def run(self, model):
        return (model,)


NODE_CLASS_MAPPINGS = {"AnyV2VTestTextEncode": AnyV2VTestTextEncode,
                       "AnyV2VTestClipVisionEncode": AnyV2VTestClipVisionEncode,
                       "AnyV2VTestAlwaysRun": AnyV2VTestAlwaysRun}
