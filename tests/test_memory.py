"""Offload policies: same frames as keeping everything resident, one component resident at a time.

On this CPU-only suite "the device" is the CPU too, so the tests check the hooks' bookkeeping and
that they change no number; the GPU benchmark (benchmarks/gpu.py) measures the memory they save.
"""

import pytest
import torch

from anyv2v_core.injection import InjectionSettings, has_injection_hooks
from anyv2v_core.loading import load_backbone
from anyv2v_core.memory import Offloader
from anyv2v_core.pipeline import EditSettings, edit
from anyv2v_core.tiny_models import moving_square_video
from anyv2v_core.errors import AnyV2VError

SETTINGS = EditSettings(size_wh=(32, 32), inversion_steps=10, steps=5, injection=InjectionSettings(0.4, 0.4, 0.6))


def run(backbone):
    source = moving_square_video(4)
    return edit(backbone, source, source[:1].flip(-1), prompt="a square", settings=SETTINGS).frames


@pytest.fixture(scope="module")
def reference_frames(tiny_model_dir):
    return run(load_backbone(tiny_model_dir))


@pytest.mark.parametrize("policy", ["model", "sequential"])
def test_offload_policies_give_the_same_frames(tiny_model_dir, reference_frames, policy):
    backbone = load_backbone(tiny_model_dir, offload=policy)
    assert backbone.offloader.policy == policy
    frames = run(backbone)
    torch.testing.assert_close(frames, reference_frames, atol=1e-6, rtol=0)
    assert backbone.offloader.resident == "vae"  # decode ran last
    assert not has_injection_hooks(backbone.unet)


def test_model_offload_keeps_one_component_resident(tiny_model_dir):
    backbone = load_backbone(tiny_model_dir, offload="model")
    backbone.encode_prompt("hello")
    assert backbone.offloader.resident == "text_encoder"
    backbone.encode_video(moving_square_video(2))
    assert backbone.offloader.resident == "vae"


def test_release_removes_every_offload_hook(tiny_model_dir):
    backbone = load_backbone(tiny_model_dir, offload="sequential")
    backbone.offloader.release()
    assert not any(m._forward_pre_hooks or m._forward_hooks for c in backbone.modules().values() for m in c.modules())


def test_unknown_policy():
    with pytest.raises(AnyV2VError, match="offload policy"):
        Offloader({}, torch.device("cpu"), "disk")
