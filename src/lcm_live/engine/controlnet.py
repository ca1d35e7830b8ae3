"""ControlNet: an image (lines, edges, a scribble) guides the layout of a text-to-image run.

``--controlnet SOURCE`` loads a diffusers ``ControlNetModel`` from a hub id (into the Hugging Face cache) or a local
folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), safetensors only. It must fit the model: its
cross-attention width and down blocks are those of the UNet it feeds residuals into (an SD1.5 ControlNet for SD1.5
models, an SDXL one for SDXL), which is checked before it loads.

It runs through diffusers' ControlNet pipelines (``StableDiffusionControlNetPipeline``,
``StableDiffusionXLControlNetPipeline``), built with ``from_pipe`` from the engine's own pipeline: the same UNet
(full LCM or LCM-LoRA fused), scheduler, text encoders and decoder, so an LCM's few steps and its w-embedding carry
over (diffusers' ControlNet pipelines feed ``time_cond_proj_dim`` UNets their guidance embedding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcm_live.engine.sources import PICKLE_SUFFIXES, hub_progress, quiet_logs, unavailable
from lcm_live.errors import ModelUnavailableError, UserError

CONTROLNET_PIPELINES = {"sd15": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline"}
WEIGHTS = "diffusion_pytorch_model.safetensors"
# What must match between a ControlNet and the UNet it feeds: one residual per down-block layer, of these widths.
FIT_KEYS = ("cross_attention_dim", "block_out_channels", "layers_per_block", "in_channels")


def _error(source: str, text: str) -> UserError:
    return UserError(f"--controlnet {source}: {text}", field="controlnet")


def _looks_like_path(text: str) -> bool:
    return (text.startswith((".", "/", "~", "\\")) or text.count("/") != 1
            or text.lower().endswith((".safetensors", *PICKLE_SUFFIXES)))


def controlnet_folder(source: str, *, cache_dir: str | None, progress: bool) -> Path:
    """The local folder of ``source``: a folder as given, or a hub repo's config and safetensors weights fetched
    into (or found in) the Hugging Face cache."""
    path = Path(source).expanduser()
    if path.is_file():
        raise _error(source, "single-file ControlNets are not supported; give a diffusers ControlNet folder "
                             f"(config.json + {WEIGHTS}) or a hub id such as lllyasviel/control_v11p_sd15_scribble")
    if not path.exists():
        if _looks_like_path(source):
            raise _error(source, "no such folder; give a diffusers ControlNet folder or a hub id (org/name)")
        path = _download(source, cache_dir=cache_dir, progress=progress)
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        raise _error(source, "no readable config.json: not a diffusers ControlNet folder") from None
    if not isinstance(config, dict) or config.get("_class_name") != "ControlNetModel":
        what = config.get("_class_name") if isinstance(config, dict) else None
        raise _error(source, f"config.json describes a {what or 'different model'}, not a ControlNetModel")
    if not (path / WEIGHTS).is_file():
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        what = f"only pickle weights ({pickles[0]})" if pickles else f"no {WEIGHTS}"
        raise _error(source, f"the folder holds {what}; lcm-live loads only safetensors")
    return path


def _download(repo_id: str, *, cache_dir: str | None, progress: bool) -> Path:
    from huggingface_hub import snapshot_download

    try:
        with hub_progress(progress), quiet_logs():
            return Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=["config.json", WEIGHTS]))
    except Exception as exc:  # offline, unreachable, not cached, no such repo
        error = unavailable(repo_id, cache_dir, exc)
        raise ModelUnavailableError(error.message.replace("model ", "--controlnet ", 1).replace(
            "--model PATH (a diffusers folder or .safetensors file), --model builtin:shapes",
            "--controlnet PATH (a diffusers ControlNet folder)"), field="controlnet") from None


def check_fit(source: str, config: dict[str, Any], unet_config: Any, arch: str) -> None:
    """Refuse a ControlNet whose residuals would not fit the UNet (before loading its weights)."""
    for key in FIT_KEYS:
        have, want = config.get(key), getattr(unet_config, key, None)
        if isinstance(have, list):
            have = tuple(have)
        if isinstance(want, list):
            want = tuple(want)
        if key == "layers_per_block" and isinstance(want, int) and have is None:
            continue
        if have != want:
            made_for = {768: "sd15", 2048: "sdxl"}.get(config.get("cross_attention_dim"), "another model")
            raise _error(source, f"made for {made_for} ({key} {have}), but the model is {arch} ({key} {want}); use "
                                 f"a ControlNet trained for {arch}")


def load_controlnet(source: str, folder: Path, *, unet: Any, arch: str, dtype: Any, device: Any) -> Any:
    """The ControlNetModel in ``folder`` (from :func:`controlnet_folder`), checked against ``unet``, on ``device`` in
    ``dtype``."""
    import torch
    from diffusers import ControlNetModel

    config = json.loads((folder / "config.json").read_text())
    check_fit(source, config, unet.config, arch)
    try:
        with quiet_logs():
            controlnet = ControlNetModel.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True)
    except Exception as exc:
        raise _error(source, f"could not be loaded ({str(exc).strip().splitlines()[0][:200]})") from None
    controlnet.to(device)
    if torch.device(device).type in ("cpu", "cuda"):
        controlnet.to(memory_format=torch.channels_last)
    return controlnet.eval()


def control_pipeline(pipe: Any, controlnet: Any, arch: str, dtype: Any) -> Any:
    """diffusers' ControlNet pipeline sharing every component of ``pipe`` (unet and vae passed explicitly: from_pipe
    drops components of a class it does not expect, such as TAESD or the OpenVINO stand-in; dtype too, or it casts
    the shared components to float32)."""
    import diffusers

    with quiet_logs():  # from_pipe's dtype cast warns once per shared component
        control = getattr(diffusers, CONTROLNET_PIPELINES[arch]).from_pipe(
            pipe, controlnet=controlnet, unet=pipe.unet, vae=pipe.vae, dtype=dtype)
    control.set_progress_bar_config(disable=True)
    return control
