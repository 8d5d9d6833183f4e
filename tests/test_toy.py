"""The toy world and the shipped toy I2VGen-XL: determinism, loading like the real model, and the
offline demo end to end."""

import numpy as np
import pytest
import torch

from anyv2v_core.toy import world
from anyv2v_core.toy.demo import DISPLAY_SCALE, WEIGHTS

def test_same_seed_same_video_and_different_seeds_differ():
    frames_a, caption_a, info_a = world.generate(123)
    frames_b, caption_b, info_b = world.generate(123)
    assert np.array_equal(frames_a, frames_b) and caption_a == caption_b
    assert all(np.array_equal(a.centroids, b.centroids) and a.colour == b.colour for a, b in zip(info_a, info_b))
    assert not np.array_equal(frames_a, world.generate(124)[0])
    assert frames_a.shape == (8, 64, 64, 3) and frames_a.dtype == np.float32
    assert 0.0 <= frames_a.min() and frames_a.max() <= 1.0


def test_shapes_move_at_constant_speed_and_bounce_inside_the_frame():
    scene = world.make_scene(7, num_frames=40)
    for index, spec in enumerate(scene.objects):
        centroids = scene.centroids(index)
        half = spec.size / 2
        assert (centroids >= half - 1e-4).all() and (centroids <= scene.size - half + 1e-4).all()
        # each axis moves by |v| per frame except at a bounce, where the step folds back
        steps = np.abs(np.diff(centroids, axis=0))
        speed = np.abs(np.asarray(spec.velocity))
        assert (steps <= speed + 1e-3).all()
        assert np.isclose(steps, speed, atol=1e-3).mean() > 0.5


def test_edits_change_the_look_and_keep_the_motion():
    scene = world.make_scene(11)
    index = len(scene.objects) - 1
    colour = world.unused_colour(scene, index)
    recoloured, swapped = world.recolour(scene, index, colour), world.swap_shape(scene, index)
    assert recoloured.objects[index].colour == colour and colour not in {o.colour for o in scene.objects}
    assert swapped.objects[index].shape != scene.objects[index].shape
    for edited in (recoloured, swapped):
        assert np.array_equal(edited.centroids(index), scene.centroids(index))
        first = world.edited_first_frame(edited)
        assert np.array_equal(first, world.render(edited)[0])
        assert not np.array_equal(first, world.render(scene)[0])
    with pytest.raises(ValueError, match="unknown colour"):
        world.recolour(scene, index, "mauve")


@pytest.fixture(scope="module")
def toy_backbone():
    from anyv2v_core.loading import load_backbone

    torch.set_num_threads(1)
    return load_backbone(WEIGHTS)


def test_shipped_weights_load_like_the_real_model(toy_backbone):
    weights = [p for p in WEIGHTS.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in weights) < 10_000_000
    assert toy_backbone.name == "i2vgen-xl" and toy_backbone.vae_scale_factor == 4
    assert toy_backbone.schedule.prediction_type == "v_prediction"
    assert toy_backbone.schedule.alphas_cumprod[-1] < 1e-6  # zero terminal SNR
    modules = dict(toy_backbone.unet.named_modules())
    assert all(name in modules for name in toy_backbone.injection_layers.all_names())


def test_demo_writes_the_edit_and_never_overwrites(tmp_path):
    """The README's first command: a whole AnyV2V edit on the shipped weights, three files out.
    (Edit quality is measured by benchmarks/toy_eval.py; the current weights do not yet meet it.)"""
    from anyv2v_core.errors import AnyV2VError
    from anyv2v_core.toy.demo import run_demo
    from anyv2v_core.video import read_frames

    torch.set_num_threads(1)
    result = run_demo(tmp_path)
    assert [p.name for p in result.files] == ["source.mp4", "edited.mp4", "strip.png"]
    shown = {name: read_frames(tmp_path / f"{name}.mp4")[0].numpy() for name in ("source", "edited")}
    for name, frames in (("source", result.source), ("edited", result.edited)):
        big = frames.repeat(DISPLAY_SCALE, axis=1).repeat(DISPLAY_SCALE, axis=2)
        assert shown[name].shape == big.shape and result.edited.shape[0] == 8
        # each file holds its own clip up to the codec's error (measured 0.005), not the other one (0.08 away)
        assert np.abs(shown[name] - big).mean() < 0.02, name
        other = result.source if name == "edited" else result.edited
        assert np.abs(shown[name] - other.repeat(DISPLAY_SCALE, axis=1).repeat(DISPLAY_SCALE, axis=2)).mean() > 0.04
    with pytest.raises(AnyV2VError, match="already exists"):
        run_demo(tmp_path)


def test_inverted_latent_gives_the_source_back_and_random_noise_does_not(toy_backbone):
    """AnyV2V's premise on trained weights: sampled under the inversion's own conditioning (source
    first frame, empty prompt, no guidance), the DDIM-inverted latent gives the source back at the
    VAE's round-trip quality; the same sampling from random noise (the paper's ablation) makes
    another video. At 100 inversion and 50 sampling steps the committed weights measured 30.41 dB
    against a 30.50 dB VAE ceiling on this clip; from noise, about 16 dB."""
    from anyv2v_core.backbones.i2vgen_xl import NEGATIVE_PROMPT
    from anyv2v_core.inversion import invert_video
    from anyv2v_core.sampling import sample_edit
    from anyv2v_core.toy.demo import SETTINGS
    from anyv2v_core.toy.metrics import psnr
    from anyv2v_core.toy.train import FPS, HELD_OUT_SEED

    scene = world.make_scene(HELD_OUT_SEED)
    source = world.render(scene)
    frames = torch.from_numpy(source)
    inversion = invert_video(toy_backbone, frames, inversion_steps=100, sampling_steps=50, fps=FPS)

    def resample(initial_latents=None) -> float:
        latents = sample_edit(toy_backbone, inversion, frames[:1], prompt="", negative_prompt=NEGATIVE_PROMPT,
                              injection=SETTINGS.injection, cfg=1.0, initial_latents=initial_latents)
        return psnr(toy_backbone.decode(latents).numpy(), source)

    clean_latents = toy_backbone.encode_video(frames)  # [1, 4, F, h, w], the shape of the inverted start too
    ceiling = psnr(toy_backbone.decode(clean_latents).numpy(), source)
    from_inversion = resample()
    from_noise = resample(torch.randn(clean_latents.shape, generator=torch.Generator().manual_seed(0)))
    assert from_inversion > ceiling - 0.5, (from_inversion, ceiling)
    assert from_noise < from_inversion - 8.0, (from_noise, from_inversion)
