"""int8 calibration at warm-up: generations over varied prompts while the quantizing parts record their inputs.

- ``--quantize int8`` on OpenVINO: the UNet backend records its calls' inputs and quantizes the IR once it has
  enough (engine/openvino_int8.py, openvino_backend.py).
- ``--quantize-vae int8``: the tiny autoencoder's halves record theirs (engine/openvino_module.py): the decoder
  each generation's latents, the encoder that generation's image, encoded here (real pictures, not zeros).

Each part quantizes on a thread of its own; this waits for them, so the first frame after warm-up runs int8.
"""

from __future__ import annotations

from typing import Any

from lcm_live.engine.request import GenerationRequest


def calibrate(engine: Any, width: int | None = None, height: int | None = None, num_inference_steps: int = 4,
              max_generations: int = 64) -> int:
    """Run calibrating generations on ``engine`` until nothing records; how many ran (0 when nothing
    calibrates). Call after a first generation at this size (which compiles the shape)."""
    from lcm_live.engine.openvino_module import vae_modules

    unet = engine.pipe.unet
    vae_halves = [m for m in vae_modules(engine.pipe.vae) if m.quantize == "int8"]
    unet_calibrates = getattr(unet, "calibrating", False)
    if not unet_calibrates and not vae_halves:
        return 0
    from lcm_live.engine.openvino_int8 import CALIBRATION_PROMPTS

    runs = 0
    while (unet_calibrates and unet.recording) or any(half.recording for half in vae_halves):
        if runs == max_generations:
            raise RuntimeError(f"int8 calibration still recording after {runs} generations")
        result = engine.generate(GenerationRequest(prompt=CALIBRATION_PROMPTS[runs % len(CALIBRATION_PROMPTS)],
                                                   num_inference_steps=num_inference_steps, width=width,
                                                   height=height, seed=runs + 1))
        if vae_halves and result.images:
            encode_image(engine, result.images[0])
        runs += 1
    if unet_calibrates:
        unet.wait_quantized()
    for half in vae_halves:
        half.wait_quantized()
    return runs


def encode_image(engine: Any, image: Any) -> None:
    """``image`` (PIL) through the engine's VAE encoder, as img2img would encode it."""
    import numpy as np
    import torch

    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
    with torch.inference_mode():
        engine.pipe.vae.encode(pixels.permute(2, 0, 1)[None].to(engine.device, engine.dtype))
