"""SEINE UNet port: key manifest, forward parity and injected (PnP) parity against the oracle,
plus the single-file checkpoint loader it is loaded with."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from anyv2v_core.backbones.checkpoints import convert_checkpoint_to_safetensors, load_state_dict_file
from anyv2v_core.backbones.rotary import RotaryEmbedding
from anyv2v_core.backbones.seine_unet import DEFAULT_INJECTION_LAYERS, SeineUNet3D, SeineUNetConfig
from anyv2v_core.errors import AnyV2VError, ModelLoadError
from conftest import oracle_path


@pytest.fixture(scope="module")
def oracle():
    return oracle_path("anyv2v-seine")


@pytest.fixture(scope="module")
def tiny_unet(oracle):
    torch.manual_seed(0)
    config = SeineUNetConfig.from_dict(json.loads((oracle / "model" / "seine_unet_config.json").read_text()))
    unet = SeineUNet3D(config).eval()
    unet.load_state_dict(load_state_dict_file(oracle / "model" / "seine_ema.safetensors"), strict=True)
    return unet


@pytest.fixture(scope="module")
def cases(oracle):
    return load_file(str(oracle / "unet_parity.safetensors"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, max_abs: float = 1e-4, max_rel: float = 1e-5):
    diff = (actual - expected).abs().max().item()
    rel = ((actual - expected).norm() / expected.norm()).item()
    assert diff <= max_abs and rel <= max_rel, f"max abs {diff:.3g}, relative L2 {rel:.3g}"


def test_full_size_key_manifest(oracle):
    manifest = json.loads((oracle / "real_unet_keys.json").read_text())
    with torch.device("meta"):
        unet = SeineUNet3D(SeineUNetConfig.from_dict(manifest["config"]))
    state = unet.state_dict()
    assert [(key, list(t.shape)) for key, t in state.items()] == [(k["key"], k["shape"]) for k in manifest["keys"]]
    assert sum(p.numel() for p in unet.parameters()) == manifest["numel_unique_parameters"]
    # the defaults are the official model
    assert SeineUNetConfig.from_dict(manifest["config"]) == SeineUNetConfig()


def test_sd_2d_config_gets_seine_edits(oracle):
    sd_config = json.loads((oracle / "model" / "stable-diffusion-v1-4" / "unet" / "config.json").read_text())
    seine_config = json.loads((oracle / "model" / "seine_unet_config.json").read_text())
    assert SeineUNetConfig.from_dict(sd_config) == SeineUNetConfig.from_dict(seine_config)
    with pytest.raises(ModelLoadError, match="use_linear_projection"):
        SeineUNetConfig.from_dict({**seine_config, "use_linear_projection": True})


@torch.no_grad()
def test_plain_case_and_intermediates(tiny_unet, cases):
    captured = {}
    names = ["time_embedding", "conv_in", "mid_block"] + [f"down_blocks.{i}" for i in range(4)] + [f"up_blocks.{i}" for i in range(4)]
    handles = [
        tiny_unet.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: captured.__setitem__(name, out[0] if isinstance(out, tuple) else out)
        )
        for name in names
    ]
    try:
        out = tiny_unet(cases["plain.sample"], cases["plain.timestep"], cases["plain.encoder_hidden_states"])
    finally:
        for handle in handles:
            handle.remove()
    for name in names:
        assert_close(captured[name], cases[f"plain.intermediate.{name}"])
    assert_close(out, cases["plain.out"])


@torch.no_grad()
def test_scalar_timestep_case(tiny_unet, cases):
    assert cases["scalar_t.timestep"].ndim == 0
    out = tiny_unet(cases["scalar_t.sample"], cases["scalar_t.timestep"], cases["scalar_t.encoder_hidden_states"])
    assert_close(out, cases["scalar_t.out"])
    out_int = tiny_unet(cases["scalar_t.sample"], int(cases["scalar_t.timestep"]), cases["scalar_t.encoder_hidden_states"])
    torch.testing.assert_close(out_int, out, rtol=0, atol=0)


@torch.no_grad()
def test_pnp_case_with_injection_hooks(tiny_unet, cases):
    from anyv2v_core.injection import KINDS, InjectionPlan, injected
    from anyv2v_core.backbones.base import InjectionLayers

    sample, t, text = cases["pnp.sample"], int(cases["pnp.timestep"]), cases["pnp.encoder_hidden_states"]

    def run(layers: InjectionLayers, spatial_events: int) -> torch.Tensor:
        plan = InjectionPlan(layers=layers, active_steps={kind: 1 for kind in KINDS})
        with injected(tiny_unet, plan) as injector:
            injector.set_step(plan.active_kinds(0), num_rows=3)
            out = tiny_unet(sample, t, text)
        assert injector.events == {"conv": 1, "spatial": spatial_events, "temporal": 16}
        return out

    out = run(DEFAULT_INJECTION_LAYERS, spatial_events=16)
    assert_close(out, cases["pnp.out"])
    torch.testing.assert_close(out[0], cases["pnp.out_without_hooks"][0], rtol=0, atol=2e-5)
    assert not any(module._forward_hooks for module in tiny_unet.modules())

    # The reference's optional cross-attention injection is Q/K of attn2 at the same places.
    layers = DEFAULT_INJECTION_LAYERS
    cross = tuple(name.replace(".attn1", ".attn2") for name in layers.spatial_attention)
    out_cross = run(InjectionLayers(layers.conv, layers.spatial_attention + cross, layers.temporal_attention), spatial_events=32)
    assert_close(out_cross, cases["pnp_cross.out"])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_unet(oracle, cases, dtype, tolerance):
    from anyv2v_core.backbones.seine import load_seine_unet

    config = SeineUNetConfig.from_dict(json.loads((oracle / "model" / "seine_unet_config.json").read_text()))
    unet = load_seine_unet(config, oracle / "model" / "seine_ema.safetensors", dtype=dtype, allow_pickle=False)
    with torch.no_grad():
        out = unet(cases["scalar_t.sample"].to(dtype), cases["scalar_t.timestep"], cases["scalar_t.encoder_hidden_states"].to(dtype))
    assert out.dtype == dtype
    assert_close(out.float(), cases["scalar_t.out"], max_abs=float("inf"), max_rel=tolerance)


def test_rotary_only_rotates_first_dims_and_is_relative():
    rope = RotaryEmbedding(32)
    assert rope.state_dict()["freqs"].shape == (16,)
    q, k = torch.randn(2, 3, 6, 48), torch.randn(2, 3, 6, 48)
    q_rot, k_rot = rope.rotate(q), rope.rotate(k)
    torch.testing.assert_close(q_rot[..., 32:], q[..., 32:], rtol=0, atol=0)
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    # logits depend on position differences only: shifting both by the same offset changes nothing
    shifted = rope.rotate(q, offset=5) @ rope.rotate(k, offset=5).transpose(-1, -2)
    torch.testing.assert_close(shifted, q_rot @ k_rot.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    # sequence on dim -3 (heads last but one)
    torch.testing.assert_close(rope.rotate(q.transpose(1, 2), seq_dim=1).transpose(1, 2), q_rot)


# ---------------------------------------------------------------------------------------------
# Checkpoint files

_executed = []


def _mark_executed():
    _executed.append(True)
    return {}


class _Payload:
    """Unpickling this would call _mark_executed: a stand-in for code hidden in a checkpoint."""

    def __reduce__(self):
        return (_mark_executed, ())


def test_pickles_are_refused_unless_allowed(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"ema": {"w": torch.ones(2)}, "step": 7}, path)
    with pytest.raises(ModelLoadError, match="convert"):
        load_state_dict_file(path)
    with pytest.raises(ModelLoadError, match="not tensors"):
        load_state_dict_file(path, allow_pickle=True)
    with pytest.raises(ModelLoadError, match="no entry 'model'"):
        load_state_dict_file(path, allow_pickle=True, entry="model")
    assert torch.equal(load_state_dict_file(path, allow_pickle=True, entry="ema")["w"], torch.ones(2))


def test_pickle_with_objects_is_refused_without_running_them(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"ema": {"w": torch.ones(2)}, "extra": _Payload()}, path)
    with pytest.raises(ModelLoadError, match="other than tensors"):
        load_state_dict_file(path, allow_pickle=True, entry="ema")
    with pytest.raises(ModelLoadError):
        convert_checkpoint_to_safetensors(path, tmp_path / "evil.safetensors", entry="ema")
    assert not _executed
    assert not (tmp_path / "evil.safetensors").exists()


def test_conversion_of_seine_layout_handles_shared_tensors(tmp_path, oracle):
    state = load_file(str(oracle / "model" / "seine_ema.safetensors"))
    freqs = RotaryEmbedding(32).freqs.detach()
    state = {key: (freqs if key.endswith("rotary_emb.freqs") else value) for key, value in state.items()}
    torch.save({"ema": state}, tmp_path / "seine.pt")  # the 16 freqs share one storage in the pickle

    out = convert_checkpoint_to_safetensors(tmp_path / "seine.pt", tmp_path / "seine.safetensors", entry="ema")
    assert sorted(os.listdir(tmp_path)) == ["seine.pt", "seine.safetensors"]  # no temporary file left
    loaded = load_state_dict_file(out)  # safetensors: no pickle permission needed
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    config = SeineUNetConfig.from_dict(json.loads((oracle / "model" / "seine_unet_config.json").read_text()))
    SeineUNet3D(config).load_state_dict(loaded, strict=True)


def test_conversion_never_overwrites_silently(tmp_path):
    torch.save({"w": torch.zeros(3)}, tmp_path / "a.pt")
    dst = tmp_path / "a.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(AnyV2VError, match="already exists"):
        convert_checkpoint_to_safetensors(tmp_path / "a.pt", dst)
    assert dst.read_bytes() == b"precious"
    convert_checkpoint_to_safetensors(tmp_path / "a.pt", dst, overwrite=True)
    assert torch.equal(load_state_dict_file(dst)["w"], torch.zeros(3))


def test_conversion_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    import safetensors.torch

    torch.save({"w": torch.zeros(3)}, tmp_path / "a.pt")

    def failing_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint_to_safetensors(tmp_path / "a.pt", tmp_path / "a.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["a.pt"]
