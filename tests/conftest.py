"""Shared fixtures: tiny models built in code and saved to temp folders (no network, seconds on CPU)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def tiny_lcm_dir(tmp_path_factory):
    """A tiny full LCM (UNet with time_cond_proj_dim) saved as a diffusers folder."""
    from lcm_live.engine.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_lcm"), full_lcm=True)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny plain SD1.5-shaped model (no w-embedding): becomes an LCM through an LCM-LoRA."""
    from lcm_live.engine.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), full_lcm=False)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models on a 2-core machine run far faster on one thread (no thread hand-offs per tiny op)."""
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def fake_uvicorn(monkeypatch):
    """Capture uvicorn.Config and replace Server.run: the app is built, nothing listens (the serve tests)."""
    import uvicorn

    seen = {}

    class FakeServer:
        def __init__(self, config):
            seen["config"] = config
            self.should_exit = False

        def run(self):
            seen["ran"] = True

    monkeypatch.setattr(uvicorn, "Server", FakeServer)
    monkeypatch.delenv("LCM_LIVE_TOKEN", raising=False)
    return seen


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need a CUDA device: skipped, with the reason, where torch sees none."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False here)")
    for item in gpu_items:
        item.add_marker(skip)
