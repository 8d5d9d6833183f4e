"""Wan image-to-video backbones (rectified flow): parity with diffusers' own pipeline, the solver
orders, injection on the transformer, the Wan 2.2 A14B expert switch, loading and bad input.

Tiny random Wan folders of the three layouts are built in-process (`tiny_models.build_tiny_wan`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from anyv2v_core.backbones.wan import WanBackbone
from anyv2v_core.errors import AnyV2VError, ModelLoadError
from anyv2v_core.injection import InjectionSettings, has_injection_hooks
from anyv2v_core.inversion import invert_video
from anyv2v_core.backbones.families import detect_backbone
from anyv2v_core.loading import load_backbone
from anyv2v_core.sampling import sample_edit
from anyv2v_core.testing.tiny_models import WAN_KINDS, build_tiny_wan, moving_square_video
from conftest import REPO_ROOT

FRAMES = 9  # 3 latent frames
SIZES = {"wan2.1-i2v": 32, "wan2.2-i2v-a14b": 32, "wan2.2-ti2v": 64}  # multiples of 16 / 32
NO_INJECTION = InjectionSettings(conv_tau=0, spatial_tau=0, temporal_tau=0, attention_tau=0)
SHARED_CONFIGS = REPO_ROOT.parent / "shared" / "docs" / "model-configs"


@pytest.fixture(scope="module")
def wan_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wan")
    return {kind: build_tiny_wan(root / kind, kind) for kind in WAN_KINDS}


@pytest.fixture(scope="module")
def wan(wan_folders) -> dict[str, WanBackbone]:
    torch.set_num_threads(1)
    return {kind: load_backbone(folder, dtype="fp32") for kind, folder in wan_folders.items()}


def clip(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(source frames [9, s, s, 3], an edited first frame [1, s, s, 3] of 8-bit values)."""
    size = SIZES[kind]
    edited = (moving_square_video(1, size, colour=(0.1, 0.2, 0.9)) * 255).round() / 255
    return moving_square_video(FRAMES, size), edited


def rows_equal_to_source(rows: torch.Tensor) -> bool:
    """True when every edit row of a [3, ...] batch equals row 0 (the source)."""
    return bool(torch.equal(rows[1], rows[0]) and torch.equal(rows[2], rows[0]))


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", WAN_KINDS)
def test_taus_zero_is_diffusers_image_to_video_from_the_inverted_latent(wan, kind):
    """Without injection the edit is plain I2V sampling from the inverted latent: diffusers'
    WanImageToVideoPipeline, given the same start latent, sigmas and inputs, computes the same
    latents. This pins the text, CLIP and first-frame conditioning, the expert switch, the shift
    and the Euler step rule."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from PIL import Image

    backbone, steps = wan[kind], 4
    frames, edited = clip(kind)
    inversion = invert_video(backbone, frames, inversion_steps=steps, sampling_steps=steps, order=1)
    ours = sample_edit(backbone, inversion, edited, prompt="a blue square", negative_prompt="blurry",
                       injection=NO_INJECTION, cfg=4.0)

    sigmas = backbone.schedule.sigmas(steps)[:-1]  # diffusers appends the final 0 itself

    class OurSigmas(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=sigmas, device=device)

    experts = backbone.transformers
    pipeline = WanImageToVideoPipeline(
        tokenizer=backbone.tokenizer, text_encoder=backbone.text_encoder, vae=backbone.vae,
        scheduler=OurSigmas(shift=1.0), image_processor=backbone.image_processor,
        image_encoder=backbone.image_encoder, transformer=experts["transformer"],
        transformer_2=experts["transformer_2"] if "transformer_2" in experts else None,
        boundary_ratio=0.9 if "transformer_2" in experts else None, expand_timesteps=kind == "wan2.2-ti2v")
    start = inversion.latent_at(sigmas[0])
    if backbone.conditioning_frames:  # TI2V: diffusers' latents include the first frame, which it overwrites
        start = torch.cat([torch.zeros_like(start[:, :, :1]), start], dim=2)
    image = Image.fromarray((edited[0] * 255).round().to(torch.uint8).numpy())
    reference = pipeline(image=image, prompt="a blue square", negative_prompt="blurry", height=SIZES[kind],
                         width=SIZES[kind], num_frames=FRAMES, num_inference_steps=steps, guidance_scale=4.0,
                         latents=start, output_type="latent").frames
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max() <= 1e-5
    assert ours.abs().mean() > 0.05  # a real comparison, not of two zero tensors


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_flow_sigmas_are_the_uniform_grid_bent_by_the_shift_as_diffusers_shifts_it(shift):
    """The parity test above feeds diffusers our sigmas; this pins the grid itself to diffusers'
    shift rule applied to a uniform grid from 1 to 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from anyv2v_core.flow_schedule import FlowMatchingSchedule

    steps = 8
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=[1 - k / steps for k in range(steps)])
    assert FlowMatchingSchedule(shift=shift).sigmas(steps) == pytest.approx(scheduler.sigmas.tolist(), abs=1e-7)


