"""Engines on the tiny random models (CPU, float32), shared by the engine tests."""

import pytest

TINY_SIZE = 64  # the smallest size the engine accepts; the tiny VAE downsamples by 2, so latents are 32x32


def _tiny_engine(folder, kind, **settings):
    from diffusers import DiffusionPipeline

    from lcm_live.config import EngineSettings
    from lcm_live.engine.model import LoadedModel
    from lcm_live.engine.pipeline import Engine

    pipe = DiffusionPipeline.from_pretrained(folder)
    loaded = LoadedModel(pipe=pipe, kind=kind, arch="sd15", name=f"tiny-{kind}", native_width=TINY_SIZE,
                         native_height=TINY_SIZE)
    return Engine(loaded, EngineSettings(model=str(folder), device="cpu", dtype="float32", **settings))


@pytest.fixture(scope="session")
def tiny_engine():
    """``tiny_engine(folder, kind, **engine_settings)`` -> an Engine around a tiny model folder."""
    return _tiny_engine


@pytest.fixture(scope="module")
def lcm(tiny_lcm_dir):
    return _tiny_engine(tiny_lcm_dir, "lcm")


@pytest.fixture(scope="module")
def lora(tiny_sd_dir):
    """A plain SD1.5-shaped model with an LCMScheduler: what an LCM-LoRA model looks like to the engine."""
    return _tiny_engine(tiny_sd_dir, "lcm-lora")
