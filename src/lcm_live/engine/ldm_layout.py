"""Write diffusers SD1.5-style components as one state dict in the original (CompVis) single-file layout.

The layout real SD1.5 ``.safetensors`` checkpoints use: ``model.diffusion_model.*`` (UNet),
``first_stage_model.*`` (VAE), ``cond_stage_model.transformer.text_model.*`` (CLIP). lcm-live reads such files
with diffusers' ``from_single_file``; this writer exists so that path is tested on tiny models made in code (there
are no real checkpoints here). It is the inverse of diffusers' converter for the block layouts the tiny and SD1.5
UNets use (``layers_per_block`` resnets per level, a down/up-sampler closing every level but the last).
"""

from __future__ import annotations

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
    for key, value in text_encoder.state_dict().items():
        # transformers 5 drops the "text_model." level from CLIPTextModel's keys; real checkpoints have it.
        key = key if key.startswith("text_model.") else "text_model." + key
        out["cond_stage_model.transformer." + key] = value
    return {k: v.contiguous() for k, v in out.items()}


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