# ---------------------------------------------------------------------------------------------- solver orders


def round_trip_error(backbone, frames: torch.Tensor, steps: int, order: int) -> float:
    inversion = invert_video(backbone, frames, inversion_steps=steps, sampling_steps=steps, order=order)
    latents = sample_edit(backbone, inversion, frames[:1], prompt="", negative_prompt="", cfg=1.0,
                          injection=NO_INJECTION)
    clean = backbone.encode_video(frames)
    return float((latents - clean).norm() / clean.norm())


def test_round_trip_error_falls_with_steps_and_second_order_wins_at_equal_calls(wan):
    backbone = wan["wan2.1-i2v"]
    frames, _ = clip("wan2.1-i2v")
    errors = {(order, steps): round_trip_error(backbone, frames, steps, order)
              for order in (1, 2) for steps in (2, 4, 8, 16)}
    for order in (1, 2):
        assert [errors[order, n] for n in (2, 4, 8, 16)] == sorted([errors[order, n] for n in (2, 4, 8, 16)],
                                                                   reverse=True), errors
    for steps in (2, 4, 8):  # order 2 at n steps makes 2n model calls, as order 1 at 2n steps
        assert errors[2, steps] < 0.5 * errors[1, 2 * steps], errors


def test_second_order_sampling_reads_the_inverted_half_step_latents(wan):
    backbone = wan["wan2.1-i2v"]
    frames, _ = clip("wan2.1-i2v")
    inversion = invert_video(backbone, frames, inversion_steps=3, sampling_steps=3, order=2)
    wanted = backbone.schedule.source_levels(3, order=2)
    assert set(inversion.latents) == wanted and len(wanted) == 6  # 3 step starts and 3 half steps
    with pytest.raises(AnyV2VError, match="even multiple"):
        invert_video(backbone, frames, inversion_steps=9, sampling_steps=3, order=2)
    finer = invert_video(backbone, frames, inversion_steps=6, sampling_steps=3, order=2)
    assert set(finer.latents) == wanted  # the half steps are points of the finer inversion grid


# ---------------------------------------------------------------------------------------------- injection


