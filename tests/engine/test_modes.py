"""The conditionings' registry (engine/modes.py): mode names, batch keys, the parameter schema and the CLI flags
all come from it."""

from __future__ import annotations

import argparse

from PIL import Image

from lcm_live.engine import modes
from lcm_live.engine.request import GenerationRequest, PromptBlend, Region, SeedBlend

IMAGE = Image.new("RGB", (64, 64))
MASK = Image.new("L", (64, 64), 255)


def test_mode_names_compose():
    def name(**kw):
        return modes.mode_name(GenerationRequest("p", **kw))

    assert name() == "txt2img" and name(image=IMAGE) == "img2img" and name(control_image=IMAGE) == "control"
    assert name(image=IMAGE, mask_image=MASK) == "inpaint"
    assert name(image=IMAGE, mask_image=MASK, control_image=IMAGE) == "inpaint+control"
    assert name(regions=[Region("r", MASK)]) == "regions"
    assert name(prompt_blend=PromptBlend("q"), seed_blend=SeedBlend(1)) == "txt2img"  # blends change inputs only


def test_batch_keys_come_from_the_registry():
    key = modes.batch_key
    assert key(GenerationRequest("a", seed=1)) == key(GenerationRequest("b", seed=2, prompt_blend=PromptBlend("q")))
    assert key(GenerationRequest("a", image=IMAGE)) != key(GenerationRequest("a", image=IMAGE, mask_image=MASK))
    assert key(GenerationRequest("a", regions=[Region("r", MASK)])) is None  # its windows are its own


def test_the_schema_offers_the_control_image_only_with_a_controlnet():
    names = [p["name"] for p in modes.param_schema()]
    assert "control_image" not in names and {"mask_image", "mask_feather", "regions", "prompt_blend",
                                             "seed_blend", "image", "strength"} <= set(names)
    with_cn = {p["name"]: p for p in modes.param_schema(modes.ModelCaps(controlnet="cn"))}
    assert with_cn["controlnet_conditioning_scale"]["conditioning"] == "control_image"
    assert with_cn["mask_feather"]["maximum"] == 64 and with_cn["regions"]["fields"] == {"prompt": "string",
                                                                                          "mask_image": "image"}


def test_every_parameter_with_a_flag_is_a_generate_flag():
    from lcm_live.cli.generate import add_parser

    sub = argparse.ArgumentParser().add_subparsers()
    add_parser(sub)
    parser = sub.choices["generate"]
    flags = {opt for action in parser._actions for opt in action.option_strings}
    wanted = {p.flag for c in modes.CONDITIONINGS for p in c.params if p.flag}
    assert wanted <= flags and {"--mask", "--region", "--prompt-blend", "--seed-blend"} <= wanted
