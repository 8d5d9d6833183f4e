"""Loading ConsistI2V folders: safetensors preferred, pickles only on request (weights only),
one-time conversion, config fallbacks, clear errors."""

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from anyv2v_core.backbones.checkpoints import convert_checkpoint_to_safetensors
from anyv2v_core.backbones.consisti2v import (
    FALLBACK_SCHEDULER_CONFIG,
    ConsistI2VBackbone,
    load_unet,
    read_scheduler_config,
)
from anyv2v_core.errors import AnyV2VError, ModelLoadError
from conftest import oracle_path


@pytest.fixture(scope="module")
def oracle():
    return oracle_path("anyv2v-consisti2v")


@pytest.fixture(scope="module")
def tiny_weights(oracle):
    return load_file(str(oracle / "model" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture
def pickled_unet(oracle, tiny_weights, tmp_path):
    """A unet/ folder with the tiny weights as a torch pickle only."""
    folder = tmp_path / "unet"
    folder.mkdir()
    shutil.copy(oracle / "model" / "unet" / "config.json", folder / "config.json")
    torch.save(tiny_weights, folder / "diffusion_pytorch_model.bin")
    return folder


def assert_same_weights(unet, weights):
    state = unet.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in weights.items())


def test_tiny_oracle_folder_loads(oracle, tiny_weights):
    backbone = ConsistI2VBackbone.from_folder(oracle / "model")
    assert_same_weights(backbone.unet, tiny_weights)
    assert backbone.schedule.timesteps(50)[:2] == [981, 961]
    assert backbone.defaults.size_wh == (256, 256) and backbone.defaults.start_index == 4


def test_pickled_unet_is_refused_unless_allowed(pickled_unet, tiny_weights):
    with pytest.raises(ModelLoadError, match="pickle"):
        load_unet(pickled_unet)
    assert_same_weights(load_unet(pickled_unet, allow_pickle=True), tiny_weights)


def test_pickle_holding_objects_is_refused_even_when_allowed(pickled_unet, tiny_weights):
    torch.save({**tiny_weights, "optimizer": logging.getLogger("x")}, pickled_unet / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="refused"):
        load_unet(pickled_unet, allow_pickle=True)


def test_converted_unet_loads_without_pickles_and_conversion_never_overwrites(pickled_unet, tiny_weights):
    source = pickled_unet / "diffusion_pytorch_model.bin"
    target = pickled_unet / "diffusion_pytorch_model.safetensors"
    convert_checkpoint_to_safetensors(source, target)
    assert_same_weights(load_unet(pickled_unet), tiny_weights)  # the safetensors file is preferred
    with pytest.raises(AnyV2VError, match="already exists"):
        convert_checkpoint_to_safetensors(source, target)


def test_training_checkpoint_prefix_is_stripped(pickled_unet, tiny_weights):
    torch.save({f"module.{name}": tensor for name, tensor in tiny_weights.items()},
               pickled_unet / "diffusion_pytorch_model.bin")
    assert_same_weights(load_unet(pickled_unet, allow_pickle=True), tiny_weights)


def test_weights_that_do_not_fit_the_config_are_named(pickled_unet, tiny_weights, caplog):
    (pickled_unet / "config.json").unlink()  # falls back to the full-size config, with a warning
    with caplog.at_level(logging.WARNING, logger="AnyV2V"), pytest.raises(ModelLoadError, match="with another shape"):
        load_unet(pickled_unet, allow_pickle=True)
    assert "inferred ConsistI2V UNet config" in caplog.text


def test_missing_scheduler_config_falls_back_with_a_warning(oracle, tmp_path, caplog):
    shipped = json.loads((oracle / "model" / "scheduler" / "scheduler_config.json").read_text())
    with caplog.at_level(logging.WARNING, logger="AnyV2V"):
        fallback = read_scheduler_config(tmp_path)
    assert "scheduler_config.json is missing" in caplog.text
    assert fallback == FALLBACK_SCHEDULER_CONFIG
    assert {key: shipped[key] for key in fallback if key != "_class_name"} == {
        key: value for key, value in fallback.items() if key != "_class_name"
    }


def test_incomplete_folder_is_refused_clearly(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="vae/, text_encoder/, tokenizer/ missing"):
        ConsistI2VBackbone.from_folder(tmp_path)
