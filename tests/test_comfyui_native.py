"""The native Wan path and BackbonePatcher in-process under ComfyUI's own Python: the checks in
tests/comfyui_native_checks.py (device placement on the stand-in GPU, ComfyUI's sampler protocol,
what is refused, nothing left on the user's MODEL, newer ComfyUI's calls), one test each.

They run once, together, in one ComfyUI process (COMFYUI_PYTHON; its environment has no pytest).
Runs where test_comfyui_host.py runs: skipped without COMFYUI_DIR, except under CI, where it fails.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from comfyui_native_checks import CHECKS
from conftest import REPO_ROOT, skip_unless_ci
from test_comfyui_host import COMFYUI_DIR, COMFYUI_PYTHON

pytestmark = pytest.mark.comfyui_host
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def results(request) -> dict[str, str]:
    """The results of the checks this session selected (all of them, or those `-k` / a node id picks)."""
    if not COMFYUI_DIR:
        skip_unless_ci("COMFYUI_DIR is not set (path to a ComfyUI checkout to test the pack in)")
    selected = [item.callspec.params["name"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    run = subprocess.run([COMFYUI_PYTHON, str(REPO_ROOT / "tests" / "comfyui_native_checks.py"), COMFYUI_DIR,
                          *selected], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, f"the checks did not run:\n{run.stderr[-5000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CHECKS))
def test_native_check(results, name):
    assert name in results, f"{name} did not run"
    assert results[name] == "ok", results[name]
