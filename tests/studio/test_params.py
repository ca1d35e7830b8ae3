"""GenerationParams: strict types, real bounds from settings, unknown fields forbidden, never clamped (R5)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm_live.config import StudioSettings
from lcm_live.engine.validation import MAX_SEED
from lcm_live.errors import UserError
from lcm_live.studio.params import build_params_model, default_params_model, echo, parse_params

Params = default_params_model()

valid = st.fixed_dictionaries(
    {},
    optional={
        "mode": st.just("txt2img"),
        "prompt": st.text(max_size=1000),
        "negative_prompt": st.text(max_size=50),
        "num_inference_steps": st.integers(1, 8),
        "guidance_scale": st.floats(0, 20, allow_nan=False),
        "seed": st.integers(0, MAX_SEED),
        "width": st.integers(32, 96).map(lambda k: k * 8),
        "height": st.integers(32, 96).map(lambda k: k * 8),
        "strength": st.floats(0.05, 1.0, allow_nan=False),
        "previews": st.booleans(),
    },
)


@settings(max_examples=150, deadline=None)
@given(valid)
def test_valid_params_are_accepted_unchanged(data):
    p = parse_params(Params, data)
    for key, value in data.items():
        assert getattr(p, key) == value


out_of_range = st.one_of(
    st.integers(max_value=0).map(lambda v: ("num_inference_steps", v)),
    st.integers(min_value=9).map(lambda v: ("num_inference_steps", v)),
    st.integers(max_value=-1).map(lambda v: ("seed", v)),
    st.integers(min_value=MAX_SEED + 1).map(lambda v: ("seed", v)),
    st.integers(-10000, 10000).filter(lambda v: not (256 <= v <= 768 and v % 8 == 0)).map(lambda v: ("width", v)),
    st.integers(-10000, 10000).filter(lambda v: not (256 <= v <= 768 and v % 8 == 0)).map(lambda v: ("height", v)),
    st.floats(allow_nan=True).filter(lambda v: not (0 <= v <= 20)).map(lambda v: ("guidance_scale", v)),
    st.floats(allow_nan=True).filter(lambda v: not (0.05 <= v <= 1)).map(lambda v: ("strength", v)),
    st.text(min_size=1001, max_size=1100).map(lambda v: ("prompt", v)),
    st.text().filter(lambda v: v not in ("txt2img", "img2img")).map(lambda v: ("mode", v)),
    st.text(min_size=1).filter(lambda k: k not in Params.model_fields).map(lambda k: (k, 1)),
    st.sampled_from(["4", 4.0, None, True, [4]]).map(lambda v: ("num_inference_steps", v)),
    st.sampled_from(["x", None, 1, [1]]).map(lambda v: ("previews", v)),
    st.sampled_from([1, None, ["a"]]).map(lambda v: ("prompt", v)),
)


@settings(max_examples=300, deadline=None)
@given(out_of_range)
def test_anything_out_of_range_is_rejected_naming_the_field(item):
    field, value = item
    with pytest.raises(UserError) as info:
        parse_params(Params, {field: value})
    assert info.value.field == echo(field)  # a client's field name comes back capped (issue 13: 1.9 MB names)


def test_img2img_needs_at_least_one_step():
    with pytest.raises(UserError) as info:
        parse_params(Params, {"mode": "img2img", "num_inference_steps": 2, "strength": 0.3})
    assert info.value.field == "strength" and "0.50" in info.value.message
    assert parse_params(Params, {"mode": "img2img", "num_inference_steps": 2, "strength": 0.5}).strength == 0.5
    assert parse_params(Params, {"mode": "txt2img", "num_inference_steps": 1, "strength": 0.3}).strength == 0.3
    # An engine whose img2img is LCM's own runs every step whatever the strength.
    lcm = build_params_model(StudioSettings(), lcm_img2img=True)
    assert parse_params(lcm, {"mode": "img2img", "num_inference_steps": 1, "strength": 0.3}).strength == 0.3


def test_bounds_come_from_settings():
    model = build_params_model(StudioSettings(max_size=1024, max_steps=4, default_steps=2), default_guidance_scale=1.0)
    schema = model.model_json_schema()["properties"]
    assert schema["width"]["maximum"] == 1024 and schema["num_inference_steps"]["maximum"] == 4
    assert schema["guidance_scale"]["default"] == 1.0 and schema["num_inference_steps"]["default"] == 2
    assert parse_params(model, {"width": 1024}).width == 1024
    with pytest.raises(UserError):
        parse_params(model, {"num_inference_steps": 5})


def test_defaults_and_request():
    p = parse_params(Params, {"prompt": "a cat", "negative_prompt": ""})
    # previews default on for a CPU (the default settings' device), where a frame takes seconds
    assert (p.mode, p.num_inference_steps, p.width, p.height, p.seed, p.previews) == ("txt2img", 4, 512, 512, 0, True)
    gpu = build_params_model(StudioSettings(), native_size=(512, 512), device="cuda")
    assert parse_params(gpu, {}).previews is False
    assert parse_params(build_params_model(StudioSettings(default_previews=False)), {}).previews is False
    request = p.to_request(image="ignored in txt2img")
    assert request.prompt == "a cat" and request.negative_prompt is None and request.image is None
    img2img = parse_params(Params, {"mode": "img2img", "strength": 0.7}).to_request(image="canvas")
    assert img2img.image == "canvas" and img2img.strength == 0.7


def test_error_messages_name_value_and_bound():
    with pytest.raises(UserError) as info:
        parse_params(Params, {"num_inference_steps": 12})
    assert "num_inference_steps=12" in info.value.message and "8" in info.value.message
    with pytest.raises(UserError, match="unknown field 'checkpoint'"):
        parse_params(Params, {"checkpoint": "x"})
    with pytest.raises(UserError):
        parse_params(Params, ["not", "an", "object"])


def test_sizes_left_to_the_model_follow_its_native_size():
    s = StudioSettings()
    assert (s.min_size, s.max_size, s.default_width, s.default_height) == (None, None, None, None)
    resolved = {n: s.for_model(n, n, device="cuda") for n in (32, 64, 512, 1024)}
    assert [(r.min_size, r.max_size, r.default_width) for r in resolved.values()] == [
        (64, 768, 64), (64, 768, 64), (256, 768, 512), (256, 1024, 1024)]
    wide = s.for_model(768, 432, device="cuda")  # not square: each side its own, the bounds take in both
    assert (wide.default_width, wide.default_height, wide.min_size, wide.max_size) == (768, 432, 256, 768)
    # On a CPU the default's long side stays at 512 (SDXL's 1024 would take minutes a frame); the bounds do not.
    cpu = s.for_model(1024, 1024, device="cpu")
    assert (cpu.default_width, cpu.min_size, cpu.max_size) == (512, 256, 1024)
    assert (s.for_model(768, 432).default_width, s.for_model(768, 432).default_height) == (512, 288)
    assert s.for_model(64, 64).default_width == 64 and s.for_model(512, 512).default_width == 512
    assert s.for_model(512, 512).for_model(64, 64).default_width == 512  # resolved once, then fixed


def test_sizes_that_were_set_are_kept_or_refused_with_the_bounds():
    assert StudioSettings(min_size=300).for_model(64, 64).default_width == 304  # the first multiple of 8 in
    kept = StudioSettings(default_width=256, max_size=400).for_model(1024, 1024, device="cuda")
    assert (kept.default_width, kept.default_height, kept.max_size) == (256, 400, 400)
    with pytest.raises(ValueError, match="default_width=100: use a multiple of 8"):
        StudioSettings(default_width=100)
    with pytest.raises(ValueError, match=r"default_width=1024: use a multiple of 8 in \[256, 768\]"):
        StudioSettings(default_width=1024).for_model(512, 512)


def test_the_conditionings_params_come_from_the_engines_registry():
    """Every conditioning param the engine declares (engine/modes.py), images aside (they are binary layers), is a
    studio field with the registry's description: a new conditioning cannot be forgotten here."""
    from lcm_live.engine.modes import ModelCaps, param_schema

    props = build_params_model(StudioSettings(), controlnet=True).model_json_schema()["properties"]
    for param in param_schema(ModelCaps(controlnet="x")):
        if param["type"] == "image":
            continue
        assert param["name"] in props, param["name"]
        assert param["description"] in props[param["name"]].get("description", ""), param["name"]
