"""The ComfyUI nodes without ComfyUI: contracts, each node on a tiny model, the graph vs the engine,
validation messages, cancel safety, and a cheap import with no `comfy` module."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

NODE_IDS = {"LoadI2VBackbone", "AnyV2VSelectFrames", "DDIMInvertVideo", "CaptureFeatures", "InjectedSampler",
            "FirstFrameEditor", "AnyV2VWanModel", "AnyV2VFlowInvertVideo", "AnyV2VWanSampler"}
LINK_TYPES = {"IMAGE", "ANYV2V_BACKBONE", "ANYV2V_INVERSION", "ANYV2V_FEATURES", "MODEL", "VAE", "CONDITIONING",
              "CLIP_VISION_OUTPUT"}
SIZE, FRAMES, INVERSION_STEPS, STEPS = 32, 6, 10, 5
PROMPT = "a blue square moving"


def load_pack(name: str = "anyv2v_pack"):
    """Import the repository as a package, the way ComfyUI imports a folder in custom_nodes/."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pack():
    torch.set_num_threads(1)
    return load_pack()


@pytest.fixture(scope="module")
def nodes(pack):
    return {name: cls() for name, cls in pack.NODE_CLASS_MAPPINGS.items()}


@pytest.fixture(scope="module")
def host(pack, tiny_model_dir):
    """The pack's host module, its diffusers folders pointed at the folder holding the tiny model."""
    module = sys.modules["anyv2v_pack.nodes.host"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "diffusers_roots", lambda: [str(tiny_model_dir.parent)])
        yield module


@pytest.fixture(scope="module")
def source_frames():
    from anyv2v_core.testing.tiny_models import moving_square_video

    video = moving_square_video(FRAMES + 2, 48)  # more frames and another size than the working ones
    return (video * 255).round() / 255  # 8-bit exact, so PNG files hold the same frames


@pytest.fixture(scope="module")
def edited_frame(source_frames):
    edited = source_frames[:1].clone()
    edited[..., 2], edited[..., 0] = source_frames[:1, ..., 0], source_frames[:1, ..., 2]  # red <-> blue
    return edited


@pytest.fixture(scope="module")
def graph(nodes, host, tiny_model_dir, source_frames):
    """Backbone, inversion and features made by the nodes (fp32, on the CPU)."""
    (backbone,) = nodes["LoadI2VBackbone"].load(tiny_model_dir.name, "fp32", "offload after each node")
    (inversion,) = nodes["DDIMInvertVideo"].invert(backbone, source_frames, SIZE, SIZE, "stretch", FRAMES, 8,
                                                   INVERSION_STEPS, STEPS, 0, 4)
    (features,) = nodes["CaptureFeatures"].plan(inversion, 0.2, 0.2, 0.5, 0)
    return backbone, inversion, features


def negative_prompt(pack) -> str:
    return pack.NODE_CLASS_MAPPINGS["InjectedSampler"].INPUT_TYPES()["required"]["negative_prompt"][1]["default"]


# ---------------------------------------------------------------------------------------------- import and contracts


