"""The one typed settings object. Built by the CLI (flags) or from the environment (``LCM_LIVE_*``),
then passed down; nothing deep inside reads the environment or globals.

``Settings.engine`` is what the engine needs to load and run a model; ``Settings.studio`` is what the
server needs. Environment: ``LCM_LIVE_ENGINE__MODEL=...``, ``LCM_LIVE_STUDIO__PORT=...``; the token also
as plain ``LCM_LIVE_TOKEN``.
"""

from __future__ import annotations

import math
import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "SimianLuo/LCM_Dreamshaper_v7"
CompileMode = Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
CPU_DEFAULT_SIDE = 512  # the studio's default image side on a CPU at most (StudioSettings.for_model)


class LoraSpec(BaseModel):
    """A style LoRA stacked on the model: a hub id, a folder or a .safetensors file, and its scale."""

    model_config = ConfigDict(frozen=True)
    source: str
    scale: float = 1.0


# A preset's (and a style's) name: what requests and GET /api/models use; never a filesystem path.
PRESET_NAME = r"^[A-Za-z0-9][\w.:+/-]{0,99}$"


class StylePreset(BaseModel):
    """A style LoRA of a model preset (models.toml): its safetensors source, its default scale, and the bounds a
    request's ``lora_scales`` (the page's slider) may move it within."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=PRESET_NAME)
    lora: str  # a .safetensors file, a folder holding one, a hub id or builtin:NAME (as --lora takes)
    scale: float = 1.0
    min: float = 0.0
    max: float = 2.0

    @model_validator(mode="after")
    def _check(self) -> StylePreset:
        if not all(math.isfinite(v) for v in (self.scale, self.min, self.max)):
            raise ValueError("scale, min and max must be finite numbers")
        if not self.min <= self.scale <= self.max:
            raise ValueError(f"scale {self.scale} is outside min..max ({self.min}..{self.max}): move it inside "
                             "or widen the bounds")
        return self


class ModelPreset(BaseModel):
    """A named model a client may pick (serve --model A --model B, or a models.toml's [models.NAME] table): the
    engine settings it changes from the server's, and the defaults the page starts it at. Unset: the server's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=PRESET_NAME)
    model: str  # as --model takes it: hub id, folder, .safetensors file, builtin:NAME
    lcm_lora: str | None = None  # auto | none | PATH_OR_ID; None: the server's --lcm-lora
    styles: list[StylePreset] = Field(default_factory=list)
    controlnet: str | list[str] | None = None  # None: the server's --controlnet(s)
    scheduler: Literal["auto", "lcm", "tcd", "euler-a", "euler-trailing"] | None = None
    width: int | None = Field(None, ge=64)  # the page's default size and steps for this model
    height: int | None = Field(None, ge=64)
    num_inference_steps: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check(self) -> ModelPreset:
        names = [style.name for style in self.styles]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"styles: {', '.join(twice)} named more than once: give each style its own name")
        return self


class EngineSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = DEFAULT_MODEL  # hub id, local diffusers folder, single .safetensors file, or builtin:NAME
    lcm_lora: str = "auto"  # auto | none | PATH_OR_ID (ignored for full LCMs)
    loras: list[LoraSpec] = Field(default_factory=list)
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")  # cuda:N: that GPU (serve --devices)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    decoder: Literal["auto", "vae", "taesd"] = "vae"  # auto: TAESD when it fits and loads (serve's default)
    taesd: str | None = None  # override the tiny decoder's id/path (default by architecture)
    tiled_vae: Literal["auto", "on", "off"] = "auto"
    # auto: OpenVINO on a CPU when the extra is installed and the CPU has bf16 (AMX or avx512_bf16), else torch
    backend: Literal["auto", "torch", "openvino"] = "auto"
    compile: bool = False  # torch.compile the UNet
    # with compile: torch.compile's mode; auto: reduce-overhead (CUDA graphs) on CUDA, default (+ weight freezing)
    # on the CPU. max-autotune also tunes Triton/C++ GEMM and conv kernels: many minutes per image shape.
    compile_mode: CompileMode = "auto"
    quantize: Literal["none", "int8", "nf4"] = "none"
    # int8 for the tiny autoencoder's encoder and decoder on OpenVINO (engine/openvino_module.py; issue 17): NNCF
    # post-training quantization calibrated on the warm-up's own latents and images. Apart from --quantize (the
    # UNet) so that it combines with --feature-reuse, whose UNet graphs stay bf16.
    quantize_vae: Literal["none", "int8"] = "none"
    openvino_cache_dir: str | None = None  # converted OpenVINO UNets; None: ~/.cache/lcm-live/openvino
    cache_dir: str | None = None  # Hugging Face cache; None: HF_HOME / the default
    offline_fallback: bool = True  # the default hub model missing -> builtin:shapes, said loudly
    prompt_cache_size: int = 64
    # A ControlNet (hub id, a folder of config.json + safetensors, or one original-layout .safetensors file):
    # "control" mode, where an image (the studio's canvas) guides the layout. On the OpenVINO backend the ControlNet
    # runs as an IR beside the UNet's (engine/openvino_controlnet.py; the UNet takes its residuals as IR inputs).
    # Several (``--controlnet A --controlnet B``, a list): their residuals summed, as diffusers' MultiControlNetModel.
    controlnet: str | list[str] | None = None
    # An IP-Adapter (engine/ip_adapter.py): a .safetensors file in diffusers' IP-Adapter format, its CLIP image
    # encoder in the image_encoder folder beside it; a reference image then guides the content and style.
    ip_adapter: str | None = None
    # The sampler (engine/families.py): auto detects the model's family from its folder or name; lcm, tcd, euler-a
    # (SDXL-Turbo) or euler-trailing (SD-Turbo, SDXS, SDXL-Lightning) override it. eta: TCD's gamma (None: the
    # family's, 0.3 for TCD, 1.0 for Hyper-SD's one-step LoRA).
    scheduler: Literal["auto", "lcm", "tcd", "euler-a", "euler-trailing"] = "auto"
    eta: float | None = Field(None, ge=0, le=1)
    # Fewer FLOPs per live frame (issue 17): feature_reuse K recomputes the UNet's deep blocks every K evaluations
    # and reuses them in between (engine/feature_reuse.py; 1: off, the exact path); token_merging R merges that
    # fraction of the tokens in the highest-resolution attention (ToMe for SD, engine/tome.py; 0: off).
    feature_reuse: int = Field(1, ge=1, le=64)
    feature_reuse_across_steps: bool = False  # reuse between the steps of a generation too (DeepCache's own)
    token_merging: float = Field(0.0, ge=0.0, le=0.75)


