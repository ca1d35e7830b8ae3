"""Tiny random SD1.5-shaped components, built in code: for tests and `bench --arch tiny`.

No download anywhere: the CLIP tokenizer is built locally from a byte-level vocabulary (every byte, and every
byte closing a word, plus CLIP's two special tokens), which CLIPTokenizer reads like the real one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcm_live.engine.clip_vocab import write_byte_level_clip_vocab


def build_tokenizer(folder: str | Path, *, model_max_length: int = 77) -> Any:
    """A CLIPTokenizer over a byte-level vocabulary (514 tokens), saved to ``folder``."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    vocab_file, merges_file = write_byte_level_clip_vocab(folder)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)
    tokenizer.save_pretrained(folder)
    return tokenizer


def tiny_components(
    *, time_cond_proj_dim: int | None = 32, seed: int = 0, tokenizer_dir: str | Path
) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer and an LCMScheduler, all tiny (the whole set is ~1 MB).

    ``time_cond_proj_dim`` set: a full LCM (w-embedding); None: a plain SD1.5-shaped model for LCM-LoRA.
    """
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=4,
        time_cond_proj_dim=time_cond_proj_dim,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(tokenizer),
            max_position_embeddings=77,
            projection_dim=32,
        )
    )
    scheduler = LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        set_alpha_to_one=False, original_inference_steps=50, steps_offset=1,
    )
    return {
        "unet": unet.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_tiny_pipeline(folder: str | Path, *, full_lcm: bool = True, seed: int = 0) -> Path:
    """Save a tiny diffusers folder (safetensors): a full LCM, or a plain SD1.5-shaped model when
    ``full_lcm`` is False. Returns the folder."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    folder = Path(folder)
    parts = tiny_components(
        time_cond_proj_dim=32 if full_lcm else None, seed=seed, tokenizer_dir=folder / "_tokenizer_build"
    )
    if full_lcm:
        pipe = LatentConsistencyModelPipeline(**parts, safety_checker=None, feature_extractor=None,
                                              requires_safety_checker=False)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    _remove_tree(folder / "_tokenizer_build")
    json.loads((folder / "model_index.json").read_text())  # written, readable
    return folder


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def save_tiny_single_file(path: str | Path, *, seed: int = 0) -> tuple[Path, Path]:
    """A tiny plain SD1.5-shaped model as ONE .safetensors file in the original SD key layout, plus the diffusers
    folder holding its configs (what ``from_single_file(..., config=)`` reads). Returns (file, config folder)."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    from lcm_live.engine.ldm_layout import sd15_state_dict

    path = Path(path)
    folder = save_tiny_pipeline(path.parent / (path.stem + "_config"), full_lcm=False, seed=seed)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    save_file(sd15_state_dict(pipe.unet, pipe.vae, pipe.text_encoder), str(path))
    for part in ("unet", "vae", "text_encoder"):  # the config folder keeps configs only, as the shipped ones
        for weights in (folder / part).glob("*.safetensors"):
            weights.unlink()
    return path, folder


def save_tiny_controlnet(folder: str | Path, unet: Any, *, seed: int = 0, std: float = 0.2) -> Path:
    """A ControlNet shaped for ``unet`` (diffusers' ``from_unet``, random weights: an LCM UNet's guidance projection
    has no place in a ControlNet, which real ones lack too) saved as a diffusers folder (config.json +
    safetensors). Its zero convolutions get random weights, so the control image changes the output (a fresh
    ControlNet adds exactly nothing). The conditioning embedding downsamples as the tiny VAE does (2x)."""
    import torch
    from diffusers import ControlNetModel

    folder = Path(folder)
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8), load_weights_from_unet=False)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if not param.abs().any():  # the zero-initialised convolutions; the image's way in made to count
                param.normal_(0.0, 2.0 if name.startswith("controlnet_cond_embedding.conv_out") else std)
    controlnet.save_pretrained(folder, safe_serialization=True)
    return folder


def save_tiny_controlnet_single_file(path: str | Path, unet: Any, *, seed: int = 0) -> tuple[Path, Any]:
    """A ControlNet shaped for ``unet`` with the released ControlNets' image embedding (8x down: 16, 32, 96, 256
    channels, the only one the original layout's converter reads) as ONE .safetensors file in the original layout
    (``control_model.*``, engine/ldm_layout.py). Returns (file, the ControlNetModel it holds)."""
    import torch
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    from lcm_live.engine.ldm_layout import controlnet_state_dict

    path = Path(path)
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    with torch.no_grad():
        for param in controlnet.parameters():
            if not param.abs().any():
                param.normal_(0.0, 0.2)
    save_file(controlnet_state_dict(controlnet), str(path))
    return path, controlnet


def save_tiny_lora(path: str | Path, unet: Any, *, rank: int = 4, seed: int = 0, std: float = 0.05) -> Path:
    """A LoRA for ``unet`` made with peft (random A and B, so it changes the output), saved as one .safetensors
    file in diffusers' LoRA format (``unet.``-prefixed keys, what ``load_lora_weights`` reads). Leaves ``unet``
    as it was."""
    import copy

    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    path = Path(path)
    unet = copy.deepcopy(unet)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_" in name:  # peft starts B at zero (a no-op LoRA); make it do something
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=layers, weight_name=path.name,
                                              safe_serialization=True)
    return path


def put_in_hf_cache(cache: str | Path, repo_id: str, source: str | Path) -> Path:
    """Lay ``source`` (a folder, or one file) out as the Hugging Face cache holds a downloaded repo snapshot, so
    hub-id loading is tested offline: ``<cache>/models--org--name/{refs/main, snapshots/<commit>/...}``."""
    import shutil

    source = Path(source)
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    if source.is_dir():
        shutil.copytree(source, snapshot)
    else:
        snapshot.mkdir(parents=True)
        shutil.copy(source, snapshot / source.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def tiny_sdxl_components(*, time_cond_proj_dim: int | None = 32, seed: int = 0,
                         tokenizer_dir: str | Path) -> dict[str, Any]:
    """Tiny SDXL-shaped parts: two text encoders of different widths (32, CLIP-L's role; 48 with a projection,
    OpenCLIP bigG's role), their hidden states concatenated for cross-attention (80), the pooled projection (40)
    and six micro-conditioning ids (6 x 8) feeding the "text_time" added embedding (88)."""
    import torch
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer(tokenizer_dir)
    tokenizer_2 = build_tokenizer(Path(tokenizer_dir) / "2")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 40,
        cross_attention_dim=32 + 48, norm_num_groups=4, time_cond_proj_dim=time_cond_proj_dim,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=32)
    common = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, num_hidden_layers=2, vocab_size=len(tokenizer),
                  max_position_embeddings=77)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                projection_dim=32, **common))
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, intermediate_size=96,
                                                                num_attention_heads=4, projection_dim=40,
                                                                hidden_act="gelu", **common))
    scheduler = LCMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading",
        set_alpha_to_one=False, original_inference_steps=50, steps_offset=1,
    )
    return {"unet": unet.eval(), "vae": vae.eval(), "text_encoder": text_encoder.eval(),
            "text_encoder_2": text_encoder_2.eval(), "tokenizer": tokenizer, "tokenizer_2": tokenizer_2,
            "scheduler": scheduler}


def save_tiny_sdxl_pipeline(folder: str | Path, *, full_lcm: bool = True, seed: int = 0) -> Path:
    """A tiny StableDiffusionXLPipeline folder (safetensors): a full LCM-SDXL or a plain SDXL-shaped model."""
    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    parts = tiny_sdxl_components(time_cond_proj_dim=32 if full_lcm else None, seed=seed,
                                 tokenizer_dir=folder / "_tokenizer_build")
    StableDiffusionXLPipeline(**parts).save_pretrained(folder, safe_serialization=True)
    _remove_tree(folder / "_tokenizer_build")
    return folder


def save_tiny_sdxl_single_file(path: str | Path, *, seed: int = 0) -> tuple[Path, Path]:
    """A tiny plain SDXL-shaped model as ONE .safetensors file in the original SDXL layout, plus its config
    folder (configs and tokenizers, no weights). Returns (file, config folder)."""
    from safetensors.torch import save_file

    from lcm_live.engine.ldm_layout import sdxl_state_dict

    path = Path(path)
    folder = path.parent / (path.stem + "_config")
    parts = tiny_sdxl_components(time_cond_proj_dim=None, seed=seed, tokenizer_dir=folder / "_tokenizer_build")
    from diffusers import StableDiffusionXLPipeline

    StableDiffusionXLPipeline(**parts).save_pretrained(folder, safe_serialization=True)
    _remove_tree(folder / "_tokenizer_build")
    save_file(sdxl_state_dict(parts["unet"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"]), str(path))
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        for weights in (folder / part).glob("*.safetensors"):
            weights.unlink()
    return path, folder


def save_tiny_unet_only(folder: str | Path, *, sdxl: bool = False, full_lcm: bool = True, seed: int = 0) -> Path:
    """A tiny UNet-only folder, as latent-consistency/lcm-sdxl is laid out: config.json (UNet2DConditionModel)
    and diffusion_pytorch_model.safetensors, no model_index.json. It fits the tiny base of its shape."""
    folder = Path(folder)
    build = folder.parent / (folder.name + "_tokenizer_build")
    make = tiny_sdxl_components if sdxl else tiny_components
    unet = make(time_cond_proj_dim=32 if full_lcm else None, seed=seed, tokenizer_dir=build)["unet"]
    _remove_tree(build)
    unet.save_pretrained(folder, safe_serialization=True)
    return folder
