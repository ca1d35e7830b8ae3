"""Request validation as properties: every value in range passes, every value out of range is refused (never
clamped), and the error names the field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lcm_live.engine.request import GenerationRequest
from lcm_live.engine.validation import resolve_guidance, validate_request
from lcm_live.errors import UserError

valid_sizes = st.integers(8, 256).map(lambda k: k * 8)  # 64 .. 2048 in steps of 8
sizes = st.one_of(st.none(), st.integers(-100, 3000))


@settings(max_examples=300, deadline=None)
@given(steps=st.integers(-3, 12), width=sizes, height=sizes,
       guidance=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       n=st.integers(-2, 4), seed=st.one_of(st.none(), st.integers(-5, 2**65)))
def test_in_range_passes_out_of_range_names_the_field(steps, width, height, guidance, n, seed):
    request = GenerationRequest("p", num_inference_steps=steps, width=width, height=height, guidance_scale=guidance,
                                num_images_per_prompt=n, seed=seed)
    problems = []
    if not 1 <= steps <= 8:
        problems.append("num_inference_steps")
    for name, value in (("width", width), ("height", height)):
        if value is not None and not (64 <= value <= 2048 and value % 8 == 0):
            problems.append(name)
    if guidance is not None and not (guidance >= 0 and guidance != float("inf")):
        problems.append("guidance_scale")
    if seed is not None and not 0 <= seed <= 2**32 - 1:
        problems.append("seed")
    if n < 1:
        problems.append("num_images_per_prompt")
    if problems:
        with pytest.raises(UserError) as err:
            validate_request(request)
        assert err.value.field == problems[0]
    else:
        validate_request(request)


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 8), strength=st.floats(-1, 2, allow_nan=False))
def test_strength_needs_one_step(steps, strength):
    from PIL import Image

    request = GenerationRequest("p", num_inference_steps=steps, strength=strength, image=Image.new("RGB", (8, 8)))
    if 0 < strength <= 1 and steps * strength >= 1 - 1e-9:
        validate_request(request)
    else:
        with pytest.raises(UserError) as err:
            validate_request(request)
        assert err.value.field == "strength"
    # LCM's own img2img runs every step whatever the strength: only the (0, 1] range applies here.
    if 0 < strength <= 1:
        validate_request(request, lcm_img2img=True)
    else:
        with pytest.raises(UserError):
            validate_request(request, lcm_img2img=True)


@given(size=valid_sizes)
def test_every_multiple_of_8_in_range_is_accepted(size):
    validate_request(GenerationRequest("p", width=size, height=size))


def test_guidance_defaults_and_cfg_modes():
    assert resolve_guidance(GenerationRequest("p"), "lcm") == (8.0, False)
    assert resolve_guidance(GenerationRequest("p", guidance_scale=3.0), "lcm") == (3.0, False)  # w-embedding
    assert resolve_guidance(GenerationRequest("p"), "lcm-lora") == (1.0, False)
    assert resolve_guidance(GenerationRequest("p", guidance_scale=1.5), "lcm-lora") == (1.5, True)
    assert resolve_guidance(GenerationRequest("p", negative_prompt="  "), "lcm") == (8.0, False)  # blank: none
