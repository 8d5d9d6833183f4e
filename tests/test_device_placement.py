"""Device placement on a stand-in GPU: what a CUDA run would hit, caught on the CPU.

Every backbone the loader builds (`tiny_backbones.TINY_BACKBONES`, one entry per name of
`backbones.families.BACKBONES`) x every offload policy x (all frames at once, temporal windows) x
every solver order its schedule offers runs inversion, injected sampling and decoding with
`anyv2v_core.testing.device_standin` as its device: any CPU tensor that meets a device tensor in an
operation raises as on CUDA, and the frames must be those of the plain CPU run. Observed behaviour
of the policies (which component is on the device when each one runs) is checked here too, by
looking at where the weights are, not at the offloader's own bookkeeping.
"""

from __future__ import annotations

import pytest
import torch

from anyv2v_core.injection import InjectionSettings
from anyv2v_core.backbones.families import BACKBONES, backbone_defaults
from anyv2v_core.memory import DENOISERS, OFFLOAD_POLICIES
from anyv2v_core.pipeline import edit
from anyv2v_core.plan import EditSettings
from anyv2v_core.testing.device_standin import OnStandIn, StandInDevice
from anyv2v_core.testing.tiny_models import moving_square_video
from tiny_backbones import TINY_BACKBONES

# 2 inversion and 2 sampling steps: injection runs at the first step, the source row is dropped at
# the second (SEINE's DDPM adds noise there; Wan 2.2 A14B switches to its low-noise expert there)
STEPS = dict(inversion_steps=2, steps=2, start_index=0, cfg=5.0, injection=InjectionSettings(0.5, 0.5, 0.5, 0.5),
             decode_chunk_size=2)
RUNS = [(name, windowed, order) for name in TINY_BACKBONES for windowed in (False, True)
        for order in backbone_defaults(name).spacing.orders]


def run_id(name: str, windowed: bool, order: int) -> str:
    return f"{name}-{'windows' if windowed else 'all-frames'}-order{order}"


def test_every_backbone_the_loader_builds_has_a_tiny_model():
    assert sorted(TINY_BACKBONES) == sorted(BACKBONES), "add the new family to tests/tiny_backbones.py"


def load(name: str, tiny_sources):
    return TINY_BACKBONES[name].load(tiny_sources[name])


def run(backbone, name: str, windowed: bool, order: int) -> torch.Tensor:
    tiny = TINY_BACKBONES[name]
    source = moving_square_video(tiny.num_frames, tiny.size)
    settings = EditSettings(size_wh=(tiny.size, tiny.size), num_frames=tiny.num_frames, inversion_order=order,
                            windows=tiny.windows if windowed else None, **STEPS)
    return edit(backbone, source, source[:1].flip(-1), prompt="a square", settings=settings).frames


def weights_on_device(module: torch.nn.Module) -> list[bool]:
    return [isinstance(t, OnStandIn) for t in [*module.parameters(), *module.buffers()]]


@pytest.fixture(scope="module")
def cpu_frames(tiny_sources):
    """The frames of each run on the CPU, computed when a test first asks for them."""
    torch.set_num_threads(1)
    frames = {}

    def get(name: str, windowed: bool, order: int) -> torch.Tensor:
        if (name, windowed, order) not in frames:
            frames[name, windowed, order] = run(load(name, tiny_sources), name, windowed, order)
        return frames[name, windowed, order]

    return get


@pytest.mark.parametrize("policy", OFFLOAD_POLICIES)
@pytest.mark.parametrize("name, windowed, order", RUNS, ids=[run_id(*r) for r in RUNS])
def test_every_phase_runs_on_the_device_with_the_cpu_frames(name, windowed, order, policy, tiny_sources, cpu_frames):
    backbone = load(name, tiny_sources)
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
        frames = run(backbone, name, windowed, order)
    assert frames.device.type == "cpu" and not isinstance(frames, OnStandIn)
    # some composite ops take their generic path on an unknown device (group norm's math path): on
    # ConsistI2V's 1x1 bottleneck at 32x32 that moves frames by up to 1.2e-3 (a third of an 8-bit level)
    torch.testing.assert_close(frames, cpu_frames(name, windowed, order), rtol=0, atol=2e-3)
    if policy != "sequential":  # sequential streams the denoisers' blocks: checked below
        assert all(on_device for _, on_device, _ in entered), "a component ran with weights left on the CPU"
    if policy != "none":
        assert not any(others for _, _, others in entered), "another component stayed on the device"
    assert {component for component, _, _ in entered} == set(backbone.modules()), "a component never ran"