@pytest.mark.parametrize("kind", ["wan2.1-i2v", "wan2.2-i2v-a14b"])
def test_attention_injection_is_active_exactly_in_its_window_on_every_block(wan, kind):
    """While injection is on, the edit rows' Q and K in every hooked block equal the source row's
    (never V); after it they differ. The source row is kept at every step to see both."""
    backbone, steps, tau = wan[kind], 4, 0.5
    frames, edited = clip(kind)
    inversion = invert_video(backbone, frames, inversion_steps=steps, sampling_steps=steps)
    modules = dict(backbone.denoiser.named_modules())
    seen: list[tuple[int, str, str, bool]] = []  # (step, block, q/k/v, edit rows equal the source row)
    step = [0]

    def spy(block: str, what: str):
        def record(module, args, output=None):
            value = args[0] if output is None else output
            seen.append((step[0], block, what, rows_equal_to_source(value)))
        return record

    handles = []
    for block in backbone.injection_layers.attention:
        attention = modules[block]
        # norm_q / norm_k take to_q / to_k's output after the injection hook replaced it
        handles.append(attention.norm_q.register_forward_pre_hook(spy(block, "q")))
        handles.append(attention.norm_k.register_forward_pre_hook(spy(block, "k")))
        handles.append(attention.to_v.register_forward_hook(spy(block, "v")))
    try:
        sample_edit(backbone, inversion, edited, prompt="a blue square", negative_prompt="",
                    injection=InjectionSettings(attention_tau=tau), cfg=3.0, keep_source_row=True,
                    progress=lambda done, total: step.__setitem__(0, done))
    finally:
        for handle in handles:
            handle.remove()
    active_steps = int(steps * tau)
    blocks_per_call = len(backbone.injection_layers.attention) // len(backbone.transformers)
    assert len(seen) == 2 * steps * 3 * blocks_per_call  # order 2: two evaluations per step
    for step_index, block, what, equal in seen:
        expected = what != "v" and step_index < active_steps
        assert equal == expected, (step_index, block, what)
    assert not has_injection_hooks(backbone.denoiser)


def test_injection_hooks_are_removed_after_an_error_and_a_cancel_and_reruns_are_identical(wan):
    backbone = wan["wan2.2-i2v-a14b"]
    frames, edited = clip("wan2.2-i2v-a14b")
    inversion = invert_video(backbone, frames, inversion_steps=4, sampling_steps=4)
    settings = dict(prompt="a blue square", negative_prompt="", injection=InjectionSettings(attention_tau=1.0), cfg=3.0)
    reference = sample_edit(backbone, inversion, edited, **settings)
    assert not has_injection_hooks(backbone.denoiser)

    class Cancelled(Exception):
        pass

    def cancel_at_step_2(done, total):
        if done == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        sample_edit(backbone, inversion, edited, progress=cancel_at_step_2, **settings)
    assert not has_injection_hooks(backbone.denoiser)

    def fail(module, args):
        raise RuntimeError("a failure inside the transformer")

    handle = backbone.transformers["transformer_2"].blocks[1].register_forward_pre_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="inside the transformer"):
            sample_edit(backbone, inversion, edited, **settings)
    finally:
        handle.remove()
    assert not has_injection_hooks(backbone.denoiser)
    assert torch.equal(sample_edit(backbone, inversion, edited, **settings), reference)


@pytest.mark.parametrize("kind", ["wan2.2-i2v-a14b", "wan2.2-ti2v"])
def test_rows_one_at_a_time_give_the_batched_edit(wan, kind):
    """Each block runs the source row, then the edit rows, one at a time; the injected Q/K of the
    source wait only for their block; the edit is the batched one, and the blocks come back as they were."""
    backbone = wan[kind]
    frames, edited = clip(kind)
    inversion = invert_video(backbone, frames, inversion_steps=4, sampling_steps=4)
    settings = dict(prompt="a blue square", negative_prompt="", injection=InjectionSettings(attention_tau=0.5), cfg=3.0)
    batched = sample_edit(backbone, inversion, edited, **settings)
    calls = []
    attention = backbone.row_blocks()[0].attn1  # inside the block, where the rows are split
    handle = attention.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    backbone.one_row_at_a_time = True
    try:
        one_at_a_time = sample_edit(backbone, inversion, edited, **settings)
    finally:
        backbone.one_row_at_a_time = False
        handle.remove()
    torch.testing.assert_close(one_at_a_time, batched, rtol=0, atol=1e-5)
    assert calls and set(calls) == {1}  # the block's attention only ever saw one row
    assert not any("forward" in vars(module) for module in backbone.row_blocks())
    assert not has_injection_hooks(backbone.denoiser)
    uninjected = sample_edit(backbone, inversion, edited, **{**settings, "injection": NO_INJECTION})
    assert not torch.allclose(one_at_a_time, uninjected)  # the injection reached the one-row runs


