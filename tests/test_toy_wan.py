"""The flow world and the shipped toy Wan: determinism, loading through `load_backbone` like a real
Wan 2.2 TI2V folder with its own defaults, resumable training and the evaluation's smoke mode."""

import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from anyv2v_core.toy import world
from anyv2v_core.toy.wan_train import HELD_OUT_SEED, WAN_WEIGHTS

REPO = Path(__file__).resolve().parents[1]


def test_flow_world_is_seeded_and_its_motion_is_not_in_the_first_frame():
    a, b = world.make_flow_scene(5), world.make_flow_scene(5)
    assert a == b and np.array_equal(world.render(a), world.render(b))
    assert world.render(a).shape == (world.FLOW_FRAMES, world.FLOW_SIZE, world.FLOW_SIZE, 3)
    scenes = [world.make_flow_scene(seed) for seed in range(200)]
    assert not np.array_equal(world.render(scenes[0]), world.render(scenes[1]))
    velocities = {tuple(np.round(s.objects[0].velocity, 6)) for s in scenes}
    # every velocity is one of 8 headings x 2 speeds, and all 16 occur
    allowed = {(round(speed * math.cos(2 * math.pi * k / 8), 6), round(speed * math.sin(2 * math.pi * k / 8), 6))
               for speed in world.FLOW_SPEEDS for k in range(world.FLOW_HEADINGS)}
    assert velocities == allowed
    # a first frame does not decide the motion: the same frame 0 with another velocity is another clip
    moved = world.Scene(a.size, a.num_frames, a.background, (replace(a.objects[0], velocity=(0.0, 1.5)),))
    assert np.array_equal(world.render(moved)[0], world.render(a)[0])
    assert not np.array_equal(world.render(moved)[1:], world.render(a)[1:])


@pytest.fixture(scope="module")
def toy_wan():
    from anyv2v_core.loading import load_backbone

    torch.set_num_threads(1)
    return load_backbone(WAN_WEIGHTS)


def test_shipped_toy_wan_loads_as_a_wan_ti2v_folder_with_its_own_defaults(toy_wan):
    from anyv2v_core.backbones.wan import WAN22_TI2V_DEFAULTS, WAN_TOY_DEFAULTS, WanTI2VBackbone
    from anyv2v_core.backbones.families import backbone_defaults, detect_backbone

    weights = [p for p in WAN_WEIGHTS.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in weights) < 20_000_000
    assert detect_backbone(WAN_WEIGHTS) == "wan2.2-ti2v" and isinstance(toy_wan, WanTI2VBackbone)
    assert toy_wan.defaults == WAN_TOY_DEFAULTS == backbone_defaults("wan2.2-ti2v", WAN_WEIGHTS)
    assert backbone_defaults("wan2.2-ti2v") == WAN22_TI2V_DEFAULTS  # a real TI2V folder keeps the official ones
    assert toy_wan.defaults.size_wh == (world.FLOW_SIZE,) * 2 and toy_wan.defaults.num_frames == world.FLOW_FRAMES
    modules = dict(toy_wan.transformers.named_modules())
    assert all(name in modules for name in toy_wan.injection_layers.all_names())
    # latents_mean / latents_std were measured on held-out clips: other held-out clips' latents come out
    # normalised (per channel mean near 0, spread near 1), as the engine's schedule assumes
    clips = torch.from_numpy(np.stack([world.render(world.make_flow_scene(HELD_OUT_SEED + 400 + k)) for k in range(4)]))
    latents = torch.cat([toy_wan.encode_video(clip) for clip in clips])  # [4, C, F', h, w]
    assert latents.shape[1:] == (8, 3, 8, 8)
    assert latents.mean(dim=(0, 2, 3, 4)).abs().max() < 0.5
    assert ((latents.std(dim=(0, 2, 3, 4)) > 0.5) & (latents.std(dim=(0, 2, 3, 4)) < 2.0)).all()


def test_training_writes_a_loadable_folder_and_resumes(tmp_path):
    from anyv2v_core.loading import load_backbone
    from anyv2v_core.toy import wan_train

    out, work = tmp_path / "weights", tmp_path / "work"
    common = ["--out", str(out), "--work", str(work), "--vae-steps", "2", "--vae-batch", "1", "--vae-eval-clips", "2", "--batch", "2",
              "--width", "32", "--blocks", "2", "--checkpoint-every", "1", "--threads", "1"]
    wan_train.main(common + ["--steps", "1"])
    assert load_backbone(out).name == "wan2.2-ti2v"
    wan_train.main(common + ["--steps", "2"])  # continues the same run: no second VAE stage, one more step
    log = [line.split(",")[:2] for line in (work / "loss.csv").read_text().splitlines()]
    assert log == [["vae", "1"], ["vae", "2"], ["transformer", "1"], ["transformer", "2"]]
    assert not list(tmp_path.glob("*.partial"))


def test_evaluation_smoke_mode_counts_the_defaults_calls():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import toy_wan_eval

    from anyv2v_core.backbones.wan import WAN_TOY_DEFAULTS

    rows = {row["row"]: row for row in toy_wan_eval.main(["--smoke"])}
    assert list(rows) == ["defaults", "no injection"]
    steps, order = WAN_TOY_DEFAULTS.sampling_steps, WAN_TOY_DEFAULTS.inversion_order
    # inversion and sampling each take `order` calls per step; the source row runs only while injecting
    assert rows["defaults"]["calls"] == rows["no injection"]["calls"] == 2 * order * steps
    assert rows["defaults"]["rows"] > rows["no injection"]["rows"] == order * steps * 3
    assert all(np.isfinite(row["motion"][0]) and row["reconstruction"][0] > 10 for row in rows.values())
