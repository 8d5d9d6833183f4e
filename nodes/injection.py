"""CaptureFeatures: which source features the sampler injects, where and for how long.

Decision: this node computes nothing ahead. It hands InjectedSampler the inversion plus the
injection settings, and the sampler computes the source branch *in-batch*: at each step the
UNet runs on [source, uncond, cond] rows and hooks copy the source row's conv / Q / K features
into the edit rows while their window is open (then the source row is dropped from the batch).
Capturing the features ahead instead would store every injected activation of every hooked
layer per step: for I2VGen-XL at 512x512x16 frames about 0.8 GB per step in fp16, some 20 GB
over the default 25-step temporal window. In-batch costs one extra UNet row while injection is
active and keeps the extra memory bounded by the stored inverted latents (one [1, 4, 16, 64, 64]
float32 latent = 1 MiB per sampling step, on the CPU), so the default edit fits a 24 GB GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from .inversion import INVERSION

FEATURES = "ANYV2V_FEATURES"
LAYER_KINDS = {"conv": "conv", "spatial": "spatial_attention", "temporal": "temporal_attention", "attention": "attention"}


@dataclass
class FeaturePlan:
    """What flows on an ANYV2V_FEATURES link: the source branch's inputs and the injection plan."""

    source: object  # nodes.inversion.SourceInversion
    injection: object  # anyv2v_core.injection.InjectionSettings, layers None = the backbone's defaults
    start_index: int
    layer_overrides: dict[str, tuple[str, ...]]  # {"conv" | "spatial" | "temporal": module names}

    def injection_for(self, backbone):
        """The injection settings with the overridden kinds' layers replacing the backbone's defaults."""
        if not self.layer_overrides:
            return self.injection
        from dataclasses import replace

        layers = replace(backbone.injection_layers,
                         **{LAYER_KINDS[kind]: names for kind, names in self.layer_overrides.items()})
        return replace(self.injection, layers=layers)


def parse_layer_override(text: str) -> dict[str, tuple[str, ...]]:
    """{"conv" | "spatial" | "temporal": module names} from lines like `spatial: up_blocks.1.attentions.1...`.

    Raises ValueError naming the bad line.
    """
    layers: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate((text or "").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, sep, names = line.partition(":")
        kind = kind.strip().lower()
        if not sep or kind not in LAYER_KINDS:
            raise ValueError(f"layer_override line {number} ({line[:40]!r}) must start with conv:, spatial:, temporal: "
                             "or attention:")
        if kind in layers:
            raise ValueError(f"layer_override names {kind}: twice (line {number}); put all its modules on one line")
        layers[kind] = tuple(name.strip() for name in names.split(",") if name.strip())
    return layers


def tau_input(default: float, what: str) -> tuple:
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1.0, "step": 0.05,
                      "tooltip": f"Fraction of the sampling steps (the first, noisiest ones) during which {what} "
                                 "Higher keeps more of the source's structure and motion; lower lets the edit change more."})


class CaptureFeatures:
    DESCRIPTION = (
        "Sets up AnyV2V's feature injection: the source branch's residual conv features and spatial / temporal "
        "self-attention Q and K replace the edit's during the first steps, which carries the source's layout "
        "and motion into the edited video. The sampler computes the source branch in the same batch, so "
        "nothing extra is stored. Paper defaults: conv 0.2, spatial 0.2, temporal 0.5; its examples mostly "
        "use temporal 1.0, style edits 1.0 for all three, small prompt edits 0.1-0.3. Wan models have one joint "
        "attention instead: attention_tau (0.5; raise it when layout or motion drift). The editor shows only the taus "
        "that act on the backbone the inversion comes from."
    )
    CATEGORY = "AnyV2V/sampling"
    RETURN_TYPES = (FEATURES,)
    RETURN_NAMES = ("features",)
    OUTPUT_TOOLTIPS = ("The source branch and injection plan, for InjectedSampler.",)
    FUNCTION = "plan"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "inversion": (INVERSION, {"tooltip": "The inverted source video from DDIMInvertVideo."}),
                "conv_tau": tau_input(0.2, "the decoder's residual conv features are injected."),
                "spatial_tau": tau_input(0.2, "spatial self-attention Q/K are injected."),
                "temporal_tau": tau_input(0.5, "temporal self-attention Q/K are injected (this carries the motion)."),
                "start_index": ("INT", {"default": 0, "min": 0, "max": 999,
                                        "tooltip": "Sampling starts from the inverted latent at this step index instead "
                                                   "of the noisiest one (0, the paper's value). Must be below the "
                                                   "sampling steps; higher keeps more of the source's colours."}),
            },
            "optional": {
                "layer_override": ("STRING", {
                    "default": "", "multiline": True,
                    "tooltip": "Advanced. Empty = the paper's layers for this model. One line per kind to replace, e.g. "
                               "'spatial: up_blocks.1.attentions.1.transformer_blocks.0.attn1, ...' "
                               "(conv: resnet conv modules; spatial/temporal/attention: attention modules with Q/K "
                               "projections, e.g. 'attention: transformer.blocks.0.attn1' for a Wan folder)."}),
                # after layer_override: saved UI workflows list widget values in this order
                "attention_tau": tau_input(0.5, "the joint space-time self-attention Q/K of a video transformer (Wan) "
                                                "are injected; it carries both layout and motion, the work of the UNets' "
                                                "spatial and temporal taus, which do nothing on Wan (and this one nothing "
                                                "on the UNets)."),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, layer_override=""):
        try:
            parse_layer_override(layer_override)
        except ValueError as error:
            return str(error)
        return True

    def plan(self, inversion, conv_tau, spatial_tau, temporal_tau, start_index, layer_override="", attention_tau=0.5):
        from anyv2v_core.errors import AnyV2VError
        from anyv2v_core.injection import InjectionSettings

        steps = inversion.inversion.sampling_steps
        if start_index >= steps:
            raise AnyV2VError(f"start_index {start_index} must be below the {steps} sampling steps the inversion was "
                              f"made for; use 0..{steps - 1}")
        settings = InjectionSettings(conv_tau=conv_tau, spatial_tau=spatial_tau, temporal_tau=temporal_tau,
                                     attention_tau=attention_tau)
        return (FeaturePlan(source=inversion, injection=settings, start_index=start_index,
                            layer_overrides=parse_layer_override(layer_override)),)


NODE_CLASS_MAPPINGS = {"CaptureFeatures": CaptureFeatures}
NODE_DISPLAY_NAME_MAPPINGS = {"CaptureFeatures": "AnyV2V Capture Features"}
