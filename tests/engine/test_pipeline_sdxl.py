"""The engine on tiny SDXL-shaped models: two text encoders, pooled embeddings, micro-conditioning.

Full LCM-SDXL runs as StableDiffusionXLPipeline + LCMScheduler with a w-embedding UNet; LCM-LoRA-SDXL with CFG.
"""

from __future__ import annotations

import numpy as np
import pytest

from lcm_live.engine.hooks import Cancelled
from lcm_live.engine.model import LoadedModel
from lcm_live.engine.pipeline import Engine
from lcm_live.engine.request import GenerationRequest
from lcm_live.errors import UserError

SIZE = 64


def _tiny_sdxl(tmp_path, *, full_lcm: bool):
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lcm_live.engine.tiny import build_tokenizer

    tokenizer = build_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 micro-conditioning ids * 8 + pooled text (32)
        cross_attention_dim=64,  # text_encoder (32) and text_encoder_2 (32) hidden states, concatenated
        norm_num_groups=4, time_cond_proj_dim=32 if full_lcm else None,
    )
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=4, sample_size=32)
    config = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                  num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=32)
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    scheduler = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                             timestep_spacing="leading", original_inference_steps=50, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet.eval(), scheduler=scheduler)
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def _engine(folder, kind):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    return Engine(LoadedModel(pipe=pipe, kind=kind, arch="sdxl", name=f"tiny-sdxl-{kind}", native_width=SIZE,
                              native_height=SIZE))


@pytest.fixture(scope="module")
def sdxl_lcm_dir(tmp_path_factory):
    return _tiny_sdxl(tmp_path_factory.mktemp("sdxl_lcm"), full_lcm=True)


@pytest.fixture(scope="module")
def sdxl_plain_dir(tmp_path_factory):
    return _tiny_sdxl(tmp_path_factory.mktemp("sdxl_plain"), full_lcm=False)


def test_full_lcm_sdxl_equals_diffusers_and_streams_steps(sdxl_lcm_dir):
    import torch
    from diffusers import StableDiffusionXLPipeline

    engine = _engine(sdxl_lcm_dir, "lcm")
    events = []
    ours = engine.generate(GenerationRequest("a lighthouse", seed=9, num_inference_steps=2), callback=events.append)
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_lcm_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe("a lighthouse", num_inference_steps=2, guidance_scale=8.0, width=SIZE, height=SIZE,
                   generator=torch.Generator("cpu").manual_seed(9)).images[0]
    assert np.array_equal(np.asarray(ref), np.asarray(ours.images[0]))
    assert [e.step for e in events] == [1, 2] and tuple(events[0].latents.shape) == (1, 4, 32, 32)
    with pytest.raises(UserError):
        engine.generate(GenerationRequest("a lighthouse", negative_prompt="fog"))
    i2i = engine.generate(GenerationRequest("a lighthouse", seed=9, num_inference_steps=2,
                                            image=ours.images[0], strength=0.5))
    assert i2i.images[0].size == (SIZE, SIZE) and i2i.parameters["mode"] == "img2img"


def test_lcm_lora_sdxl_with_cfg_and_negative_prompt(sdxl_plain_dir):
    import torch
    from diffusers import StableDiffusionXLPipeline

    engine = _engine(sdxl_plain_dir, "lcm-lora")
    request = GenerationRequest("a boat", negative_prompt="rain", guidance_scale=1.5, seed=4, num_inference_steps=2)
    ours = engine.generate(request).images[0]
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_plain_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    ref = ref_pipe("a boat", negative_prompt="rain", num_inference_steps=2, guidance_scale=1.5, width=SIZE,
                   height=SIZE, generator=torch.Generator("cpu").manual_seed(4)).images[0]
    assert np.array_equal(np.asarray(ref), np.asarray(ours))
    assert engine.generate(request).parameters["negative_prompt"] == "rain" and engine.prompts.hits == 1

    def cancel(event):
        raise Cancelled()

    with pytest.raises(Cancelled):
        engine.generate(GenerationRequest("a boat", seed=4, image=ours, strength=1.0), callback=cancel)
