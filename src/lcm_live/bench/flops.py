"""FLOPs of a path's components per sample, counted from the models themselves at the bench's shapes.

Each component is rebuilt from its own class and config on the meta device (no memory, no arithmetic) and run
once under ``torch.utils.flop_counter.FlopCounterMode``, which adds up every matmul, convolution and attention
(2 FLOPs per multiply-add) the forward dispatches. Counting a meta twin rather than the engine's module means the
count is the same whatever runs the module (OpenVINO IR, torch.compile, offloaded weights) and costs a second or
two, once per component, shape and process (cached). Element-wise work (norms, activations, softmax) is not
counted: it is a few percent of a UNet's time and no GEMM peak bounds it.

On the meta device attention decomposes into two batched matmuls (``aten.bmm``): counted in full. (The UNet
figures in ``shared/notes/performance.md`` were counted on CPU tensors, where torch's fused CPU attention kernel
is not in the counter's table: sd15 at 512x512 is 677 GFLOP there without attention, 803 GFLOP with it.)
"""

from __future__ import annotations

import json
from typing import Any

TEXT_TOKENS = 77  # CLIP's context length: every prompt is padded to it

_CACHE: dict[tuple, float] = {}


def underlying(module: Any) -> Any:
    """The model a wrapper runs: torch.compile's ``_orig_mod``, the OpenVINO UNet's torch UNet, feature reuse's."""
    for _ in range(4):
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif type(module).__name__ == "FeatureReuseUNet":
            module = module.unet
        elif isinstance(getattr(module, "_torch_unet", None), list):
            module = module._torch_unet[0]
        else:
            break
    return module


def meta_twin(module: Any) -> Any:
    """A new instance of ``module``'s class from its config, every parameter and buffer on the meta device."""
    from accelerate import init_empty_weights

    module = underlying(module)
    with init_empty_weights(include_buffers=True):
        if hasattr(type(module), "from_config"):  # diffusers
            twin = type(module).from_config(module.config)
        else:  # transformers
            twin = type(module)(module.config)
    tome = getattr(module, "_tome_info", None)
    if tome is not None:  # token merging (engine/tome.py): the twin merges as the module does
        import tomesd

        args = tome["args"]
        tomesd.apply_patch(twin, ratio=args["ratio"], max_downsample=args["max_downsample"], sx=args["sx"],
                           sy=args["sy"], use_rand=args["use_rand"], merge_attn=args["merge_attn"],
                           merge_crossattn=args["merge_crossattn"], merge_mlp=args["merge_mlp"])
    return twin.eval()


