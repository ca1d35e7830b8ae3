"""UNet-only models (e.g. ``latent-consistency/lcm-sdxl``): a repo or folder holding only ``config.json`` (a
UNet2DConditionModel, a full LCM when it has ``time_cond_proj_dim``) and its safetensors weights, no
model_index.json. The UNet runs inside a base pipeline of its architecture, which gives the text encoders,
tokenizers, VAE and scheduler config; the base is fetched or found like any hub id, never with its own UNet.

Only configs are read here before anything loads; nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lcm_live.engine.sources import (
    PICKLE_SUFFIXES,
    ModelInfo,
    check_folder,
    download_pipeline,
    hub_progress,
    quiet_logs,
    resolve,
    unavailable,
    unet_config,
)
from lcm_live.errors import UserError, first_line

# The base pipeline a UNet-only model of each architecture runs in (what the models' cards load it into). A value
# may also be a local diffusers folder (tests point these at tiny bases).
BASE_MODELS: dict[str, str] = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
# UNets distilled from another base than their architecture's default (SSD-1B: a smaller SDXL-shaped UNet).
REPO_BASES: dict[str, str] = {"latent-consistency/lcm-ssd-1b": "segmind/SSD-1B"}
# What a UNet-only repo's weights may be called: one file or safetensors shards with their index. Never pickles.
UNET_FILES = ["config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
              "diffusion_pytorch_model-*-of-*.safetensors"]


def fetch_unet_repo(repo_id: str, *, cache_dir: str | None, progress: bool) -> Path | None:
    """The local snapshot of a hub UNet-only repo (config.json and its safetensors weights), or None when the repo
    is not one: no top-level UNet config.json, or it cannot be had (the pipeline download then says why)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        with quiet_logs():  # a pipeline repo has no top-level config.json: that is an answer, not a failure
            config = Path(hf_hub_download(repo_id, "config.json", cache_dir=cache_dir))
    except Exception:
        return None
    if unet_config(config.parent) is None:
        return None
    try:
        with hub_progress(progress), quiet_logs():
            folder = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=UNET_FILES))
    except Exception as exc:  # offline with the weights not cached, unreachable
        raise unavailable(repo_id, cache_dir, exc) from None
    if not any(folder.glob("diffusion_pytorch_model*.safetensors")):
        # A cache another tool filled may hold the pickle weights only: refused, never read.
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UserError(f"--model {repo_id}: the cached UNet holds only pickle weights ({pickles[0]}); lcm-live "
                            "loads only .safetensors", field="model")
        raise unavailable(repo_id, cache_dir, RuntimeError("no safetensors weights")) from None
    return folder


def read_unet_info(folder: Path, name: str) -> ModelInfo:
    """ModelInfo from a UNet-only folder's config.json: SDXL has the "text_time" added embedding (and attends to
    CLIP-L + OpenCLIP bigG, 768 + 1280 = 2048 wide); SD1.5 attends to CLIP-L (768); SD2.x (1024) is refused."""
    config = unet_config(folder) or {}
    width = config.get("cross_attention_dim")
    width = width if isinstance(width, int) else None
    if config.get("addition_embed_type") == "text_time" or width == 2048:
        arch = "sdxl"
    elif width == 1024:
        raise UserError(f"--model {name}: a Stable Diffusion 2.x UNet (cross-attention width 1024); lcm-live "
                        "supports SD1.5 and SDXL", field="model")
    else:
        arch = "sd15"
    return ModelInfo(arch, config.get("time_cond_proj_dim") is not None, width)


def base_model(name: str, arch: str) -> str:
    return REPO_BASES.get(name) or BASE_MODELS[arch]


def fetch_base(name: str, info: ModelInfo, *, cache_dir: str | None, progress: bool) -> tuple[str, Path]:
    """(base id, its local folder) for the UNet-only model ``name``, checked to fit the UNet; the base's own UNet
    is neither downloaded nor checked. Not to be had: one ModelUnavailableError naming the model and the base."""
    base = base_model(name, info.arch)
    source = resolve(base)
    if source.kind == "hub":
        folder = download_pipeline(base, cache_dir=cache_dir, progress=progress, skip=("unet",), needed_by=name)
    elif source.kind == "folder":
        folder = Path(source.location)
    else:
        raise UserError(f"--model {name}: its base {base} must be a diffusers pipeline (hub id or folder)",
                        field="model")
    check_folder(folder, skip=("unet",))
    check_fit(name, info, base, folder)
    return base, folder


def check_fit(name: str, info: ModelInfo, base: str, folder: Path) -> None:
    """The UNet attends to the base's text encoder outputs (SDXL: both, concatenated): their widths must match."""
    # (the base's own unet/ is not downloaded: its architecture comes from model_index.json alone)
    widths = []
    try:
        index = json.loads((folder / "model_index.json").read_text())
        for part in ("text_encoder", "text_encoder_2"):
            if part in index:
                widths.append(int(json.loads((folder / part / "config.json").read_text())["hidden_size"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"--model {name}: its base {base} has unreadable configs ({first_line(exc)})",
                        field="model") from None
    base_arch = "sdxl" if "text_encoder_2" in index else "sd15"
    if base_arch != info.arch or sum(widths) != info.context_width:
        raise UserError(f"--model {name}: this {info.arch} UNet attends to text {info.context_width} wide, but its "
                        f"base {base} ({base_arch}) gives {' + '.join(map(str, widths)) or 'none'}; they do not "
                        "fit", field="model")


def load_unet_parts(folder: Path, base_folder: Path, *, name: str, dtype: Any) -> dict[str, Any]:
    """The UNet (safetensors only) and an LCMScheduler made from the base's scheduler config (as the LCM model
    cards do: ``LCMScheduler.from_config(pipe.scheduler.config)``), passed to the base pipeline's load."""
    from diffusers import LCMScheduler, UNet2DConditionModel

    try:
        unet = UNet2DConditionModel.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"--model {name}: cannot load this UNet ({first_line(exc)})", field="model") from None
    with quiet_logs():  # the base's scheduler config carries keys LCMScheduler does not take (e.g. skip_prk_steps)
        scheduler = LCMScheduler.from_pretrained(base_folder, subfolder="scheduler")
    return {"unet": unet, "scheduler": scheduler}

