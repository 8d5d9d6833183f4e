"""Security: safetensors only by default, no remote code, no code from model folders, no network
unless a repo id is given on purpose. (Node paths that try to leave the model folders are in
test_bad_inputs.py.)"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import socket
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT

PACKAGE_FILES = sorted([*(REPO_ROOT / "anyv2v_core").rglob("*.py"), *(REPO_ROOT / "nodes").rglob("*.py"),
                        REPO_ROOT / "__init__.py"])

FORBIDDEN = {
    "trust_remote_code=True": re.compile(r"trust_remote_code\s*=\s*True"),
    "weights_only=False": re.compile(r"weights_only\s*=\s*False"),
    "use_safetensors=False": re.compile(r"use_safetensors\s*=\s*False"),
    "pickle.load": re.compile(r"\bpickle\.loads?\("),
    "eval/exec": re.compile(r"(?<![\w.])(eval|exec)\("),
}


def calls(source: str, name: str) -> list[str]:
    """The argument text of every call `name(...)` in `source` (balanced parentheses)."""
    found = []
    for match in re.finditer(re.escape(name) + r"\(", source):
        depth, end = 1, match.end()
        while depth and end < len(source):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        found.append(source[match.end() : end - 1])
    return found


def test_the_package_holds_no_unsafe_loading_code():
    assert len(PACKAGE_FILES) > 20
    problems = []
    for path in PACKAGE_FILES:
        source = path.read_text()
        problems += [f"{path.name}: {what}" for what, pattern in FORBIDDEN.items() if pattern.search(source)]
        for arguments in calls(source, "torch.load"):  # calls and their mentions in docstrings alike
            if not re.search(r"weights_only\s*=\s*True", arguments):
                problems.append(f"{path.name}: torch.load({arguments[:60]}) without weights_only=True")
    assert not problems, problems


def test_loaders_refuse_pickles_by_default():
    from anyv2v_core.backbones.checkpoints import load_state_dict_file
    from anyv2v_core.loading import load_backbone

    for function in (load_backbone, load_state_dict_file):
        assert inspect.signature(function).parameters["allow_pickle"].default is False


@pytest.fixture
def no_network(monkeypatch):
    """Hub downloads and socket connections are refused and recorded (a library that caught the
    refusal and carried on is still caught); the offline switches are off, so nothing but the code
    itself keeps it from reaching the network."""
    import huggingface_hub

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("network access refused by the test")

    for name in ("snapshot_download", "hf_hub_download"):
        monkeypatch.setattr(huggingface_hub, name, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(variable, raising=False)
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


def test_a_local_folder_loads_and_edits_without_network(tiny_model_dir, no_network):
    from anyv2v_core.loading import load_backbone
    from anyv2v_core.pipeline import edit
    from anyv2v_core.plan import EditSettings
    from anyv2v_core.testing.tiny_models import moving_square_video

    torch.set_num_threads(1)  # the machine is shared: more threads only contend
    backbone = load_backbone(tiny_model_dir)
    frames = moving_square_video(3, 32)
    edit(backbone, frames, frames[:1], prompt="a", settings=EditSettings(size_wh=(32, 32), inversion_steps=2, steps=2))


def test_the_node_loader_on_a_listed_folder_uses_no_network(tiny_model_dir, no_network, monkeypatch):
    import sys

    from test_nodes import load_pack

    pack = load_pack()
    monkeypatch.setattr(sys.modules["anyv2v_pack.nodes.host"], "diffusers_roots", lambda: [str(tiny_model_dir.parent)])
    (handle,) = pack.NODE_CLASS_MAPPINGS["LoadI2VBackbone"]().load(tiny_model_dir.name, "fp32", "offload after each node")
    assert handle.backbone.name == "i2vgen-xl"


@pytest.mark.parametrize("fp16_weights_only, repo_has_fp16, weights", [
    (False, True, "*.safetensors"),
    (True, True, "*.fp16.safetensors"),  # I2VGen-XL in half precision: 5 GB, not 15
    (True, False, "*.safetensors"),  # a repo without fp16 copies still downloads its weights
])
def test_a_repo_id_downloads_safetensors_and_configs_only(tiny_model_dir, monkeypatch, fp16_weights_only,
                                                          repo_has_fp16, weights):
    """The one network path: a repo id given on purpose; pickles and code files are never fetched."""
    import huggingface_hub

    from anyv2v_core.backbones.folders import resolve_source

    requests = []

    def snapshot_download(repo_id, **kwargs):
        requests.append((repo_id, kwargs))
        return str(tiny_model_dir)

    def list_repo_files(repo_id, **kwargs):
        names = ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
        return names + (["unet/diffusion_pytorch_model.fp16.safetensors"] if repo_has_fp16 else [])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", list_repo_files)
    assert resolve_source("ali-vilab/i2vgen-xl", fp16_weights_only=fp16_weights_only) == tiny_model_dir
    ((repo_id, kwargs),) = requests
    patterns = kwargs["allow_patterns"]
    assert repo_id == "ali-vilab/i2vgen-xl" and "*.json" in patterns
    assert [p for p in patterns if p.endswith(".safetensors")] == [weights]
    assert not [p for p in patterns if p.endswith((".bin", ".pt", ".pth", ".ckpt", ".py", "*"))]


def test_half_precision_loads_ask_for_the_fp16_files_only(tiny_model_dir, monkeypatch):
    from anyv2v_core import loading

    asked = []

    def resolve_source(source, *, fp16_weights_only=False):
        asked.append(fp16_weights_only)
        return tiny_model_dir

    monkeypatch.setattr(loading, "resolve_source", resolve_source)
    loading.load_backbone("ali-vilab/i2vgen-xl", dtype="fp32")
    loading.load_backbone("ali-vilab/i2vgen-xl", dtype="bf16")
    loading.load_backbone("ali-vilab/i2vgen-xl", dtype="bf16", variant=None)  # full-precision files asked by name
    assert asked == [False, True, False]


MARKER = "code_from_the_model_folder_ran"


def plant_code(folder: Path, marker: Path) -> None:
    """Python files a malicious model could ship, each creating `marker` if it is ever imported."""
    payload = f"open({str(marker)!r}, 'w').close()\n"
    for name in ("evil.py", "unet/evil.py", "text_encoder/modeling_evil.py", "pipeline.py"):
        (folder / name).write_text(payload)


def test_a_folder_naming_custom_code_is_refused_without_running_it(tiny_model_dir, tmp_path):
    from anyv2v_core.errors import ModelLoadError
    from anyv2v_core.loading import load_backbone

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    marker = tmp_path / MARKER
    plant_code(folder, marker)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "EvilPipeline", "unet": ["evil", "EvilUNet"]}))
    with pytest.raises(ModelLoadError, match="holds a EvilPipeline model"):
        load_backbone(folder)
    assert not marker.exists()


def test_auto_map_entries_in_configs_are_ignored(tiny_model_dir, tmp_path):
    """Configs that point at code in the folder (transformers' auto_map, a custom class name) load
    with the library's own classes; the folder's code never runs."""
    from anyv2v_core.loading import load_backbone

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    marker = tmp_path / MARKER
    plant_code(folder, marker)
    for component, auto_map in (("text_encoder", {"AutoModel": "modeling_evil.EvilModel"}),
                                ("unet", {"AutoModel": "evil.EvilUNet"})):
        config = folder / component / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "auto_map": auto_map}))
    backbone = load_backbone(folder)
    assert type(backbone.unet).__module__.startswith("diffusers.")
    assert type(backbone.text_encoder).__module__.startswith("transformers.")
    assert not marker.exists()
