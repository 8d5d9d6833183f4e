"""Offload policies and out-of-memory handling, observed on the stand-in GPU (anyv2v_core.testing.device_standin):
where the weights are, what is copied each way, and what a failure leaves behind.

Which component runs where under each policy, with the frames of the CPU run, is checked for every
backbone in test_device_placement.py.
"""

import pytest
import torch

from anyv2v_core.errors import AnyV2VError, AnyV2VOutOfMemory
from anyv2v_core.injection import InjectionSettings
from anyv2v_core.loading import load_backbone
from anyv2v_core.memory import (
    OFFLOAD_POLICIES, auto_policy, available_memory, guard_out_of_memory, is_out_of_memory, streamed_denoiser_bytes,
    weight_bytes)
from anyv2v_core.offload import Offloader
from anyv2v_core.pipeline import edit
from anyv2v_core.plan import EditSettings
from anyv2v_core.testing.device_standin import OnStandIn, StandInDevice
from anyv2v_core.testing.tiny_models import moving_square_video
from tiny_backbones import TINY_BACKBONES

SETTINGS = EditSettings(size_wh=(32, 32), inversion_steps=2, steps=2, injection=InjectionSettings(0.5, 0.5, 0.5))
SOURCE = moving_square_video(4)
GIB = 2**30


def run(backbone) -> torch.Tensor:
    return edit(backbone, SOURCE, SOURCE[:1].flip(-1), prompt="a square", settings=SETTINGS).frames


def partly_on_device(backbone) -> list[str]:
    """Components with some weights on the stand-in and some not (a move that stopped half-way)."""
    return [name for name, module in backbone.modules().items()
            if len({isinstance(t, OnStandIn) for t in [*module.parameters(), *module.buffers()]}) > 1]


def weights_on_device(backbone) -> int:
    """Bytes of weights now on the stand-in, found by looking at the modules."""
    return sum(t.numel() * t.element_size() for module in backbone.modules().values()
               for t in [*module.parameters(), *module.buffers()] if isinstance(t, OnStandIn))


def all_weight_bytes(backbone) -> int:
    return sum(weight_bytes(module) for module in backbone.modules().values())


@pytest.fixture(scope="module")
def reference_frames(tiny_model_dir):
    torch.set_num_threads(1)
    return run(load_backbone(tiny_model_dir))


@pytest.fixture()
def backbone(tiny_model_dir):
    return load_backbone(tiny_model_dir)


def test_offloading_copies_no_weight_back_and_a_repeated_policy_moves_nothing(backbone, reference_frames):
    with StandInDevice() as gpu:
        backbone.set_offload("none", gpu.device)
        torch.testing.assert_close(run(backbone), reference_frames, rtol=0, atol=1e-3)
        loaded = weights_on_device(backbone)
        assert loaded == weight_bytes(backbone.unet) + weight_bytes(backbone.vae)  # the encoders have left

        before = (gpu.bytes_to_device, gpu.bytes_to_host)
        backbone.set_offload("none", gpu.device)  # the same policy on the same device (a node's second run)
        assert (gpu.bytes_to_device, gpu.bytes_to_host) == before and weights_on_device(backbone) == loaded

        backbone.set_offload("model", gpu.device)  # the model policy evicts everything: pointers, no copies
        backbone.to("cpu")
        assert weights_on_device(backbone) == 0 and gpu.bytes_to_host == before[1]


@pytest.mark.parametrize("policy", OFFLOAD_POLICIES)
def test_weights_are_loaded_with_non_blocking_copies(backbone, policy):
    with StandInDevice() as gpu:
        backbone.set_offload(policy, gpu.device)
        run(backbone)
        weights_in = gpu.non_blocking_bytes_to_device
        assert weights_in >= all_weight_bytes(backbone) - weight_bytes(backbone.image_encoder)  # all but the negative row's


def test_sequential_offload_moves_one_pass_of_the_unet_per_call_and_nothing_back(backbone):
    with StandInDevice() as gpu:
        backbone.set_offload("sequential", gpu.device)
        row = backbone.condition(SOURCE[:1], "a square", num_frames=4, fps=8)
        latents = backbone.encode_video(SOURCE)
        backbone.predict(latents, 501, [row])  # the first call learns the blocks' order
        per_call = []
        for t in (401, 301, 201):
            before = (gpu.bytes_to_device, gpu.bytes_to_host)
            backbone.predict(latents, t, [row])
            per_call.append((gpu.bytes_to_device - before[0], gpu.bytes_to_host - before[1]))
    unet = weight_bytes(backbone.unet)
    for to_device, to_host in per_call:
        assert to_host == 0, "a weight was copied back to the host"
        assert unet * 0.9 <= to_device <= unet * 1.2, (to_device, unet)


