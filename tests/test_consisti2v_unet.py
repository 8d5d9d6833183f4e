"""The ConsistI2V UNet port against the reference: key manifest, forward parity, hooked parity."""

import json

import pytest
import torch
from safetensors.torch import load_file

from anyv2v_core.backbones.base import InjectionLayers
from anyv2v_core.backbones.consisti2v_unet import ConsistI2VUNet, ConsistI2VUNetConfig
from anyv2v_core.errors import ModelLoadError
from anyv2v_core.injection import InjectionPlan, InjectionSettings, injected
from conftest import oracle_path

RTOL = 1e-5  # max |port - reference| / max |reference|


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def oracle():
    return oracle_path("anyv2v-consisti2v")


@pytest.fixture(scope="module")
def manifest(oracle):
    return json.loads((oracle / "real_unet_keys.json").read_text())


@pytest.fixture(scope="module")
def tiny_weights(oracle):
    return load_file(str(oracle / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def tiny_unet(oracle, tiny_weights):
    torch.set_num_threads(1)
    config = ConsistI2VUNetConfig.from_dict(json.loads((oracle / "model" / "unet" / "config.json").read_text()))
    unet = ConsistI2VUNet(config).eval()
    unet.load_state_dict(tiny_weights, strict=True)
    return unet


def test_full_size_config_has_exactly_the_checkpoint_keys_and_shapes(manifest):
    with torch.device("meta"):
        unet = ConsistI2VUNet(ConsistI2VUNetConfig.from_dict(manifest["config"]))
    ours = {name: list(tensor.shape) for name, tensor in unet.state_dict().items()}
    reference = {entry["key"]: entry["shape"] for entry in manifest["keys"]}
    assert sorted(set(reference) - set(ours)) == []  # missing
    assert sorted(set(ours) - set(reference)) == []  # extra
    assert {name: shape for name, shape in ours.items() if shape != reference[name]} == {}
    assert sum(tensor.numel() for tensor in unet.state_dict().values()) == manifest["summary"]["num_elements"]


def test_parameters_without_effect_are_still_loaded_by_name_and_shape(oracle, manifest, tiny_unet, tiny_weights):
    """The tiny parity cannot see these 74 tensors (unused by the reference forward), so check
    them against the full-size manifest and check that loading puts each file tensor in place."""
    dead = json.loads((oracle / "unet_params_without_effect.json").read_text())
    assert len(dead) == 74
    reference = {entry["key"]: entry["shape"] for entry in manifest["keys"]}
    with torch.device("meta"):
        full = ConsistI2VUNet(ConsistI2VUNetConfig.from_dict(manifest["config"])).state_dict()
    tiny = tiny_unet.state_dict()
    for name in dead:
        assert name in reference and list(full[name].shape) == reference[name], name
        assert torch.equal(tiny[name], tiny_weights[name]), name


def test_unsupported_config_options_are_refused_clearly(manifest):
    config = dict(manifest["config"], first_frame_condition_mode="conv2d")
    with pytest.raises(ModelLoadError, match="first_frame_condition_mode"):
        ConsistI2VUNetConfig.from_dict(config)


def test_unet_forward_matches_reference(oracle, tiny_unet):
    data = load_file(str(oracle / "unet_parity.safetensors"))
    names = [name[len("act."):] for name in data if name.startswith("act.")]
    modules = dict(tiny_unet.named_modules())
    captured = {}
    handles = [
        modules[name].register_forward_hook(lambda m, i, out, name=name: captured.__setitem__(name, out))
        for name in names
    ]
    try:
        with torch.no_grad():
            out = tiny_unet(
                data["input.sample"],
                data["input.timestep"],
                data["input.encoder_hidden_states"],
                data["input.first_frame_latents"],
                int(data["input.frame_stride"]),
            )
    finally:
        for handle in handles:
            handle.remove()
    num_frames = data["input.sample"].shape[2] + 1
    for name in names:  # activations of video 0 in the internal [(B F), ...] layout
        got = captured[name][0] if isinstance(captured[name], tuple) else captured[name]
        assert relative_error(got[:num_frames], data[f"act.{name}"]) < RTOL, name
    assert out.shape == data["output.sample"].shape
    assert relative_error(out, data["output.sample"]) < RTOL


def test_unet_with_anyv2v_injection_matches_reference_hooks(oracle, tiny_unet):
    data = load_file(str(oracle / "unet_pnp_parity.safetensors"))
    places = [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (3, 2)]
    layers = InjectionLayers(
        conv=("up_blocks.1.resnets.1.conv2",),
        spatial_attention=tuple(f"up_blocks.{b}.attentions.{i}.transformer_blocks.0.attn1" for b, i in places),
        temporal_attention=tuple(f"up_blocks.{b}.tempo_attns.{i}.transformer_blocks.0.attn1" for b, i in places),
    )
    schedule = data["input.pnp_injection_schedule"].tolist()
    t = int(data["input.timestep"])
    args = (data["input.sample"], t, data["input.encoder_hidden_states"], data["input.first_frame_latents"],
            int(data["input.frame_stride"]))
    plan = InjectionPlan.build(len(schedule), InjectionSettings(conv_tau=1.0, spatial_tau=1.0, temporal_tau=1.0), layers)
    with torch.no_grad():
        plain = tiny_unet(*args)
        with injected(tiny_unet, plan) as injector:
            injector.set_step(plan.active_kinds(schedule.index(t)), num_rows=3)
            hooked = tiny_unet(*args)
    assert injector.events == {"conv": 1, "spatial": 2 * 8, "temporal": 2 * 8}
    assert relative_error(plain, data["output.sample_plain"]) < RTOL
    assert relative_error(hooked, data["output.sample_injected"]) < RTOL
    assert torch.equal(hooked[0], plain[0])  # the source row is never changed
