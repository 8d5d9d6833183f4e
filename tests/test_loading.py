"""Model folders: clear errors for every way a folder can be wrong, and safe defaults."""

import json
import shutil

import pytest
import torch

from anyv2v_core.errors import ModelLoadError
from anyv2v_core.loading import load_backbone


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_loads_in_eval_mode_with_the_requested_dtype(tiny_model_dir):
    backbone = load_backbone(tiny_model_dir, dtype="bf16")
    assert backbone.unet.dtype == torch.bfloat16 and backbone.text_encoder.dtype == torch.bfloat16
    assert not any(module.training for module in backbone.modules().values())
    assert backbone.schedule.prediction_type == "v_prediction"


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_backbone(tmp_path / "nowhere")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_backbone(tmp_path)


@pytest.mark.parametrize("pipeline_class, message", [
    ("StableDiffusionPipeline", "Stable Diffusion folder, not an image-to-video model"),
    ("StableVideoDiffusionPipeline", "holds a StableVideoDiffusionPipeline model"),
])
def test_other_pipeline_class(model_copy, pipeline_class, message):
    index = json.loads((model_copy / "model_index.json").read_text())
    (model_copy / "model_index.json").write_text(json.dumps({**index, "_class_name": pipeline_class}))
    with pytest.raises(ModelLoadError, match=message):
        load_backbone(model_copy)


def test_seine_layout_is_detected(tmp_path):
    from anyv2v_core.backbones.families import detect_backbone

    (tmp_path / "stable-diffusion-v1-4" / "unet").mkdir(parents=True)
    (tmp_path / "stable-diffusion-v1-4" / "vae").mkdir()
    (tmp_path / "stable-diffusion-v1-4" / "unet" / "config.json").write_text("{}")
    (tmp_path / "seine.safetensors").write_bytes(b"")
    assert detect_backbone(tmp_path) == "seine"


def test_missing_component(model_copy):
    shutil.rmtree(model_copy / "image_encoder")
    with pytest.raises(ModelLoadError, match="image_encoder/ is missing"):
        load_backbone(model_copy)


def test_pickle_only_weights_are_refused_unless_allowed(model_copy):
    from safetensors.torch import load_file

    unet = model_copy / "unet"
    torch.save(load_file(unet / "diffusion_pytorch_model.safetensors"), unet / "diffusion_pytorch_model.bin")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="allow_pickle=True"):
        load_backbone(model_copy)
    assert load_backbone(model_copy, allow_pickle=True).unet is not None


def test_repo_id_is_not_downloaded_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE"):
        load_backbone("ali-vilab/i2vgen-xl")


def test_unknown_dtype(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="dtype"):
        load_backbone(tiny_model_dir, dtype="int8")


def test_a_folder_with_only_fp16_files_loads(model_copy):
    """The recommended download keeps only *.fp16.safetensors; variant="auto" finds them in any dtype."""
    for weights in model_copy.glob("*/*.safetensors"):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    assert load_backbone(model_copy, dtype="fp32").unet.dtype == torch.float32
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors is missing"):
        load_backbone(model_copy, variant=None)