def test_setup_out_of_memory_leaves_no_weight_on_the_device(backbone, reference_frames):
    budget = weight_bytes(backbone.unet) // 2
    with StandInDevice(fail_after_bytes_to_device=budget) as gpu:
        with pytest.raises(AnyV2VOutOfMemory) as raised:  # setting the policy up, or the first call
            backbone.set_offload("none", gpu.device)
            run(backbone)
        assert isinstance(raised.value, torch.OutOfMemoryError)  # ComfyUI recognises it and frees its models
        assert not partly_on_device(backbone), "a half-moved component was left on the device"
        backbone.offloader.offload_all()
        with pytest.raises(AnyV2VOutOfMemory, match="out of memory during setup"):  # ComfyUI's load (load_steady)
            backbone.offloader.load_steady()
        assert weights_on_device(backbone) == 0
        gpu.fail_after_bytes_to_device = None  # the memory is back: the run works and gives the same frames
        torch.testing.assert_close(run(backbone), reference_frames, rtol=0, atol=1e-3)


def test_out_of_memory_while_a_policy_brings_a_component_in(backbone):
    with StandInDevice(fail_after_bytes_to_device=weight_bytes(backbone.unet) // 2) as gpu:
        backbone.set_offload("model", gpu.device)
        with pytest.raises(AnyV2VOutOfMemory, match="out of memory during inversion"):
            run(backbone)
        assert not partly_on_device(backbone)


@pytest.mark.parametrize("message", [
    "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
    "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    "HIP out of memory. Tried to allocate 2.00 GiB",
])
def test_library_allocation_failures_are_out_of_memory(message):
    assert is_out_of_memory(RuntimeError(message))
    with pytest.raises(AnyV2VOutOfMemory, match="out of memory during sampling"):
        with guard_out_of_memory("sampling"):
            raise RuntimeError(message)
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))


def test_release_removes_every_offload_hook(backbone):
    with StandInDevice() as gpu:
        backbone.set_offload("sequential", gpu.device)
        backbone.offloader.release()
    assert not any(m._forward_pre_hooks or m._forward_hooks for c in backbone.modules().values() for m in c.modules())


def test_unknown_policy():
    with pytest.raises(AnyV2VError, match="offload policy"):
        Offloader({}, torch.device("cpu"), "disk")


# ---------------------------------------------------------------------------------------------- the auto mode


