"""Family detection (engine/families.py): the released configs, presets by name, --scheduler, refusals that
name the flag; no models built (the families' images: test_families.py)."""

from __future__ import annotations

import pytest
from engine_requests import req
from family_models import scheduler_from


def _config(arch: str, component: str = "scheduler") -> dict:
    from lcm_live.engine.architectures import read_config

    return read_config(arch, component)


def _detect(name="some/model", *, arch="sd15", full_lcm=False, scheduler_config=None, unet_config=None, loras=(),
            scheduler="auto"):
    from lcm_live.engine.families import detect_family

    return detect_family(name, arch=arch, full_lcm=full_lcm, scheduler_config=scheduler_config,
                         unet_config=unet_config, loras=loras, scheduler=scheduler)


def test_detects_families_from_the_released_configs():
    """The scheduler and UNet configs the releases ship (engine/configs), under names that say nothing."""
    assert _detect(scheduler_config=_config("sd-turbo"), unet_config=_config("sd-turbo", "unet")).name == "sd-turbo"
    assert _detect(arch="sdxl", scheduler_config=_config("sdxl-turbo")).name == "sdxl-turbo"
    assert _detect(arch="sdxl", scheduler_config=_config("sdxl")).name == "lcm-lora"  # SDXL base: leading Euler
    assert _detect(scheduler_config=_config("sd15"), unet_config=_config("sd15", "unet")).name == "lcm-lora"
    assert _detect(scheduler_config=None).name == "lcm-lora"  # a single file: a plain model, as before
    assert _detect(full_lcm=True, scheduler_config=_config("sd15")).name == "lcm"
    assert _detect(scheduler_config={"_class_name": "TCDScheduler"}).name == "tcd"
    trailing_euler = {**_config("sdxl"), "timestep_spacing": "trailing"}
    assert _detect(arch="sdxl", scheduler_config=trailing_euler).name == "sdxl-lightning"
    ddpm_trailing = {"_class_name": "DDPMScheduler", "timestep_spacing": "trailing"}
    assert _detect(scheduler_config=ddpm_trailing).scheduler == "euler-trailing"


@pytest.mark.parametrize("name, loras, arch, family, steps, sampler", [
    ("stabilityai/sd-turbo", (), "sd15", "sd-turbo", 1, "euler-trailing"),
    ("stabilityai/sdxl-turbo", (), "sdxl", "sdxl-turbo", 1, "euler-a"),
    ("sd_xl_turbo_1.0_fp16.safetensors", (), "sdxl", "sdxl-turbo", 1, "euler-a"),
    ("IDKiro/sdxs-512-0.9", (), "sd15", "sdxs", 1, "euler-trailing"),
    ("stabilityai/stable-diffusion-xl-base-1.0", ("ByteDance/SDXL-Lightning/sdxl_lightning_2step_lora.safetensors",),
     "sdxl", "sdxl-lightning", 2, "euler-trailing"),
    ("runwayml/stable-diffusion-v1-5", ("ByteDance/Hyper-SD/Hyper-SD15-1step-lora.safetensors",), "sd15",
     "hyper-sd", 1, "tcd"),
    ("runwayml/stable-diffusion-v1-5", ("Hyper-SD15-8steps-lora.safetensors",), "sd15", "hyper-sd", 8,
     "euler-trailing"),
    ("stabilityai/stable-diffusion-xl-base-1.0", ("h1t/TCD-SDXL-LoRA",), "sdxl", "tcd", 4, "tcd"),
    ("segmind/SSD-1B", (), "sdxl", "ssd-1b", 4, "lcm"),
    ("segmind/Segmind-Vega", (), "sdxl", "segmind-vega", 4, "lcm"),
    ("nota-ai/bk-sdm-small", (), "sd15", "bk-sdm", 4, "lcm"),
])
def test_presets_by_name(name, loras, arch, family, steps, sampler):
    fam = _detect(name, arch=arch, loras=loras, scheduler_config=_config("sdxl" if arch == "sdxl" else "sd15"))
    assert (fam.name, fam.num_inference_steps, fam.scheduler) == (family, steps, sampler)


def test_preset_details():
    from lcm_live.engine.families import FAMILIES, make_scheduler

    one = _detect("sdxl_lightning_1step_unet_x0.safetensors", arch="sdxl")
    assert one.scheduler_config == {"prediction_type": "sample"}  # Lightning's 1-step UNet predicts x0
    assert make_scheduler(one, scheduler_from("sdxl")).config.prediction_type == "sample"
    assert FAMILIES["ssd-1b"].lcm_lora == "latent-consistency/lcm-lora-ssd-1b"
    assert FAMILIES["lcm"].kind == "lcm" and FAMILIES["sd-turbo"].kind == "lcm-lora"
    # Only a folder's own name counts, not the folders above it.
    assert _detect("/models/sd-turbo-tests/dreamshaper", scheduler_config=_config("sd15")).name == "lcm-lora"


def test_an_unclassifiable_model_names_scheduler():
    from lcm_live.errors import UserError

    for config in ({"_class_name": "FlowMatchEulerDiscreteScheduler"},
                   {**_config("sd15"), "prediction_type": "v_prediction"}):
        with pytest.raises(UserError) as err:
            _detect("me/odd-model", scheduler_config=config)
        assert err.value.field == "scheduler" and "--scheduler" in err.value.message
        assert "me/odd-model" in err.value.message
        assert _detect("me/odd-model", scheduler_config=config, scheduler="euler-trailing").name == "euler-trailing"


def test_scheduler_override():
    from lcm_live.errors import UserError

    plain = _config("sd15")
    assert _detect(scheduler_config=plain, scheduler="euler-a").name == "euler-a"
    assert _detect(scheduler_config=plain, scheduler="tcd").eta == 0.3
    # The detected family is kept when it already samples that way (Hyper-SD's eta 1.0 with --scheduler tcd).
    assert _detect(loras=("Hyper-SD15-1step-lora",), scheduler_config=plain, scheduler="tcd").name == "hyper-sd"
    assert _detect("stabilityai/sd-turbo", scheduler_config=plain, scheduler="lcm").name == "lcm-lora"
    with pytest.raises(UserError) as err:
        _detect(full_lcm=True, scheduler_config=plain, scheduler="tcd")
    assert err.value.field == "scheduler" and "--scheduler lcm" in err.value.message
    with pytest.raises(UserError) as err:
        _detect(scheduler="ddim")
    assert "ddim" in err.value.message and "euler-trailing" in err.value.message


def test_cli_flags_reach_the_settings():
    import argparse

    from lcm_live.cli.common import add_engine_arguments, engine_settings_from_args

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    s = engine_settings_from_args(parser.parse_args(["--scheduler", "tcd", "--eta", "0.5"]))
    assert (s.scheduler, s.eta) == ("tcd", 0.5)
    assert engine_settings_from_args(parser.parse_args([])).scheduler == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["--scheduler", "ddim"])


def test_full_lcm_and_lcm_lora_keep_their_defaults(lcm, lora):
    """Engines made without a family (tests, tools) get their kind's LCM family: nothing changes for them."""
    assert (lcm.family.name, lcm.sampler, lcm.info.default_guidance_scale) == ("lcm", "lcm", 8.0)
    assert (lora.family.name, lora.sampler, lora.info.default_guidance_scale) == ("lcm-lora", "lcm", 1.0)
    assert lcm.generate(req("x", seed=0, num_inference_steps=None)).parameters["num_inference_steps"] == 4
