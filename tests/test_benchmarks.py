"""The benchmarks stay runnable and the mutation list stays true to the code (issue 21).

Every script in benchmarks/ runs in its smoke mode (`--smoke`: tiny sizes, seconds); a new script is
covered by being there, and one without a smoke mode fails. Their full modes are manual commands
whose numbers are in docs/. Every mutation of `benchmarks/mutation.py` still names a snippet found
exactly once in its file and tests that exist (the mutation run itself is manual: it is long).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, skip_unless_ci
from test_comfyui_host import COMFYUI_DIR, COMFYUI_PYTHON

BENCHMARKS = sorted((REPO_ROOT / "benchmarks").glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda path: path.name)
def test_every_benchmark_runs_in_its_smoke_mode(script):
    python = sys.executable
    if "import comfy" in script.read_text():  # it measures the native path: ComfyUI's Python runs it
        if not COMFYUI_DIR:
            skip_unless_ci(f"{script.name} runs in ComfyUI's Python: set COMFYUI_DIR and COMFYUI_PYTHON")
        python = COMFYUI_PYTHON
    result = subprocess.run([python, str(script), "--smoke"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, f"{script.name} --smoke: exit {result.returncode}\n{result.stderr[-4000:]}"
    assert result.stdout.strip(), f"{script.name} --smoke printed nothing"


def load_mutation_list():
    spec = importlib.util.spec_from_file_location("mutation", REPO_ROOT / "benchmarks" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutation"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_mutation_matches_its_file_exactly_once_and_names_tests_that_exist():
    mutation = load_mutation_list()
    stale = [f"{m.name}: {count} occurrences in {m.path}" for m, count in
             mutation.stale_mutations(REPO_ROOT, mutation.MUTATIONS)]
    assert stale == [], "update these snippets of benchmarks/mutation.py to the code"
    names = [m.name for m in mutation.MUTATIONS]
    assert len(set(names)) == len(names), "two mutations share a name"
    missing = []
    for m in mutation.MUTATIONS:
        assert m.old != m.new and m.tests, m.name
        for test in m.tests:
            path, _, name = test.partition("::")
            if not (REPO_ROOT / path).is_file():
                missing.append(f"{m.name}: {path}")
            elif name:
                tree = ast.parse((REPO_ROOT / path).read_text())
                if name.split("[")[0] not in {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}:
                    missing.append(f"{m.name}: {test}")
    assert missing == [], "these mutations name tests that do not exist"
