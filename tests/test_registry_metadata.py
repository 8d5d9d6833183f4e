"""What the Comfy Registry and the Manager list: pyproject.toml's [project] and [tool.comfy] tables are complete,
the version is semantic and has its CHANGELOG.md entry, the icon exists, and
the frontend extension ships (comfy-cli's `comfy node validate` reads the same fields offline)."""

import re
import tomllib

from conftest import REPO_ROOT
from test_nodes import load_pack

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
SEMANTIC_VERSION = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?")


def test_the_registry_tables_are_complete():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    for key in ("name", "description", "version", "license", "requires-python", "dependencies"):
        assert project.get(key), f"[project] {key} is empty"
    for key in ("Repository", "Issues", "Homepage", "Documentation"):  # the URL keys the registry reads
        assert project["urls"].get(key, "").startswith("https://"), f"[project.urls] {key}"
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert comfy.get(key), f"[tool.comfy] {key} is empty"
    assert re.fullmatch(r"[a-z0-9-]+", comfy["PublisherId"]), "a publisher id is lower case letters, digits and -"
    assert isinstance(comfy["includes"], list)
    assert comfy["requires-comfyui"].startswith(">=")
    assert not any(dependency.split("=")[0].split(">")[0].strip() == "torch" for dependency in project["dependencies"])


def test_the_icon_is_the_repositorys_file():
    path = PYPROJECT["tool"]["comfy"]["Icon"].split("/main/", 1)[1]
    assert (REPO_ROOT / path).is_file(), f"[tool.comfy] Icon points at {path}, which the repository lacks"


def test_the_version_is_semantic_and_in_the_changelog():
    version = PYPROJECT["project"]["version"]
    assert SEMANTIC_VERSION.fullmatch(version), version
    headings = re.findall(r"^## (\S+)", (REPO_ROOT / "CHANGELOG.md").read_text(), flags=re.MULTILINE)
    assert headings and headings[0] == version, f"CHANGELOG.md's newest entry {headings[:1]} is not {version}"


def test_the_frontend_extension_ships_with_the_pack():
    """Display names and descriptions are test_nodes.py's node contract; the extension is ComfyUI's WEB_DIRECTORY."""
    pack = load_pack()
    assert (REPO_ROOT / pack.WEB_DIRECTORY / "anyv2v.js").is_file()
