"""Device placement on a stand-in GPU: what a CUDA run would hit, caught on the CPU.

Every backbone (I2VGen-XL, ConsistI2V, SEINE) under every offload policy runs inversion, injected
sampling (with temporal windows) and decoding with `anyv2v_core.device_standin` as its device:
any CPU tensor that meets a device tensor in an operation raises as on CUDA, and the frames must
be those of the plain CPU run. Observed behaviour of the policies (which component is on the
device when each one runs) is checked here too, by looking at where the weights are, not at the
offloader's own bookkeeping.
"""

from __future__ import annotations

import pytest
import torch

from anyv2v_core.device_standin import OnStandIn, StandInDevice
from anyv2v_core.injection import InjectionSettings
from anyv2v_core.memory import OFFLOAD_POLICIES
from anyv2v_core.pipeline import EditSettings, edit
from anyv2v_core.tiny_models import moving_square_video
from anyv2v_core.windows import ContextWindows
from conftest import oracle_path

# 2 inversion and 2 sampling steps: injection runs at the first step, the source row is dropped at
# the second (SEINE's DDPM adds noise there); 4 frames in windows of 3 overlapping 1 (2 windows;
# ConsistI2V generates 3 frames after its first: one window)
SETTINGS = dict(size_wh=(32, 32), num_frames=4, inversion_steps=2, steps=2, start_index=0, cfg=5.0,
                injection=InjectionSettings(0.5, 0.5, 0.5), windows=ContextWindows(3, 1), decode_chunk_size=2)
SOURCE = moving_square_video(4, 32)
EDITED = SOURCE[:1].flip(-1)


def load(name: str, tiny_model_dir=None):
    if name == "i2vgen-xl":
        from anyv2v_core.loading import load_backbone

        return load_backbone(tiny_model_dir)
    if name == "consisti2v":
        from anyv2v_core.backbones.consisti2v import ConsistI2VBackbone

        return ConsistI2VBackbone.from_folder(oracle_path("anyv2v-consisti2v") / "model")
    from anyv2v_core.backbones.seine import load_seine

    model = oracle_path("anyv2v-seine") / "model"
    return load_seine(model / "stable-diffusion-v1-4", model / "seine_ema.safetensors")


def run(backbone) -> torch.Tensor:
    return edit(backbone, SOURCE, EDITED, prompt="a square", settings=EditSettings(**SETTINGS)).frames


def weights_on_device(module: torch.nn.Module) -> list[bool]:
    return [isinstance(t, OnStandIn) for t in [*module.parameters(), *module.buffers()]]


BACKBONES = ("i2vgen-xl", "consisti2v", "seine")


@pytest.fixture(scope="module")
def cpu_frames(tiny_model_dir):
    torch.set_num_threads(1)
    return {name: run(load(name, tiny_model_dir)) for name in BACKBONES}


@pytest.mark.parametrize("policy", OFFLOAD_POLICIES)
@pytest.mark.parametrize("name", BACKBONES)
def test_every_phase_runs_on_the_device_with_the_cpu_frames(name, policy, tiny_model_dir, cpu_frames):
    backbone = load(name, tiny_model_dir)
    entered = []  # (component, every weight of it on the device, any weight of the others on it)

    def spy(component):
        def check(module, args):
            modules = backbone.modules()
            others = [w for other, m in modules.items() if other != component for w in weights_on_device(m)]
            entered.append((component, all(weights_on_device(modules[component])), any(others)))
        return check

    with StandInDevice() as gpu:
        backbone.set_offload(policy, gpu.device)
        for component, module in backbone.modules().items():  # registered after the policy's hooks: sees their result
            for entry in [module, getattr(module, "encoder", None), getattr(module, "decoder", None)]:
                if isinstance(entry, torch.nn.Module):  # the VAE is entered through encode/decode, not forward
                    entry.register_forward_pre_hook(spy(component))
        frames = run(backbone)
    assert frames.device.type == "cpu" and not isinstance(frames, OnStandIn)
    # some composite ops take their generic path on an unknown device (group norm's math path): on
    # ConsistI2V's 1x1 bottleneck at 32x32 that moves frames by up to 1.2e-3 (a third of an 8-bit level)
    torch.testing.assert_close(frames, cpu_frames[name], rtol=0, atol=2e-3)
    if policy != "sequential":  # sequential streams the UNet's blocks: checked below
        assert all(on_device for _, on_device, _ in entered), "a component ran with weights left on the CPU"
    if policy != "none":
        assert not any(others for _, _, others in entered), "another component stayed on the device"
    components = {component for component, _, _ in entered}
    assert {"unet", "vae", "text_encoder"} <= components


def test_sequential_offload_streams_the_unet_blocks_through_the_device(tiny_model_dir):
    backbone = load("i2vgen-xl", tiny_model_dir)
    blocks = [block for block in backbone.unet.children() if any(True for _ in block.parameters())]
    seen = []  # per block forward: its weights on the device, the number of other blocks' weights there

    def spy(block):
        def check(module, args):
            others = sum(any(weights_on_device(other)) for other in blocks if other is not block)
            seen.append((all(weights_on_device(block)), others))
        return check

    with StandInDevice() as gpu:
        backbone.set_offload("sequential", gpu.device)
        for block in blocks:
            block.register_forward_pre_hook(spy(block))
        run(backbone)
        assert not any(any(weights_on_device(block)) for block in blocks), "blocks stay on the device after the call"
    assert seen and all(on_device for on_device, _ in seen), "a block ran with its weights on the CPU"
    assert max(others for _, others in seen) <= 1, "more than the running block and the prefetched next one"


def test_policy_none_frees_the_encoders_before_the_unet_runs(tiny_model_dir):
    backbone = load("i2vgen-xl", tiny_model_dir)
    encoders_during_unet = []
    with StandInDevice() as gpu:
        backbone.set_offload("none", gpu.device)
        backbone.unet.register_forward_pre_hook(lambda module, args: encoders_during_unet.append(
            any(weights_on_device(backbone.text_encoder)) or any(weights_on_device(backbone.image_encoder))))
        run(backbone)
        assert all(weights_on_device(backbone.unet)) and all(weights_on_device(backbone.vae))
    assert encoders_during_unet and not any(encoders_during_unet)
