"""Write diffusers SD1.5 / SDXL components as one state dict in the original single-file layout.

The layouts real ``.safetensors`` checkpoints use: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*``
(VAE), and the text encoders: SD1.5 ``cond_stage_model.transformer.text_model.*`` (CLIP, Hugging Face names);
SDXL ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L) and ``conditioner.embedders.1.model.*``
(OpenCLIP bigG: fused q/k/v ``in_proj``, ``resblocks``, ``text_projection`` as [width, proj]). lcm-live reads
such files with diffusers' ``from_single_file``; this writer exists so that path is tested on tiny models made in
code (there are no real checkpoints here). It inverts diffusers' converter for the block layouts SD UNets use
(``layers_per_block`` resnets per level, a down/up-sampler closing every level but the last).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_VAE_ATTENTION = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def sd15_state_dict(unet: Any, vae: Any, text_encoder: Any) -> dict[str, Any]:
    """The three components' weights under original SD1.5 single-file keys (tensors are shared, not copied)."""
    out: dict[str, Any] = {}
    for key, value in unet_to_ldm(unet.state_dict(), unet.config).items():
        out["model.diffusion_model." + key] = value
    for key, value in vae_to_ldm(vae.state_dict()).items():
        out["first_stage_model." + key] = value
    out.update(_clip_hf(text_encoder, "cond_stage_model.transformer."))
    return {k: v.contiguous() for k, v in out.items()}


def sdxl_state_dict(unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any) -> dict[str, Any]:
    """SDXL base components under original single-file keys."""
    out: dict[str, Any] = {}
    for key, value in unet_to_ldm(unet.state_dict(), unet.config).items():
        out["model.diffusion_model." + key] = value
    for key, value in vae_to_ldm(vae.state_dict()).items():
        out["first_stage_model." + key] = value
    out.update(_clip_hf(text_encoder, "conditioner.embedders.0.transformer."))
    out.update(_open_clip(text_encoder_2, "conditioner.embedders.1.model."))
    return {k: v.contiguous() for k, v in out.items()}


def _clip_hf(text_encoder: Any, prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in text_encoder.state_dict().items():
        # transformers 5 drops the "text_model." level from CLIPTextModel's keys; real checkpoints have it.
        key = key if key.startswith("text_model.") else "text_model." + key
        out[prefix + key] = value
    return out


_OPEN_CLIP_NAMES = (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
                    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"))


def _open_clip(text_encoder: Any, prefix: str) -> dict[str, Any]:
    """CLIPTextModelWithProjection -> OpenCLIP names; q, k, v stacked into one in_proj (rows q, then k, then v)."""
    import torch

    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    out = {prefix + "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": state.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": state.pop("final_layer_norm.bias"),
           prefix + "text_projection": state.pop("text_projection.weight").T}  # Linear [proj, width] -> x @ P
    layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
    for n in sorted(layers):
        src, dst = f"encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + "attn.in_proj_" + kind] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")])
        for hf_name, open_clip_name in _OPEN_CLIP_NAMES:
            for kind in ("weight", "bias"):
                out[f"{dst}{open_clip_name}.{kind}"] = state.pop(f"{src}{hf_name}.{kind}")
    if state:
        raise ValueError(f"no OpenCLIP name for text encoder keys {sorted(state)[:3]}")
    return out


