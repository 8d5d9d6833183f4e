"""The toy training script: a short run writes a folder the engine loads, and a UNet saved with
another head width is re-headed without losing its weights."""

import json

import pytest
import torch

from anyv2v_core.toy import train


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A two-step run of both stages, with 4-wide heads (the width of the shipped weights)."""
    out = tmp_path_factory.mktemp("toy") / "weights"
    torch.set_num_threads(1)
    train.main(["--out", str(out), "--vae-steps", "2", "--vae-batch", "2", "--unet-steps", "2", "--batch", "2",
                "--frames", "4", "--checkpoint-every", "1", "--threads", "1", "--attention-head-dim", "4"])
    return out


def test_a_short_run_writes_a_folder_the_engine_loads(short_run):
    from anyv2v_core.loading import load_backbone

    backbone = load_backbone(short_run)
    assert backbone.name == "i2vgen-xl" and backbone.unet.config.attention_head_dim == 4
    assert not list(short_run.parent.glob("*.partial"))  # checkpoints replaced the folder atomically
    note = (short_run / "TRAINING.md").read_text()
    assert "## UNet steps 0 to 2 (from scratch, VAE included)" in note
    assert "--unet-steps 2" in note and "--attention-head-dim 4" in note
    for component in ("unet", "vae"):
        assert "_name_or_path" not in json.loads((short_run / component / "config.json").read_text())


def test_resuming_re_heads_the_unet_and_keeps_every_other_weight(short_run):
    from diffusers import I2VGenXLUNet

    saved = I2VGenXLUNet.from_pretrained(short_run, subfolder="unet")
    unet = train.load_networks(short_run, head_dim=16)[0]
    assert unet.config.attention_head_dim == 16 != saved.config.attention_head_dim
    widths = {m.to_q.out_features // m.heads for n, m in unet.named_modules() if n.endswith("attn1")
              and not n.startswith("image_latents_temporal_encoder")}
    assert widths == {16}
    before, after = saved.state_dict(), unet.state_dict()
    kept = [k for k in before if not k.startswith("transformer_in.")]
    assert kept and all(torch.equal(before[k], after[k]) for k in kept)
    # the resized input transformer starts as the identity: its residual branch outputs zero
    assert not unet.transformer_in.proj_out.weight.any() and not unet.transformer_in.proj_out.bias.any()
