"""Style LoRA scales changed after load (engine/loras.py ``StyleScales``): the weights carry base + scale * delta
for each new scale, back and forth, and images equal those of a model loaded at that scale (CPU float32)."""

from __future__ import annotations

import pytest
import torch

from lcm_live.config import EngineSettings, LoraSpec
from lcm_live.engine.loras import StyleScales
from lcm_live.engine.tiny import save_tiny_lora
from lcm_live.errors import UserError

LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a layer the tiny LoRA touches


def _engine(model, loras):
    from lcm_live.engine.pipeline import Engine

    return Engine.from_settings(EngineSettings(model=str(model), device="cpu", dtype="float32", backend="torch",
                                               decoder="vae", loras=loras), progress=False)


def _weight(unet, layer=LAYER):
    module = unet.get_submodule(layer)
    return getattr(module, "base_layer", module).weight.detach().clone()  # peft wraps the layer once loaded


def _delta(lora_file, layer=LAYER):
    from safetensors.torch import load_file

    state = load_file(str(lora_file))
    a = next(v for k, v in state.items() if f"{layer}.lora.down" in k)
    b = next(v for k, v in state.items() if f"{layer}.lora.up" in k)
    return b @ a  # alpha = rank: peft's scaling is 1


@pytest.fixture(scope="module")
def style(tiny_lcm_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet")
    return save_tiny_lora(tmp_path_factory.mktemp("style") / "ink.safetensors", unet, rank=2, seed=5, std=0.2)


@pytest.fixture(scope="module")
def base_weight(tiny_lcm_dir):
    from diffusers import UNet2DConditionModel

    return _weight(UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet"))


def test_scales_move_the_fused_weights_back_and_forth(tiny_lcm_dir, style, base_weight):
    engine = _engine(tiny_lcm_dir, [LoraSpec(source=str(style), scale=0.5)])
    unet = engine.pipe.unet
    delta = _delta(style)
    assert torch.allclose(_weight(unet), base_weight + 0.5 * delta, atol=1e-6)
    styles = StyleScales(engine.pipe, [("ink", str(style), 0.5)], cache_dir=None, model_name="tiny")
    assert styles.set({"ink": 0.5}) is False  # unchanged: nothing loaded, nothing fused
    for scale in (1.0, 0.0, 1.7, 0.5):
        assert styles.set({"ink": scale}) is True
        assert torch.allclose(_weight(unet), base_weight + scale * delta, atol=1e-5), scale
    with pytest.raises(UserError, match="'paper' is not a style"):
        styles.set({"ink": 1.0, "paper": 1.0})


def test_images_after_a_scale_change_equal_a_model_loaded_at_that_scale(tiny_lcm_dir, style):
    from lcm_live.engine.request import GenerationRequest

    request = GenerationRequest("a red circle", num_inference_steps=2, seed=3, width=64, height=64)
    moved = _engine(tiny_lcm_dir, [LoraSpec(source=str(style), scale=0.2)])
    StyleScales(moved.pipe, [("ink", str(style), 0.2)], cache_dir=None, model_name="tiny").set({"ink": 1.2})
    direct = _engine(tiny_lcm_dir, [LoraSpec(source=str(style), scale=1.2)])
    to_array = lambda image: torch.tensor(list(image.getdata()), dtype=torch.float32)  # noqa: E731
    a = to_array(moved.generate(request).images[0])
    b = to_array(direct.generate(request).images[0])
    other = to_array(_engine(tiny_lcm_dir, [LoraSpec(source=str(style), scale=0.2)]).generate(request).images[0])
    assert (a - b).abs().max() <= 1  # 8-bit pixels: equal up to rounding
    assert (a - other).abs().max() > 4  # and the scale does change the image


def test_bfloat16_weights_come_back_exactly_after_many_changes(tiny_lcm_dir, style):
    from lcm_live.engine.pipeline import Engine

    engine = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="bfloat16",
                                                 backend="torch", decoder="vae",
                                                 loras=[LoraSpec(source=str(style), scale=0.5)]), progress=False)
    loaded = _weight(engine.pipe.unet)
    styles = StyleScales(engine.pipe, [("ink", str(style), 0.5)], cache_dir=None, model_name="tiny")
    for k in range(40):
        styles.set({"ink": 0.1 + 0.03 * k})
    styles.set({"ink": 0.5})
    assert torch.equal(_weight(engine.pipe.unet), loaded)  # bf16: no rounding left by the changes
    styles.set({"ink": 1.5})
    expected = (loaded.float() + 1.0 * _delta(style)).to(torch.bfloat16)
    assert (_weight(engine.pipe.unet).float() - expected.float()).abs().max() <= 2 * 2 ** -8 * loaded.abs().max()


def test_a_style_that_cannot_load_leaves_no_adapter_behind(tiny_lcm_dir, style, tmp_path):
    engine = _engine(tiny_lcm_dir, [LoraSpec(source=str(style), scale=0.5)])
    before = _weight(engine.pipe.unet)
    styles = StyleScales(engine.pipe, [("ink", str(style), 0.5), ("gone", str(tmp_path / "gone.safetensors"), 1.0)],
                         cache_dir=None, model_name="tiny")
    with pytest.raises(UserError, match="gone.safetensors: no such file"):
        styles.set({"ink": 1.0, "gone": 1.0})
    assert not any(engine.pipe.get_list_adapters().values())  # ink's adapter, loaded first, went again
    assert torch.equal(_weight(engine.pipe.unet), before) and styles.scales == {"ink": 0.5, "gone": 1.0}


def test_a_wrapped_unet_refuses_scale_changes_naming_the_flags(tiny_lcm_dir, style):
    from lcm_live.config import ModelPreset, StylePreset
    from lcm_live.engine.pipeline import Engine
    from lcm_live.studio.models import ModelRegistry
    from lcm_live.studio.switching import LoadedEngine, restyle

    engine = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32",
                                                 backend="torch", decoder="vae", feature_reuse=2,
                                                 loras=[LoraSpec(source=str(style), scale=0.5)]), progress=False)
    preset = ModelPreset(name="t", model=str(tiny_lcm_dir), styles=[StylePreset(name="ink", lora=str(style),
                                                                                scale=0.5)])
    ModelRegistry([preset])  # a valid preset
    with pytest.raises(UserError) as err:  # feature reuse wraps the UNet: peft cannot load into it
        restyle(LoadedEngine(engine, scales={"ink": 0.5}), preset, {"ink": 1.0})
    assert err.value.field == "lora_scales" and "feature_reuse:2" in err.value.message
    assert "--feature-reuse" in err.value.message