def _block_map(config: Any) -> list[tuple[str, str]]:
    """(diffusers prefix, LDM prefix) pairs, longest first so nested names map before their parents."""
    per_level = config.layers_per_block + 1  # resnets + the sampler slot (LDM numbers them together)
    levels = len(config.block_out_channels)
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
             ("mid_block.resnets.0", "middle_block.0"), ("mid_block.attentions.0", "middle_block.1"),
             ("mid_block.resnets.1", "middle_block.2")]
    up_has_attention = ["CrossAttn" in t for t in config.up_block_types]
    for i in range(levels):
        for j in range(config.layers_per_block):
            n = per_level * i + j + 1
            pairs += [(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0"),
                      (f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1")]
        pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{per_level * (i + 1)}.0.op"))
        for j in range(per_level):  # up levels have one resnet more than down levels
            n = per_level * i + j
            pairs += [(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0"),
                      (f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1")]
        slot = 2 if up_has_attention[i] else 1  # the upsampler follows the attention when there is one
        pairs.append((f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{per_level * i + per_level - 1}.{slot}.conv"))
    return sorted(pairs, key=lambda p: -len(p[0]))


def unet_to_ldm(state: dict[str, Any], config: Any) -> dict[str, Any]:
    pairs = _block_map(config)
    out = {}
    for key, value in state.items():
        if key.startswith("time_embedding.cond_proj"):
            raise ValueError("the original layout has no w-embedding (time_cond_proj_dim): full LCMs stay diffusers")
        prefix = next((p for p in pairs if key.startswith(p[0] + ".")), None)
        if prefix is None:
            raise ValueError(f"no original-layout name for UNet key {key}")
        rest = key[len(prefix[0]):]
        if ".resnets." in prefix[0] or prefix[0].startswith("mid_block.resnets"):
            for new, old in _RESNET:
                if rest.startswith("." + new + "."):
                    rest = "." + old + rest[len(new) + 1:]
                    break
        out[prefix[1] + rest] = value
    return out


def vae_to_ldm(state: dict[str, Any]) -> dict[str, Any]:
    levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[1] == "down_blocks":  # encoder.down_blocks.i.{resnets.j | downsamplers.0.conv}
            tail = ".".join(parts[3:]).replace("resnets.", "block.", 1).replace("downsamplers.0.", "downsample.")
            new = f"encoder.down.{parts[2]}.{tail}"
        elif parts[1] == "up_blocks":  # decoder.up_blocks.i -> decoder.up.(levels-1-i): LDM counts up from the bottom
            tail = ".".join(parts[3:]).replace("resnets.", "block.", 1).replace("upsamplers.0.", "upsample.")
            new = f"decoder.up.{levels - 1 - int(parts[2])}.{tail}"
        elif parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{parts[0]}.mid.block_{int(parts[3]) + 1}." + ".".join(parts[4:])
            else:  # attentions.0: linear q/k/v/out become 1x1 convs in the original layout
                tail = ".".join(parts[4:])
                for diffusers_name, ldm_name in _VAE_ATTENTION:
                    if tail.startswith(diffusers_name + "."):
                        tail = ldm_name + tail[len(diffusers_name):]
                        break
                new = f"{parts[0]}.mid.attn_1.{tail}"
                if value.dim() == 2:
                    value = value[:, :, None, None]
        out[new.replace("conv_shortcut", "nin_shortcut")] = value
    return out


def controlnet_state_dict(controlnet: Any) -> dict[str, Any]:
    """A diffusers ControlNetModel under the original single-file keys (``control_model.*``, as the lllyasviel
    ControlNet 1.1 releases): its UNet encoder in the UNet's layout, ``zero_convs``, ``middle_block_out`` and the
    image embedding as ``input_hint_block`` (convolutions at even indices, SiLUs between them)."""
    state = controlnet.state_dict()
    encoder = {k: v for k, v in state.items() if k.split(".")[0] in ("time_embedding", "conv_in", "down_blocks",
                                                                       "mid_block")}
    levels = controlnet.config  # a ControlNet has no up blocks: their layout is never read
    shape = SimpleNamespace(layers_per_block=levels.layers_per_block, block_out_channels=levels.block_out_channels,
                            up_block_types=["UpBlock2D"] * len(levels.block_out_channels))
    out = {"control_model." + key: value for key, value in unet_to_ldm(encoder, shape).items()}
    embedding = "controlnet_cond_embedding"
    blocks = len(controlnet.controlnet_cond_embedding.blocks)
    for p in ("weight", "bias"):
        for i in range(len(controlnet.controlnet_down_blocks)):
            out[f"control_model.zero_convs.{i}.0.{p}"] = state[f"controlnet_down_blocks.{i}.{p}"]
        out[f"control_model.middle_block_out.0.{p}"] = state[f"controlnet_mid_block.{p}"]
        out[f"control_model.input_hint_block.0.{p}"] = state[f"{embedding}.conv_in.{p}"]
        for i in range(blocks):
            out[f"control_model.input_hint_block.{2 * i + 2}.{p}"] = state[f"{embedding}.blocks.{i}.{p}"]
        out[f"control_model.input_hint_block.{2 * blocks + 2}.{p}"] = state[f"{embedding}.conv_out.{p}"]
    return {k: v.contiguous() for k, v in out.items()}
