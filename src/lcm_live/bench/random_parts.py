"""Parts of the real architectures with seeded random weights, for the benches (and tests): the tiny autoencoder,
a ControlNet shaped for a UNet, and a fixed line drawing for it. Same shapes, FLOPs and kernels as the released
models; no hub needed."""

from __future__ import annotations

from typing import Any


def random_taesd(arch: str, dtype: Any, seed: int) -> Any:
    """AutoencoderTiny with seeded random weights: its default config (the taesd / taesdxl architecture, 8x
    upsampling); for the tiny test model a two-block one that matches the tiny VAE's 2x."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    if arch == "tiny":
        taesd = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    else:
        taesd = AutoencoderTiny()
    return taesd.to(dtype).eval()


def random_controlnet(unet: Any, vae_scale_factor: int, dtype: Any, device: Any, seed: int) -> Any:
    """A ControlNet shaped for ``unet`` (diffusers' from_unet: the encoder's shapes and FLOPs), random weights; its
    image embedding downsamples as the VAE does (SD's 8x: the released ControlNets' 16, 32, 96, 256 channels)."""
    import torch
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    levels = vae_scale_factor.bit_length()  # 8 -> 4 levels (3 stride-2 convolutions), 2 -> 2
    controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False,
                                           conditioning_embedding_out_channels=(16, 32, 96, 256)[:levels])
    controlnet.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    return controlnet.eval()


def control_lines(width: int, height: int) -> Any:
    """A fixed line drawing (white on black, as a scribble ControlNet takes it)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "black")
    draw = ImageDraw.Draw(image)
    draw.ellipse([width // 4, height // 4, 3 * width // 4, 3 * height // 4], outline="white", width=6)
    draw.line([(0, height - 1), (width - 1, height // 2)], fill="white", width=6)
    return image
