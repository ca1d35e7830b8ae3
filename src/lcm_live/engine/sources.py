"""Where a model comes from: a builtin name, a local diffusers folder, a UNet-only folder (config.json of a
UNet2DConditionModel and its weights, e.g. latent-consistency/lcm-sdxl), a single-file checkpoint, or a hub id.

Everything here only looks (paths, JSON, safetensors headers); nothing loads weights, and nothing is ever
unpickled: pickle formats (.ckpt, .pt, .pth, .bin) are refused before any load is attempted.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lcm_live.errors import ModelUnavailableError, UserError, first_line

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
BUILTIN_PREFIX = "builtin:"


def builtin_root() -> Path:
    """The folder holding the shipped models (``src/lcm_live/builtin/NAME``); tests point it elsewhere."""
    from importlib.resources import files

    return Path(str(files("lcm_live") / "builtin"))


@dataclass(frozen=True)
class Source:
    kind: Literal["folder", "unet", "single_file", "hub"]  # "unet": a UNet-only folder, run in a base pipeline
    location: str  # a folder or file path, or a hub id
    name: str  # what the user asked for, as shown in metadata


def resolve(model: str) -> Source:
    """Classify ``model`` (``--model``); raise a one-line UserError for what can never load."""
    if model.startswith(BUILTIN_PREFIX):
        folder = builtin_folder(model[len(BUILTIN_PREFIX):])
        check_folder(folder)
        return Source("folder", str(folder), model)
    path = Path(model).expanduser()
    if path.is_file():
        _check_file(path)
        return Source("single_file", str(path), path.name)
    if path.is_dir():
        check_folder(path)
        return Source("unet" if unet_config(path) is not None else "folder", str(path), model)
    if looks_like_path(model):
        raise UserError(f"--model {model!r}: no such file or folder; give a diffusers folder, a .safetensors file, "
                        "a hub id (org/name) or builtin:shapes", field="model")
    return Source("hub", model, model)


BUILTIN_LORA_FILE = "pytorch_lora_weights.safetensors"


def builtin_names(kind: Literal["model", "lora"] = "model") -> list[str]:
    """The shipped built-ins of one kind, as ``builtin:NAME``: pipelines (model_index.json) or LoRAs."""
    root = builtin_root()
    marker = "model_index.json" if kind == "model" else BUILTIN_LORA_FILE
    return sorted(f"{BUILTIN_PREFIX}{p.name}" for p in root.iterdir() if (p / marker).is_file()) if root.is_dir() else []


def builtin_folder(name: str) -> Path:
    root = builtin_root()
    folder = root / name
    if name and "/" not in name and "\\" not in name and (folder / "model_index.json").is_file():
        return folder
    have = ", ".join(builtin_names()) or "none (run `make builtin-model` to make builtin:shapes)"
    raise UserError(f"--model builtin:{name}: no such built-in model in {root}; shipped: {have}", field="model")


def builtin_lora(name: str, *, flag: str, field: str) -> Path:
    """The LoRA file of the shipped ``builtin:NAME`` (``make builtin-lora`` makes them), or a refusal naming
    the shipped ones."""
    path = builtin_root() / name / BUILTIN_LORA_FILE
    if name and "/" not in name and "\\" not in name and path.is_file():
        return path
    have = ", ".join(builtin_names("lora")) or "none (run `make builtin-lora`)"
    raise UserError(f"{flag} builtin:{name}: no such built-in LoRA; shipped: {have}", field=field)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "org/name", as the Hugging Face hub names repos


def looks_like_path(text: str) -> bool:
    """The one rule for every source flag (--model, --lcm-lora, --lora, --controlnet, --taesd): a source that is not
    on disk is a hub id when it reads exactly "org/name" (and not as a weights file name); anything else was meant
    as a path, and is refused as a missing file rather than looked up on the hub."""
    return not HUB_ID.match(text) or text.lower().endswith((".safetensors", *PICKLE_SUFFIXES))


def _check_file(path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise UserError(f"--model {path}: {suffix} files are pickles, which can run code when loaded; lcm-live "
                        "loads only .safetensors (convert it once, or use the model's safetensors release)",
                        field="model")
    if suffix != ".safetensors":
        raise UserError(f"--model {path}: not a model file; give a .safetensors checkpoint or a diffusers folder",
                        field="model")


def _weight_files(paths) -> list[Path]:
    return [p for p in paths if p.is_file() and p.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)]


def unet_config(folder: Path) -> dict | None:
    """The top-level config.json of a UNet-only folder (``_class_name`` UNet2DConditionModel, no model_index.json),
    or None when the folder is anything else."""
    path = folder / "config.json"
    if (folder / "model_index.json").is_file() or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and config.get("_class_name") == "UNet2DConditionModel" else None


def check_folder(folder: Path, *, skip: tuple[str, ...] = ()) -> None:
    """A diffusers folder (model_index.json) or a UNet-only folder whose every weight file is safetensors, or a
    clear refusal. ``skip``: components that are passed in, not loaded from this folder (their weights may be
    anything, or missing)."""
    if not (folder / "model_index.json").is_file():
        weights = _weight_files(folder.iterdir())  # top level only: this may be any folder at all
        pickles = [p for p in weights if p.suffix.lower() in PICKLE_SUFFIXES]
        if pickles and len(pickles) == len(weights):
            raise UserError(f"--model {folder}: holds only pickle weights ({pickles[0].name}); lcm-live loads only "
                            ".safetensors", field="model")
        if unet_config(folder) is not None:
            if not weights:
                raise UserError(f"--model {folder}: a UNet config.json with no .safetensors weights beside it",
                                field="model")
            return
        raise UserError(f"--model {folder}: not a diffusers folder (no model_index.json); give a diffusers folder, "
                        "a UNet-only folder (config.json + diffusion_pytorch_model.safetensors) or a single "
                        ".safetensors file", field="model")
    weights = [p for p in _weight_files(folder.rglob("*")) if p.relative_to(folder).parts[0] not in skip]
    pickles = [p for p in weights if p.suffix.lower() in PICKLE_SUFFIXES]
    # A component with pickle weights and no safetensors beside them could only be loaded by unpickling.
    parts = {p.parent for p in pickles} - {p.parent for p in weights if p.suffix.lower() == ".safetensors"}
    if parts:
        part = sorted(parts)[0]
        raise UserError(f"--model {folder}: {part.relative_to(folder)} has only pickle weights "
                        f"({next(p.name for p in pickles if p.parent == part)}); lcm-live loads only .safetensors "
                        "(save it again with safe_serialization=True)", field="model")


@dataclass(frozen=True)
class ModelInfo:
    """What configs or a file header tell before any weight loads."""

    arch: Literal["sd15", "sdxl"]
    full_lcm: bool  # the UNet has a w-embedding input (time_cond_proj_dim)
    context_width: int | None  # the UNet's cross-attention width: real SD1.5 768, SDXL 2048


def read_folder_info(folder: Path) -> ModelInfo:
    """ModelInfo of a diffusers folder, from model_index.json and the UNet config."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
        unet_file = folder / "unet" / "config.json"
        unet = json.loads(unet_file.read_text()) if unet_file.is_file() else None
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {folder}: unreadable model_index.json or unet/config.json ({exc})",
                        field="model") from None
    if unet is None or list(index.get("unet") or [None, None])[1] != "UNet2DConditionModel":
        raise UserError(f"--model {folder}: {index.get('_class_name', 'this pipeline')} is not a Stable Diffusion "
                        "1.5 / SDXL pipeline (no UNet2DConditionModel); lcm-live runs SD1.5 and SDXL models",
                        field="model")
    arch = "sdxl" if ("text_encoder_2" in index or unet.get("addition_embed_type") == "text_time") else "sd15"
    width = unet.get("cross_attention_dim")
    return ModelInfo(arch, unet.get("time_cond_proj_dim") is not None, width if isinstance(width, int) else None)


