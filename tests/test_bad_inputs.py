"""Every bad input of issue 6, one parametrized case each: the engine or the node refuses it with an
AnyV2VError (ModelLoadError for models) whose message names the problem, before any heavy work.

"Before heavy work" is enforced, not assumed: the backbone used here raises HeavyWorkStarted from
its VAE and UNet entry points, so a check that ran too late fails the test with that error instead.
`BAD_INPUT_COUNT` at the bottom is the number reported in docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from anyv2v_core.backbones.base import InjectionLayers
from anyv2v_core.errors import AnyV2VError, ModelLoadError
from anyv2v_core.injection import InjectionSettings
from anyv2v_core.inversion import Inversion, invert_video
from anyv2v_core.pipeline import edit
from anyv2v_core.plan import EditSettings
from anyv2v_core.sampling import sample_edit
from anyv2v_core.testing.tiny_models import moving_square_video
from anyv2v_core.windows import ContextWindows

SIZE = 32
SOURCE = moving_square_video(6, SIZE)
EDITED = SOURCE[:1].flip(-1)
QUICK = dict(size_wh=(SIZE, SIZE), inversion_steps=4, steps=2)


class HeavyWorkStarted(Exception):
    pass


@pytest.fixture
def guarded(tiny_backbone, monkeypatch):
    """The tiny backbone with every VAE / UNet entry point raising HeavyWorkStarted."""

    def heavy(*args, **kwargs):
        raise HeavyWorkStarted("a check ran after the model started working")

    for name in ("encode_video", "predict", "decode", "condition"):
        monkeypatch.setattr(tiny_backbone, name, heavy)
    return tiny_backbone


def run_edit(backbone, source=SOURCE, edited=EDITED, **settings):
    return edit(backbone, source, edited, prompt="a square", settings=EditSettings(**{**QUICK, **settings}))


def fake_inversion(**overrides) -> Inversion:
    """An Inversion with no latents: enough for sample_edit's checks, which come before any use of them."""
    fields = dict(latents={}, source_condition=None, source_first_frame=torch.zeros(1, SIZE, SIZE, 3),
                  backbone_name="i2vgen-xl", num_frames=6, fps=8, inversion_steps=4, sampling_steps=2)
    return Inversion(**{**fields, **overrides})


def run_sample(backbone, inversion=None, edited=EDITED, **kwargs):
    arguments = dict(prompt="a square", negative_prompt="", **kwargs)
    return sample_edit(backbone, inversion or fake_inversion(), edited, **arguments)


def with_alpha(frames):
    return torch.cat([frames, torch.ones_like(frames[..., :1])], dim=-1)


def poisoned(frames, value):
    frames = frames.clone()
    frames[0, 0, 0, 0] = value
    return frames


MISSING_CONV = InjectionLayers(conv=("up_blocks.9.resnets.0.conv2",), spatial_attention=(), temporal_attention=())

# ---------------------------------------------------------------------------------------------- frames

