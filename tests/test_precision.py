"""Which precision `auto` picks, with the device queries stubbed at the boundary (a T4, an A100),
in the engine (compute capability) and in the nodes (ComfyUI's answer); rotary frequencies stay
float32 in half-precision models.

The choice for the UNet backbones is fp16 on every GPU (bf16 only when asked for, from compute
capability 8.0): the references ran fp16, and benchmarks/precision.py measures bf16 drifting
further from float32 over an inversion and an edit (docs/memory.md).
"""

import sys
import types

import pytest
import torch

from anyv2v_core.errors import ModelLoadError
from anyv2v_core.loading import resolve_dtype
from conftest import oracle_path

CUDA = torch.device("cuda")
FP16_FIRST, BF16_FIRST = (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)


@pytest.fixture()
def gpu(monkeypatch):
    """A CUDA GPU of a chosen compute capability; `is_bf16_supported()` is True on all of them, as it is on a T4."""
    def with_capability(capability, name):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    return with_capability


def test_auto_is_fp16_below_compute_capability_8(gpu):
    gpu((7, 5), "Tesla T4")
    assert resolve_dtype("auto", CUDA) == torch.float16
    assert resolve_dtype("auto", CUDA, BF16_FIRST) == torch.float16  # emulated bf16 is never chosen
    assert resolve_dtype("auto", CUDA, (torch.bfloat16,)) == torch.float32
    with pytest.raises(ModelLoadError, match=r"Tesla T4, compute capability 7\.5\) does not support bf16 natively"):
        resolve_dtype("bf16", CUDA)
    assert resolve_dtype("fp16", CUDA) == torch.float16


def test_auto_from_compute_capability_8_follows_the_family(gpu):
    gpu((8, 0), "NVIDIA A100-SXM4-40GB")
    assert resolve_dtype("auto", CUDA) == torch.float16  # the UNet backbones: fp16, as their references
    assert resolve_dtype("auto", CUDA, BF16_FIRST) == torch.bfloat16  # a family trained in bf16 (Wan)
    assert resolve_dtype("bf16", CUDA) == torch.bfloat16


def test_auto_follows_comfyuis_fp16_rules_without_comfyui(gpu):
    """Pascal computes fp16 no faster than fp32 and GTX 16xx-class cards give NaN in fp16: ComfyUI runs
    both in fp32, and so does the engine alone, so one model loads in one precision with or without it."""
    gpu((6, 1), "NVIDIA GeForce GTX 1080")
    assert resolve_dtype("auto", CUDA) == torch.float32
    assert resolve_dtype("fp16", CUDA) == torch.float16  # asked for: slow, not wrong
    gpu((7, 5), "NVIDIA GeForce GTX 1660 SUPER")
    assert resolve_dtype("auto", CUDA) == resolve_dtype("auto", CUDA, BF16_FIRST) == torch.float32
    with pytest.raises(ModelLoadError, match=r"fp16 gives NaN / black frames on this GPU \(NVIDIA GeForce GTX 1660"):
        resolve_dtype("fp16", CUDA)
    gpu((7, 5), "NVIDIA GeForce RTX 2080 Ti")  # the same architecture with tensor cores
    assert resolve_dtype("auto", CUDA) == torch.float16


def test_auto_is_float32_off_cuda():
    assert resolve_dtype("auto", torch.device("cpu"), BF16_FIRST) == torch.float32


def test_each_family_states_its_half_precision():
    """The UNet backbones prefer fp16 (their references); Wan, trained in bf16, prefers bf16."""
    from anyv2v_core.backbones.families import BACKBONES, WAN, backbone_class

    for name in BACKBONES:
        assert backbone_class(name).half_dtypes[0] == (torch.bfloat16 if name in WAN.names else torch.float16)


# ---------------------------------------------------------------------------------------------- nodes


@pytest.fixture()
def comfy(monkeypatch):
    """ComfyUI's model management as seen by the pack: a CPU device that answers the precision
    questions as told (should_use_fp16 / should_use_bf16 carry --force-fp32 and the broken-fp16 list)."""
    answers = {"fp16": True, "bf16": True}
    model_management = types.SimpleNamespace(
        get_torch_device=lambda: torch.device("cpu"), unet_offload_device=lambda: torch.device("cpu"),
        should_use_fp16=lambda device=None, **kwargs: answers["fp16"],
        should_use_bf16=lambda device=None, **kwargs: answers["bf16"])
    package = types.ModuleType("comfy")
    package.model_management = model_management
    monkeypatch.setitem(sys.modules, "comfy", package)
    monkeypatch.setitem(sys.modules, "comfy.model_management", model_management)
    return answers


