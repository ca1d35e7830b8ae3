"""IP-Adapter: a reference image whose content and style guide the picture (Ye et al. 2023, "IP-Adapter").

``--ip-adapter SOURCE`` is a ``.safetensors`` file in diffusers' IP-Adapter format (``image_proj.*`` and
``ip_adapter.N.to_k_ip/to_v_ip.weight``, as h94/IP-Adapter's ``ip-adapter_sd15.safetensors``), with its CLIP image
encoder (a ``CLIPVisionModelWithProjection`` folder: config.json + model.safetensors) in the ``image_encoder``
folder beside it, as that repository lays them out; or ``ORG/NAME/PATH/FILE.safetensors`` on the hub (the file
and ``PATH/image_encoder`` fetched into the Hugging Face cache). Safetensors only.

Before anything loads, the file's header is held against the model: its ``to_k_ip`` layers must be the UNet's
cross-attention layers (their number, widths and the cross-attention width: SD1.5's 768, SDXL's 2048) and its
projection must take the image encoder's embedding width; an adapter for the other architecture is one clear
error. Only the base adapters (an ``image_proj.proj`` projection of CLIP's image embedding) load: the Plus and
FaceID variants (a resampler over hidden states) are refused by name.

It loads through diffusers' ``load_ip_adapter`` (IP-Adapter attention processors in the UNet, its
``encoder_hid_proj``), and runs in the engine's own loop (engine/denoiser.py) as diffusers' pipelines run it:
``added_cond_kwargs={"image_embeds": [rows]}``, the uncond rows zeros. The image embedding comes from the
pipeline's own ``encode_image`` and is cached by the image's pixels, so a live session pays the encoder once per
reference image. With the adapter loaded, a request without a reference image runs at scale 0, which diffusers'
processors skip: its picture is the one without the adapter.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

from lcm_live.engine.sources import hub_progress, quiet_logs, unavailable
from lcm_live.errors import UserError, first_line

ENCODER_FOLDER = "image_encoder"
ENCODER_FILES = ("config.json", "model.safetensors")
CACHE_SIZE = 8  # reference images whose embeddings are kept (a few sessions' each)
_LAYER_KEY = re.compile(r"^ip_adapter\.(\d+)\.to_k_ip\.weight$")
_HUB_PATH = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+/(?:[\w.-]+/)*[\w.-]+\.safetensors$")  # ORG/NAME/PATH/FILE


def _error(source: str, text: str) -> UserError:
    return UserError(f"--ip-adapter {source}: {text}", field="ip_adapter")


def _made_for(width: Any) -> str:
    return {768: "sd15", 2048: "sdxl"}.get(width, "another model")


def ip_adapter_location(source: str, *, cache_dir: str | None, progress: bool) -> tuple[Path, Path]:
    """(the adapter's .safetensors file, its image encoder folder), fetched into the cache for a hub path."""
    path = Path(source).expanduser()
    if not path.exists():
        if not _HUB_PATH.match(source):
            raise _error(source, "no such file; give the adapter's .safetensors file (its image_encoder folder "
                                 "beside it) or a hub path ORG/NAME/PATH/FILE.safetensors")
        path = _download(source, cache_dir=cache_dir, progress=progress)
    if path.is_dir():
        raise _error(source, "is a folder; give the adapter's .safetensors file inside it (e.g. "
                             "ip-adapter_sd15.safetensors)")
    if path.suffix.lower() != ".safetensors":
        raise _error(source, f"{path.suffix or 'this file'} is not a safetensors file (pickle formats such as .bin "
                             "or .pth can run code when loaded); use the adapter's .safetensors release")
    encoder = path.parent / ENCODER_FOLDER
    missing = [name for name in ENCODER_FILES if not (encoder / name).is_file()]
    if missing:
        raise _error(source, f"no image encoder beside it ({encoder} lacks {', '.join(missing)}); put the CLIP "
                             "image encoder the adapter was trained with (config.json + model.safetensors) there")
    return path, encoder


def _download(source: str, *, cache_dir: str | None, progress: bool) -> Path:
    from huggingface_hub import hf_hub_download

    org, name, *rest = source.split("/")
    repo, file = f"{org}/{name}", "/".join(rest)
    folder = str(Path(file).parent / ENCODER_FOLDER).removeprefix("./")
    try:
        with hub_progress(progress), quiet_logs():
            for part in ENCODER_FILES:
                hf_hub_download(repo, f"{folder}/{part}", cache_dir=cache_dir)
            return Path(hf_hub_download(repo, file, cache_dir=cache_dir))
    except Exception as exc:  # offline, unreachable, not cached, no such file
        raise unavailable(source, cache_dir, exc, flag="--ip-adapter", field="ip_adapter",
                          ways_out="--ip-adapter PATH (a .safetensors file, its image_encoder folder beside "
                                   "it)") from None


def cross_attention_widths(unet: Any) -> list[int]:
    """The hidden width of each of the UNet's cross-attention layers, in diffusers' IP-Adapter key order
    (``ip_adapter.1``, ``.3``, ...: the order of ``unet.attn_processors``, self-attention skipped)."""
    blocks = list(unet.config.block_out_channels)
    widths = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            widths.append(blocks[-1])
        elif name.startswith("up_blocks"):
            widths.append(blocks[::-1][int(name.split(".")[1])])
        else:
            widths.append(blocks[int(name.split(".")[1])])
    return widths


def check_fit(source: str, path: Path, encoder: Path, unet: Any, arch: str) -> None:
    """Refuse an adapter that does not fit the UNet or its image encoder, from headers and configs only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as exc:
        raise _error(source, f"cannot read it as safetensors ({first_line(exc)})") from None
    if not any(k.startswith("image_proj.") for k in shapes) or not any(_LAYER_KEY.match(k) for k in shapes):
        raise _error(source, "not an IP-Adapter in diffusers' format (no image_proj.* and ip_adapter.N.to_k_ip "
                             "weights)")
    if "image_proj.proj.weight" not in shapes:
        raise _error(source, "a Plus or FaceID IP-Adapter (a resampler over the image encoder's hidden states); "
                             "lcm-live loads the base ones (image_proj.proj), e.g. ip-adapter_sd15.safetensors")
    layers = sorted((int(_LAYER_KEY.match(k).group(1)), shape) for k, shape in shapes.items() if _LAYER_KEY.match(k))
    want_width = unet.config.cross_attention_dim
    width = layers[0][1][1]
    if width != want_width:
        raise _error(source, f"made for {_made_for(width)} (cross_attention_dim {width}), but the model is {arch} "
                             f"(cross_attention_dim {want_width}); use an IP-Adapter trained for {arch}")
    widths = cross_attention_widths(unet)
    have = [shape[0] for _, shape in layers]
    if [i for i, _ in layers] != list(range(1, 2 * len(widths), 2)) or have != widths:
        raise _error(source, f"its {len(have)} attention layers (widths {have[:4]}...) are not the model's "
                             f"{len(widths)} cross-attention layers (widths {widths[:4]}...); use an IP-Adapter "
                             f"trained for this {arch} model")
    try:
        config = json.loads((encoder / "config.json").read_text())
    except (OSError, ValueError):
        raise _error(source, f"{encoder / 'config.json'} is not readable JSON") from None
    takes, gives = shapes["image_proj.proj.weight"][1], config.get("projection_dim")
    if takes != gives:
        raise _error(source, f"its projection takes image embeddings of width {takes}, but the image encoder in "
                             f"{encoder} gives {gives}; put the encoder it was trained with there")


def load_ip_adapter(pipe: Any, source: str, path: Path, encoder: Path, *, arch: str, dtype: Any,
                    device: Any) -> None:
    """Check, then load the image encoder and the adapter into ``pipe`` (already on ``device`` in ``dtype``)."""
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    check_fit(source, path, encoder, pipe.unet, arch)
    try:
        with quiet_logs():
            image_encoder = CLIPVisionModelWithProjection.from_pretrained(str(encoder), dtype=dtype,
                                                                          use_safetensors=True)
        attach_ip_adapter(pipe, image_encoder, load_file(str(path)), dtype=dtype, device=device)
    except UserError:
        raise
    except Exception as exc:
        raise _error(source, f"could not be loaded ({first_line(exc)}); is it an IP-Adapter for {arch}?") from None


def attach_ip_adapter(pipe: Any, image_encoder: Any, state: dict[str, Any], *, dtype: Any, device: Any) -> None:
    """Register ``image_encoder`` and load the adapter's flat state dict (``image_proj.*``, ``ip_adapter.*``)
    through diffusers' ``load_ip_adapter``; the UNet ends on ``device`` in ``dtype``."""
    state_dict = {part: {k.removeprefix(f"{part}."): v for k, v in state.items() if k.startswith(f"{part}.")}
                  for part in ("image_proj", "ip_adapter")}
    pipe.register_modules(image_encoder=image_encoder.to(device=device, dtype=dtype).eval())
    with quiet_logs():
        pipe.load_ip_adapter(state_dict, subfolder=None, weight_name=None, image_encoder_folder=None)
    pipe.unet.to(device=device, dtype=dtype)


def pixel_key(image: Any) -> str:
    """A reference image's identity: a digest of its mode, size and pixels."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ImageEmbeddings:
    """The pipeline's ``encode_image`` (CLIP image embedding, uncond zeros), cached by pixels: (1, 1, D) each."""

    def __init__(self, pipe: Any, device: Any, size: int = CACHE_SIZE):
        self.pipe, self.device, self.size = pipe, device, size
        self._cache: OrderedDict[tuple[str | None, str], tuple[Any, Any]] = OrderedDict()
        self.hits = self.misses = 0
        self.scale: float | None = None  # what the UNet's IP-Adapter processors are set to (None: unknown)

    def set_scale(self, scale: float) -> None:
        """The adapter's scale for the next call (diffusers' ``set_ip_adapter_scale``, only when it changes)."""
        if scale != self.scale:
            self.pipe.set_ip_adapter_scale(scale)
            self.scale = scale

    def __call__(self, image: Any, scope: str | None = None) -> tuple[Any, Any]:
        """(cond, uncond) of ``image``; cached per ``scope`` (GenerationRequest.cache_scope) and pixels."""
        key = (scope, pixel_key(image))
        if key in self._cache:
            self.hits += 1
            self._cache.move_to_end(key)
            return self._cache[key]
        self.misses += 1
        cond, uncond = self.pipe.encode_image(image, self.device, 1, False)  # (1, D) each
        self._cache[key] = cond[None], uncond[None]  # (1, 1, D): one image for the one adapter, as diffusers
        while len(self._cache) > self.size:
            self._cache.popitem(last=False)
        return self._cache[key]

    def blank(self) -> tuple[Any, Any]:
        """Zero embeddings (1, 1, D), for requests without a reference image (run at scale 0)."""
        import torch

        width = self.pipe.image_encoder.config.projection_dim  # what the adapter's projection takes
        zeros = torch.zeros(1, 1, width, device=self.device, dtype=self.pipe.unet.dtype)
        return zeros, zeros
