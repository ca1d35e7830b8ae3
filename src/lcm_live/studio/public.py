"""What the studio tells clients about its model: names, never a path on the server.

``--model /srv/models/dreamshaper`` must not reach a browser or an image's metadata as that path (it says how the
server's disk is laid out, and it is none of a client's business): models, LoRAs and ControlNets are named by their
hub id, ``builtin:NAME``, or the folder's or file's own name. Credentials never appear at all.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Keys of the engine's parameters and info that hold a model source (a hub id, builtin:NAME or a path).
SOURCE_KEYS = ("model", "controlnet", "controlnets", "ip_adapter", "lcm_lora", "teacher")


def public_model_name(source: Any) -> Any:
    """A model source as a client may see it: hub ids and builtin names as they are, paths as their last part
    (several ControlNets: each)."""
    if isinstance(source, list):
        return [public_model_name(s) for s in source]
    if not isinstance(source, str) or not source:
        return source
    if source.startswith("builtin:"):
        return source
    if _HUB_ID.match(source) and not os.path.exists(source) and not source.lower().endswith(".safetensors"):
        return source  # org/name
    tail = re.split(r"[\\/]+", source.rstrip("\\/"))[-1]
    return tail or "local model"


def public_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """An image's parameters with every model source made public (``loras``: each ``source`` too)."""
    out = dict(parameters)
    for key in SOURCE_KEYS:
        if key in out:
            out[key] = public_model_name(out[key])
    loras = out.get("loras")
    if isinstance(loras, list):
        out["loras"] = [{**lora, "source": public_model_name(lora.get("source"))} if isinstance(lora, dict)
                        else public_model_name(lora) for lora in loras]
    return out


def public_info(info: Any) -> dict[str, Any]:
    """What the page may know about the model: names only, never a path or a token."""
    if dataclasses.is_dataclass(info):
        info = dataclasses.asdict(info)
    elif not isinstance(info, dict):
        info = dict(vars(info))
    model = public_model_name(str(info.get("model") or info.get("name") or "unknown"))
    out = {"model": model, "kind": info.get("kind"), "device": str(info.get("device")),
           "dtype": str(info.get("dtype")), "notice": _public_notice(info.get("notice"), info)}
    # Only where loaded: the per-ControlNet params' order, and the IP-Adapter (a reference image, layer i, is taken).
    if info.get("controlnets"):
        out["controlnets"] = public_model_name(list(info["controlnets"]))
    if info.get("ip_adapter"):
        out["ip_adapter"] = public_model_name(info["ip_adapter"])
    return out


def _public_notice(notice: Any, info: dict[str, Any]) -> Any:
    """The loading notice ("offline: using builtin:shapes instead of X") with any source path in it named."""
    if not isinstance(notice, str):
        return notice
    for key in SOURCE_KEYS:
        value = info.get(key)
        if isinstance(value, str) and value and public_model_name(value) != value:
            notice = notice.replace(value, public_model_name(value))
    return notice