class StudioSettings(BaseModel):
    """What `lcm-live serve` needs: network, auth, limits, deadlines and the parameter bounds it publishes."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)
    token: str | None = None  # also plain LCM_LIVE_TOKEN; required (>= 32 chars) off loopback
    allowed_origins: list[str] = Field(default_factory=list)  # extra WebSocket/POST origins, "scheme://host[:port]"
    allowed_hosts: list[str] = Field(default_factory=list)  # extra Host names accepted without a token
    # HTTPS (both or neither, PEM files): browsers give pages the camera only over https or on localhost, so a
    # phone or another computer on the LAN needs it to use Camera.
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    # sessions / limits
    max_sessions: int | None = Field(None, ge=1)  # None: 1 on CPU, 4 on GPU
    # stream batching: frames of up to this many sessions (same size, steps, guidance) in one UNet call;
    # None: 1 on CPU (batching buys nothing there), max_sessions on GPU
    max_batch_size: int | None = Field(None, ge=1)
    # Model presets (Settings.models): engines kept loaded per worker, least recently used evicted past this;
    # None: 1 on a CPU (a second SD1.5 in RAM rarely pays), 2 on CUDA/MPS
    max_loaded_models: int | None = Field(None, ge=1)
    # One inference worker per device, each with its own engine (serve --devices cuda:0,cuda:1; cpu,cpu in tests);
    # None: one worker on EngineSettings.device (studio/pool.py)
    devices: list[str] | None = Field(None, min_length=1)
    rest_queue_size: int = Field(2, ge=1)  # POST /api/generate waiting beyond this -> 429
    # POST /api/upscale (studio/upscale_route.py): the output's width * height at most (one clear 422 naming scale)
    max_upscale_pixels: int = Field(4096 * 4096, ge=64 * 64)
    # serve --upscaler: an ESRGAN-family .safetensors the operator chose (engine/esrgan.py), loaded at start; POST
    # /api/upscale's "upscaler": "esrgan" | "esrgan+lcm" uses it (a request never names a file)
    upscaler: str | None = None
    max_ws_message_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    max_body_bytes: int = Field(2 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(1024 * 1024, ge=64 * 64)  # decoded canvas, width * height
    max_image_side: int = Field(1024, ge=64)
    # A params message is small JSON: text messages past this are refused (the session stays), and any client JSON
    # (WebSocket or REST) nests at most json_max_depth levels, checked before parsing (studio/json_input.py).
    max_ws_text_bytes: int = Field(256 * 1024, ge=1024)
    json_max_depth: int = Field(8, ge=2, le=64)
    # Decoding a canvas: a progressive JPEG may repeat its scans (each costs a full pass over the image: 1.4 MB of
    # them took 5-9 s); more scans than this are refused before decoding. Decodes run on their own threads,
    # at most decode_threads at a time, so crafted images cannot take the cores the worker needs.
    max_jpeg_scans: int = Field(16, ge=1)
    decode_threads: int = Field(1, ge=1)
    # deadlines (seconds)
    queue_wait_timeout_s: float = Field(10.0, gt=0)
    generation_timeout_s: float = Field(30.0, gt=0)
    idle_timeout_s: float = Field(300.0, gt=0)
    # failures
    max_consecutive_failures: int = Field(3, ge=1)  # then /readyz 503 (and exit if exit_on_failures)
    exit_on_failures: bool = False
    exit_on_warmup_failure: bool = True
    # warmup: one generation at this size before /readyz says ready (None: the default size)
    warmup_width: int | None = None
    warmup_height: int | None = None
    warmup_steps: int = Field(1, ge=1)
    # connections (studio/connections.py; uvicorn's own knobs where it has them). Seconds, then counts.
    request_header_timeout_s: float = Field(5.0, gt=0)  # a request's head complete within this of connecting
    # (or of the previous response): idle and slow-header connections are closed
    keep_alive_timeout_s: float = Field(5.0, gt=0)  # uvicorn timeout_keep_alive: idle after a response
    request_body_timeout_s: float = Field(30.0, gt=0)  # a request body complete within this of its head
    write_timeout_s: float = Field(30.0, gt=0)  # writes blocked (the peer reads nothing) this long: aborted
    close_timeout_s: float = Field(3.0, gt=0)  # a close (WebSocket closing handshake, shutdown, timeouts)
    # not finished within this: aborted, unsent data dropped; also uvicorn's wait for a WebSocket close reply
    ws_ping_interval_s: float = Field(20.0, gt=0)  # uvicorn ws_ping_interval
    ws_ping_timeout_s: float = Field(20.0, gt=0)  # uvicorn ws_ping_timeout: no pong within this -> closed (1011)
    graceful_shutdown_timeout_s: float = Field(10.0, gt=0)  # uvicorn timeout_graceful_shutdown
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # uvicorn h11_max_incomplete_event_size: request head
    # Open connections from one client address (an IPv6 /64 counts as one): past it, that address's oldest
    # connection waiting for a request is closed, or, with all busy, the new one. In all: past it, the oldest one
    # idle for 1 s is closed, or the new one may only ask for /healthz, /readyz and /metrics (others 503), up to
    # probe_reserve_connections more; past those, the oldest waiting at all is closed, or the new one.
    max_connections_per_client: int = Field(64, ge=1)  # a quarter of max_connections (make soak: 32 clients)
    max_connections: int = Field(256, ge=1)
    probe_reserve_connections: int = Field(16, ge=1)
    # frames
    frame_format: Literal["jpeg", "webp"] = "jpeg"
    frame_quality: int = Field(85, ge=1, le=100)
    # Broadcast (studio/broadcast.py): one page's final frames at /broadcast/<key>.mjpeg (MJPEG for OBS, VLC,
    # ffmpeg) and /broadcast/<key>.jpg. The key is those URLs' only credential and gives nothing but the frames;
    # None: a random one at each start (set one for a URL that survives restarts). Streams past
    # max_broadcast_viewers get 503; 0 turns broadcasting off.
    broadcast_key: str | None = Field(None, min_length=16, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")
    max_broadcast_viewers: int = Field(4, ge=0, le=64)
    # Camera/screen input: skip a canvas whose cosine similarity to the last processed one passes this threshold,
    # with a probability rising to 1 (studio/similarity.py); None: every changed canvas is processed.
    similarity_filter: float | None = Field(None, gt=0, lt=1)
    # parameter bounds published in the schema and enforced on every request
    # Sizes left as None follow the model (for_model): the default is its native size (SD1.5 512, SDXL 1024,
    # builtin:shapes 64: a model made at 64 px tiles its shapes over a 512 px image), the bounds 256..768
    # widened to take it in.
    min_size: int | None = Field(None, ge=64)
    max_size: int | None = Field(None, ge=64)
    size_multiple: int = Field(8, ge=8)
    default_width: int | None = Field(None, ge=64)
    default_height: int | None = Field(None, ge=64)
    min_steps: int = Field(1, ge=1)
    max_steps: int = Field(8, ge=1)
    default_steps: int = 4
    max_guidance_scale: float = 20.0
    default_guidance_scale: float | None = None  # None: the model's (full LCM 8.0, LCM-LoRA 1.0)
    max_prompt_chars: int = Field(1000, ge=1)
    min_strength: float = Field(0.05, gt=0, le=1)
    default_strength: float = 0.6
    # control mode (with --controlnet): how strongly the canvas guides the image
    max_controlnet_conditioning_scale: float = Field(2.0, gt=0)
    default_controlnet_conditioning_scale: float = Field(1.0, ge=0)
    # None: on for a CPU (a 4-step SD1.5 frame takes seconds there: the first step's picture comes at a quarter
    # of that), off on a GPU (frames come in milliseconds; previews would only cost decodes)
    default_previews: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> StudioSettings:
        for device in self.devices or []:
            if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
                raise ValueError(f"devices: {device!r} is not a device; list cpu, mps, cuda or cuda:N, e.g. cuda:0,cuda:1")
        if "*" in self.allowed_origins or "null" in self.allowed_origins:
            raise ValueError("allowed_origins: list explicit origins like http://myhost:7860; '*' and 'null' are refused")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("ssl_certfile and ssl_keyfile: give both (a certificate and its private key) or neither")
        if self.min_size is not None and self.max_size is not None and not self.min_size <= self.max_size:
            raise ValueError(f"min_size {self.min_size} is above max_size {self.max_size}")
        low = self.min_size if self.min_size is not None else 64  # the model may widen the bounds to its size
        high = self.max_size if self.max_size is not None else 2048
        for name in ("default_width", "default_height"):
            value = getattr(self, name)
            if value is not None and not (low <= value <= high and value % self.size_multiple == 0):
                raise ValueError(f"{name}={value}: use a multiple of {self.size_multiple} in [{low}, {high}]")
        if not self.min_steps <= self.default_steps <= self.max_steps:
            raise ValueError(f"default_steps={self.default_steps}: use {self.min_steps}..{self.max_steps}")
        if not self.min_strength <= self.default_strength <= 1:
            raise ValueError(f"default_strength={self.default_strength}: use {self.min_strength}..1")
        if self.default_controlnet_conditioning_scale > self.max_controlnet_conditioning_scale:
            raise ValueError(f"default_controlnet_conditioning_scale={self.default_controlnet_conditioning_scale}: "
                             f"use 0..{self.max_controlnet_conditioning_scale}")
        return self

    def for_model(self, native_width: int = 512, native_height: int = 512, device: str = "cpu") -> StudioSettings:
        """These settings with every size (and the previews default) left as None resolved for a model of that
        native size on that device: the default size is the native one, the bounds are 256..768 widened to include
        it (down to 64, the engine's least); previews are on for a CPU.
        On a CPU the default's long side stays at most CPU_DEFAULT_SIDE: SDXL's 1024 would take minutes a frame
        there (past the generation timeout); the bounds still reach the native size.
        Raises ValueError where a size that was set does not fit the resolved bounds."""
        m = self.size_multiple
        width, height = (max(m, round(v / m) * m) for v in (native_width, native_height))
        low = self.min_size if self.min_size is not None else max(64, min(256, width, height))
        high = self.max_size if self.max_size is not None else max(768, width, height)
        first, last = -(-low // m) * m, high // m * m  # the multiples of m inside the bounds
        scale = CPU_DEFAULT_SIDE / max(width, height) if device == "cpu" else 1.0

        def fit(side: int) -> int:
            side = round(side * scale / m) * m if scale < 1 else side
            return min(max(side, first), last)

        resolved = {"min_size": low, "max_size": high,
                    "default_width": self.default_width or fit(width),
                    "default_height": self.default_height or fit(height),
                    "default_previews": self.default_previews if self.default_previews is not None
                    else device == "cpu"}
        return StudioSettings.model_validate(self.model_dump() | resolved)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LCM_LIVE_", env_nested_delimiter="__", extra="ignore")

    engine: EngineSettings = Field(default_factory=EngineSettings)
    studio: StudioSettings = Field(default_factory=StudioSettings)
    # The presets a client may pick by name (studio/models.py); empty: the one model of ``engine``. The first is
    # the default; each changes ``engine`` only where it says.
    models: list[ModelPreset] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        names = [preset.name for preset in self.models]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"models: {', '.join(twice)} named more than once: give each preset its own name")
        return self
