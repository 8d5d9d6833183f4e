"""The package's layers (docs/architecture.md): the engine has no import circles, and the tools for
tests (anyv2v_core/testing: the stand-in device, the tiny random models) are not part of the
runtime: the engine, the nodes and the pack's entry point never import them, and the registry's
zip leaves them out (.comfyignore)."""

from __future__ import annotations

from conftest import REPO_ROOT

from anyv2v_core.testing.imports import import_circles, import_graph, imported_names, package_of

TESTING = "anyv2v_core.testing"
PACKAGE_FILES = [*(REPO_ROOT / "anyv2v_core").rglob("*.py"), *(REPO_ROOT / "nodes").rglob("*.py"),
                 REPO_ROOT / "__init__.py"]
RUNTIME_FILES = sorted(path for path in PACKAGE_FILES
                       if not path.is_relative_to(REPO_ROOT / "anyv2v_core" / "testing"))


def test_the_import_reader_resolves_relative_imports_of_the_testing_package():
    toy = ["anyv2v_core", "toy"]
    assert "anyv2v_core.testing.tiny_models" in imported_names("from ..testing.tiny_models import WAN_KINDS", toy)
    assert "anyv2v_core.testing" in imported_names("from .. import testing", toy)
    assert "anyv2v_core.testing.device_standin" in imported_names("import anyv2v_core.testing.device_standin", [])
    assert not {n for n in imported_names("from .components import write_tokenizer", toy) if n.startswith(TESTING)}


def test_no_runtime_module_imports_the_tools_for_tests():
    assert len(RUNTIME_FILES) > 30 and REPO_ROOT / "anyv2v_core" / "toy" / "train.py" in RUNTIME_FILES
    offenders = {}
    for path in RUNTIME_FILES:
        names = imported_names(path.read_text(), package_of(path))
        offenders[str(path.relative_to(REPO_ROOT))] = sorted(
            name for name in names if name == TESTING or name.startswith(TESTING + "."))
    assert not {path: names for path, names in offenders.items() if names}, \
        "runtime code imports anyv2v_core/testing (left out of the registry's zip): move what it needs beside it"


def test_the_registry_zip_leaves_the_tools_for_tests_out():
    ignored = (REPO_ROOT / ".comfyignore").read_text().splitlines()
    assert "anyv2v_core/testing/" in ignored


def test_the_circle_finder_finds_circles_and_only_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert import_circles(graph) == [["a", "b", "c"]]


# docs/architecture.md's rows, top to bottom: a module imports only from its own row and the rows under it
LAYERS = (
    ("anyv2v_core.testing",),
    ("anyv2v_core.cli", "anyv2v_core.__main__", "anyv2v_core.batch", "anyv2v_core.toy", "anyv2v_core.options"),
    ("anyv2v_core.pipeline",),
    ("anyv2v_core.inversion", "anyv2v_core.sampling", "anyv2v_core.inversion_store"),
    ("anyv2v_core.plan",),
    ("anyv2v_core.loading", "anyv2v_core.backbones", "anyv2v_core.injection"),
    ("anyv2v_core.schedule", "anyv2v_core.diffusion_schedule", "anyv2v_core.flow_schedule", "anyv2v_core.windows",
     "anyv2v_core.video", "anyv2v_core.offload", "anyv2v_core.memory", "anyv2v_core.errors"),
)


def layer_of(module: str) -> int | None:
    return next((depth for depth, row in enumerate(LAYERS)
                 if any(module == name or module.startswith(name + ".") for name in row)), None)


def test_every_engine_module_sits_in_a_layer_and_imports_only_its_own_or_lower_ones():
    graph = import_graph()
    assert [module for module in graph if module != "anyv2v_core" and layer_of(module) is None] == [], \
        "a new module: give it its row in LAYERS and in docs/architecture.md"
    upward = [f"{module} -> {target}" for module, targets in sorted(graph.items()) for target in sorted(targets)
              if target != "anyv2v_core" and layer_of(target) < layer_of(module)]
    assert upward == [], "these imports reach a higher layer: move the shared part down"


def test_the_engine_has_no_import_circles():
    graph = import_graph()
    assert "anyv2v_core.plan" in graph["anyv2v_core.pipeline"]  # the reader sees the engine's imports
    assert import_circles(graph) == [], "a module imports a module that imports it back: move the shared part below both"