@pytest.mark.parametrize("fp16, bf16, family, expected", [
    (True, True, FP16_FIRST, torch.float16),
    (True, True, BF16_FIRST, torch.bfloat16),
    (False, True, FP16_FIRST, torch.bfloat16),  # a GPU whose fp16 ComfyUI knows to be broken
    (False, False, FP16_FIRST, torch.float32),  # --force-fp32, or a GPU with neither
])
def test_nodes_ask_comfyui_which_half_precision_to_use(comfy, fp16, bf16, family, expected):
    from test_nodes import load_pack

    load_pack()
    host = sys.modules["anyv2v_pack.nodes.host"]
    comfy.update(fp16=fp16, bf16=bf16)
    assert host.weight_dtype("auto", torch.device("cpu"), family) == expected
    assert host.weight_dtype("fp32", torch.device("cpu"), family) == "fp32"


def test_the_loader_node_loads_in_comfyuis_precision(comfy, tiny_model_dir, monkeypatch):
    from test_nodes import load_pack

    pack = load_pack()
    host = sys.modules["anyv2v_pack.nodes.host"]
    monkeypatch.setattr(host, "diffusers_roots", lambda: [str(tiny_model_dir.parent)])
    loader = pack.NODE_CLASS_MAPPINGS["LoadI2VBackbone"]()
    comfy.update(fp16=True, bf16=True)
    assert loader.load(tiny_model_dir.name, "auto", "auto")[0].backbone.dtype == torch.float16
    comfy.update(fp16=False, bf16=False)
    assert loader.load(tiny_model_dir.name, "auto", "auto")[0].backbone.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- rotary


@pytest.mark.parametrize("name", ["consisti2v", "seine"])
def test_rotary_frequencies_stay_float32_in_half_precision_models(name):
    from anyv2v_core.backbones.rotary import RotaryEmbedding

    def load(dtype):
        if name == "consisti2v":
            from anyv2v_core.backbones.consisti2v import ConsistI2VBackbone

            return ConsistI2VBackbone.from_folder(oracle_path("anyv2v-consisti2v") / "model", dtype=dtype).unet
        from anyv2v_core.backbones.seine import load_seine

        model = oracle_path("anyv2v-seine") / "model"
        return load_seine(model / "stable-diffusion-v1-4", model / "seine_ema.safetensors", dtype=dtype).unet

    half, full = load(torch.float16), load(torch.float32)
    rotaries = [m for m in half.modules() if isinstance(m, RotaryEmbedding)]
    assert rotaries and all(m.freqs.dtype == torch.float32 for m in rotaries)
    others = [p for n, p in half.named_parameters() if not n.endswith("rotary_emb.freqs")]
    assert {p.dtype for p in others} == {torch.float16}
    reference = next(m for m in full.modules() if isinstance(m, RotaryEmbedding))
    assert torch.equal(rotaries[0].angles(16), reference.angles(16))  # positions x frequencies as in float32


# ---------------------------------------------------------------------------------------------- overflow


def test_a_half_precision_encode_that_overflows_is_redone_in_float32(tiny_model_dir):
    from anyv2v_core.backbones.vae_frames import encode_frames
    from anyv2v_core.loading import load_backbone
    from anyv2v_core.testing.tiny_models import moving_square_video

    vaes = {dtype: load_backbone(tiny_model_dir, dtype=dtype).vae for dtype in (torch.float16, torch.float32)}
    for vae in vaes.values():  # activations beyond fp16's range (65504) after the first convolution
        vae.encoder.conv_in.weight.data *= 1e5
    frames = moving_square_video(2, 32)
    with torch.inference_mode():
        plain = vaes[torch.float16].encode(frames[:1].permute(0, 3, 1, 2).half() * 2 - 1).latent_dist.parameters
    assert not torch.isfinite(plain).all(), "the test needs an encode that overflows in fp16"
    latents = encode_frames(vaes[torch.float16], frames, scaling_factor=0.18215, device=torch.device("cpu"))
    expected = encode_frames(vaes[torch.float32], frames, scaling_factor=0.18215, device=torch.device("cpu"))
    assert torch.isfinite(latents).all()
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-2)  # the fp16 weights, computed in float32


@pytest.mark.parametrize("phase", ["the inversion", "the edit's sampling"])
def test_nan_latents_after_inversion_or_sampling_are_a_clear_error_not_a_black_video(tiny_model_dir, phase):
    from anyv2v_core.errors import AnyV2VError
    from anyv2v_core.loading import load_backbone
    from anyv2v_core.pipeline import edit, invert_source
    from anyv2v_core.plan import EditSettings
    from anyv2v_core.testing.tiny_models import moving_square_video

    backbone = load_backbone(tiny_model_dir)
    source = moving_square_video(4, 32)
    settings = EditSettings(size_wh=(32, 32), inversion_steps=2, steps=2, start_index=0)
    inversion = None if phase == "the inversion" else invert_source(backbone, source, settings)
    # an overflow in the denoiser, as a broken fp16 GPU gives
    backbone.unet.register_forward_hook(lambda module, args, output: (output[0] * float("inf"),))
    with pytest.raises(AnyV2VError, match=f"{phase} of i2vgen-xl gave NaN/inf latents in float32.*precision"):
        edit(backbone, source, source[:1], prompt="a square", settings=settings, inversion=inversion)