# Keys of the original (CompVis / Stability) single-file layout, read from the safetensors header only.
_SDXL_MARKERS = ("conditioner.embedders.1.model.ln_final.weight", "model.diffusion_model.label_emb.0.0.weight")
_SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
_SD1_CLIP = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"  # CLIP-L, HF layout
_SD2_CLIP = "cond_stage_model.model.token_embedding.weight"  # OpenCLIP ViT-H


def detect_single_file_arch(path: str | Path) -> str:
    """"sd15" or "sdxl" from a single-file checkpoint's keys and shapes; a clear error for anything else."""
    return read_single_file_info(path).arch


def read_single_file_info(path: str | Path) -> ModelInfo:
    """ModelInfo of a single-file checkpoint, from its safetensors header (keys and shapes, no weights).

    SD1.x: a CLIP text encoder under ``cond_stage_model.transformer`` whose width (768 for real SD1.5) equals the
    UNet's cross-attention width; SDXL: the second (OpenCLIP bigG) embedder or the UNet's ``label_emb``.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            text_width = f.get_slice(_SD1_CLIP).get_shape()[1] if _SD1_CLIP in keys else None
            to_k = next((k for k in sorted(keys) if k.startswith("model.diffusion_model.")
                         and k.endswith("attn2.to_k.weight")), None)
            context_width = f.get_slice(to_k).get_shape()[1] if to_k else None
    except Exception as exc:  # a truncated or foreign file: safetensors says why
        raise UserError(f"--model {path}: not a readable safetensors file ({first_line(exc)})",
                        field="model") from None
    if any("cond_proj" in k for k in keys):
        raise UserError(f"--model {path}: a single-file full LCM (w-embedding) is not supported; use its diffusers "
                        "folder or hub id", field="model")
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise UserError(f"--model {path}: no Stable Diffusion UNet keys (model.diffusion_model.*) in this file; it "
                        "may be a LoRA or a lone VAE (pass LoRAs with --lora)", field="model")
    if any(k in keys for k in _SDXL_MARKERS):
        if _SDXL_CLIP_L not in keys:
            raise UserError(f"--model {path}: an SDXL refiner (no CLIP-L text encoder) cannot generate on its own; "
                            "give an SDXL base model", field="model")
        return ModelInfo("sdxl", False, context_width)
    if _SD2_CLIP in keys or (context_width is not None and context_width == 1024):
        raise UserError(f"--model {path}: a Stable Diffusion 2.x checkpoint (OpenCLIP text encoder); lcm-live "
                        "supports SD1.5 and SDXL", field="model")
    if text_width is not None and text_width == context_width:
        return ModelInfo("sd15", False, context_width)
    raise UserError(f"--model {path}: not a recognised SD1.5 or SDXL checkpoint (text encoder width {text_width}, "
                    f"cross-attention width {context_width})", field="model")



def cache_location(cache_dir: str | None) -> str:
    from huggingface_hub import constants

    return str(Path(cache_dir).expanduser()) if cache_dir else constants.HF_HUB_CACHE


@contextlib.contextmanager
def quiet_logs():
    """diffusers and huggingface_hub log warnings and errors ("Couldn't connect to the Hub", size-mismatch walls)
    before they raise or fall back to the cache; the user gets our one line instead."""
    from diffusers.utils import logging as dlogging
    from huggingface_hub.utils import logging as hlogging

    before = dlogging.get_verbosity(), hlogging.get_verbosity()
    dlogging.set_verbosity(dlogging.CRITICAL)
    hlogging.set_verbosity(hlogging.CRITICAL)
    try:
        yield
    finally:
        dlogging.set_verbosity(before[0])
        hlogging.set_verbosity(before[1])


def download_pipeline(repo_id: str, *, cache_dir: str | None, progress: bool, skip: tuple[str, ...] = (),
                      needed_by: str | None = None) -> Path:
    """Fetch (or find in the cache) a hub pipeline's safetensors files; returns the local snapshot folder.
    ``skip``: components passed in at load time, never downloaded (e.g. the base's own UNet under a UNet-only
    model); ``needed_by``: the model this pipeline is the base of, named in the error."""
    from diffusers import DiffusionPipeline

    try:
        with hub_progress(progress), quiet_logs():
            folder = DiffusionPipeline.download(repo_id, cache_dir=cache_dir, use_safetensors=True,
                                                safety_checker=None, feature_extractor=None, image_encoder=None,
                                                **dict.fromkeys(skip))
    except Exception as exc:  # offline, unreachable, not cached, no such repo, no safetensors weights
        raise unavailable(repo_id, cache_dir, exc, needed_by=needed_by) from None
    return Path(folder)


@contextlib.contextmanager
def hub_progress(show: bool):
    """Show or hide huggingface_hub's download bars, restoring exactly what was there."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hide = not show and not are_progress_bars_disabled()
    if hide:
        disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            enable_progress_bars()


