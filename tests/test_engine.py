"""Behaviour of inversion, injection and injected sampling on a tiny model built in-process."""

import pytest
import torch
from anyv2v_core.testing.tiny_models import moving_square_video

from anyv2v_core.errors import AnyV2VError
from anyv2v_core.injection import FeatureInjector, InjectionPlan, InjectionSettings, has_injection_hooks, injected
from anyv2v_core.inversion import invert_video
from anyv2v_core.sampling import sample_edit
from spies import OverwrittenFeatures, injected_names

STEPS = 10
INVERSION_STEPS = 20


@pytest.fixture(scope="module")
def source():
    return moving_square_video(num_frames=6, size=32)


@pytest.fixture(scope="module")
def edited_first_frame(source):
    frame = source[:1].clone()
    frame[..., 2:10, 2:10, :] = torch.tensor([0.1, 0.2, 0.9])
    return frame


@pytest.fixture(scope="module")
def inversion(tiny_backbone, source):
    return invert_video(tiny_backbone, source, inversion_steps=INVERSION_STEPS, sampling_steps=STEPS, fps=8)


def run_edit(backbone, inversion, edited_first_frame, **kwargs):
    settings = dict(prompt="a blue square", negative_prompt="blurry", cfg=5.0)
    settings.update(kwargs)
    return sample_edit(backbone, inversion, edited_first_frame, **settings)


def test_inversion_keeps_exactly_the_sampling_timesteps(tiny_backbone, inversion):
    assert sorted(inversion.latents) == sorted(tiny_backbone.schedule.timesteps(STEPS))
    assert all(latent.shape == (1, 4, 6, 16, 16) and latent.device.type == "cpu" for latent in inversion.latents.values())


def test_inversion_moves_towards_noise(tiny_backbone, source, inversion):
    x0 = tiny_backbone.encode_video(source)
    timesteps = sorted(inversion.latents)
    distances = [float((inversion.latents[t] - x0).norm()) for t in timesteps]
    assert distances == sorted(distances), "latents must drift monotonically away from x0 as t grows"


def test_inversion_rejects_steps_that_miss_sampling_timesteps(tiny_backbone, source):
    with pytest.raises(AnyV2VError, match="inversion steps do not reach sampling timestep"):
        invert_video(tiny_backbone, source, inversion_steps=30, sampling_steps=STEPS)


def test_all_taus_zero_equals_plain_i2v_sampling(tiny_backbone, inversion, edited_first_frame):
    """tau = 0 for every kind is plain I2VGen-XL DDIM sampling (diffusers' scheduler) from the inverted latent."""
    from diffusers import DDIMScheduler
    from anyv2v_core.toy.components import SCHEDULER_CONFIG

    edited = run_edit(tiny_backbone, inversion, edited_first_frame, injection=InjectionSettings(0, 0, 0))

    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    scheduler.set_timesteps(STEPS)
    rows_args = dict(num_frames=6, fps=8)
    uncond = tiny_backbone.condition(edited_first_frame, "blurry", unconditional=True, **rows_args)
    cond = tiny_backbone.condition(edited_first_frame, "a blue square", **rows_args)
    latents = inversion.latents[int(scheduler.timesteps[0])].clone()
    for t in scheduler.timesteps:
        out = tiny_backbone.predict(torch.cat([latents, latents]), int(t), [uncond, cond])
        guided = out[:1] + 5.0 * (out[1:] - out[:1])
        latents = scheduler.step(guided, t, latents, eta=0.0).prev_sample
    torch.testing.assert_close(edited, latents, atol=1e-5, rtol=1e-4)


def test_each_kind_is_injected_exactly_in_its_window(tiny_backbone, inversion, edited_first_frame):
    """Observed on the features: at step i the edit rows carry the source row's features of every kind
    whose window int(steps * tau) is still open, and of no other; the source row runs until the last
    window closes."""
    settings = InjectionSettings(conv_tau=0.2, spatial_tau=0.4, temporal_tau=0.6)
    with OverwrittenFeatures(tiny_backbone.denoiser) as seen:
        run_edit(tiny_backbone, inversion, edited_first_frame, injection=settings)
    open_kinds = [[kind for kind in ("conv", "spatial", "temporal") if step < int(STEPS * settings.tau(kind))]
                  for step in range(STEPS)]
    assert seen.rows == [3 if kinds else 2 for kinds in open_kinds]
    assert seen.calls == [injected_names(tiny_backbone.injection_layers, *kinds) for kinds in open_kinds if kinds]


