"""Decoders: the tiny autoencoder (TAESD), tiled VAE decoding, and cheap previews of step latents.

At 1 to 4 steps the full SD VAE decoder is most of an image's work (2.5 TFLOP at 512x512, against 0.68 per UNet
step); TAESD (``AutoencoderTiny``) decodes the same latents for 0.14 TFLOP. Previews of the denoising steps use
TAESD when it is loaded, else a linear latent -> RGB map calibrated once against the model's own VAE encoder.
"""

from __future__ import annotations

import logging
from typing import Any

from lcm_live.errors import ModelUnavailableError, UserError, first_line

logger = logging.getLogger(__name__)

TAESD_BY_ARCH = {"sd15": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
TILING_AUTO_PIXELS = 1024 * 1024  # tiled decoding past this many output pixels (bounds the decoder's memory)


def load_taesd(source: str | None, arch: str, *, device: Any, dtype: Any, cache_dir: str | None = None) -> Any:
    """``AutoencoderTiny`` from a hub id or folder (safetensors only); a UserError when it cannot be had."""
    from diffusers import AutoencoderTiny

    source = source or TAESD_BY_ARCH.get(arch)
    if source is None:
        raise UserError(f"--decoder taesd: no tiny decoder is known for architecture {arch!r}; use --decoder vae",
                        field="decoder")
    try:
        taesd = AutoencoderTiny.from_pretrained(source, use_safetensors=True, cache_dir=cache_dir, torch_dtype=dtype)
    except Exception as exc:  # offline, not cached, no such folder, no safetensors weights
        from lcm_live.engine.sources import cache_location

        reason = first_line(exc, 160)
        raise ModelUnavailableError(
            f"--decoder taesd: the tiny decoder {source!r} cannot be loaded ({reason}); looked in the cache "
            f"{cache_location(cache_dir)}. Use --decoder vae, or connect once so it can be downloaded",
            field="decoder",
        ) from None
    return taesd.to(device).eval()


# The latent spaces TAESD / TAESDXL were trained on: SD's VAE (8x down, 4 channels) and its scaling factors.
SD_LATENT_SCALING = {"sd15": 0.18215, "sdxl": 0.13025}


def taesd_fits(vae: Any, arch: str) -> str | None:
    """None when the tiny decoder for ``arch`` fits this model's VAE; else why not (a model with its own latent
    space, such as builtin:shapes, would decode to noise)."""
    config = vae.config
    scaling = SD_LATENT_SCALING.get(arch)
    if scaling is None:
        return f"no tiny decoder is known for architecture {arch!r}"
    down = 2 ** (len(getattr(config, "block_out_channels", ())) - 1)
    factor = float(getattr(config, "scaling_factor", 0.0) or 0.0)
    if down != 8 or getattr(config, "latent_channels", None) != 4 or abs(factor - scaling) > 1e-3:
        return (f"this model's VAE has its own latent space ({down}x down, scaling factor {factor:.4g}; TAESD "
                f"expects SD's 8x, {scaling})")
    return None


def resolve_decoder(settings: Any, vae: Any, arch: str, *, device: Any, dtype: Any) -> tuple[Any, str]:
    """``--decoder auto``: TAESD when it fits the model's VAE and can be loaded (cache or hub), else the full VAE;
    returns (TAESD or None, the reason, for ``info``). Explicit ``vae`` / ``taesd`` are taken as asked."""
    if settings.decoder == "vae":
        return None, "vae"
    if settings.decoder == "taesd":
        return load_taesd(settings.taesd, arch, device=device, dtype=dtype, cache_dir=settings.cache_dir), "taesd"
    why_not = taesd_fits(vae, arch)
    if why_not is not None:
        return None, f"vae (auto: {why_not})"
    try:
        taesd = load_taesd(settings.taesd, arch, device=device, dtype=dtype, cache_dir=settings.cache_dir)
    except ModelUnavailableError as exc:
        logger.warning("--decoder auto: using the full VAE: %s", exc.message)
        return None, "vae (auto: the tiny decoder is not available; --decoder taesd says why)"
    return taesd, "taesd (auto: the tiny decoder, for speed)"


def swap_in_decoder(settings: Any, pipe: Any, arch: str, *, device: Any, dtype: Any) -> tuple[Any, str]:
    """Resolve ``settings.decoder`` for ``pipe`` and make TAESD its ``pipe.vae`` where it is chosen (the pipelines
    decode, and img2img encodes, through pipe.vae; TAESD takes the scaled latents as they are: its scaling factor
    is 1.0). Returns the settings with ``decoder`` resolved to ``taesd`` or ``vae``, and the reason."""
    if settings.decoder == "vae":
        return settings, "vae"
    if is_tiny_autoencoder(pipe.vae):
        taesd, why = pipe.vae, "taesd"
    else:
        taesd, why = resolve_decoder(settings, pipe.vae, arch, device=device, dtype=dtype)
        if taesd is not None:
            pipe.vae = taesd
    return settings.model_copy(update={"decoder": "taesd" if taesd is not None else "vae"}), why


def wants_tiling(mode: str, width: int, height: int) -> bool:
    """``on`` / ``off`` / ``auto`` (tiled past ~1 megapixel)."""
    if mode == "on":
        return True
    if mode == "off":
        return False
    return width * height > TILING_AUTO_PIXELS


def set_tiling(vae: Any, enabled: bool) -> None:
    if enabled and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
    elif not enabled and hasattr(vae, "disable_tiling"):
        vae.disable_tiling()


def is_tiny_autoencoder(vae: Any) -> bool:
    return type(vae).__name__ == "AutoencoderTiny"


class LatentPreview:
    """Step latents -> a small RGB preview, without the full VAE decoder.

    Latents are the scaled ones the UNet sees, shape (B, C, h, w). With TAESD they are decoded as they are;
    otherwise a 4x3 linear map plus bias, fitted by least squares on a few smooth random colour fields encoded
    with the model's own VAE encoder (so it fits any SD1.5 or SDXL VAE, fine-tuned or not), costs one tiny
    VAE encode the first time and a matrix product per preview after that.
    """

    def __init__(self, vae: Any, *, taesd: Any = None, scale_factor: int = 8):
        self.vae = vae
        self.taesd = taesd
        self.scale_factor = scale_factor
        self._map = None  # (C + 1, 3) float32: latent channels + bias -> RGB in [-1, 1]

    def calibrate(self, samples: int = 8, size: int = 64) -> Any:
        """Fit the latent -> RGB map (seeded, so the same VAE always gives the same map)."""
        import torch
        import torch.nn.functional as F

        vae = self.vae
        param = next(vae.parameters())
        if param.dtype == torch.float16:
            # fp16 VAEs (SDXL's above all) can overflow; calibrate on a float32 copy, leaving the shared one be.
            import copy

            vae = copy.deepcopy(vae).float()
            param = next(vae.parameters())
        gen = torch.Generator("cpu").manual_seed(1234)
        # Smooth colour fields in [-1, 1]: a 4x4 grid of random colours, bilinearly upsampled.
        colours = torch.rand(samples, 3, 4, 4, generator=gen) * 2 - 1
        images = F.interpolate(colours, size=(size, size), mode="bilinear", align_corners=True)
        with torch.no_grad():
            encoded = vae.encode(images.to(param.device, param.dtype))
            dist = getattr(encoded, "latent_dist", None)
            latents = dist.mean if dist is not None else encoded.latents
            latents = latents.float().cpu() * float(getattr(vae.config, "scaling_factor", 1.0))
        h, w = latents.shape[-2:]
        targets = F.interpolate(images, size=(h, w), mode="area")  # RGB at latent resolution
        x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])  # (N, C)
        x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)  # (N, C + 1): bias column
        y = targets.permute(0, 2, 3, 1).reshape(-1, 3)  # (N, 3)
        solution = torch.linalg.lstsq(x, y).solution  # (C + 1, 3)
        if not torch.isfinite(solution).all():  # a VAE that gave NaNs: flat grey previews rather than garbage
            logger.warning("latent preview calibration failed (non-finite latents); previews will be grey")
            solution = torch.zeros_like(solution)
        self._map = solution
        return self._map

    def calibrate_once(self) -> None:
        if self.taesd is None and self._map is None:
            self.calibrate()

    def __call__(self, latents: Any, index: int = 0) -> Any:
        """One PIL image (of batch item ``index``) at the output's pixel size."""
        import numpy as np
        import torch
        from PIL import Image

        one = latents[index : index + 1]
        if self.taesd is not None:
            param = next(self.taesd.parameters())
            with torch.no_grad():
                rgb = self.taesd.decode(one.to(param.device, param.dtype)).sample[0].float().cpu()  # (3, H, W)
            rgb = rgb.permute(1, 2, 0)
            size = None
        else:
            self.calibrate_once()
            lat = one[0].float().cpu().permute(1, 2, 0)  # (h, w, C)
            rgb = torch.cat([lat, torch.ones(*lat.shape[:2], 1)], dim=-1) @ self._map  # (h, w, 3) in ~[-1, 1]
            size = (lat.shape[1] * self.scale_factor, lat.shape[0] * self.scale_factor)
        pixels = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
        if size is not None and size != image.size:
            image = image.resize(size, Image.BILINEAR)
        return image