def test_pack_imports_without_comfy_and_without_heavy_modules():
    """Run in a fresh interpreter where `comfy`, `comfy_api` and `folder_paths` cannot be imported."""
    script = f"""
import importlib.abc, importlib.util, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("comfy", "comfy_api", "folder_paths"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location("anyv2v", {str(REPO_ROOT / "__init__.py")!r},
                                              submodule_search_locations=[{str(REPO_ROOT)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules["anyv2v"] = pack; spec.loader.exec_module(pack)
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "numpy", "anyv2v_core") if m in sys.modules)
print({{"nodes": sorted(pack.NODE_CLASS_MAPPINGS), "heavy": heavy,
        "names": sorted(pack.NODE_DISPLAY_NAME_MAPPINGS)}})
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = ast.literal_eval(result.stdout.strip().splitlines()[-1])  # a dict literal printed by the script
    assert set(report["nodes"]) == NODE_IDS
    assert set(report["names"]) == NODE_IDS
    assert report["heavy"] == [], f"importing the pack pulled in {report['heavy']}"


@pytest.mark.parametrize("node_id", sorted(NODE_IDS))
def test_node_contract(pack, host, node_id):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    spec = cls.INPUT_TYPES()
    required, optional = spec["required"], spec.get("optional", {})
    assert cls.CATEGORY.startswith("AnyV2V/")
    assert cls.DESCRIPTION.strip() and pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("AnyV2V ")
    assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS)

    parameters = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
    names = [name for name in parameters if name != "self"]
    assert set(names) == set(required) | set(optional), f"{cls.FUNCTION}() does not take exactly the inputs"
    for name in names:
        has_default = parameters[name].default is not inspect.Parameter.empty
        assert has_default == (name in optional), f"{name}: optional inputs need a default, required ones none"

    for name, (kind, *rest) in {**required, **optional}.items():
        options = rest[0] if rest else {}
        assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
        if isinstance(kind, (list, tuple)):
            assert kind, f"{node_id}.{name} offers no choice"
            assert options.get("default", kind[0]) in kind
        elif kind in ("INT", "FLOAT"):
            assert options["min"] <= options["default"] <= options["max"], f"{node_id}.{name} default out of range"
        else:
            assert kind in LINK_TYPES | {"STRING", "FLOAT", "INT"}, f"{node_id}.{name}: unexpected type {kind}"

    validate = getattr(cls, "VALIDATE_INPUTS", None)
    if validate is not None:
        arguments = inspect.signature(validate).parameters
        assert set(arguments) <= set(required) | set(optional)
        defaults = {name: options.get("default", kind[0] if isinstance(kind, (list, tuple)) else None)
                    for name, (kind, *rest) in {**required, **optional}.items() for options in [rest[0] if rest else {}]}
        assert validate(**{name: defaults[name] for name in arguments}) is True, "defaults must validate"


# ---------------------------------------------------------------------------------------------- each node


def test_select_frames(nodes, source_frames):
    frames, fps = nodes["AnyV2VSelectFrames"].select(source_frames, 24.0, 1, 3, 2)
    assert torch.equal(frames, source_frames[1:7:3]) and fps == 8.0
    frames, _ = nodes["AnyV2VSelectFrames"].select(source_frames, 24.0, 0, 1, 0)
    assert frames.shape[0] == source_frames.shape[0]
    with pytest.raises(ValueError, match="past the end"):
        nodes["AnyV2VSelectFrames"].select(source_frames, 24.0, 100, 1, 0)


def test_loader_gives_a_backbone_on_the_offload_device(graph):
    backbone, _, _ = graph
    assert backbone.backbone.name == "i2vgen-xl" and not backbone.keep_loaded and backbone.offload == "none"
    assert backbone.backbone.device.type == "cpu" and backbone.backbone.dtype == torch.float32


def test_loader_reads_a_folder_with_only_fp16_files(nodes, host, tiny_model_dir, tmp_path, monkeypatch):
    """The recommended download keeps only the *.fp16.safetensors files; they load in any dtype."""
    import shutil

    folder = tmp_path / "i2vgen-xl-fp16"
    shutil.copytree(tiny_model_dir, folder)
    for weights in folder.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    monkeypatch.setattr(host, "diffusers_roots", lambda: [str(tmp_path)])
    (handle,) = nodes["LoadI2VBackbone"].load("i2vgen-xl-fp16", "fp32", "offload after each node")
    assert handle.backbone.dtype == torch.float32 and handle.backbone.unet.dtype == torch.float32


def test_inversion_holds_the_sampling_latents(graph):
    backbone, inversion, _ = graph
    schedule = backbone.backbone.schedule
    assert set(inversion.inversion.latents) == set(schedule.timesteps(STEPS))
    latent = inversion.inversion.latent_at(schedule.timesteps(STEPS)[0])
    scale = backbone.backbone.vae_scale_factor
    assert latent.shape == (1, 4, FRAMES, SIZE // scale, SIZE // scale) and latent.device.type == "cpu"
    assert torch.isfinite(latent).all()
    assert inversion.inversion.size_wh == (SIZE, SIZE) and inversion.resize == "stretch"


def test_first_frame_editor_passthrough(nodes, source_frames):
    from anyv2v_core.video import resize_frames

    (first,) = nodes["FirstFrameEditor"].edit(source_frames, 40, 24, "crop", "passthrough", "", "unused", 20, 1.5,
                                              7.5, 0)
    assert first.shape == (1, 24, 40, 3) and first.dtype == torch.float32
    assert torch.equal(first, resize_frames(source_frames[:1], (40, 24), "crop"))


def test_first_frame_editor_instruct_pix2pix_needs_a_model(nodes, host, source_frames):
    with pytest.raises(ValueError, match="instruct-pix2pix.*hf download timbrooks/instruct-pix2pix"):
        nodes["FirstFrameEditor"].edit(source_frames, SIZE, SIZE, "stretch", "instruct-pix2pix", "make it snowy",
                                       "instruct-pix2pix", 20, 1.5, 7.5, 0)
    with pytest.raises(ValueError, match="holds a I2VGenXLPipeline pipeline, not StableDiffusionInstructPix2PixPipeline"):
        nodes["FirstFrameEditor"].edit(source_frames, SIZE, SIZE, "stretch", "instruct-pix2pix", "make it snowy",
                                       "tiny-i2vgenxl", 20, 1.5, 7.5, 0)


def build_tiny_instruct_pix2pix(folder):
    """A random-weight InstructPix2Pix pipeline in diffusers format (8-channel UNet input: latents + image)."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from anyv2v_core.toy.components import write_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                        latent_channels=4, sample_size=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1))
    write_tokenizer(folder / "tokenizer")
    StableDiffusionInstructPix2PixPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=unet,
        scheduler=EulerAncestralDiscreteScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(folder)


