"""The example workflows open as they are: each carries a note naming the exact model files and the folders
they go in, and GPU memory advice with the figures the docs give (the browser test, tests/test_frontend.py,
checks how they load and run)."""

import json
import re

import pytest

from conftest import REPO_ROOT

WORKFLOWS = sorted(path.name for path in (REPO_ROOT / "workflows").glob("*.json"))
# (widget holding a model file or folder, its folder under ComfyUI/models) of each loader in the examples
MODEL_INPUTS = {"UNETLoader": ("unet_name", "diffusion_models"), "CLIPLoader": ("clip_name", "text_encoders"),
                "VAELoader": ("vae_name", "vae"), "CLIPVisionLoader": ("clip_name", "clip_vision"),
                "LoadI2VBackbone": ("model", "diffusers")}
MEMORY_DOCS = ("docs/memory.md", "docs/wan.md")
FIGURE = re.compile(r"(\d+(?:\.\d+)?) ?GiB|(\d+(?:\.\d+)?) ?GB")


def note_of(workflow: str) -> str:
    ui = json.loads((REPO_ROOT / "workflows" / workflow).read_text())
    (note,) = [node["widgets_values"][0] for node in ui["nodes"] if node["type"] == "Note"]
    return note


def models_used(workflow: str) -> list[str]:
    """`folder/file` of every model the workflow's API twin loads (the built-in edit's model only when used)."""
    api = json.loads((REPO_ROOT / "workflows" / "api" / workflow).read_text())
    used = [f"{MODEL_INPUTS[node['class_type']][1]}/{node['inputs'][MODEL_INPUTS[node['class_type']][0]]}"
            for node in api.values() if node["class_type"] in MODEL_INPUTS]
    used += [f"diffusers/{node['inputs']['model']}" for node in api.values()
             if node["class_type"] == "FirstFrameEditor" and node["inputs"]["mode"] != "passthrough"]
    return used


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_the_note_names_every_model_file_and_its_folder(workflow):
    note = note_of(workflow)
    missing = [model for model in models_used(workflow) if model not in note]
    assert models_used(workflow) and not missing, f"{workflow}: its note does not name {missing} (folder/file)"


@pytest.mark.parametrize("workflow", WORKFLOWS)
def test_the_note_gives_the_memory_advice_of_the_docs(workflow):
    (advice,) = [paragraph for paragraph in note_of(workflow).split("\n\n") if paragraph.startswith("GPU memory")]
    cited = [doc for doc in MEMORY_DOCS if doc in advice]
    assert cited, f"{workflow}: the memory advice names none of {MEMORY_DOCS}"
    documented = {float(number) for doc in cited
                  for number in re.findall(r"\d+(?:\.\d+)?", (REPO_ROOT / doc).read_text())}
    for match in FIGURE.finditer(advice):
        figure = match.group(1) or match.group(2)
        decimals = len(figure.partition(".")[2])
        assert any(round(number, decimals) == float(figure) for number in documented), \
            f"{workflow}: {match.group(0)} in its note is in none of {cited}"
