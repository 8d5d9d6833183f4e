"""Shared test fixtures: the parity oracles in ../shared/oracle and offline settings.

Outside CI a test that needs ../shared (the oracles, the ComfyUI snapshot) skips where it is
absent; under CI (CI=true, which .ci/run sets) that is a failure, so CI cannot pass by skipping."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_ROOT = REPO_ROOT.parent / "shared"
ORACLE_ROOT = Path(os.environ.get("ANYV2V_ORACLE_DIR", SHARED_ROOT / "oracle"))
UNDER_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_unless_ci(reason: str) -> None:
    """Skip the test, or fail it under CI, where everything in ../shared must be present."""
    if UNDER_CI:
        pytest.fail(f"{reason} (CI=true: CI must run this test, not skip it)")
    pytest.skip(reason)


def oracle_path(name: str) -> Path:
    """Folder of one parity oracle (e.g. "anyv2v-i2vgenxl"); skips the test where it is absent (fails under CI)."""
    path = ORACLE_ROOT / name
    if not path.is_dir():
        skip_unless_ci(f"parity oracle {path} is absent (it lives in ../shared/oracle beside the repo)")
    return path


@pytest.fixture(scope="session")
def i2vgenxl_oracle() -> Path:
    return oracle_path("anyv2v-i2vgenxl")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random I2VGen-XL diffusers folder built in-process (no shared/ needed)."""
    from anyv2v_core.testing.tiny_models import build_tiny_i2vgenxl

    return build_tiny_i2vgenxl(tmp_path_factory.mktemp("models") / "tiny-i2vgenxl")


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict:
    """The tiny model of every backbone family (tests/tiny_backbones.py), written (or found) once;
    `TINY_BACKBONES[name].load(tiny_sources[name])` loads a fresh copy."""
    from tiny_backbones import TINY_BACKBONES

    root = tmp_path_factory.mktemp("tiny-backbones")
    return {name: tiny.build(root) for name, tiny in TINY_BACKBONES.items()}


@pytest.fixture(scope="session")
def tiny_backbone(tiny_model_dir):
    from anyv2v_core.loading import load_backbone

    return load_backbone(tiny_model_dir)