FRAME_CASES = {
    "empty batch": (lambda b: run_edit(b, source=SOURCE[:0]), "0 frame.*at least 2"),
    "one frame": (lambda b: run_edit(b, source=SOURCE[:1]), "1 frame.*at least 2"),
    "channels first": (lambda b: run_edit(b, source=SOURCE.permute(0, 3, 1, 2)), "channels first"),
    "RGBA frames": (lambda b: run_edit(b, source=with_alpha(SOURCE)), "RGBA.*alpha"),
    "grayscale frames without a channel axis": (lambda b: run_edit(b, source=SOURCE[..., 0]), r"layout.*\[6, 32, 32\]"),
    "a batch of videos": (lambda b: run_edit(b, source=SOURCE[None]), r"layout.*\[1, 6, 32, 32, 3\]"),
    "not a tensor": (lambda b: run_edit(b, source=SOURCE.numpy()), "must be a tensor.*ndarray"),
    "NaN values": (lambda b: run_edit(b, source=poisoned(SOURCE, float("nan"))), "NaN"),
    "infinite values": (lambda b: run_edit(b, source=poisoned(SOURCE, float("inf"))), "infinite"),
    "8-bit values": (lambda b: run_edit(b, source=SOURCE * 255), r"0\.\.1.*1/255"),
    "negative values": (lambda b: run_edit(b, source=SOURCE - 0.5), r"0\.\.1"),
    "more frames asked than the source has": (lambda b: run_edit(b, num_frames=8), "6 frames but 8.*at most 6"),
    "more frames at once than the model can take": (
        lambda b: run_edit(b, source=torch.rand(129, 8, 8, 3)), "129 frames at once exceed 8x the 16.*window_length 16"),
    "windows longer than the model can take": (
        lambda b: run_edit(b, source=torch.rand(201, 8, 8, 3), windows=ContextWindows(200, 4)),
        "windows of 200 frames exceed 8x.*use windows of 16"),
    "source frames given to invert_video unprepared, size not a multiple of 8": (
        lambda b: invert_video(b, torch.rand(4, 30, 30, 3), inversion_steps=4, sampling_steps=2), "multiples of 8"),
    "edited first frame: a batch of two": (lambda b: run_edit(b, edited=SOURCE[:2]), "one image, got a batch of 2"),
    "edited first frame: RGBA": (lambda b: run_edit(b, edited=with_alpha(EDITED)), "edited first frame.*alpha"),
    "edited first frame: one channel": (lambda b: run_edit(b, edited=EDITED[..., :1]), r"edited first frame.*\[1, 32, 32, 1\]"),
    "edited first frame: NaN": (lambda b: run_edit(b, edited=poisoned(EDITED, float("nan"))), "edited first frame.*NaN"),
    "edited first frame: 8-bit": (lambda b: run_edit(b, edited=EDITED * 255), r"edited first frame.*0\.\.1"),
    "edited first frame: not at the inversion's size": (
        lambda b: run_sample(b, edited=torch.rand(1, 48, 32, 3)), "working size 32x32, got 1 image.*32x48"),
}


@pytest.mark.parametrize("case", list(FRAME_CASES))
def test_bad_frames(guarded, case):
    run, message = FRAME_CASES[case]
    with pytest.raises(AnyV2VError, match=message):
        run(guarded)


def test_edited_first_frame_of_another_aspect_ratio_is_resized_with_a_warning(caplog):
    """Decision: a warning, not an error: the resize policy handles any aspect ratio, but a frame
    whose aspect matches neither the source nor the working size will not line up with the source."""
    from anyv2v_core.video import prepare_first_frame

    with caplog.at_level(logging.WARNING, logger="AnyV2V"):
        assert prepare_first_frame(torch.rand(1, 32, 64, 3), size_wh=(SIZE, SIZE)).shape == (1, SIZE, SIZE, 3)
    assert "another aspect ratio than the working size 32x32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="AnyV2V"):  # the source's aspect ratio (or the working one) is fine
        prepare_first_frame(torch.rand(1, 36, 64, 3), size_wh=(SIZE, SIZE), source_wh=(1280, 720))
        prepare_first_frame(torch.rand(1, 64, 64, 3), size_wh=(SIZE, SIZE), source_wh=(1280, 720))
    assert caplog.text == ""


def test_long_clips_at_once_warn_and_name_the_windows(tiny_backbone, caplog):
    from anyv2v_core.plan import check_frame_count

    with caplog.at_level(logging.WARNING, logger="AnyV2V"):
        check_frame_count(tiny_backbone, 32, None)  # 2x the training length: fine
        assert caplog.text == ""
        check_frame_count(tiny_backbone, 33, None)
        assert "33 frames at once exceed 2x the 16 frames" in caplog.text and "window_length 16" in caplog.text
        caplog.clear()
        check_frame_count(tiny_backbone, 1000, ContextWindows(16, 4))  # windows: any length
        assert caplog.text == ""


# ---------------------------------------------------------------------------------------------- settings

