"""load_backbone picks each backbone from its folder; the convert command makes SEINE's pickle safe."""

import torch
from safetensors.torch import load_file

from anyv2v_core.cli import main
from anyv2v_core.loading import load_backbone
from conftest import oracle_path


def test_seine_folder_loads_through_the_common_loader(tmp_path):
    oracle = oracle_path("anyv2v-seine") / "model"
    (tmp_path / "seine.safetensors").symlink_to(oracle / "seine_ema.safetensors")
    (tmp_path / "stable-diffusion-v1-4").symlink_to(oracle / "stable-diffusion-v1-4")
    backbone = load_backbone(tmp_path)
    assert backbone.name == "seine" and backbone.sampler == "ddpm"


def test_consisti2v_folder_loads_through_the_common_loader():
    backbone = load_backbone(oracle_path("anyv2v-consisti2v") / "model")
    assert backbone.name == "consisti2v" and backbone.defaults.size_wh == (256, 256)


def test_convert_writes_safetensors_once(tmp_path, capsys):
    state = {"ema": {"conv.weight": torch.randn(2, 2), "shared": torch.ones(3)}}
    state["ema"]["alias"] = state["ema"]["shared"]  # shared storage, as SEINE's rotary freqs
    torch.save(state, tmp_path / "seine.pt")
    assert main(["convert", str(tmp_path / "seine.pt"), str(tmp_path / "seine.safetensors")]) == 0
    converted = load_file(tmp_path / "seine.safetensors")
    assert set(converted) == {"conv.weight", "shared", "alias"}
    before = (tmp_path / "seine.safetensors").read_bytes()
    assert main(["convert", str(tmp_path / "seine.pt"), str(tmp_path / "seine.safetensors")]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert (tmp_path / "seine.safetensors").read_bytes() == before