# ---------------------------------------------------------------------------------------------- Wan 2.2 A14B


def test_a14b_switches_experts_at_the_same_sigma_in_inversion_and_sampling(wan):
    backbone = wan["wan2.2-i2v-a14b"]
    frames, edited = clip("wan2.2-i2v-a14b")
    calls: list[tuple[str, float]] = []
    handles = [expert.register_forward_pre_hook(
        lambda module, args, kwargs, name=name: calls.append((name, float(kwargs["timestep"].flatten()[0]))),
        with_kwargs=True) for name, expert in backbone.transformers.items()]
    try:
        inversion = invert_video(backbone, frames, inversion_steps=8, sampling_steps=8, order=1)
        inverted, calls[:] = list(calls), []
        sample_edit(backbone, inversion, edited, prompt="", negative_prompt="", injection=NO_INJECTION)
        sampled = list(calls)
    finally:
        for handle in handles:
            handle.remove()
    for phase in (inverted, sampled):
        assert {name for name, time in phase if time >= 900} == {"transformer"}
        assert {name for name, time in phase if time < 900} == {"transformer_2"}
    inversion_experts, sampling_experts = dict((t, n) for n, t in inverted), dict((t, n) for n, t in sampled)
    shared = set(inversion_experts) & set(sampling_experts)
    assert len(shared) == 7  # every sigma but 0 (inversion only) and 1 (sampling only)
    assert all(inversion_experts[t] == sampling_experts[t] for t in shared)
    # the experts are different networks: the switch is observable
    x = torch.randn(1, 36, 3, 4, 4)
    text = torch.zeros(1, 512, 16)
    outputs = [expert(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                      return_dict=False)[0] for expert in backbone.transformers.values()]
    assert not torch.allclose(outputs[0], outputs[1])


# ---------------------------------------------------------------------------------------------- windows, CLI


def test_temporal_windows_count_video_frames_and_one_window_is_no_window(wan):
    from anyv2v_core.plan import plan_inversion, video_frames_per_call
    from anyv2v_core.windows import ContextWindows

    backbone = wan["wan2.1-i2v"]
    frames, edited = clip("wan2.1-i2v")
    frames = moving_square_video(17, 32)  # 5 latent frames

    def run(windows):
        inversion = invert_video(backbone, frames, inversion_steps=2, sampling_steps=2, windows=windows)
        return inversion, sample_edit(backbone, inversion, edited, prompt="", negative_prompt="", cfg=2.0)

    plain = run(None)[1]
    whole, whole_latents = run(ContextWindows(17, 4))
    assert torch.equal(whole_latents, plain)
    windowed, windowed_latents = run(ContextWindows(9, 4))  # latent windows of 3 sharing 1 frame
    assert windowed.windows == ContextWindows(3, 1)
    # memory is sized for the video frames of one window, the same from the inversion and its plan
    planned = plan_inversion(backbone, frames, inversion_steps=2, sampling_steps=2, windows=ContextWindows(9, 4))
    assert video_frames_per_call(backbone, windowed) == video_frames_per_call(backbone, planned) == 9
    assert video_frames_per_call(backbone, whole) == 17
    assert not torch.equal(windowed_latents, plain) and torch.isfinite(windowed_latents).all()
    with pytest.raises(AnyV2VError, match="4k \\+ 1"):
        invert_video(backbone, frames, inversion_steps=2, sampling_steps=2, windows=ContextWindows(8, 4))


def test_cli_edits_with_wan_and_rounds_the_clip_to_4k_plus_1_frames(wan_folders, tmp_path):
    from anyv2v_core.cli import main
    from anyv2v_core.video import read_frames, write_image, write_video

    source = moving_square_video(11, 32)
    write_video(tmp_path / "source.mp4", source, fps=16)
    write_image(tmp_path / "first.png", clip("wan2.1-i2v")[1][0])
    out = tmp_path / "edited.mp4"
    code = main(["edit", "--model", str(wan_folders["wan2.1-i2v"]), "--video", str(tmp_path / "source.mp4"),
                 "--edited-first-frame", str(tmp_path / "first.png"), "--prompt", "a blue square", "--out", str(out),
                 "--steps", "2", "--inversion-steps", "2", "--size", "32x32", "--attention-blocks", "late",
                 "--inversion-order", "1", "--shift", "5"])
    assert code == 0
    frames, fps = read_frames(out)
    assert frames.shape == (9, 32, 32, 3)  # 11 source frames -> 9 = 4 * 2 + 1