@pytest.fixture(scope="module")
def real_i2vgenxl():
    """I2VGen-XL's published architecture on the meta device (no memory, no weights)."""
    import json

    from diffusers import AutoencoderKL, I2VGenXLUNet
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    from anyv2v_core.backbones.i2vgen_xl import I2VGenXLBackbone
    from conftest import REPO_ROOT

    config = json.loads((REPO_ROOT / "benchmarks" / "i2vgenxl_configs.json").read_text())["i2vgen-xl"]
    with torch.device("meta"):
        networks = {"unet": I2VGenXLUNet.from_config(config["unet"]), "vae": AutoencoderKL.from_config(config["vae"]),
                    "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
                    "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**config["image_encoder"]))}
    return I2VGenXLBackbone(**{name: network.half() for name, network in networks.items()}, tokenizer=None,
                            clip_image_config=config["feature_extractor"], scheduler_config=config["scheduler"],
                            device=torch.device("meta"), dtype=torch.float16)


@pytest.mark.parametrize("free_gib, policy", [(24, "none"), (12, "none"), (8, "model"), (6, "sequential")])
def test_auto_memory_mode_follows_the_free_device_memory(real_i2vgenxl, free_gib, policy):
    """I2VGen-XL at 512x512x16 in fp16: 2.8 GiB of UNet + VAE and 3.9 GiB of 3-row activations
    (docs/memory.md) need 7.1 GiB with the encoders gone, 7.0 GiB one component at a time."""
    assert auto_policy(real_i2vgenxl, available_memory(free_gib * GIB)) == policy


def test_auto_memory_mode_counts_free_plus_freeable_minus_the_reserve_not_the_total(real_i2vgenxl):
    # an 8 GB card on Windows: 8.00 GiB in all, the desktop holds 0.5 GiB. Fitting "model" (7.0 GiB) into
    # the total left 0.03 GiB to spare; from the free memory, with 1 GiB kept, only streaming fits.
    assert auto_policy(real_i2vgenxl, available_memory(int(7.5 * GIB))) == "sequential"
    # ComfyUI holds 10 GiB of other models it can unload on a 24 GB card, and keeps its own reserve
    assert auto_policy(real_i2vgenxl, available_memory(2 * GIB, freeable_bytes=10 * GIB,
                                                       reserve_bytes=GIB // 2)) == "none"
    assert available_memory(GIB, 0, 2 * GIB) == 0  # never negative: nothing fits, the least memory is chosen
    assert auto_policy(real_i2vgenxl, 0) == "sequential"


def test_auto_memory_mode_scales_with_the_run(real_i2vgenxl):
    assert auto_policy(real_i2vgenxl, available_memory(8 * GIB), frames=8) == "none"  # half the frames, half the activations
    assert streamed_denoiser_bytes(real_i2vgenxl.unet) < weight_bytes(real_i2vgenxl.unet) / 2


# ---------------------------------------------------------------------------------------------- work done once


def forward_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_pre_hook(lambda m, args: calls.append(1))
    return calls


def test_the_negative_row_runs_no_image_encoder_and_the_edited_frame_is_encoded_once(backbone):
    image_encoder_calls, vae_encoder_calls = forward_calls(backbone.image_encoder), forward_calls(backbone.vae.encoder)
    edited = SOURCE[:1].flip(-1)
    uncond = backbone.condition(edited, "ugly", num_frames=4, fps=8, unconditional=True)  # as sample_edit does
    cond = backbone.condition(edited, "a square", num_frames=4, fps=8)
    assert len(image_encoder_calls) == 1 and len(vae_encoder_calls) == 1
    assert torch.equal(uncond.image_embeddings, torch.zeros_like(cond.image_embeddings))
    assert torch.equal(uncond.image_latents, cond.image_latents)
    other = backbone.condition(SOURCE[1:2], "a square", num_frames=4, fps=8)  # another frame is encoded again
    assert len(vae_encoder_calls) == 2 and not torch.equal(other.image_latents, cond.image_latents)


def test_conditioning_rows_are_copied_to_the_device_once_per_set_of_rows_and_window(backbone):
    from anyv2v_core.windows import ContextWindows, predict_in_windows

    frames = moving_square_video(6)
    with StandInDevice() as gpu:
        backbone.set_offload("none", gpu.device)
        rows = [backbone.condition(frames[:1], prompt, num_frames=6, fps=8) for prompt in ("", "ugly", "a square")]
        latents = backbone.encode_video(frames).expand(3, -1, -1, -1, -1)
        windows = ContextWindows(4, 2)  # two windows: each slices the rows' image latents
        copied = []
        for t in (501, 401, 301):
            before = gpu.bytes_to_device
            predict_in_windows(backbone, latents, t, rows, windows)
            copied.append(gpu.bytes_to_device - before)
    # later steps copy only the fps values and the windows' blend weights (tens of bytes)
    assert copied[1] == copied[2] < 1024 and copied[0] > 100 * copied[1], copied


def test_a_half_precision_decode_that_overflows_is_redone_in_float32(tiny_model_dir):
    from anyv2v_core.backbones.vae_frames import decode_latents

    vaes = {dtype: load_backbone(tiny_model_dir, dtype=dtype).vae for dtype in (torch.float16, torch.float32)}
    for vae in vaes.values():  # activations beyond fp16's range (65504) after the first convolution
        vae.decoder.conv_in.weight.data *= 1e4
    latents = torch.randn(1, 4, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = vaes[torch.float16].decode(latents[0].permute(1, 0, 2, 3).half() / 0.18215, return_dict=False)[0]
    assert not torch.isfinite(plain).all(), "the test needs a decode that overflows in fp16"
    frames = decode_latents(vaes[torch.float16], latents, scaling_factor=0.18215, device=torch.device("cpu"))
    expected = decode_latents(vaes[torch.float32], latents, scaling_factor=0.18215, device=torch.device("cpu"))
    assert torch.isfinite(frames).all()
    torch.testing.assert_close(frames, expected, rtol=0, atol=1e-2)  # the fp16 weights, computed in float32


def test_an_offloaded_backbone_is_freed_with_its_host_copies(tiny_model_dir):
    """ComfyUI loads a new backbone when its inputs change: the old one, its host copies included, must go."""
    import gc
    import weakref

    backbone = load_backbone(tiny_model_dir)
    with StandInDevice() as gpu:
        backbone.set_offload("sequential", gpu.device)
        run(backbone)
    unet, host_copy = weakref.ref(backbone.unet), weakref.ref(next(iter(backbone.offloader.weights["unet"].host.values())))
    del backbone
    gc.collect()
    assert unet() is None and host_copy() is None


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_a_dropped_backbone_frees_its_device_weights_at_once_without_the_garbage_collector(name, tiny_sources):
    """Switching models mid-prompt: the old model's device memory must be free as soon as the last
    reference goes, not at a garbage collection that may come too late (a reference cycle through
    the offloader's hooks kept it)."""
    import gc
    import weakref

    tiny = TINY_BACKBONES[name]
    source = moving_square_video(tiny.num_frames, tiny.size)
    settings = EditSettings(size_wh=(tiny.size, tiny.size), num_frames=tiny.num_frames, inversion_steps=2, steps=2,
                            start_index=0)
    gc.collect()
    gc.disable()
    try:
        backbone = tiny.load(tiny_sources[name])
        with StandInDevice() as gpu:
            backbone.set_offload("none", gpu.device)
            edit(backbone, source, source[:1].flip(-1), prompt="a square", settings=settings)
            on_device = [weakref.ref(t) for module in backbone.modules().values()
                         for t in [*module.parameters(), *module.buffers()] if isinstance(t, OnStandIn)]
            denoiser = weakref.ref(backbone.denoiser)
            del backbone
            assert on_device, "the test needs weights on the device"
            assert denoiser() is None, "the dropped backbone's networks are still alive"
            assert not [ref for ref in on_device if ref() is not None], "device weights outlive their backbone"
    finally:
        gc.enable()


def test_auto_counts_wan_activations_and_the_held_source_qk_of_rows_one_at_a_time():
    """Wan 2.1 at 832x480 x 81 frames in bf16 (21 x 60 x 104 latent elements): 3 rows of activations
    batched; one row plus the source row's Q/K of one block (2 x 5120 per 2x2 latent pixels:
    0.67 GB) when the rows run one at a time."""
    import types

    from anyv2v_core.backbones.wan import WAN21_I2V_DEFAULTS, WanBackbone
    from anyv2v_core.memory import activation_bytes

    wan = types.SimpleNamespace(activation_profile=WanBackbone.activation_profile, dtype=torch.bfloat16,
                                defaults=WAN21_I2V_DEFAULTS, vae_scale_factor=8, one_row_at_a_time=False)
    elements = 21 * 60 * 104
    batched, vae = activation_bytes(wan, frames=81, size_wh=(832, 480), rows=3)
    assert batched == int(3 * WanBackbone.activation_profile.unet * elements * 2) > 10 * GIB
    wan.one_row_at_a_time = True
    one_row, _ = activation_bytes(wan, frames=81, size_wh=(832, 480), rows=3)
    held = one_row - int(WanBackbone.activation_profile.unet * elements * 2)
    assert held == pytest.approx(0.67e9, rel=0.01)
    assert vae > GIB  # the float32 causal VAE decoding one latent frame at 832x480


# ---------------------------------------------------------------------------------------------- pinned host copies


def test_host_copies_are_pinned_tensor_by_tensor_under_a_cap_and_resident_components_are_not(backbone, monkeypatch):
    """Pinning a whole component before dropping its pageable copy held the model twice in host RAM (Wan
    14B: ~40 GB more); each pageable tensor must go as soon as its pinned copy exists, the components a
    policy keeps on the device need no pinned copy, and the pinned total stays under the cap."""
    import weakref

    from anyv2v_core import offload

    pinned_from, alive_when_pinning = [], []  # per pinned tensor: was the previous pageable one already freed

    def fake_page_locked(tensor):
        alive_when_pinning.append(sum(ref() is not None for ref in pinned_from))
        pinned_from.append(weakref.ref(tensor))
        return tensor.clone()

    monkeypatch.setattr(offload, "page_locked", fake_page_locked)
    text_encoder = offload.host_weights(backbone.text_encoder)
    monkeypatch.setattr(offload, "pinned_bytes_cap", lambda: offload.pinned_bytes() + text_encoder.total_bytes() // 2)
    text_encoder.pin()
    assert pinned_from and max(alive_when_pinning) == 0, "a pageable copy outlived its pinned one"
    assert all(ref() is None for ref in pinned_from)
    assert 0 < text_encoder.pinned_bytes <= text_encoder.total_bytes() // 2, "the cap was not kept"
    assert all(slot.get() is text_encoder.host[slot] for slot in text_encoder.slots), "the module lost its host copy"

    with StandInDevice() as gpu:  # which components each policy pins on a CUDA GPU
        pinned = {policy: Offloader(backbone.modules(), gpu.device, policy).pinned_components()
                  for policy in OFFLOAD_POLICIES}
    assert pinned["none"] == ["text_encoder", "image_encoder"]  # the UNet and the VAE stay on the device
    assert pinned["model"] == pinned["sequential"] == list(backbone.modules())
