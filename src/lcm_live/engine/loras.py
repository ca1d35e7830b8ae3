"""LCM-LoRA and style LoRAs: loaded through diffusers/peft as named adapters, weighted, fused, unloaded.

Fusing folds B @ A * scale into the base weights, so a fused LoRA costs nothing per step. LoRA weights are
read only from safetensors: a local file or folder is read with ``safetensors.torch.load_file``; a hub id goes
through diffusers with ``use_safetensors=True``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lcm_live.engine.sources import PICKLE_SUFFIXES, quiet_hub_logs, unavailable
from lcm_live.errors import ModelUnavailableError, UserError

LCM_LORA_IDS = {"sd15": "latent-consistency/lcm-lora-sdv1-5", "sdxl": "latent-consistency/lcm-lora-sdxl"}


def lcm_lora_source(setting: str, arch: str) -> str | None:
    """``--lcm-lora auto|none|PATH_OR_ID`` -> the LoRA to load, or None for "none"."""
    if setting == "none":
        return None
    if setting == "auto":
        return LCM_LORA_IDS[arch]
    return setting


def read_lora(source: str, *, flag: str, cache_dir: str | None) -> Any:
    """A LoRA state dict (local safetensors) or the hub id itself (loaded by diffusers, safetensors only)."""
    from safetensors.torch import load_file

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
            what = f"only pickle weights ({pickles[0]})" if pickles else "no .safetensors file"
            raise UserError(f"{flag} {source}: the folder holds {what}; LoRAs load only from .safetensors",
                            field=flag.lstrip("-"))
        if len(files) > 1:
            raise UserError(f"{flag} {source}: {len(files)} .safetensors files in the folder; name the file",
                            field=flag.lstrip("-"))
        path = files[0]
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UserError(f"{flag} {source}: LoRAs load only from .safetensors files (pickle formats such as "
                            f"{path.suffix or 'this'} can run code when loaded)", field=flag.lstrip("-"))
        try:
            return load_file(str(path))
        except Exception as exc:
            raise UserError(f"{flag} {source}: not a readable safetensors file ({exc})",
                            field=flag.lstrip("-")) from None
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or source.lower().endswith(
            (".safetensors", *PICKLE_SUFFIXES)):
        raise UserError(f"{flag} {source}: no such file or folder", field=flag.lstrip("-"))
    return source  # a hub id


def apply_loras(pipe: Any, loras: list[tuple[str, float, str]], *, model_name: str, cache_dir: str | None) -> None:
    """Load each (source, scale, flag) as an adapter, weight them, fuse them and drop the adapters.

    1. load every LoRA under its own adapter name (a misfit raises one short UserError naming LoRA and model);
    2. ``set_adapters(names, scales)`` stacks them;
    3. ``fuse_lora`` folds them into the weights; ``unload_lora_weights`` removes the now-empty adapter layers.
    """
    if not loras:
        return
    names = []
    for i, (source, _scale, flag) in enumerate(loras):
        name = f"lora{i}"
        weights = read_lora(source, flag=flag, cache_dir=cache_dir)
        _load_one(pipe, weights, name, source=source, flag=flag, model_name=model_name, cache_dir=cache_dir)
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[scale for _, scale, _ in loras])
    pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
    pipe.unload_lora_weights()


def _load_one(pipe: Any, weights: Any, name: str, *, source: str, flag: str, model_name: str,
              cache_dir: str | None) -> None:
    before = _adapter_count(pipe)
    kwargs = {} if isinstance(weights, dict) else {"cache_dir": cache_dir, "use_safetensors": True}
    try:
        with quiet_hub_logs():
            pipe.load_lora_weights(weights, adapter_name=name, **kwargs)
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise misfit(source, model_name, exc, flag) from None
    except OSError as exc:
        if isinstance(weights, str):
            error = unavailable(source, cache_dir, exc)
            raise ModelUnavailableError(error.message.replace("model ", f"{flag} ", 1), field=flag.lstrip("-")) \
                from None
        raise
    if _adapter_count(pipe) == before:  # diffusers only warns when no key matched any module
        raise UserError(f"{flag} {source} does not fit the model {model_name}: none of its keys match the "
                        "model's layers (a LoRA for another architecture?)", field=flag.lstrip("-"))


def _adapter_count(pipe: Any) -> int:
    return sum(len(v) for v in pipe.get_list_adapters().values())


def misfit(source: str, model_name: str, exc: BaseException, flag: str) -> UserError:
    """One line for what peft reports as a wall of ``size mismatch for ...`` lines."""
    text = str(exc)
    mismatches = re.findall(r"size mismatch for ([\w.]+): copying a param with shape (torch\.Size\(\[[\d, ]*\]\))"
                            r".*?current model is (torch\.Size\(\[[\d, ]*\]\))", text)
    if mismatches:
        key, got, want = mismatches[0]
        detail = (f"{len(mismatches)} weight shape(s) differ, e.g. {key}: LoRA {got[11:-2]} vs model {want[11:-2]}"
                  " (a LoRA for another architecture, e.g. SDXL vs SD1.5?)")
    else:
        detail = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
    return UserError(f"{flag} {source} does not fit the model {model_name}: {detail}", field=flag.lstrip("-"))