def unavailable(repo_id: str, cache_dir: str | None, exc: BaseException, *, needed_by: str | None = None,
                flag: str | None = None, ways_out: str | None = None, field: str = "model") -> ModelUnavailableError:
    """Why ``repo_id`` cannot be had, and the ways out. ``flag``, ``ways_out`` and ``field``: another flag's
    (``--lora``, ``--controlnet``) name, local alternatives and settings field, instead of ``--model``'s."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    why = "HF_HUB_OFFLINE is set and it is not cached" if offline else _short_reason(exc)
    what = (f"model {needed_by!r} is a UNet only and runs inside the base pipeline {repo_id!r} (text encoders, "
            "tokenizers, VAE), which" if needed_by else f"{flag or 'model'} {repo_id!r}")
    ways_out = ways_out or "--model PATH (a diffusers folder or .safetensors file), --model builtin:shapes"
    return ModelUnavailableError(
        f"{what} cannot be had ({why}); looked in the cache {cache_location(cache_dir)}. "
        f"Ways out: {ways_out}, or connect and run again to download it", field=field)


def _short_reason(exc: BaseException) -> str:
    text = first_line(exc, 10_000)
    lowered = text.lower()
    if "safetensors" in lowered:
        return "no safetensors weights in it"
    if "not found" in lowered or "404" in lowered or "repository" in lowered and "exist" in lowered:
        return "not found on the hub"
    if "cached" in lowered or "connect" in lowered or "offline" in lowered or "resolve" in lowered:
        return "offline or unreachable, and not cached"
    return text[:120]
