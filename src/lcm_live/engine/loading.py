"""``load_model``: settings in, a ready diffusers pipeline with an LCMScheduler out (see engine/model.py).

1. resolve the source (builtin, folder, UNet-only folder, single file, hub id) and refuse pickles before anything
   loads;
2. a hub id is fetched into the Hugging Face cache (safetensors only): a UNet-only repo (top-level UNet
   config.json, e.g. latent-consistency/lcm-sdxl) as such, else the pipeline; if it cannot be had and it is the
   default model with ``offline_fallback``, ``builtin:shapes`` is used instead and ``notice`` says so;
3. the architecture (sd15 / sdxl) and kind (full LCM: the UNet has ``time_cond_proj_dim``; else plain SD that
   becomes an LCM through an LCM-LoRA) come from configs or the file header and decide the pipeline class; the
   LoRAs are read before the (long) pipeline load, so a bad LoRA fails at once; a UNet-only model then gets its
   base pipeline (engine/unet_only.py) and loads into it;
4. plain models get ``LCMScheduler`` and the LCM-LoRA, style LoRAs are stacked with it, and all are fused;
5. the pipeline moves to the device and dtype; the ControlNets (``--controlnet``, repeatable, fetched before the
   pipeline load) are checked against the UNet and load beside it (engine/controlnet.py); an IP-Adapter
   (``--ip-adapter``, found before the pipeline load) is checked against the UNet and loads into it with its image
   encoder (engine/ip_adapter.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from lcm_live.config import DEFAULT_MODEL, EngineSettings
from lcm_live.engine import load_progress
from lcm_live.engine.architectures import config_dir
from lcm_live.engine.controlnet import combine, controlnet_location, controlnet_sources, load_controlnet
from lcm_live.engine.families import make_scheduler, read_family
from lcm_live.engine.loras import BUILTIN_LCM_LORAS, LCM_LORA_IDS, apply_loras, lcm_lora_source, read_loras
from lcm_live.engine.model import LoadedModel
from lcm_live.engine.sources import (
    ModelInfo,
    Source,
    check_folder,
    download_pipeline,
    quiet_logs,
    read_folder_info,
    read_single_file_info,
    resolve,
)
from lcm_live.engine.unet_only import fetch_base, fetch_unet_repo, load_unet_parts, read_unet_info
from lcm_live.errors import ModelUnavailableError, UserError, first_line

FALLBACK_MODEL = "builtin:shapes"
# Native sizes where the model's config says otherwise than what it is best used at.
PRESET_SIZES = {"SimianLuo/LCM_Dreamshaper_v7": (512, 512)}
# The UNet cross-attention width of the real architectures (the text encoders' hidden size: CLIP-L 768;
# CLIP-L + OpenCLIP bigG 768 + 1280): what the hub LCM-LoRAs are made for.
REAL_CONTEXT_WIDTH = {"sd15": 768, "sdxl": 2048}


def load_model(settings: EngineSettings, *, device: Any = "cpu", dtype: Any = None,
               progress: bool = True) -> LoadedModel:
    import torch

    dtype = dtype or torch.float32
    # 1-2. Where the weights are.
    notice = None
    source = resolve(settings.model)
    folder = None
    if source.kind == "hub":
        try:
            unet_dir = fetch_unet_repo(source.location, cache_dir=settings.cache_dir, progress=progress)
            if unet_dir is not None:
                source = Source("unet", str(unet_dir), source.name)
            else:
                folder = download_pipeline(source.location, cache_dir=settings.cache_dir, progress=progress)
                check_folder(folder)  # a cache another tool filled may hold pickles only: refuse them here too
        except ModelUnavailableError as exc:
            if not (settings.offline_fallback and settings.model == DEFAULT_MODEL):
                raise
            try:
                source = resolve(FALLBACK_MODEL)
            except UserError:
                raise ModelUnavailableError(f"{exc.message} (and {FALLBACK_MODEL}, the offline fallback, is not "
                                            "installed)", field="model") from None
            notice = (f"OFFLINE: the default model {DEFAULT_MODEL} cannot be had, so lcm-live is using "
                      f"{FALLBACK_MODEL}, its small built-in model (pass --model to choose another)")
    if source.kind == "folder":
        folder = Path(source.location)

    # 3. Architecture and kind, from configs and headers only; then the LoRAs are read (fail fast), then the
    #    pipeline loads.
    if source.kind == "single_file":
        info = read_single_file_info(source.location)
    elif source.kind == "unet":
        info = read_unet_info(Path(source.location), source.name)
    else:
        info = read_folder_info(folder)
    arch, full_lcm = info.arch, info.full_lcm
    # The family (engine/families.py): its sampler, defaults, and whether an LCM-LoRA makes it an LCM.
    family = read_family(source.name, folder, arch=arch, full_lcm=full_lcm,
                         loras=tuple(spec.source for spec in settings.loras), scheduler=settings.scheduler,
                         unet_dir=Path(source.location) if source.kind == "unet" else None)
    wanted: list[tuple[str, float, str]] = []
    if not full_lcm and (family.lcm_lora is not None or settings.lcm_lora not in ("auto", "none")):
        lcm_lora = settings.lcm_lora
        if lcm_lora == "auto" and family.lcm_lora != "auto":  # the family's own (SSD-1B, Segmind Vega)
            lcm_lora = family.lcm_lora
        else:
            _check_auto_lcm_lora(settings.lcm_lora, info, source.name)
            lcm_lora = lcm_lora_source(settings.lcm_lora, arch, info.context_width)
        if lcm_lora is not None:
            wanted.append((lcm_lora, 1.0, "--lcm-lora"))
    wanted += [(spec.source, spec.scale, "--lora") for spec in settings.loras]
    loras = read_loras(wanted, cache_dir=settings.cache_dir)
    # The ControlNets and the IP-Adapter are fetched (or refused) before the long pipeline load, as the LoRAs are.
    controlnets_at = [(source, controlnet_location(source, cache_dir=settings.cache_dir, progress=progress))
                      for source in controlnet_sources(settings.controlnet)]
    ip_adapter_at = None
    if settings.ip_adapter:
        from lcm_live.engine.ip_adapter import ip_adapter_location

        ip_adapter_at = ip_adapter_location(settings.ip_adapter, cache_dir=settings.cache_dir, progress=progress)
    if source.kind == "single_file":
        load_progress.expect([Path(source.location)])  # byte progress for a listener (studio/loader.py)
        pipe = _load_single_file(Path(source.location), arch, dtype=dtype, progress=progress)
    elif source.kind == "unet":
        base, base_dir = fetch_base(source.name, info, cache_dir=settings.cache_dir, progress=progress)
        load_progress.expect([*Path(source.location).glob("*.safetensors"),  # its UNet, the base's other parts
                              *(p for p in load_progress.pipeline_files(base_dir) if p.parent.name != "unet")])
        parts = load_unet_parts(Path(source.location), base_dir, name=source.name, dtype=dtype)
        pipe = _load_folder(base_dir, arch, full_lcm, dtype=dtype, progress=progress, parts=parts,
                            label=f"{source.name} (its base pipeline {base})")
    else:
        load_progress.expect(load_progress.pipeline_files(folder))
        pipe = _load_folder(folder, arch, full_lcm, dtype=dtype, progress=progress)

    # 4. The family's scheduler (LCMScheduler, TCDScheduler, Euler on trailing timesteps), and the LoRAs stacked
    #    and fused.
    pipe.scheduler = make_scheduler(family, pipe.scheduler)
    apply_loras(pipe, loras, model_name=source.name)

    # 5. Device and dtype.
    # (casting only where needed: diffusers warns on every .to(dtype) of a model, even a no-op one)
    if any(getattr(part, "dtype", dtype) != dtype for part in pipe.components.values()):
        pipe.to(dtype=dtype)
    pipe.to(device)
    width, height = native_size(pipe, source.name, arch)
    if family.native_size is not None:  # SDXL-Turbo: SDXL's UNet, trained at 512x512
        width = height = family.native_size
    nets = [load_controlnet(name, at, unet=pipe.unet, arch=arch, dtype=dtype, device=device)
            for name, at in controlnets_at]  # (before the IP-Adapter changes the UNet's attention processors)
    names = [name for name, _ in controlnets_at]
    if ip_adapter_at is not None:
        from lcm_live.engine.ip_adapter import load_ip_adapter

        load_ip_adapter(pipe, settings.ip_adapter, *ip_adapter_at, arch=arch, dtype=dtype, device=device)
    return LoadedModel(pipe=pipe, kind=family.kind, arch=arch, name=source.name, family=family,
                       native_width=width, native_height=height,
                       loras=[(lora.source, lora.scale) for lora in loras], notice=notice,
                       controlnet=combine(nets) if nets else None, controlnet_name=" + ".join(names) or None,
                       controlnet_names=names, ip_adapter_name=settings.ip_adapter if ip_adapter_at else None)


def _check_auto_lcm_lora(setting: str, info: ModelInfo, name: str) -> None:
    """The hub LCM-LoRAs fit only the real SD1.5 / SDXL widths: say so before fetching one that cannot fit (a
    small model such as builtin:shapes-teacher needs an LCM-LoRA trained for it)."""
    want = REAL_CONTEXT_WIDTH[info.arch]
    if setting == "auto" and info.context_width != want and info.context_width not in BUILTIN_LCM_LORAS:
        raise UserError(f"--lcm-lora auto: {name} is not an LCM and {LCM_LORA_IDS[info.arch]} fits only {info.arch} "
                        f"models of cross-attention width {want} (this one: {info.context_width}); pass --lcm-lora "
                        "PATH (an LCM-LoRA trained for it, e.g. with `lcm-live distill --lora`) or --lcm-lora "
                        "none; a distilled model lcm-live did not recognise (Turbo, SDXS, Lightning, TCD, Hyper-SD) "
                        "needs --scheduler tcd|euler-a|euler-trailing instead",
                        field="lcm_lora")


def native_size(pipe: Any, name: str, arch: str) -> tuple[int, int]:
    """(width, height): a preset where there is one, else the UNet's sample size times the VAE's factor
    (SD1.5 64 x 8 = 512, SDXL 128 x 8 = 1024)."""
    if name in PRESET_SIZES:
        return PRESET_SIZES[name]
    side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return side, side


def single_file_config(arch: str) -> Path:
    """The diffusers config folder a single-file checkpoint of ``arch`` is read with (shipped, no hub)."""
    return config_dir(arch)


def _load_folder(folder: Path, arch: str, full_lcm: bool, *, dtype: Any, progress: bool,
                 parts: dict[str, Any] | None = None, label: str | None = None) -> Any:
    """The pipeline of a diffusers folder; ``parts``: components passed in instead of read from it (a UNet-only
    model's UNet and scheduler), ``label``: what the error calls the model."""
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch == "sdxl":
        cls, extra = StableDiffusionXLPipeline, {}
    else:
        cls = LatentConsistencyModelPipeline if full_lcm else StableDiffusionPipeline
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    with _progress(progress):
        try:
            return cls.from_pretrained(folder, dtype=dtype, use_safetensors=True, local_files_only=True,
                                       **extra, **(parts or {}))
        except (OSError, ValueError) as exc:
            raise UserError(f"--model {label or folder}: cannot load this diffusers folder ({first_line(exc)})",
                            field="model") from None


def _load_single_file(path: Path, arch: str, *, dtype: Any, progress: bool) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    config = single_file_config(arch)
    components: dict[str, Any] = {"tokenizer": _tokenizer(config, "tokenizer", arch)}
    if arch == "sdxl":
        cls = StableDiffusionXLPipeline
        components["tokenizer_2"] = _tokenizer(config, "tokenizer_2", arch)
    else:
        cls = StableDiffusionPipeline
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with _progress(progress), quiet_logs():  # diffusers warns about its own internal dtype casts here
        try:
            return cls.from_single_file(str(path), config=str(config), local_files_only=True, dtype=dtype,
                                        **components)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"--model {path}: cannot read this {arch} checkpoint ({first_line(exc)})",
                            field="model") from None


def _tokenizer(config: Path, component: str, arch: str) -> Any:
    """The folder's own tokenizer when it has one (vocab.json or tokenizer.json), else the shipped CLIP BPE set up
    for ``arch`` (the shipped configs carry only tokenizer_config.json: one vocabulary copy serves all)."""
    from transformers import CLIPTokenizer

    from lcm_live.engine.architectures import clip_tokenizer

    if any((config / component / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        return CLIPTokenizer.from_pretrained(config / component)
    return clip_tokenizer(arch, component)



@contextlib.contextmanager
def _progress(show: bool):
    """Show or hide diffusers' "Loading pipeline components" bar."""
    from diffusers.utils import logging as dlogging

    if show:
        yield
        return
    dlogging.disable_progress_bar()
    try:
        yield
    finally:
        dlogging.enable_progress_bar()