SETTING_CASES = {
    "steps 0": (lambda b: EditSettings(steps=0), "steps must be an integer >= 1"),
    "steps negative": (lambda b: EditSettings(steps=-3), "steps must be an integer >= 1"),
    "steps not an integer": (lambda b: EditSettings(steps=2.5), r"steps must be an integer >= 1 \(got 2.5\)"),
    "steps above the training timesteps": (lambda b: run_edit(b, steps=1001, inversion_steps=1001),
                                           "1001 steps is more than the model's 1000"),
    "inversion steps 0": (lambda b: EditSettings(inversion_steps=0), "inversion steps must be an integer >= 1"),
    "frame count 0": (lambda b: EditSettings(num_frames=0), "frame count must be an integer >= 1"),
    "start index = steps": (lambda b: EditSettings(steps=10, start_index=10), r"start index must be in 0\.\.9"),
    "start index > steps": (lambda b: EditSettings(steps=10, start_index=12), r"start index must be in 0\.\.9"),
    "start index negative": (lambda b: EditSettings(start_index=-1), "start index must be an integer >= 0"),
    "start index past the default steps": (lambda b: run_edit(b, steps=None, start_index=50),
                                           r"start index must be in 0\.\.49 for 50 steps"),
    "start index not an integer": (lambda b: run_sample(b, start_index=1.0), r"start index must be in 0\.\.1"),
    "conv tau below 0": (lambda b: InjectionSettings(conv_tau=-0.1), r"conv_tau .* \[0, 1\]"),
    "spatial tau above 1": (lambda b: InjectionSettings(spatial_tau=1.5), r"spatial_tau .* \[0, 1\]"),
    "temporal tau NaN": (lambda b: InjectionSettings(temporal_tau=float("nan")), r"temporal_tau .* \[0, 1\]"),
    "tau as text": (lambda b: InjectionSettings(conv_tau="0.2"), r"conv_tau .* \[0, 1\]"),
    "inversion steps missing the sampling timesteps": (
        lambda b: run_edit(b, inversion_steps=30, steps=20), "30 inversion steps do not reach sampling timestep"),
    "inversion steps missing them (invert_video)": (
        lambda b: invert_video(b, SOURCE, inversion_steps=3, sampling_steps=2), "use an inversion step count among"),
    "cfg 0": (lambda b: EditSettings(cfg=0), "cfg must be positive"),
    "cfg negative": (lambda b: EditSettings(cfg=-2.0), "cfg must be positive"),
    "cfg NaN": (lambda b: EditSettings(cfg=float("nan")), "cfg must be positive"),
    "cfg infinite": (lambda b: run_sample(b, cfg=float("inf")), "cfg must be positive"),
    "cfg as text": (lambda b: EditSettings(cfg="9"), "cfg must be positive"),
    "fps 0": (lambda b: EditSettings(fps=0), "fps must be an integer >= 1"),
    "fps negative": (lambda b: EditSettings(fps=-8), "fps must be an integer >= 1"),
    "fps 0 (invert_video)": (lambda b: invert_video(b, SOURCE, inversion_steps=4, sampling_steps=2, fps=0),
                             "fps must be positive"),
    "fps NaN (invert_video)": (lambda b: invert_video(b, SOURCE, inversion_steps=4, sampling_steps=2,
                                                      fps=float("nan")), "fps must be positive"),
    "seed negative": (lambda b: EditSettings(seed=-1), r"seed must be an integer in 0\.\.2\*\*64-1"),
    "seed above 64 bits": (lambda b: EditSettings(seed=2**64), r"seed must be an integer in 0\.\.2\*\*64-1"),
    "seed above 64 bits (sample_edit)": (lambda b: run_sample(b, seed=2**64), r"seed must be an integer in 0\.\.2\*\*64-1"),
    "size not a multiple of 8": (lambda b: EditSettings(size_wh=(30, 32)), "30x32 is not usable.*multiples of 8"),
    "size 0": (lambda b: EditSettings(size_wh=(0, 0)), "multiples of 8"),
    "size not two integers": (lambda b: EditSettings(size_wh=(512.0, 512)), "two integers"),
    "size with one value": (lambda b: EditSettings(size_wh=(512,)), "two integers"),
    "unknown resize policy": (lambda b: EditSettings(resize="fit"), "resize policy 'fit' is unknown"),
    "decode chunk size 0": (lambda b: EditSettings(decode_chunk_size=0), "decode chunk size must be"),
    "unknown sampler": (lambda b: EditSettings(sampler="euler"), "sampler 'euler' is unknown"),
    "unknown sampler (sample_edit)": (lambda b: run_sample(b, sampler="euler"), "sampler 'euler' does not apply to this model family; use one of ddim, ddpm"),
    "window of one frame": (lambda b: ContextWindows(1, 0), "window length must be an integer >= 2"),
    "window overlap = length": (lambda b: ContextWindows(8, 8), r"window overlap must be in 0\.\.7"),
    "injection settings of another type": (lambda b: EditSettings(injection={"conv_tau": 0.2}), "InjectionSettings"),
    "inversion made with another backbone": (lambda b: run_sample(b, fake_inversion(backbone_name="seine")),
                                             "made with seine, not i2vgen-xl; invert again"),
    "injection layers the UNet lacks": (lambda b: run_edit(b, injection=InjectionSettings(layers=MISSING_CONV)),
                                        r"no layer\(s\) up_blocks\.9\.resnets\.0\.conv2"),
}


