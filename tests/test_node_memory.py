"""What the nodes leave on the GPU, with the stand-in GPU (anyv2v_core.testing.device_standin) as ComfyUI's
device: each memory mode after a run, after a cancel and after an out-of-memory error. Looked at
in the modules (where the weights are, which hooks remain), not in the offloader's bookkeeping.
ComfyUI's own model management is exercised by the real-host test (test_comfyui_host.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from anyv2v_core.errors import AnyV2VOutOfMemory
from anyv2v_core.memory import weight_bytes
from anyv2v_core.testing.device_standin import OnStandIn, StandInDevice
from test_nodes import PROMPT, SIZE, load_pack

FRAMES, INVERSION_STEPS, STEPS = 4, 2, 2  # the third interrupt check is within the sampling steps or the decode

MODES = ("auto", "keep loaded", "offload after each node", "model offload (less VRAM)",
         "sequential offload (least VRAM, slowest)")


class Cancelled(Exception):
    pass


@pytest.fixture(scope="module")
def nodes(tiny_model_dir):
    torch.set_num_threads(1)
    pack = load_pack()
    host = sys.modules["anyv2v_pack.nodes.host"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(host, "diffusers_roots", lambda: [str(tiny_model_dir.parent)])
        patch.setattr(host, "compute_device", lambda: StandInDevice.device)
        yield {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()} | {"host": host}


@pytest.fixture(scope="module")
def source_frames():
    from anyv2v_core.testing.tiny_models import moving_square_video

    return moving_square_video(FRAMES, SIZE)


def weights_on_device(handle) -> int:
    return sum(t.numel() * t.element_size() for module in handle.backbone.modules().values()
               for t in [*module.parameters(), *module.buffers()] if isinstance(t, OnStandIn))


def hooks(handle) -> int:
    """The engine's forward hooks (offload, injection) on the networks; transformers' own are not counted."""
    return sum(getattr(hook, "__module__", "").startswith("anyv2v_core")
               for component in handle.backbone.modules().values() for m in component.modules()
               for hook in [*m._forward_pre_hooks.values(), *m._forward_hooks.values()])


def invert(nodes, handle, source_frames):
    (inversion,) = nodes["DDIMInvertVideo"].invert(handle, source_frames, SIZE, SIZE, "stretch", FRAMES, 8,
                                                   INVERSION_STEPS, STEPS, 0, 4)
    return inversion


def sample(nodes, handle, inversion, source_frames):
    (features,) = nodes["CaptureFeatures"].plan(inversion, 0.2, 0.2, 0.5, 0)
    return nodes["InjectedSampler"].sample(handle, features, source_frames[:1].flip(-1), PROMPT, "", 9.0, 1, "auto", 0)


@pytest.mark.parametrize("mode", MODES)
def test_after_a_node_the_weights_are_where_the_memory_mode_says(nodes, tiny_model_dir, source_frames, mode):
    (handle,) = nodes["LoadI2VBackbone"].load(tiny_model_dir.name, "fp32", mode)
    backbone = handle.backbone
    with StandInDevice() as gpu:
        inversion = invert(nodes, handle, source_frames)
        if handle.keep_loaded:  # auto is keep loaded with the policy that fits ("none" here)
            assert weights_on_device(handle) == weight_bytes(backbone.unet) + weight_bytes(backbone.vae)
            unet_weights = list(backbone.unet.parameters())
            before = gpu.bytes_to_device
            sample(nodes, handle, inversion, source_frames)
            assert all(a is b for a, b in zip(unet_weights, backbone.unet.parameters())), "the UNet moved again"
            assert gpu.bytes_to_device - before < weight_bytes(backbone.unet)
        else:
            assert weights_on_device(handle) == 0 and hooks(handle) == 0
            sample(nodes, handle, inversion, source_frames)
            assert weights_on_device(handle) == 0 and hooks(handle) == 0


@pytest.mark.parametrize("mode", ["offload after each node", "model offload (less VRAM)"])
def test_a_cancel_or_an_out_of_memory_error_leaves_nothing_on_the_gpu(nodes, tiny_model_dir, source_frames, mode,
                                                                     monkeypatch):
    (handle,) = nodes["LoadI2VBackbone"].load(tiny_model_dir.name, "fp32", mode)
    with StandInDevice() as gpu:
        inversion = invert(nodes, handle, source_frames)
        checks = []

        def cancel_at_the_third_step():
            checks.append(1)
            if len(checks) == 3:
                raise Cancelled

        monkeypatch.setattr(nodes["host"], "check_interrupted", cancel_at_the_third_step)
        with pytest.raises(Cancelled):
            sample(nodes, handle, inversion, source_frames)
        assert weights_on_device(handle) == 0, "the model stayed on the GPU after a cancel"
        assert hooks(handle) == 0, "offload or injection hooks were left on the model"

        monkeypatch.undo()
        gpu.fail_after_bytes_to_device = gpu.bytes_to_device + weight_bytes(handle.backbone.unet) // 2
        with pytest.raises(AnyV2VOutOfMemory):
            sample(nodes, handle, inversion, source_frames)
        assert weights_on_device(handle) == 0 and hooks(handle) == 0