def test_hook_copies_the_source_block_into_every_other_block():
    injector = FeatureInjector()
    injector.set_step(("spatial",), num_rows=3)
    output = torch.arange(3 * 4 * 2, dtype=torch.float32).reshape(3 * 4, 2)  # [rows * per-row batch, C]
    replaced = injector.hook_for("spatial")(None, (), output)
    torch.testing.assert_close(replaced, output[:4].repeat(3, 1))
    assert injector.hook_for("conv")(None, (), output) is None  # inactive kind: untouched
    injector.set_step(("spatial",), num_rows=1)  # no source row: nothing to inject
    assert injector.hook_for("spatial")(None, (), output) is None


def test_dropping_the_source_row_after_the_last_window_changes_nothing(tiny_backbone, inversion, edited_first_frame):
    settings = InjectionSettings(0.2, 0.2, 0.5)
    dropped = run_edit(tiny_backbone, inversion, edited_first_frame, injection=settings)
    kept = run_edit(tiny_backbone, inversion, edited_first_frame, injection=settings, keep_source_row=True)
    torch.testing.assert_close(dropped, kept, atol=1e-5, rtol=1e-5)


def test_injection_changes_the_result(tiny_backbone, inversion, edited_first_frame):
    plain = run_edit(tiny_backbone, inversion, edited_first_frame, injection=InjectionSettings(0, 0, 0))
    injected_result = run_edit(tiny_backbone, inversion, edited_first_frame, injection=InjectionSettings(1, 1, 1))
    assert (plain - injected_result).abs().max() > 1e-3


def test_start_index_past_the_steps_is_refused(tiny_backbone, inversion, edited_first_frame):
    """(Where sampling starts is observed in test_sampling_behaviour.py.)"""
    with pytest.raises(AnyV2VError, match="start index"):
        run_edit(tiny_backbone, inversion, edited_first_frame, start_index=STEPS)


def test_unet_is_unpatched_after_success_and_after_an_exception(tiny_backbone, inversion, edited_first_frame):
    unet = tiny_backbone.unet
    processors = {name: type(p) for name, p in unet.attn_processors.items()}
    reference = run_edit(tiny_backbone, inversion, edited_first_frame)
    assert not has_injection_hooks(unet)

    class Cancelled(Exception):
        pass

    def cancel_at_step_3(done, total):
        if done == 3:
            raise Cancelled

    with pytest.raises(Cancelled):
        run_edit(tiny_backbone, inversion, edited_first_frame, progress=cancel_at_step_3)
    assert not has_injection_hooks(unet)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == processors
    torch.testing.assert_close(run_edit(tiny_backbone, inversion, edited_first_frame), reference, atol=0, rtol=0)


def test_injection_names_missing_layers(tiny_backbone):
    from anyv2v_core.backbones.base import InjectionLayers

    layers = InjectionLayers(conv=("up_blocks.9.resnets.0.conv2",), spatial_attention=(), temporal_attention=())
    plan = InjectionPlan.build(1, InjectionSettings(1, 1, 1, layers=layers), tiny_backbone.injection_layers)
    with pytest.raises(AnyV2VError, match=r"up_blocks\.9\.resnets\.0\.conv2"):
        with injected(tiny_backbone.unet, plan):
            pass
    assert not has_injection_hooks(tiny_backbone.unet)


def test_same_seed_same_output_and_posterior_sampling_is_seeded(tiny_backbone, source):
    def inverted(seed):
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        return invert_video(tiny_backbone, source, inversion_steps=10, sampling_steps=10, generator=generator)

    a, b, c = inverted(7), inverted(7), inverted(8)
    t = max(a.latents)
    assert torch.equal(a.latents[t], b.latents[t])
    assert not torch.equal(a.latents[t], c.latents[t])
    assert torch.equal(inverted(None).latents[t], inverted(None).latents[t])


@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan")])
def test_taus_outside_unit_interval_are_rejected(tau):
    with pytest.raises(AnyV2VError, match="conv_tau"):
        InjectionSettings(conv_tau=tau)
