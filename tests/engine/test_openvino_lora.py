"""Style LoRA sliders on the OpenVINO UNet (engine/openvino_lora.py): the branch graph's images at a scale equal
the torch backend's at that scale (CPU float32), a scale change converts nothing, the defaults run the fused IR,
and a style that touches the text encoder moves it too."""

from __future__ import annotations

import pytest
import torch

from lcm_live.config import EngineSettings, LoraSpec
from lcm_live.engine.tiny import save_tiny_lora

pytest.importorskip("openvino")

DEFAULT = 0.2


@pytest.fixture(scope="module")
def style(tiny_lcm_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet")
    return save_tiny_lora(tmp_path_factory.mktemp("style") / "ink.safetensors", unet, rank=2, seed=5, std=0.2)


def _engine(model, style, scale, backend, cache):
    from lcm_live.engine.pipeline import Engine

    return Engine.from_settings(EngineSettings(model=str(model), device="cpu", dtype="float32", backend=backend,
                                               decoder="vae", openvino_cache_dir=str(cache),
                                               loras=[LoraSpec(source=str(style), scale=scale)]), progress=False)


def _image(engine) -> torch.Tensor:
    """The final latents (the UNet's doing; the VAE after it is the same on both backends)."""
    from lcm_live.engine.request import GenerationRequest

    request = GenerationRequest("a red circle", num_inference_steps=2, seed=3, width=64, height=64,
                                output_type="latent")
    return engine.generate(request).images[0].float()


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten(), b.flatten()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.fixture(scope="module")
def moved(tiny_lcm_dir, style, tmp_path_factory):
    """An OpenVINO engine loaded at the default scale, and its OpenVINOStyles."""
    from lcm_live.engine.openvino_lora import OpenVINOStyles

    engine = _engine(tiny_lcm_dir, style, DEFAULT, "openvino", tmp_path_factory.mktemp("ir"))
    at_default = _image(engine)
    styles = OpenVINOStyles(engine.pipe, [("ink", str(style), DEFAULT)], cache_dir=None, model_name="tiny")
    return engine, styles, at_default


@pytest.mark.parametrize("scale", [1.2, 0.0, -0.5])
def test_openvino_image_at_a_scale_equals_the_torch_backends(tiny_lcm_dir, style, moved, scale, tmp_path):
    engine, styles, at_default = moved
    assert styles.set({"ink": scale}) is True
    got = _image(engine)
    want = _image(_engine(tiny_lcm_dir, style, scale, "torch", tmp_path))
    print(f"scale {scale}: max-abs {(got - want).abs().max():.2e} cosine {_cosine(got, want):.6f} "
          f"moved {(got - at_default).abs().max():.3f}")
    assert (got - want).abs().max() < 2e-3 and _cosine(got, want) > 0.9999
    assert (got - at_default).abs().max() > 0.05  # the scale does change the image


def test_a_scale_change_converts_nothing_after_the_first(moved):
    engine, styles, at_default = moved
    unet = engine.pipe.unet
    styles.set({"ink": 0.9})
    _image(engine)  # the branch graph for this shape: converted at most once (the test above may have done it)
    conversions, compiled = unet.conversions, len(unet._compiled)
    for scale in (1.4, 0.6, -0.2):
        styles.set({"ink": scale})
        _image(engine)
    assert (unet.conversions, len(unet._compiled)) == (conversions, compiled)
    styles.set({"ink": DEFAULT})  # back at the default: the fused IR, the first image
    assert styles.route({})[0] == "unet"
    assert (_image(engine) - at_default).abs().max() < 1e-5


def test_the_torch_unet_keeps_its_layers_and_state_dict(moved):
    engine, styles, _ = moved
    styles.set({"ink": 1.0})
    torch_unet = engine.pipe.unet.torch_module()
    assert not any("lora" in key or "base_layer" in key for key in torch_unet.state_dict())
    assert engine.pipe.unet.styles is styles


def test_a_style_touching_the_text_encoder_moves_it(tiny_lcm_dir, tmp_path):
    """A LoRA with text-encoder layers too: the prompt embedding moves with the slider (torch, unfused)."""
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    from lcm_live.engine.openvino_lora import OpenVINOStyles

    encoder = CLIPTextModel.from_pretrained(tiny_lcm_dir / "text_encoder")
    generator = torch.Generator().manual_seed(1)
    layers = {}  # peft's names under diffusers' text_encoder. prefix: q and v projections of every layer, rank 2
    for name, module in encoder.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            layers[f"text_encoder.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=generator)
            layers[f"text_encoder.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=generator)
    save_file({k: v * 0.3 for k, v in layers.items()}, str(tmp_path / "words.safetensors"))
    path = tmp_path / "words.safetensors"
    engine = _engine(tiny_lcm_dir, path, 0.5, "openvino", tmp_path / "ir")
    styles = OpenVINOStyles(engine.pipe, [("words", str(path), 0.5)], cache_dir=None, model_name="tiny")

    def embedding():
        return engine.pipe.encode_prompt("a red circle", "cpu", 1, False)[0]

    before = embedding()
    styles.set({"words": 1.5})
    moved = embedding()
    want = _engine(tiny_lcm_dir, path, 1.5, "torch", tmp_path).pipe.encode_prompt("a red circle", "cpu", 1, False)[0]
    assert (moved - want).abs().max() < 1e-4 and (moved - before).abs().max() > 1e-2
    assert styles.route({})[0] == "unet"  # no UNet layer to branch: the fused IR, no second graph


def test_feature_reuse_on_openvino_still_refuses_naming_the_flag(tiny_lcm_dir, style, tmp_path):
    from lcm_live.config import ModelPreset, StylePreset
    from lcm_live.engine.pipeline import Engine
    from lcm_live.errors import UserError
    from lcm_live.studio.switching import LoadedEngine, restyle

    engine = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32",
                                                 backend="openvino", decoder="vae", feature_reuse=2,
                                                 openvino_cache_dir=str(tmp_path),
                                                 loras=[LoraSpec(source=str(style), scale=DEFAULT)]), progress=False)
    preset = ModelPreset(name="t", model=str(tiny_lcm_dir),
                         styles=[StylePreset(name="ink", lora=str(style), scale=DEFAULT)])
    loaded = LoadedEngine(engine, scales={"ink": DEFAULT})
    with pytest.raises(UserError) as err:  # its reused evaluations run graphs without the branches
        restyle(loaded, preset, {"ink": 1.0})
    assert err.value.field == "lora_scales" and "--feature-reuse" in err.value.message
    assert "feature_reuse:2" in err.value.message and loaded.scales == {"ink": DEFAULT}


def test_a_controlnets_residuals_reach_the_branch_graph(tiny_lcm_dir, style, tmp_path):
    """With a ControlNet the branch graph takes its residuals too (the tracer's inputs, in the UNet graph's order)."""
    from diffusers import UNet2DConditionModel
    from PIL import Image, ImageDraw

    from lcm_live.engine.openvino_lora import OpenVINOStyles
    from lcm_live.engine.pipeline import Engine
    from lcm_live.engine.request import GenerationRequest
    from lcm_live.engine.tiny import save_tiny_controlnet

    controlnet = save_tiny_controlnet(tmp_path / "cn", UNet2DConditionModel.from_pretrained(tiny_lcm_dir / "unet"))
    lines = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(lines).line([(4, 4), (60, 60)], fill="white", width=4)

    def latents(backend, scale, move_to=None):
        engine = Engine.from_settings(EngineSettings(
            model=str(tiny_lcm_dir), device="cpu", dtype="float32", backend=backend, decoder="vae",
            controlnet=str(controlnet), openvino_cache_dir=str(tmp_path / "ir"),
            loras=[LoraSpec(source=str(style), scale=scale)]), progress=False)
        if move_to is not None:
            OpenVINOStyles(engine.pipe, [("ink", str(style), scale)], cache_dir=None, model_name="t").set(
                {"ink": move_to})
        request = GenerationRequest("a red circle", num_inference_steps=2, seed=3, width=64, height=64,
                                    control_image=lines, output_type="latent")
        return engine.generate(request).images[0].float()

    got, want = latents("openvino", DEFAULT, move_to=1.2), latents("torch", 1.2)
    assert (got - want).abs().max() < 2e-3 and _cosine(got, want) > 0.9999
    assert (got - latents("torch", DEFAULT)).abs().max() > 0.05


def test_a_style_that_cannot_load_changes_nothing(tiny_lcm_dir, style, tmp_path):
    from lcm_live.engine.openvino_lora import OpenVINOStyles
    from lcm_live.errors import UserError

    engine = _engine(tiny_lcm_dir, style, DEFAULT, "openvino", tmp_path)
    styles = OpenVINOStyles(engine.pipe, [("ink", str(style), DEFAULT), ("gone", str(tmp_path / "gone.safetensors"),
                                                                          1.0)], cache_dir=None, model_name="tiny")
    with pytest.raises(UserError, match="gone.safetensors: no such file"):
        styles.set({"ink": 1.0, "gone": 1.0})
    with pytest.raises(UserError, match="'paper' is not a style of tiny"):
        styles.set({"ink": 1.0, "paper": 1.0})
    assert engine.pipe.unet.styles is None and styles.route({})[0] == "unet"
    assert styles.scales == {"ink": DEFAULT, "gone": 1.0}
    assert type(engine.pipe.unet).__name__ == "OpenVINOUNet"


def test_bfloat16_the_default_cpu_dtype_matches_a_model_fused_at_that_scale(tiny_lcm_dir, style, tmp_path):
    """bf16 inference (OpenVINO's hint): the branch graph at 1.2 against the fused IR of a model loaded at 1.2."""
    from lcm_live.engine.openvino_lora import OpenVINOStyles
    from lcm_live.engine.pipeline import Engine

    def engine(scale):
        return Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="bfloat16",
                                                   backend="openvino", decoder="vae",
                                                   openvino_cache_dir=str(tmp_path / str(scale)),
                                                   loras=[LoraSpec(source=str(style), scale=scale)]), progress=False)

    moved = engine(DEFAULT)
    at_default = _image(moved)
    OpenVINOStyles(moved.pipe, [("ink", str(style), DEFAULT)], cache_dir=None, model_name="tiny").set({"ink": 1.2})
    got, want = _image(moved), _image(engine(1.2))
    print(f"bf16: max-abs {(got - want).abs().max():.2e} of {want.abs().max():.1f}, cosine {_cosine(got, want):.6f}"
          f", moved {(got - at_default).abs().max():.3f}")
    assert _cosine(got, want) > 0.9999 and (got - want).abs().max() <= 2 ** -6 * want.abs().max()  # a few bf16 steps


def test_sdxl_branch_graph_takes_its_added_conditioning(tmp_path):
    """SDXL: the branch graph's inputs include text_embeds and time_ids (after lora_scales in the tracer's order)."""
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.openvino_lora import OpenVINOStyles
    from lcm_live.engine.tiny import save_tiny_sdxl_pipeline

    model = save_tiny_sdxl_pipeline(tmp_path / "xl")
    lora = save_tiny_lora(tmp_path / "xl-style.safetensors", UNet2DConditionModel.from_pretrained(model / "unet"),
                          rank=2, seed=5, std=0.2)
    engine = _engine(model, lora, DEFAULT, "openvino", tmp_path / "ir")
    OpenVINOStyles(engine.pipe, [("ink", str(lora), DEFAULT)], cache_dir=None, model_name="xl").set({"ink": 1.2})
    got, want = _image(engine), _image(_engine(model, lora, 1.2, "torch", tmp_path))
    assert (got - want).abs().max() < 2e-3 and _cosine(got, want) > 0.9999