# ---------------------------------------------------------------------------------------------- bad input


def make_text_to_video_folder(folder: Path, source: Path) -> Path:
    shutil.copytree(source, folder)
    config_path = folder / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(in_channels=16, image_dim=None, added_kv_proj_dim=None)
    config_path.write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "WanPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture()
def no_weights_load(monkeypatch):
    """Fail the test if any Wan weights start loading."""
    from diffusers import WanTransformer3DModel

    def refuse(*args, **kwargs):
        pytest.fail("weights were loaded before the bad input was refused")

    monkeypatch.setattr(WanTransformer3DModel, "from_pretrained", refuse)


def test_bad_wan_input_fails_before_any_weight_loads(wan_folders, tmp_path, no_weights_load, capsys):
    from anyv2v_core.cli import main
    from anyv2v_core.video import write_image, write_video

    write_video(tmp_path / "source.mp4", moving_square_video(9, 32), fps=16)
    write_image(tmp_path / "first.png", clip("wan2.1-i2v")[1][0])
    text_to_video = make_text_to_video_folder(tmp_path / "t2v", wan_folders["wan2.1-i2v"])
    no_low_noise_expert = tmp_path / "a14b"
    shutil.copytree(wan_folders["wan2.2-i2v-a14b"], no_low_noise_expert)
    shutil.rmtree(no_low_noise_expert / "transformer_2")
    cases = [
        ((wan_folders["wan2.1-i2v"], "--frames", "8", "--size", "32x32"), "4k \\+ 1 frames .* got 8; use 5"),
        ((wan_folders["wan2.1-i2v"], "--size", "40x32"), "multiples of 16"),
        ((wan_folders["wan2.2-ti2v"], "--size", "48x48"), "multiples of 32"),
        ((text_to_video, "--size", "32x32"), "text-to-video"),
        ((no_low_noise_expert, "--size", "32x32"), "transformer_2/ \\(the low-noise expert\\) is missing"),
        ((wan_folders["wan2.1-i2v"], "--sampler", "ddim"), "sampler 'ddim' does not apply"),
        ((wan_folders["wan2.1-i2v"], "--steps", "4", "--inversion-steps", "6"), "multiple of 4"),
        ((wan_folders["wan2.1-i2v"], "--attention-blocks", "3-9", "--size", "32x32"), "blocks in 0..3"),
    ]
    for (model, *options), message in cases:
        code = main(["edit", "--model", str(model), "--video", str(tmp_path / "source.mp4"), "--edited-first-frame",
                     str(tmp_path / "first.png"), "--prompt", "x", "--out", str(tmp_path / "out.mp4"), *options])
        error = capsys.readouterr().err
        assert code == 2, (options, error)
        assert error.startswith("error: ") and len(error.strip().splitlines()) == 1, error
        import re

        assert re.search(message, error), (message, error)
    assert not (tmp_path / "out.mp4").exists()
    assert detect_backbone(wan_folders["wan2.2-ti2v"]) == "wan2.2-ti2v"
    with pytest.raises(ModelLoadError, match="apply to Wan"):
        load_backbone(REPO_ROOT / "anyv2v_core" / "toy" / "weights", shift=3.0)


# ---------------------------------------------------------------------------------------------- real architectures


def published_config(repo: str, subfolder: str) -> dict:
    folder = SHARED_CONFIGS / repo / subfolder
    files = sorted(folder.glob("config*.json")) if folder.is_dir() else []
    if not files:
        pytest.skip(f"{folder} is absent (the published configs live in ../shared/docs/model-configs)")
    return json.loads(files[0].read_text())