def streamed_blocks(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The top-level blocks of a denoiser that hold weights (a ModuleList's items are blocks)."""
    blocks = []
    for child in denoiser.children():
        items = child.values() if isinstance(child, torch.nn.ModuleDict) else child
        blocks += list(items) if isinstance(child, (torch.nn.ModuleList, torch.nn.ModuleDict)) else [child]
    return [block for block in blocks if any(True for _ in block.parameters())]


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_sequential_offload_streams_every_denoisers_blocks_through_the_device(name, tiny_sources):
    """The UNets' and both Wan 2.2 A14B experts' blocks come in one at a time (plus the prefetched
    next one): what lets a 14B transformer run on a card smaller than its weights."""
    backbone = load(name, tiny_sources)
    denoisers = {component: streamed_blocks(module) for component, module in backbone.modules().items()
                 if component in DENOISERS}
    seen = {component: [] for component in denoisers}  # per block forward: on the device, other blocks there

    def own_weights_on_device(block, blocks) -> bool:
        """Any weight of `block` on the device that no other block shares (SEINE's blocks share a rotary table)."""
        shared = {id(t) for other in blocks if other is not block for t in [*other.parameters(), *other.buffers()]}
        return any(isinstance(t, OnStandIn) for t in [*block.parameters(), *block.buffers()] if id(t) not in shared)

    def spy(component, block):
        def check(module, args):
            blocks = denoisers[component]
            others = sum(own_weights_on_device(other, blocks) for other in blocks if other is not block)
            seen[component].append((all(weights_on_device(block)), others))
        return check

    with StandInDevice() as gpu:
        backbone.set_offload("sequential", gpu.device)
        for component, blocks in denoisers.items():
            for block in blocks:
                block.register_forward_pre_hook(spy(component, block))
        run(backbone, name, windowed=False, order=1)
        for blocks in denoisers.values():
            assert not any(any(weights_on_device(block)) for block in blocks), "blocks stay on the device after the call"
    for component, calls in seen.items():
        assert len(calls) >= len(denoisers[component]), f"{component} ran fewer blocks than it has"
        assert all(on_device for on_device, _ in calls), f"a block of {component} ran with its weights on the CPU"
        assert max(others for _, others in calls) <= 1, "more than the running block and the prefetched next one"


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_a_backbones_device_is_its_offloaders_and_moves_only_with_its_policy(name, tiny_sources):
    """The execution device has one owner, the offloader: `set_offload` and `to` move it with the
    weights, and setting the backbone's device alone (inputs sent to one device, weights placed on
    another) is refused, leaving both where they were."""
    backbone = load(name, tiny_sources)
    tiny = TINY_BACKBONES[name]
    clip = moving_square_video(tiny.num_frames, tiny.size)
    assert backbone.device == backbone.offloader.device == torch.device("cpu")
    with StandInDevice() as gpu:
        for policy in OFFLOAD_POLICIES:
            backbone.set_offload(policy, gpu.device)
            assert backbone.device == backbone.offloader.device == gpu.device
        with pytest.raises(AttributeError, match=r"call \.to\('cpu'\) or \.set_offload\(policy, 'cpu'\)"):
            backbone.device = "cpu"
        backbone.set_offload("model")  # no device given: it stays where it runs
        assert backbone.device == backbone.offloader.device == gpu.device
        backbone.encode_video(clip)  # the inputs go where the weights are (a CPU input would raise here)
        backbone.to("cpu")
        assert backbone.device == backbone.offloader.device == torch.device("cpu")
        assert not any(any(weights_on_device(module)) for module in backbone.modules().values())


def test_policy_none_frees_the_encoders_before_the_unet_runs(tiny_sources):
    backbone = load("i2vgen-xl", tiny_sources)
    encoders_during_unet = []
    with StandInDevice() as gpu:
        backbone.set_offload("none", gpu.device)
        backbone.unet.register_forward_pre_hook(lambda module, args: encoders_during_unet.append(
            any(weights_on_device(backbone.text_encoder)) or any(weights_on_device(backbone.image_encoder))))
        run(backbone, "i2vgen-xl", windowed=False, order=1)
        assert all(weights_on_device(backbone.unet)) and all(weights_on_device(backbone.vae))
    assert encoders_during_unet and not any(encoders_during_unet)