def test_first_frame_editor_edits_the_source_first_frame_like_diffusers(pack, nodes, host, source_frames, tmp_path,
                                                                       monkeypatch):
    """instruct-pix2pix mode is diffusers' InstructPix2Pix pipeline run on the source's first frame at the
    working size (8-bit, as an image editor sees it), with the node's settings and seed."""
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    from anyv2v_core.video import resize_frames

    build_tiny_instruct_pix2pix(tmp_path / "tiny-ip2p")
    monkeypatch.setattr(host, "diffusers_roots", lambda: [str(tmp_path)])
    assert pack.NODE_CLASS_MAPPINGS["FirstFrameEditor"].VALIDATE_INPUTS("instruct-pix2pix", "tiny-ip2p") is True
    (edited,) = nodes["FirstFrameEditor"].edit(source_frames, SIZE, SIZE, "stretch", "instruct-pix2pix", "make it blue",
                                               "tiny-ip2p", 3, 1.5, 7.5, 7)

    pipeline = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        tmp_path / "tiny-ip2p", safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)

    def diffusers_edit(frame):
        pixels = (frame[0] * 255).round().to(torch.uint8).numpy()
        images = pipeline("make it blue", image=Image.fromarray(pixels), num_inference_steps=3, image_guidance_scale=1.5,
                          guidance_scale=7.5, generator=torch.Generator().manual_seed(7), output_type="np").images
        return torch.from_numpy(images)

    first_frame = resize_frames(source_frames[:1], (SIZE, SIZE), "stretch")
    torch.testing.assert_close(edited, diffusers_edit(first_frame), atol=1e-6, rtol=0)
    assert (edited - diffusers_edit(torch.zeros_like(first_frame))).abs().max() > 0.01, "the edit ignores its input"
    with pytest.raises(ValueError, match="needs an instruction"):
        nodes["FirstFrameEditor"].edit(source_frames, SIZE, SIZE, "stretch", "instruct-pix2pix", " ", "tiny-ip2p", 3,
                                       1.5, 7.5, 7)