def count_flops(run) -> float:
    """FLOPs that ``run()`` dispatches (FlopCounterMode, no_grad)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def _key(kind: str, module: Any, *shape: int) -> tuple:
    module = underlying(module)
    config = module.config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    tome = getattr(module, "_tome_info", None)
    merging = None if tome is None else tome["args"]["ratio"]
    return (kind, type(module).__name__, json.dumps(config, sort_keys=True, default=str), shape, merging)


def _cached(key: tuple, count) -> float:
    if key not in _CACHE:
        _CACHE[key] = count()
    return _CACHE[key]


def _unet_inputs(config: Any, latent_height: int, latent_width: int) -> dict[str, Any]:
    import torch

    meta = {"device": "meta"}
    inputs = {
        "sample": torch.empty(1, config.in_channels, latent_height, latent_width, **meta),
        "timestep": torch.tensor(500.0, **meta),
        "encoder_hidden_states": torch.empty(1, TEXT_TOKENS, config.cross_attention_dim, **meta),
    }
    if getattr(config, "time_cond_proj_dim", None):
        inputs["timestep_cond"] = torch.empty(1, config.time_cond_proj_dim, **meta)
    if getattr(config, "addition_embed_type", None) == "text_time":  # SDXL: pooled text + 6 size/crop ids
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pooled, **meta),
                                       "time_ids": torch.empty(1, 6, **meta)}
    return inputs


def unet_flops(unet: Any, latent_height: int, latent_width: int) -> float:
    """One UNet evaluation of one sample at ``latent_height x latent_width`` (the image size / 8)."""
    def count() -> float:
        twin = meta_twin(unet)
        inputs = _unet_inputs(twin.config, latent_height, latent_width)
        # The sample positionally, as the engine passes it (token merging's pre-hook reads it from the arguments).
        return count_flops(lambda: twin(inputs.pop("sample"), **inputs))

    return _cached(_key("unet", unet, latent_height, latent_width), count)


def shallow_unet_flops(unet: Any, latent_height: int, latent_width: int) -> float:
    """One reused evaluation under feature reuse (engine/feature_reuse.py): the shallow blocks only."""
    def count() -> float:
        import torch

        from lcm_live.engine.feature_reuse import capturing_deep_feature, shallow_forward

        twin = meta_twin(unet)
        inputs = _unet_inputs(twin.config, latent_height, latent_width)
        with capturing_deep_feature(twin) as store, torch.no_grad():  # the deep feature, from a meta evaluation
            twin(inputs["sample"], **{k: v for k, v in inputs.items() if k != "sample"})
        return count_flops(lambda: shallow_forward(twin, deep_feature=store["feature"], **inputs))

    return _cached(_key("unet_shallow", unet, latent_height, latent_width), count)


def controlnet_flops(controlnet: Any, latent_height: int, latent_width: int, scale: int) -> float:
    """One ControlNet evaluation of one sample; its image is ``scale`` times the latents' size."""
    import torch

    def count() -> float:
        twin = meta_twin(controlnet)
        inputs = _unet_inputs(twin.config, latent_height, latent_width)
        inputs.pop("timestep_cond", None)
        image = torch.empty(1, 3, latent_height * scale, latent_width * scale, device="meta")
        return count_flops(lambda: twin(**inputs, controlnet_cond=image))

    return _cached(_key("controlnet", controlnet, latent_height, latent_width, scale), count)


def text_encoder_flops(text_encoder: Any) -> float:
    """One prompt (77 tokens) through a CLIP text encoder."""
    import torch

    def count() -> float:
        twin = meta_twin(text_encoder)
        ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device="meta")
        return count_flops(lambda: twin(ids))

    return _cached(_key("text_encoder", text_encoder), count)


def decoder_flops(vae: Any, latent_height: int, latent_width: int) -> float:
    """Decoding one sample's latents to an image (AutoencoderKL or AutoencoderTiny)."""
    import torch

    def count() -> float:
        twin = meta_twin(vae)
        latents = torch.empty(1, twin.config.latent_channels, latent_height, latent_width, device="meta")
        return count_flops(lambda: twin.decode(latents))

    return _cached(_key("decode", vae, latent_height, latent_width), count)


def encoder_flops(vae: Any, height: int, width: int) -> float:
    """Encoding one image of ``height x width`` pixels to latents (image-to-image)."""
    import torch

    def count() -> float:
        twin = meta_twin(vae)
        image = torch.empty(1, twin.config.in_channels, height, width, device="meta")
        return count_flops(lambda: twin.encode(image))

    return _cached(_key("encode", vae, height, width), count)


def pipeline_flops(pipe: Any, width: int, height: int, controlnet: Any = None) -> dict[str, float]:
    """FLOPs per sample of each stage a StageTimer names, for ``pipe`` at ``width x height`` pixels."""
    scale = getattr(pipe, "vae_scale_factor", 8)
    lh, lw = height // scale, width // scale
    flops = {"unet": unet_flops(pipe.unet, lh, lw), "decode": decoder_flops(pipe.vae, lh, lw),
             "encode": encoder_flops(pipe.vae, height, width)}
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            flops[name] = text_encoder_flops(getattr(pipe, name))
    if controlnet is not None:
        flops["controlnet"] = controlnet_flops(controlnet, lh, lw, scale)
    if reuse_of(pipe.unet) is not None:
        flops["unet_shallow"] = shallow_unet_flops(pipe.unet, lh, lw)
    return flops


def reuse_of(unet: Any) -> Any:
    """The feature reuse policy (engine/feature_reuse.py) ``unet`` runs, or None: the torch wrapper's ``reuse``,
    the OpenVINO UNet's ``feature_reuse``."""
    if type(unet).__name__ == "FeatureReuseUNet":
        return unet.reuse
    return getattr(unet, "feature_reuse", None)
