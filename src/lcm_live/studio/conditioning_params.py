"""The studio's fields for the ControlNets (one or several, with their steps) and the IP-Adapter, from the engine's
registry (engine/modes.py), and what they put into a request (studio/params.py builds the model with them).

With one ControlNet, ``controlnet_conditioning_scale``, ``control_guidance_start`` and ``control_guidance_end`` are
numbers; with N > 1 each is a list of exactly N numbers, one per net in ``/api/info``'s ``controlnets`` order. Net
0's image is the canvas (control mode); net k's (k >= 1) is the binary layer ``n``+k; a net without one sits out.
With an IP-Adapter, ``ip_adapter_scale``; the reference image is the binary layer ``i`` (docs/protocol.md).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

PER_NET = ("controlnet_conditioning_scale", "control_guidance_start", "control_guidance_end")


def conditioning_fields(reg: dict[str, dict[str, Any]], settings: Any, *, controlnets: int,
                        ip_adapter: bool) -> dict[str, Any]:
    """pydantic field definitions: the ControlNets' per-net fields (``controlnets`` >= 1) and ``ip_adapter_scale``."""
    fields: dict[str, Any] = {}
    if controlnets:
        bounds = {"controlnet_conditioning_scale": (settings.default_controlnet_conditioning_scale,
                                                    reg["controlnet_conditioning_scale"]["minimum"],
                                                    settings.max_controlnet_conditioning_scale),
                  "control_guidance_start": (0.0, 0.0, reg["control_guidance_start"]["maximum"]),
                  "control_guidance_end": (1.0, 0.0, reg["control_guidance_end"]["maximum"])}
        for name in PER_NET:
            default, low, high = bounds[name]
            description = reg[name]["description"]
            if controlnets == 1:
                fields[name] = (float, Field(default, ge=low, le=high, description=description))
            else:
                item = Annotated[float, Field(ge=low, le=high)]
                fields[name] = (list[item], Field(  # type: ignore[valid-type]
                    [default] * controlnets, min_length=controlnets, max_length=controlnets,
                    description=f"{description}; one per ControlNet ({controlnets}, in /api/info's controlnets "
                                "order)"))
    if ip_adapter:
        p = reg["ip_adapter_scale"]
        fields["ip_adapter_scale"] = (float, Field(p["default"], ge=p["minimum"], le=p["maximum"],
                                                   description=p["description"] + " (the reference image: the "
                                                   "binary layer i)"))
    return fields


def check_steps(data: dict[str, Any]) -> tuple[str, str] | None:
    """(field, message) when a net's start is not before its end, else None."""
    if "control_guidance_start" not in data:
        return None
    starts, ends = data["control_guidance_start"], data["control_guidance_end"]
    pairs = zip(starts, ends, strict=True) if isinstance(starts, list) else [(starts, ends)]
    for k, (start, end) in enumerate(pairs):
        if not start < end:
            where = f"[{k}]" if isinstance(starts, list) else ""
            return ("control_guidance_end", f"control_guidance_end{where}={end} is not above control_guidance_start"
                                            f"{where}={start}: a ControlNet acts from start to end (fractions of the "
                                            "steps)")
    return None


def request_kwargs(data: dict[str, Any], control: Any, *, controlnets: int, reference: Any = None,
                   control_images: list[Any] | None = None) -> dict[str, Any]:
    """GenerationRequest's ControlNet and IP-Adapter arguments: ``control`` is net 0's image (the canvas in control
    mode, else None), ``control_images`` nets 1..N-1's layers (None: that net sits out)."""
    out: dict[str, Any] = {name: data[name] for name in PER_NET if name in data}
    if controlnets > 1 and control is not None:
        rest = list(control_images or [])
        out["control_image"] = [control, *rest, *[None] * (controlnets - 1 - len(rest))]
    else:
        out["control_image"] = control
    if "ip_adapter_scale" in data and reference is not None:
        out.update(ip_adapter_image=reference, ip_adapter_scale=data["ip_adapter_scale"])
    return out