@pytest.mark.parametrize("case", list(SETTING_CASES))
def test_bad_settings(guarded, case):
    run, message = SETTING_CASES[case]
    with pytest.raises(AnyV2VError, match=message):
        run(guarded)


# ---------------------------------------------------------------------------------------------- models


def rewrite_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def unet_without_the_injection_layers(folder: Path) -> None:
    """A self-consistent I2VGen-XL UNet (config and weights agree) with one resnet/attention per up
    block fewer: the injection targets up_blocks.*.attentions.2 and friends do not exist."""
    from diffusers import I2VGenXLUNet

    config = json.loads((folder / "unet" / "config.json").read_text())
    shutil.rmtree(folder / "unet")
    I2VGenXLUNet.from_config({**config, "layers_per_block": 1}).save_pretrained(folder / "unet")


def pickle_only_unet(folder: Path) -> None:
    from safetensors.torch import load_file

    unet = folder / "unet"
    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


class RunsCode:
    def __reduce__(self):
        return (print, ("this pickle ran code",))


MODEL_CASES = {
    # name: (how to spoil a copy of the tiny model folder, load_backbone arguments, message)
    "a folder that does not exist": (lambda f: shutil.rmtree(f), {}, "does not exist; pass a diffusers model folder"),
    "a file instead of a folder": (lambda f: (shutil.rmtree(f), f.write_text("x")), {}, "is a file"),
    "no model_index.json": (lambda f: (f / "model_index.json").unlink(), {}, "no model_index.json"),
    "model_index.json not JSON": (lambda f: (f / "model_index.json").write_text("{"), {}, "not valid JSON"),
    "a Stable Diffusion folder": (lambda f: rewrite_json(f / "model_index.json", _class_name="StableDiffusionPipeline"),
                                  {}, "Stable Diffusion folder, not an image-to-video model"),
    "another pipeline class": (lambda f: rewrite_json(f / "model_index.json", _class_name="CogVideoXImageToVideoPipeline"),
                               {}, "holds a CogVideoXImageToVideoPipeline model; AnyV2V needs an image-to-video backbone"),
    "a missing component": (lambda f: shutil.rmtree(f / "image_encoder"), {}, "image_encoder/ is missing"),
    "missing UNet weights": (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), {},
                             "unet/diffusion_pytorch_model.safetensors is missing"),
    "a missing config.json": (lambda f: (f / "vae" / "config.json").unlink(), {}, "vae/config.json is missing"),
    "a missing tokenizer config": (lambda f: (f / "tokenizer" / "tokenizer_config.json").unlink(), {},
                                   "tokenizer/tokenizer_config.json is missing"),
    "a variant that is not there": (lambda f: None, {"variant": "fp16"},
                                    r"diffusion_pytorch_model\.fp16\.safetensors is missing \(drop --variant\?\)"),
    "pickle-only weights": (pickle_only_unet, {}, r"only pickle weights.*allow_pickle=True \(CLI: --allow-pickle\)"),
    "truncated safetensors": (lambda f: truncate(f / "vae" / "diffusion_pytorch_model.safetensors"), {},
                              "could not load the model in"),
    "a UNet without the injected up-block layers": (unet_without_the_injection_layers, {},
                                                    r"has no up_blocks\.1\.attentions\.2\.transformer_blocks\.0\.attn1\.to_q.*layers_per_block"),
    "an unknown dtype name": (lambda f: None, {"dtype": "int8"}, "dtype 'int8' is unknown"),
    "a dtype that cannot run the model": (lambda f: None, {"dtype": torch.int8}, "torch.int8 cannot run the model"),
    "an unknown offload policy": (lambda f: None, {"offload": "disk"}, "offload policy 'disk' is unknown"),
    "an unknown backbone": (lambda f: None, {"backbone": "svd"}, "backbone 'svd' is not supported"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_folders(tiny_model_dir, tmp_path, case):
    from anyv2v_core.loading import load_backbone

    spoil, arguments, message = MODEL_CASES[case]
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    spoil(folder)
    with pytest.raises(ModelLoadError, match=message):
        load_backbone(folder, **arguments)


OTHER_MODEL_CASES = {
    "a repo id while offline": (lambda tmp: load("ali-vilab/i2vgen-xl"), "HF_HUB_OFFLINE=1 forbids downloading"),
    "a path that is no repo id": (lambda tmp: load("a/b/c"), "model folder a/b/c does not exist"),
    "a pickle checkpoint without the opt-in": (
        lambda tmp: load_checkpoint(tmp, {"w": torch.ones(1)}, allow_pickle=False), "pickles are not loaded by default"),
    "a pickle checkpoint that runs code (opted in)": (
        lambda tmp: load_checkpoint(tmp, {"w": RunsCode()}, allow_pickle=True), "could run code"),
    "a pickle checkpoint holding no tensors": (
        lambda tmp: load_checkpoint(tmp, {"w": [1, 2]}, allow_pickle=True), "not tensors"),
    "bf16 on a GPU without bf16": (lambda tmp: resolve_bf16_without_support(), "does not support bf16 natively.*use fp16"),
}


def load(source):
    from anyv2v_core.loading import load_backbone

    return load_backbone(source)


def load_checkpoint(tmp: Path, content: dict, *, allow_pickle: bool):
    from anyv2v_core.backbones.checkpoints import load_state_dict_file

    path = tmp / "model.pt"
    if any(isinstance(value, RunsCode) for value in content.values()):
        path.write_bytes(pickle.dumps(content, protocol=2))  # unpickling it would call print(): code from the file
    else:
        torch.save(content, path)
    return load_state_dict_file(path, allow_pickle=allow_pickle)


def resolve_bf16_without_support():
    from unittest import mock

    from anyv2v_core.loading import resolve_dtype

    with mock.patch("torch.cuda.get_device_capability", return_value=(7, 5)), \
            mock.patch("torch.cuda.get_device_name", return_value="Tesla T4"):
        return resolve_dtype("bf16", torch.device("cuda"))


@pytest.mark.parametrize("case", list(OTHER_MODEL_CASES))
def test_bad_model_sources(tmp_path, monkeypatch, case):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, message = OTHER_MODEL_CASES[case]
    with pytest.raises(ModelLoadError, match=message):
        run(tmp_path)


def test_components_saved_in_mismatched_dtypes_load_in_one_dtype(tiny_model_dir, tmp_path):
    """Mismatched dtypes in a folder (an fp16 UNet beside fp32 encoders) are not an error: every
    component is cast to the one requested dtype, so the UNet never meets a tensor of another."""
    from diffusers import I2VGenXLUNet

    from anyv2v_core.loading import load_backbone

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    I2VGenXLUNet.from_pretrained(folder / "unet").half().save_pretrained(folder / "unet")
    backbone = load_backbone(folder, dtype="fp32")
    assert {module.dtype for module in backbone.modules().values()} == {torch.float32}


# ---------------------------------------------------------------------------------------------- files


def existing(tmp: Path, name: str) -> Path:
    (tmp / name).write_bytes(b"the user's file")
    return tmp / name


def read_only_folder() -> Path:
    """A folder no one can write in, root included (os.access says yes to root; a write does not)."""
    import tempfile

    for folder in (Path("/sys"), Path("/proc")):
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError:
            return folder
    pytest.skip("no read-only folder on this machine")


def video_io():
    from anyv2v_core import video

    return video


FILE_CASES = {
    "a corrupt video": (lambda tmp: video_io().read_frames(existing(tmp, "clip.mp4")), "could not read any frame"),
    "a text file as the video": (lambda tmp: video_io().read_frames(existing(tmp, "notes.txt")), "could not read any frame"),
    "a video that does not exist": (lambda tmp: video_io().read_frames(tmp / "missing.mp4"), "does not exist"),
    "a folder without images": (lambda tmp: video_io().read_frames(tmp), "holds no images"),
    "a corrupt image": (lambda tmp: video_io().read_image(existing(tmp, "frame.png")), "could not read image"),
    "an image that does not exist": (lambda tmp: video_io().read_image(tmp / "missing.png"), "could not read image"),
    "an existing output video": (lambda tmp: video_io().write_video(existing(tmp, "out.mp4"), SOURCE, 8),
                                 r"already exists; pass --overwrite \(overwrite=True\)"),
    "an existing output image": (lambda tmp: video_io().write_image(existing(tmp, "out.png"), EDITED),
                                 "already exists"),
    "an output folder that does not exist": (lambda tmp: video_io().write_video(tmp / "no" / "out.mp4", SOURCE, 8),
                                             "does not exist; create it first"),
    "an output path that is a folder": (lambda tmp: video_io().write_video(tmp, SOURCE, 8), "is a folder"),
    "an output folder that is a file": (lambda tmp: video_io().write_video(existing(tmp, "f") / "out.mp4", SOURCE, 8),
                                        "does not exist"),
    "an unwritable output folder": (lambda tmp: video_io().write_video(read_only_folder() / "out.mp4", SOURCE, 8),
                                    "is not writable"),
    "convert onto an existing file": (lambda tmp: convert(tmp, existing(tmp, "seine.safetensors")), "already exists"),
    "convert onto the checkpoint itself": (lambda tmp: convert(tmp, tmp / "seine.pt", overwrite=True),
                                           "is the checkpoint being converted"),
}


def convert(tmp: Path, dst: Path, overwrite: bool = False):
    from anyv2v_core.backbones.checkpoints import convert_checkpoint_to_safetensors

    torch.save({"w": torch.ones(1)}, tmp / "seine.pt")
    return convert_checkpoint_to_safetensors(tmp / "seine.pt", dst, overwrite=overwrite)


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_bad_files(tmp_path, case):
    run, message = FILE_CASES[case]
    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    with pytest.raises(AnyV2VError, match=message):
        run(tmp_path)
    for path in tmp_path.rglob("*"):  # existing files untouched, no temp file left behind
        if path.is_file() and path in before:
            assert path.read_bytes() == before[path]
    assert not [p.name for p in tmp_path.rglob(".*")], "a temp file was left behind"


def test_cli_refuses_an_existing_output_before_loading_the_model(tmp_path, capsys):
    from anyv2v_core.cli import main

    out = existing(tmp_path, "out.mp4")
    status = main(["edit", "--model", str(tmp_path / "no-model"), "--video", "x.mp4", "--edited-first-frame", "x.png",
                   "--prompt", "p", "--out", str(out)])
    assert status == 2 and "already exists" in capsys.readouterr().err
    assert out.read_bytes() == b"the user's file"


# ---------------------------------------------------------------------------------------------- nodes


@pytest.fixture
def pack(tiny_model_dir, monkeypatch):
    """The node pack, its diffusers folders pointed at the folder holding the tiny model."""
    from test_nodes import load_pack

    pack = load_pack()
    monkeypatch.setattr(sys.modules["anyv2v_pack.nodes.host"], "diffusers_roots", lambda: [str(tiny_model_dir.parent)])
    return pack


def validate(pack, node: str, **inputs):
    return pack.NODE_CLASS_MAPPINGS[node].VALIDATE_INPUTS(**inputs)


def load_node(pack, model="tiny-i2vgenxl", repo_id=""):
    return pack.NODE_CLASS_MAPPINGS["LoadI2VBackbone"]().load(model, "fp32", "offload after each node", repo_id)


def invert_node(pack, width=64, window_length=0, window_overlap=4):
    return pack_node(pack, "DDIMInvertVideo").invert(load_node(pack)[0], SOURCE, width, 64, "stretch", 4, 8, 10, 5,
                                                     window_length, window_overlap)


ESCAPES = ["../../etc", "/etc", "tiny-i2vgenxl/../../../etc", "..\\..\\etc", "~/../../etc"]

NODE_CASES = {
    **{f"model path {name!r} (validation)": (lambda p, name=name: validate(p, "LoadI2VBackbone", model=name),
                                             "not a path out of them|is not a model folder") for name in ESCAPES},
    "model path '../../etc' (run)": (lambda p: load_node(p, "../../etc"), "not a path out of them"),
    "an empty model list": (lambda p: load_node(p, "(no diffusers model found)"), "no model is in ComfyUI's diffusers"),
    "repo id '../../etc'": (lambda p: validate(p, "LoadI2VBackbone", model="x", repo_id="../../etc"),
                            "not a Hugging Face repo id"),
    "repo id 'org/..'": (lambda p: load_node(p, repo_id="org/.."), "not a Hugging Face repo id"),
    "repo id with a path": (lambda p: validate(p, "LoadI2VBackbone", model="x", repo_id="org/model/../x"),
                            "not a Hugging Face repo id"),
    "instruct-pix2pix model path '../../etc'": (
        lambda p: validate(p, "FirstFrameEditor", mode="instruct-pix2pix", model="../../etc"),
        "not a path out of them"),
    "inversion: width not a multiple of 8 (run)": (lambda p: invert_node(p, width=60), "multiples of 8"),
    "inversion: steps that miss the sampling timesteps": (
        lambda p: validate(p, "DDIMInvertVideo", inversion_steps=30, sampling_steps=50), "inversion steps do not reach"),
    "inversion: sampling steps 0": (lambda p: validate(p, "DDIMInvertVideo", inversion_steps=100, sampling_steps=0),
                                    "between 1 and 1000"),
    "inversion: window overlap = length (run)": (lambda p: invert_node(p, window_length=8, window_overlap=8),
                                                 "window overlap"),
    "features: a layer_override line of no kind": (
        lambda p: validate(p, "CaptureFeatures", layer_override="attn: up_blocks.1"), "must start with conv:"),
    "select frames: start past the end": (
        lambda p: pack_node(p, "AnyV2VSelectFrames").select(SOURCE, 24.0, 6, 1, 16), "past the end of the video"),
    "first frame editor: an unknown mode": (
        lambda p: validate(p, "FirstFrameEditor", mode="sketch", model="x"), "mode 'sketch' is unknown"),
}


def pack_node(pack, node):
    return pack.NODE_CLASS_MAPPINGS[node]()


@pytest.mark.parametrize("case", list(NODE_CASES))
def test_bad_node_inputs(pack, case):
    """Validation messages (VALIDATE_INPUTS returns them, ComfyUI shows them before running) or errors."""
    run, message = NODE_CASES[case]
    try:
        result = run(pack)
    except ValueError as error:  # AnyV2VError and ModelLoadError are ValueErrors
        result = str(error)
    assert isinstance(result, str), f"accepted: {result!r}"
    assert re.search(message, result), result


def test_node_paths_never_leave_the_model_folders(pack, tiny_model_dir, tmp_path, monkeypatch):
    """Even with a model folder outside the roots that would match, a widget value resolves inside them only."""
    host = sys.modules["anyv2v_pack.nodes.host"]
    roots = tmp_path / "models" / "diffusers"
    roots.mkdir(parents=True)
    shutil.copytree(tiny_model_dir, tmp_path / "outside")  # a real model folder, next to the roots
    monkeypatch.setattr(host, "diffusers_roots", lambda: [str(roots)])
    for name in ("../../outside", str(tmp_path / "outside"), "../../../" + str(tmp_path / "outside")):
        with pytest.raises(ValueError, match="not a path out of them"):
            host.resolve_model_folder(name, "hint")
    shutil.copytree(tiny_model_dir, roots / "inside")
    assert host.resolve_model_folder("inside", "hint") == str(roots / "inside")


@pytest.mark.parametrize("name", ["C:evil", "C:\\Windows\\System32", "\\\\server\\share\\model"])
def test_windows_drive_paths_never_leave_the_model_folders(pack, monkeypatch, name):
    """On Windows, joining "C:x" onto a root drops the root; such names are refused like "../"."""
    import ntpath
    import os

    host = sys.modules["anyv2v_pack.nodes.host"]
    monkeypatch.setattr(os, "path", ntpath)
    with pytest.raises(ValueError, match="not a path out of them"):
        host.resolve_model_folder(name, "hint")


BAD_INPUT_COUNT = (len(FRAME_CASES) + len(SETTING_CASES) + len(MODEL_CASES) + len(OTHER_MODEL_CASES)
                   + len(FILE_CASES) + len(NODE_CASES) + 7)  # + aspect ratio, long clip warning, dtypes, CLI, 3 drive paths
