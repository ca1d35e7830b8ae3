"""LCM-LoRA and style LoRAs on a tiny plain SD model: made with peft, loaded, stacked with scales, fused."""

from __future__ import annotations

import pytest
import torch

from lcm_live.config import EngineSettings, LoraSpec
from lcm_live.engine.loading import load_model
from lcm_live.engine.tiny import put_in_hf_cache, save_tiny_lora
from lcm_live.errors import ModelUnavailableError, UserError

# A layer both LoRAs touch: the tiny UNet's only attention stack is in down block 1.
LAYER = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _load(model, **kw):
    return load_model(EngineSettings(model=str(model), **kw), device="cpu", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def base(tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def lcm_lora(base, tmp_path_factory):
    return save_tiny_lora(tmp_path_factory.mktemp("lcm") / "lcm-lora.safetensors", base.unet, seed=1)


@pytest.fixture(scope="module")
def style_lora(base, tmp_path_factory):
    return save_tiny_lora(tmp_path_factory.mktemp("style") / "style.safetensors", base.unet, rank=2, seed=2)


def _delta(lora_file, layer=LAYER):
    """B @ A of one layer (alpha = rank, so peft's scaling is 1)."""
    from safetensors.torch import load_file

    state = load_file(str(lora_file))
    # diffusers' format: "lora.down" is peft's A (rank x in), "lora.up" is B (out x rank)
    a = next(v for k, v in state.items() if f"{layer}.lora.down" in k)
    b = next(v for k, v in state.items() if f"{layer}.lora.up" in k)
    return b @ a


def _weight(unet, layer=LAYER):
    return dict(unet.named_parameters())[layer + ".weight"].detach()


def test_lcm_lora_path_is_fused_into_the_unet(tiny_sd_dir, base, lcm_lora):
    model = _load(tiny_sd_dir, lcm_lora=str(lcm_lora))
    assert model.kind == "lcm-lora" and model.loras == [(str(lcm_lora), 1.0)]
    expected = _weight(base.unet) + _delta(lcm_lora)
    assert torch.allclose(_weight(model.pipe.unet), expected, atol=1e-6)
    # Fused and unloaded: plain layers, no adapter left to cost time per step.
    assert not any("lora" in name for name, _ in model.pipe.unet.named_parameters())
    assert model.pipe.get_list_adapters() in ({}, {"unet": []}) or not any(model.pipe.get_list_adapters().values())


def test_fused_output_equals_unfused_diffusers(tiny_sd_dir, base, lcm_lora):
    """The fused model computes what diffusers' own adapter path computes."""
    from diffusers import StableDiffusionPipeline

    model = _load(tiny_sd_dir, lcm_lora=str(lcm_lora))
    ref = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, requires_safety_checker=False)
    ref.load_lora_weights(str(lcm_lora.parent), weight_name=lcm_lora.name, adapter_name="lcm")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        got = model.pipe.unet(latents, 500, encoder_hidden_states=context).sample
        want = ref.unet(latents, 500, encoder_hidden_states=context).sample
        plain = base.unet(latents, 500, encoder_hidden_states=context).sample
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the LoRA does change the model


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # stacking is the point
def test_style_lora_stacks_with_its_scale(tiny_sd_dir, base, lcm_lora, style_lora):
    model = _load(tiny_sd_dir, lcm_lora=str(lcm_lora), loras=[LoraSpec(source=str(style_lora), scale=0.5)])
    assert model.loras == [(str(lcm_lora), 1.0), (str(style_lora), 0.5)]
    expected = _weight(base.unet) + _delta(lcm_lora) + 0.5 * _delta(style_lora)
    assert torch.allclose(_weight(model.pipe.unet), expected, atol=1e-6)


def test_lora_folder_is_read(tiny_sd_dir, base, lcm_lora):
    model = _load(tiny_sd_dir, lcm_lora=str(lcm_lora.parent))
    assert torch.allclose(_weight(model.pipe.unet), _weight(base.unet) + _delta(lcm_lora), atol=1e-6)


def test_full_lcm_ignores_lcm_lora_but_takes_style_loras(tiny_lcm_dir, tmp_path):
    from diffusers import LatentConsistencyModelPipeline

    ref = LatentConsistencyModelPipeline.from_pretrained(tiny_lcm_dir, safety_checker=None)
    style = save_tiny_lora(tmp_path / "style.safetensors", ref.unet, seed=3)
    model = _load(tiny_lcm_dir, lcm_lora="auto", loras=[LoraSpec(source=str(style), scale=1.0)])
    assert model.kind == "lcm" and model.loras == [(str(style), 1.0)]
    assert torch.allclose(_weight(model.pipe.unet), _weight(ref.unet) + _delta(style), atol=1e-6)


def test_misfit_lora_gets_one_line_naming_lora_and_model(tiny_sd_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(  # same layout, wider: every attention weight has another shape
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=4, norm_num_groups=4)
    misfit = save_tiny_lora(tmp_path / "for-another-model.safetensors", other)
    with pytest.raises(UserError) as excinfo:
        _load(tiny_sd_dir, lcm_lora="none", loras=[LoraSpec(source=str(misfit))])
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 400 and excinfo.value.__cause__ is None
    assert str(misfit) in message and str(tiny_sd_dir) in message and "does not fit" in message
    assert "size mismatch for" not in message  # not the wall


def test_lora_with_no_matching_keys_is_refused(tiny_sd_dir, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "nothing-matches.safetensors"
    save_file({"unet.no_such_block.to_q.lora_A.weight": torch.zeros(4, 8),
               "unet.no_such_block.to_q.lora_B.weight": torch.zeros(8, 4)}, str(path))
    with pytest.raises(UserError, match="does not fit"):
        _load(tiny_sd_dir, lcm_lora=str(path))


@pytest.mark.parametrize("name", ["lora.bin", "lora.pt", "lora.ckpt"])
def test_pickle_lora_is_refused(tiny_sd_dir, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04junk")
    with pytest.raises(UserError, match="safetensors"):
        _load(tiny_sd_dir, lcm_lora="none", loras=[LoraSpec(source=str(path))])


def test_auto_lcm_lora_offline_names_the_lora(tiny_sd_dir, tmp_path, monkeypatch):
    from lcm_live.engine import loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(loading.REAL_CONTEXT_WIDTH, "sd15", 32)  # let the tiny model pass for SD1.5 here
    with pytest.raises(ModelUnavailableError) as excinfo:
        _load(tiny_sd_dir, lcm_lora="auto", cache_dir=str(tmp_path / "empty-cache"))
    message = str(excinfo.value)
    assert "latent-consistency/lcm-lora-sdv1-5" in message and "--lcm-lora" in message and "\n" not in message


def test_auto_lcm_lora_refused_for_a_model_it_cannot_fit(tiny_sd_dir, monkeypatch):
    """A small plain model (like builtin:shapes-teacher) is told to bring its own LCM-LoRA: nothing is fetched."""
    from lcm_live.engine import loras

    def no_download(*args, **kwargs):
        raise AssertionError("tried to fetch an LCM-LoRA that cannot fit")

    monkeypatch.setattr(loras, "_download_lora", no_download)
    with pytest.raises(UserError) as excinfo:
        _load(tiny_sd_dir, lcm_lora="auto")
    message = str(excinfo.value)
    assert "width 768" in message and "this one: 32" in message and "--lcm-lora none" in message
    assert excinfo.value.field == "lcm_lora"


def test_lcm_lora_hub_id_from_the_cache(tiny_sd_dir, base, lcm_lora, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    renamed = tmp_path / "pytorch_lora_weights.safetensors"  # the file name diffusers' LoRA repos use
    renamed.write_bytes(lcm_lora.read_bytes())
    put_in_hf_cache(tmp_path / "cache", "someorg/tiny-lcm-lora", renamed)
    model = _load(tiny_sd_dir, lcm_lora="someorg/tiny-lcm-lora", cache_dir=str(tmp_path / "cache"))
    assert model.loras == [("someorg/tiny-lcm-lora", 1.0)]
    assert torch.allclose(_weight(model.pipe.unet), _weight(base.unet) + _delta(lcm_lora), atol=1e-6)


def test_non_finite_scale_is_refused(tiny_sd_dir, style_lora):
    with pytest.raises(UserError, match="not a finite number"):
        _load(tiny_sd_dir, lcm_lora="none", loras=[LoraSpec(source=str(style_lora), scale=float("nan"))])


def test_bad_lora_fails_before_the_model_loads(tiny_sd_dir, tmp_path, monkeypatch):
    from lcm_live.engine import loading

    def no_load(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the LoRAs were checked")

    monkeypatch.setattr(loading, "_load_folder", no_load)
    with pytest.raises(UserError, match="no such file"):
        _load(tiny_sd_dir, lcm_lora=str(tmp_path / "missing.safetensors"))


@pytest.fixture(scope="module")
def tiny_sdxl_dir(tmp_path_factory):
    from lcm_live.engine.tiny import save_tiny_sdxl_pipeline

    return save_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"), full_lcm=False)


def test_sdxl_lcm_lora_is_fused(tiny_sdxl_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    lora = save_tiny_lora(tmp_path / "lcm-lora-sdxl.safetensors", ref.unet, seed=4)
    model = _load(tiny_sdxl_dir, lcm_lora=str(lora))
    assert (model.arch, model.kind) == ("sdxl", "lcm-lora")
    layer = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"  # the second transformer layer
    assert torch.allclose(_weight(model.pipe.unet, layer), _weight(ref.unet, layer) + _delta(lora, layer), atol=1e-6)


def test_sd15_lora_on_sdxl_is_a_misfit(tiny_sdxl_dir, lcm_lora):
    with pytest.raises(UserError) as excinfo:
        _load(tiny_sdxl_dir, lcm_lora=str(lcm_lora))
    message = str(excinfo.value)
    assert "does not fit" in message and str(tiny_sdxl_dir) in message and "\n" not in message


def test_auto_picks_the_sdxl_lcm_lora(tiny_sdxl_dir, tmp_path, monkeypatch):
    from lcm_live.engine import loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(loading.REAL_CONTEXT_WIDTH, "sdxl", 80)  # the tiny SDXL's width
    with pytest.raises(ModelUnavailableError, match="latent-consistency/lcm-lora-sdxl"):
        _load(tiny_sdxl_dir, lcm_lora="auto", cache_dir=str(tmp_path / "empty-cache"))


def test_lora_whose_layers_do_not_all_load_is_refused(tiny_sd_dir, tmp_path):
    """A file mixing key formats (peft's names for one layer, diffusers' old ones for the rest): diffusers picks one
    format and drops the other layers with a warning only; the engine refuses it, naming the formats it mixes.
    (A LoRA with layers the model lacks still loads: test_families' BK-SDM under SD1.5's LCM-LoRA.)"""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    old = load_file(str(save_tiny_lora(tmp_path / "old.safetensors", unet)))
    conv = unet.down_blocks[0].resnets[0].conv1
    mixed = {"unet.down_blocks.0.resnets.0.conv1.lora_A.weight": torch.full((4, conv.in_channels, 3, 3), 0.01),
             "unet.down_blocks.0.resnets.0.conv1.lora_B.weight": torch.full((conv.out_channels, 4, 1, 1), 0.01),
             **old}
    path = tmp_path / "mixed.safetensors"
    save_file(mixed, str(path))
    with pytest.raises(UserError, match=r"mixes LoRA naming formats \(1 layers named as peft \(lora_A\), \d+ "
                                         r"layers named as diffusers \(lora.down\)\)") as excinfo:
        _load(tiny_sd_dir, lcm_lora="none", loras=[LoraSpec(source=str(path))])
    assert str(path) in str(excinfo.value) and "save_lora_weights" in str(excinfo.value)