def test_sampler_decodes_the_same_frames_in_chunks(pack, nodes, graph, edited_frame):
    backbone, _, features = graph
    one_at_a_time, fps = nodes["InjectedSampler"].sample(backbone, features, edited_frame, PROMPT, negative_prompt(pack),
                                                         9.0, 1, "auto", 0)
    in_chunks, _ = nodes["InjectedSampler"].sample(backbone, features, edited_frame, PROMPT, negative_prompt(pack),
                                                   9.0, 4, "auto", 0)
    assert fps == 8.0 and one_at_a_time.shape == (FRAMES, SIZE, SIZE, 3)
    torch.testing.assert_close(in_chunks, one_at_a_time, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- graph vs engine


def test_graph_equals_pipeline_edit(pack, nodes, graph, source_frames, edited_frame):
    from anyv2v_core.injection import InjectionSettings
    from anyv2v_core.pipeline import edit
    from anyv2v_core.plan import EditSettings
    from anyv2v_core.windows import ContextWindows

    backbone, _, _ = graph
    (inversion,) = nodes["DDIMInvertVideo"].invert(backbone, source_frames, SIZE, SIZE, "crop", FRAMES, 8,
                                                   INVERSION_STEPS, STEPS, 4, 2)
    (features,) = nodes["CaptureFeatures"].plan(inversion, 0.4, 0.2, 1.0, 1)
    frames, fps = nodes["InjectedSampler"].sample(backbone, features, edited_frame, PROMPT, negative_prompt(pack),
                                                  7.5, 1, "auto", 0)

    settings = EditSettings(size_wh=(SIZE, SIZE), resize="crop", num_frames=FRAMES, fps=8,
                            inversion_steps=INVERSION_STEPS, steps=STEPS, cfg=7.5, start_index=1,
                            injection=InjectionSettings(conv_tau=0.4, spatial_tau=0.2, temporal_tau=1.0),
                            windows=ContextWindows(4, 2))
    expected = edit(backbone.backbone, source_frames, edited_frame, prompt=PROMPT, settings=settings)
    assert fps == expected.fps
    torch.testing.assert_close(frames, expected.frames, rtol=0, atol=1e-6)


def test_graph_equals_cli(pack, nodes, graph, tiny_model_dir, source_frames, edited_frame, tmp_path):
    """The node graph and `python -m anyv2v_core edit` give the same latents (compared through the decoder)."""
    from safetensors.torch import load_file

    from anyv2v_core.cli import main
    from anyv2v_core.video import write_image

    backbone, _, features = graph
    frames, _ = nodes["InjectedSampler"].sample(backbone, features, edited_frame, PROMPT, negative_prompt(pack), 9.0, 1, "auto", 0)

    (tmp_path / "video").mkdir()
    for index, frame in enumerate(source_frames):  # lossless PNG frames, so both see the same pixels
        write_image(tmp_path / "video" / f"{index:05d}.png", frame)
    write_image(tmp_path / "edited.png", edited_frame)
    status = main(["edit", "--model", str(tiny_model_dir), "--video", str(tmp_path / "video"),
                   "--edited-first-frame", str(tmp_path / "edited.png"), "--prompt", PROMPT,
                   "--out", str(tmp_path / "out.mp4"), "--save-latents", str(tmp_path / "latents.safetensors"),
                   "--size", f"{SIZE}x{SIZE}", "--frames", str(FRAMES), "--inversion-steps", str(INVERSION_STEPS),
                   "--steps", str(STEPS), "--dtype", "fp32", "--device", "cpu"])
    assert status == 0
    cli_latents = load_file(tmp_path / "latents.safetensors")["latents"]
    torch.testing.assert_close(frames, backbone.backbone.decode(cli_latents), rtol=0, atol=1e-5)


def test_edited_frame_of_another_size_is_resized_like_the_source(pack, nodes, graph, edited_frame):
    from anyv2v_core.video import resize_frames

    backbone, _, features = graph
    at_working_size, _ = nodes["InjectedSampler"].sample(backbone, features, resize_frames(edited_frame, (SIZE, SIZE)),
                                                         PROMPT, negative_prompt(pack), 9.0, 1, "auto", 0)
    resized_inside, _ = nodes["InjectedSampler"].sample(backbone, features, edited_frame, PROMPT,
                                                        negative_prompt(pack), 9.0, 1, "auto", 0)
    assert edited_frame.shape[1] != SIZE
    torch.testing.assert_close(resized_inside, at_working_size, rtol=0, atol=1e-6)


def test_layer_override_reaches_the_sampler(pack, nodes, graph, edited_frame):
    from anyv2v_core.errors import AnyV2VError

    backbone, inversion, _ = graph
    spatial = backbone.backbone.injection_layers.spatial_attention[:2]
    (features,) = nodes["CaptureFeatures"].plan(inversion, 0.2, 0.2, 0.5, 0, f"spatial: {', '.join(spatial)}")
    injection = features.injection_for(backbone.backbone)
    assert injection.layers.spatial_attention == spatial
    assert injection.layers.conv == backbone.backbone.injection_layers.conv

    (features,) = nodes["CaptureFeatures"].plan(inversion, 0.2, 0.2, 0.5, 0, "conv: up_blocks.9.resnets.0.conv2")
    with pytest.raises(AnyV2VError, match="up_blocks.9.resnets.0.conv2"):
        nodes["InjectedSampler"].sample(backbone, features, edited_frame, PROMPT, negative_prompt(pack), 9.0, 1, "auto", 0)


def test_cancel_mid_sampling_leaves_the_backbone_unpatched(pack, nodes, graph, host, edited_frame, monkeypatch):
    from anyv2v_core.injection import has_injection_hooks

    class Interrupted(Exception):
        pass

    calls = []

    def interrupt_on_third_step():
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    backbone, _, features = graph
    monkeypatch.setattr(host, "check_interrupted", interrupt_on_third_step)
    with pytest.raises(Interrupted):
        nodes["InjectedSampler"].sample(backbone, features, edited_frame, PROMPT, negative_prompt(pack), 9.0, 1, "auto", 0)
    assert not has_injection_hooks(backbone.backbone.unet)
    assert backbone.backbone.device.type == "cpu"


def test_model_offload_policy_gives_the_same_frames(pack, nodes, graph, host, tiny_model_dir, edited_frame):
    backbone, _, features = graph
    (offloaded,) = nodes["LoadI2VBackbone"].load(tiny_model_dir.name, "fp32", "model offload (less VRAM)")
    assert offloaded.offload == "model"
    expected, _ = nodes["InjectedSampler"].sample(backbone, features, edited_frame, PROMPT, negative_prompt(pack),
                                                  9.0, 1, "auto", 0)
    frames, _ = nodes["InjectedSampler"].sample(offloaded, features, edited_frame, PROMPT, negative_prompt(pack),
                                                9.0, 1, "auto", 0)
    torch.testing.assert_close(frames, expected, rtol=0, atol=1e-6)
    assert offloaded.backbone.offloader.policy == "none", "the policy's hooks are removed after the node"


def test_injected_sampler_defaults_are_the_connected_models_settings(pack, nodes, tmp_path, monkeypatch):
    """The cfg and negative prompt widgets' defaults mean the backbone's reference settings: on a Wan
    backbone, Wan's (cfg 5, no negative prompt), not I2VGen-XL's (9, the paper's negative prompt)."""
    from anyv2v_core.backbones.i2vgen_xl import NEGATIVE_PROMPT
    from anyv2v_core.testing.tiny_models import build_tiny_wan, moving_square_video

    host = sys.modules["anyv2v_pack.nodes.host"]
    build_tiny_wan(tmp_path / "tiny-wan", "wan2.1-i2v")
    monkeypatch.setattr(host, "diffusers_roots", lambda: [str(tmp_path)])
    (backbone,) = nodes["LoadI2VBackbone"].load("tiny-wan", "fp32", "offload after each node")
    source = moving_square_video(5, 32)
    inversion, _ = nodes["AnyV2VFlowInvertVideo"].invert(backbone, source, 32, 32, "stretch", 5, 16, 2, "1 (euler)", 0, 8)
    (features,) = nodes["CaptureFeatures"].plan(inversion, 0.0, 0.0, 0.0, 0, attention_tau=0.5)
    widgets = pack.NODE_CLASS_MAPPINGS["InjectedSampler"].INPUT_TYPES()["required"]

    def sampled(negative_prompt: str, cfg: float) -> torch.Tensor:
        frames, _ = nodes["InjectedSampler"].sample(backbone, features, source[:1].flip(-1), PROMPT, negative_prompt,
                                                    cfg, 1, "auto", 0)
        return frames

    by_default = sampled(widgets["negative_prompt"][1]["default"], widgets["cfg"][1]["default"])
    assert torch.equal(by_default, sampled("", 5.0))
    assert not torch.allclose(by_default, sampled(NEGATIVE_PROMPT, 9.0), atol=1e-4)


# ---------------------------------------------------------------------------------------------- validation


def test_loader_validation(pack, host, tmp_path, monkeypatch):
    validate = pack.NODE_CLASS_MAPPINGS["LoadI2VBackbone"].VALIDATE_INPUTS
    assert pack.NODE_CLASS_MAPPINGS["LoadI2VBackbone"].INPUT_TYPES()["required"]["model"][0] == ["tiny-i2vgenxl"]
    assert validate("tiny-i2vgenxl") is True
    assert "not a path out of them" in validate("../tiny-i2vgenxl")
    assert "not a path out of them" in validate("/etc")
    assert "hf download ali-vilab/i2vgen-xl" in validate("missing-model")
    assert validate("", repo_id="ali-vilab/i2vgen-xl") is True
    (tmp_path / "sd" / "sd-1.5").mkdir(parents=True)
    (tmp_path / "sd" / "sd-1.5" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    monkeypatch.setattr(host, "diffusers_roots", lambda: [str(tmp_path / "sd")])
    assert "not an image-to-video model" in validate("sd-1.5")
    assert "not a Hugging Face repo id" in validate("", repo_id="../../etc")
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert "names a local folder" in validate("", repo_id="org/model")


def test_loader_without_models_says_how_to_get_one(pack, monkeypatch):
    host_module = sys.modules["anyv2v_pack.nodes.host"]
    monkeypatch.setattr(host_module, "diffusers_roots", lambda: [])
    cls = pack.NODE_CLASS_MAPPINGS["LoadI2VBackbone"]
    (choice,) = cls.INPUT_TYPES()["required"]["model"][0]
    message = cls.VALIDATE_INPUTS(choice)
    assert "no model is in ComfyUI's diffusers folders" in message and "models/diffusers/i2vgen-xl" in message


def test_inversion_validation(pack):
    validate = pack.NODE_CLASS_MAPPINGS["DDIMInvertVideo"].VALIDATE_INPUTS
    assert validate(500, 50) is True and validate(100, 50) is True
    message = validate(30, 50)
    assert "inversion steps do not reach" in message and "use an inversion step count among" in message
    assert "between 1 and 1000" in validate(0, 50)
    assert validate(None, 50) is True  # linked inputs are checked when the graph runs


@pytest.mark.parametrize("width, window_length, window_overlap, inversion_steps, message", [
    (60, 0, 4, INVERSION_STEPS, "multiples of 8"), (SIZE, 4, 4, INVERSION_STEPS, "window overlap must be in 0..3"),
    (SIZE, 1, 0, INVERSION_STEPS, "window length"),
    # linked step counts reach the node unvalidated (VALIDATE_INPUTS sees None): the plan refuses them
    (SIZE, 0, 4, STEPS + 1, "use an inversion step count among")])
def test_inversion_checks_size_windows_and_steps_before_any_model_work(nodes, graph, source_frames, monkeypatch,
                                                                       width, window_length, window_overlap,
                                                                       inversion_steps, message):
    """Size, windows and steps are checked when the node runs (VALIDATE_INPUTS takes only the step counts, see
    the node): the error comes before the node touches the model."""
    from anyv2v_core.errors import AnyV2VError

    backbone, _, _ = graph
    monkeypatch.setattr(sys.modules["anyv2v_pack.nodes.host"], "on_compute_device",
                        lambda *_, **__: pytest.fail("the model was set up before the inputs were checked"))
    with pytest.raises(AnyV2VError, match=message):
        nodes["DDIMInvertVideo"].invert(backbone, source_frames, width, SIZE, "stretch", FRAMES, 8, inversion_steps,
                                        STEPS, window_length, window_overlap)


def test_sampler_checks_its_plan_before_any_model_work(pack, nodes, graph, edited_frame, monkeypatch):
    """A layer the model lacks (or any other bad setting) is refused before the model is set up on the GPU."""
    from anyv2v_core.errors import AnyV2VError

    backbone, inversion, _ = graph
    (features,) = nodes["CaptureFeatures"].plan(inversion, 0.2, 0.2, 0.5, 0, "conv: up_blocks.9.resnets.0.conv2")
    monkeypatch.setattr(sys.modules["anyv2v_pack.nodes.host"], "on_compute_device",
                        lambda *_, **__: pytest.fail("the model was set up before the plan was checked"))
    with pytest.raises(AnyV2VError, match="up_blocks.9.resnets.0.conv2"):
        nodes["InjectedSampler"].sample(backbone, features, edited_frame, PROMPT, negative_prompt(pack), 9.0, 1, "auto", 0)


def test_capture_features_validation(pack, graph, nodes):
    validate = pack.NODE_CLASS_MAPPINGS["CaptureFeatures"].VALIDATE_INPUTS
    assert validate("") is True and validate("# comment\nspatial: a.b, c.d") is True
    assert "must start with conv:, spatial:, temporal: or attention:" in validate("attn: up_blocks.1")
    assert "twice" in validate("conv: a\nconv: b")
    _, inversion, _ = graph
    with pytest.raises(ValueError, match=f"start_index {STEPS} must be below the {STEPS} sampling steps"):
        nodes["CaptureFeatures"].plan(inversion, 0.2, 0.2, 0.5, STEPS)


def test_first_frame_editor_validation(pack, host):
    validate = pack.NODE_CLASS_MAPPINGS["FirstFrameEditor"].VALIDATE_INPUTS
    assert validate("passthrough", "(no diffusers model found)") is True
    assert validate("passthrough", "tiny-i2vgenxl") is True  # the model is unused in passthrough mode
    assert "mode 'sketch' is unknown" in validate("sketch", "x")
    assert "needs an InstructPix2Pix model" in validate("instruct-pix2pix", "instruct-pix2pix")
    assert "not StableDiffusionInstructPix2PixPipeline" in validate("instruct-pix2pix", "tiny-i2vgenxl")


def test_first_frame_editor_checks_the_size_when_it_runs(nodes, source_frames):
    from anyv2v_core.errors import AnyV2VError

    with pytest.raises(AnyV2VError, match="multiples of 8"):
        nodes["FirstFrameEditor"].edit(source_frames, SIZE, 100, "stretch", "passthrough", "", "x", 20, 1.5, 7.5, 0)


# ---------------------------------------------------------------------------------------------- workflows

CORE_WIDGETS = {  # widget names of the core nodes the example workflows use (None: a UI-only value)
    "LoadVideo": ["file", None], "GetVideoComponents": [], "CreateVideo": ["fps"],
    "SaveVideo": ["filename_prefix", "format", "codec"], "LoadImage": ["image", None],
    "SaveImage": ["filename_prefix"], "PreviewImage": [], "Note": [None],
    "UNETLoader": ["unet_name", "weight_dtype"], "ModelSamplingSD3": ["shift"], "CLIPLoader": ["clip_name", "type", "device"],
    "VAELoader": ["vae_name"], "CLIPVisionLoader": ["clip_name"], "CLIPTextEncode": ["text"], "CLIPVisionEncode": ["crop"],
    "VAEDecode": [],
}


def widget_names(pack, class_type: str) -> list:
    if class_type in CORE_WIDGETS:
        return CORE_WIDGETS[class_type]
    spec = pack.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    inputs = {**spec["required"], **spec.get("optional", {})}
    return [name for name, (kind, *_) in inputs.items() if not (isinstance(kind, str) and kind in LINK_TYPES)]


def ui_to_api(pack, ui: dict) -> dict:
    """The API prompt ComfyUI's frontend would queue for a UI-format workflow (for the node kinds used here)."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] == "Note":
            continue
        names = widget_names(pack, node["type"])
        values = list(node["widgets_values"])
        # a workflow saved before a node gained trailing optional widgets has fewer values; the
        # frontend gives those widgets their defaults
        assert len(values) <= len(names), f"{node['type']}: more widgets_values than widgets"
        if len(values) < len(names):
            optional = pack.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES().get("optional", {})
            assert all(name in optional for name in names[len(values):]), f"{node['type']}: required widgets missing"
            values += [optional[name][1]["default"] for name in names[len(values):]]
        inputs = {name: value for name, value in zip(names, values) if name is not None}
        for slot in node["inputs"]:
            if slot["link"] is not None:
                _, source, source_slot, target, _, _ = links[slot["link"]]
                assert target == node["id"]
                inputs[slot["name"]] = [str(source), source_slot]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


EXAMPLE_WORKFLOWS = {  # workflow -> (our nodes it must use, a file name its note must give)
    "anyv2v_prompt_edit.json": ({"LoadI2VBackbone", "DDIMInvertVideo", "CaptureFeatures", "InjectedSampler",
                                 "FirstFrameEditor"}, "ali-vilab/i2vgen-xl"),
    "anyv2v_external_first_frame.json": ({"LoadI2VBackbone", "DDIMInvertVideo", "CaptureFeatures", "InjectedSampler",
                                          "FirstFrameEditor"}, "ali-vilab/i2vgen-xl"),
    "anyv2v_wan21_i2v.json": ({"AnyV2VWanModel", "AnyV2VFlowInvertVideo", "CaptureFeatures", "AnyV2VWanSampler",
                               "FirstFrameEditor"}, "wan2.1_i2v_480p_14B_fp16.safetensors"),
    "anyv2v_wan22_ti2v.json": ({"AnyV2VWanModel", "AnyV2VFlowInvertVideo", "CaptureFeatures", "AnyV2VWanSampler",
                                "FirstFrameEditor"}, "wan2.2_ti2v_5B_fp16.safetensors"),
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_WORKFLOWS))
def test_example_workflows(pack, name):
    ui = json.loads((REPO_ROOT / "workflows" / name).read_text())
    api = json.loads((REPO_ROOT / "workflows" / "api" / name).read_text())
    assert {key: {"class_type": n["class_type"], "inputs": n["inputs"]} for key, n in api.items()} == ui_to_api(pack, ui)
    used = {node["type"] for node in ui["nodes"]}
    assert used <= set(pack.NODE_CLASS_MAPPINGS) | set(CORE_WIDGETS), "only core nodes besides ours"
    ours, model_file = EXAMPLE_WORKFLOWS[name]
    assert ours <= used
    note = next(node for node in ui["nodes"] if node["type"] == "Note")["widgets_values"][0]
    assert model_file in note
    for node in api.values():  # every required input of our nodes is set or linked
        if node["class_type"] in pack.NODE_CLASS_MAPPINGS:
            required = pack.NODE_CLASS_MAPPINGS[node["class_type"]].INPUT_TYPES()["required"]
            assert set(required) <= set(node["inputs"]), node["class_type"]
