"""Resumable training checkpoints in safetensors + one JSON file (no pickle anywhere).

A checkpoint folder holds ``modules.safetensors`` (named module state dicts, keys ``<name>/<param>``),
``optimizer.safetensors`` (AdamW moments, keys ``<group>.<index>.<field>``) and ``state.json`` (step,
RNG seed, anything JSON). Written to a temporary folder and renamed, so a kill mid-write never leaves
a half checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def save_checkpoint(folder: str | Path, modules: dict[str, Any], optimizer, state: dict) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"{name}/{k}": v.detach().cpu().contiguous().clone() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    save_file(tensors, str(tmp / "modules.safetensors"))
    if optimizer is not None:
        opt = {}
        for key, value in _flatten_optimizer(optimizer).items():
            opt[key] = value.detach().cpu().contiguous().clone()
        save_file(opt, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def load_checkpoint(folder: str | Path, modules: dict[str, Any], optimizer) -> dict:
    """Load into ``modules`` and ``optimizer`` in place; returns the JSON state."""
    from safetensors.torch import load_file

    folder = Path(folder)
    tensors = load_file(str(folder / "modules.safetensors"))
    for name, m in modules.items():
        prefix = f"{name}/"
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if optimizer is not None and (folder / "optimizer.safetensors").exists():
        _restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")))
    return json.loads((folder / "state.json").read_text())


def _flatten_optimizer(optimizer) -> dict:
    out = {}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            for field, value in optimizer.state.get(p, {}).items():
                import torch

                out[f"{g}.{i}.{field}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _restore_optimizer(optimizer, flat: dict) -> None:
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            fields = {k.split(".", 2)[2]: v for k, v in flat.items() if k.startswith(f"{g}.{i}.")}
            if fields:  # moments live where their parameter lives; "step" stays a CPU scalar as torch keeps it
                optimizer.state[p] = {k: v if k == "step" else v.to(p.device) for k, v in fields.items()}