@pytest.mark.parametrize("repo, experts, parameters", [
    ("Wan-AI--Wan2.1-I2V-14B-480P-Diffusers", ("transformer",), 16_394_878_784),
    ("Wan-AI--Wan2.2-I2V-A14B-Diffusers", ("transformer", "transformer_2"), 14_288_901_184),
    ("Wan-AI--Wan2.2-TI2V-5B-Diffusers", ("transformer",), 4_999_787_712),
])
def test_published_architectures_have_every_injection_target(repo, experts, parameters):
    """The real transformers, built on the meta device from their published configs, have the
    published parameter counts and every module the default injection hooks."""
    from diffusers import WanTransformer3DModel

    from anyv2v_core.backbones.wan import attention_block_indices, injection_layers_for
    from anyv2v_core.injection import missing_layers

    networks = {}
    for expert in experts:
        config = {k: v for k, v in published_config(repo, expert).items() if not k.startswith("_")}
        with torch.device("meta"):
            networks[expert] = WanTransformer3DModel(**config)
        assert sum(p.numel() for p in networks[expert].parameters()) == parameters
    blocks = attention_block_indices("all", networks["transformer"].config.num_layers)
    layers = injection_layers_for(experts, blocks)
    assert missing_layers(torch.nn.ModuleDict(networks), layers) == []
    assert len(layers.attention) == len(experts) * networks["transformer"].config.num_layers


@pytest.mark.parametrize("change, message", [
    ({"scale_factor_temporal": 8}, r"8 frames and 8x8 pixels per latent\) does not fit wan2.1-i2v, which takes 16 channels, 4 frames"),
    ({"scale_factor_spatial": 16}, r"4 frames and 16x16 pixels per latent\) does not fit wan2.1-i2v.* 8x pixels"),
    ("ti2v", r"this VAE \(8 latent channels.* does not fit wan2.1-i2v, which takes 16 channels.*Wan 2.2's for TI2V 5B"),
])
def test_a_vae_with_other_factors_or_channels_is_refused_at_load(wan_folders, tmp_path, change, message):
    """The VAE's compression is read from its config; one that does not fit the transformer is refused
    before any encoding, naming the VAE to use (not a raw channel-count RuntimeError mid-edit)."""
    folder = shutil.copytree(wan_folders["wan2.1-i2v"], tmp_path / "wan")
    if change == "ti2v":  # Wan 2.2's VAE with a Wan 2.1 transformer, a common mistake
        shutil.rmtree(folder / "vae")
        shutil.copytree(wan_folders["wan2.2-ti2v"] / "vae", folder / "vae")
    else:
        config = json.loads((folder / "vae" / "config.json").read_text())
        (folder / "vae" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ModelLoadError, match=message):
        load_backbone(folder, dtype="fp32")


def test_ti2v_windows_put_the_clean_first_frame_in_the_first_window_only(wan):
    """A later temporal window starts mid-video: the clean first frame (timestep 0) goes in front of the
    window that starts the video, not of every window."""
    from anyv2v_core.windows import ContextWindows

    backbone, calls = wan["wan2.2-ti2v"], []  # per transformer call: latent frames in, tokens at timestep 0

    def spy(module, args, kwargs):
        timestep = kwargs["timestep"]
        if timestep.max() > 0:  # not the inversion's first evaluation, at the clean end
            calls.append((kwargs["hidden_states"].shape[2], int((timestep == 0).sum())))

    handle = backbone.transformers["transformer"].register_forward_pre_hook(spy, with_kwargs=True)
    try:  # 13 frames: 3 generated latent frames after the first, in latent windows [0, 2) and [1, 3)
        invert_video(backbone, moving_square_video(13, 64), inversion_steps=2, sampling_steps=2, order=1,
                     windows=ContextWindows(5, 4))
    finally:
        handle.remove()
    tokens_per_frame = (64 // 16 // 2) ** 2
    assert calls == [(3, tokens_per_frame), (2, 0)]
