"""The shipped SD1.5 / SDXL configs and the random-weight builders (shapes counted on the meta device)."""

from __future__ import annotations

import pytest

from lcm_live.engine import architectures as A


def test_sd15_unet_matches_lcm_dreamshaper_v7_shapes():
    unet = A.build_unet("sd15", full_lcm=True, meta=True)
    # SD1.5's UNet has 859,520,964 parameters; the w-embedding projection adds 256 x 320 (no bias).
    assert A.count_parameters(unet) == 859_520_964 + 256 * 320
    assert unet.config.time_cond_proj_dim == 256
    assert list(unet.config.block_out_channels) == [320, 640, 1280, 1280]
    assert unet.config.cross_attention_dim == 768
    assert next(unet.parameters()).device.type == "meta"  # nothing allocated


def test_sd15_plain_unet_has_no_w_embedding():
    unet = A.build_unet("sd15", full_lcm=False, meta=True)
    assert A.count_parameters(unet) == 859_520_964
    assert unet.config.time_cond_proj_dim is None


def test_sdxl_shapes():
    unet = A.build_unet("sdxl", full_lcm=False, meta=True)
    assert A.count_parameters(unet) == 2_567_463_684
    assert unet.config.addition_embed_type == "text_time"
    assert list(unet.config.transformer_layers_per_block) == [1, 2, 10]
    assert unet.config.cross_attention_dim == 2048
    text_encoder_2 = A.build_text_encoder("sdxl", "text_encoder_2", meta=True)
    assert type(text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert text_encoder_2.config.projection_dim == 1280
    assert A.count_parameters(text_encoder_2) == 694_659_840


def test_text_encoder_and_vae_are_the_real_sizes():
    assert A.count_parameters(A.build_text_encoder("sd15", meta=True)) == 123_060_480  # CLIP ViT-L/14 text
    assert A.count_parameters(A.build_vae("sd15", meta=True)) == 83_653_863


def test_clip_tokenizer_is_the_real_vocabulary():
    tokenizer = A.clip_tokenizer("sd15")
    assert len(tokenizer) == 49408
    # Ids of CLIP's BPE: "a</w>" 320, "photo</w>" 1125, "of</w>" 539, "cat</w>" 2368.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert A.clip_tokenizer("sdxl", "tokenizer_2").pad_token == "!"


def test_random_fill_is_seeded_and_sane():
    import torch

    a = A.build_text_encoder("sd15", seed=3)
    b = A.build_text_encoder("sd15", seed=3)
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    name = next(n for n in pa if n.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.equal(pa[name], pb[name])
    assert pa[name].std().item() == pytest.approx(1 / 768**0.5, rel=0.05)  # variance 1/fan_in
    assert all(torch.all(p == 1) for n, p in pa.items() if n.endswith("final_layer_norm.weight"))
    ids = torch.tensor([[49406, 320, 2368, 49407]])
    assert torch.isfinite(a(ids).last_hidden_state).all()


def test_tiny_pipeline_runs():
    import torch

    pipe = A.build_pipeline("tiny")
    out = pipe("a cat", num_inference_steps=2, width=32, height=32, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 32, 32, 3)
    assert type(A.build_pipeline("tiny", full_lcm=False)).__name__ == "StableDiffusionPipeline"


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="sd21"):
        A.build_pipeline("sd21")


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_shipped_configs_fit_diffusers_single_file_converter(arch):
    """At the real shapes, on the meta device (nothing allocated): original-layout keys made from the shipped
    configs convert back through diffusers' own single-file converters to exactly the modules' keys and shapes."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    from lcm_live.engine import ldm_layout

    unet = A.build_unet(arch, full_lcm=False, meta=True)
    vae = A.build_vae(arch, meta=True)
    if arch == "sd15":
        flat = ldm_layout.sd15_state_dict(unet, vae, A.build_text_encoder(arch, meta=True))
    else:
        text_encoder_2 = A.build_text_encoder(arch, "text_encoder_2", meta=True)
        flat = ldm_layout.sdxl_state_dict(unet, vae, A.build_text_encoder(arch, meta=True), text_encoder_2)
        converted = convert_open_clip_checkpoint(text_encoder_2, flat, prefix="conditioner.embedders.1.model.")
        want = text_encoder_2.state_dict()
        assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in want.items()}
    for module, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        converted = convert(flat, dict(module.config))
        want = module.state_dict()
        assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in want.items()}


# The fast families: each UNet built from the shipped config has the parameter count of the released float32
# weights (file size / 4 bytes: sd-turbo 3.46 GB, sdxs-512-dreamshaper 1.26 GB, bk-sdm-tiny 1.29 GB, sdxl-turbo
# 10.3 GB; configs/README.md); their text encoders and VAEs are their base's.
@pytest.mark.parametrize("arch,unet_params,text_params,vae", [
    ("sd-turbo", 865_910_724, 340_387_840, "AutoencoderKL"),  # SD 2.1: OpenCLIP-H text (1024 wide, 23 layers)
    ("sdxs", 315_746_244, 123_060_480, "AutoencoderTiny"),  # no mid block, 3 levels, 1 layer per block
    ("bk-sdm-tiny", 323_384_964, 123_060_480, "AutoencoderKL"),
    ("bk-sdm-small", 482_346_884, 123_060_480, "AutoencoderKL"),
    ("sdxl-turbo", 2_567_463_684, 123_060_480, "AutoencoderKL"),
])
def test_fast_family_shapes(arch, unet_params, text_params, vae):
    unet = A.build_unet(arch, full_lcm=None, meta=True)
    assert A.count_parameters(unet) == unet_params
    assert unet.config.time_cond_proj_dim is None  # plain UNets: guidance is CFG (off at their defaults)
    assert A.count_parameters(A.build_text_encoder(arch, meta=True)) == text_params
    assert type(A.build_vae(arch, meta=True)).__name__ == vae
    assert A.family(arch).guidance_scale <= 1.0  # none of them runs CFG by default


def test_family_defaults_and_unknown_arch():
    assert (A.family("sd15").num_inference_steps, A.family("sd15").guidance_scale) == (4, 1.5)
    assert A.family("sdxs").num_inference_steps == 1 and A.family("sd-turbo").native_size == 512
    assert A.family("sdxl-turbo").pipeline_arch == "sdxl" and A.family("bk-sdm-tiny").pipeline_arch == "sd15"
    assert A.read_config("sdxl-turbo", "scheduler")["timestep_spacing"] == "trailing"  # its own
    assert A.read_config("sdxl-turbo", "unet") == A.read_config("sdxl", "unet")  # the base's
    with pytest.raises(ValueError, match="expected one of sd15, sdxl, sd-turbo"):
        A.family("sd3")
