"""The engine: one loaded LCM (full LCM or LCM-LoRA), text-to-image and image-to-image, one callback per step.

This is the interface the CLI, the studio and the benchmarks use::

    engine = Engine.from_settings(settings.engine)
    result = engine.generate(GenerationRequest("a cyberpunk city, neon", seed=1), callback=on_step)

Seeds are portable: noise always comes from ``torch.Generator("cpu").manual_seed(seed)``, as diffusers' docs
recommend, so a seed gives the same image here and in any other diffusers tool (bit-exact at CPU float32).
One generation runs at a time per engine (a lock); the studio calls it from one worker thread.
``engine.generate_batch(requests, callbacks)`` runs requests that share a batch key (size, steps, guidance, ...)
as one pipeline call, each with its own prompt, seed and image (stream batching: engine/batching.py).
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from lcm_live import __version__
from lcm_live.config import EngineSettings
from lcm_live.engine.batching import Prepared, StepHook, concat_embeddings, run_batch
from lcm_live.engine.decoders import (
    LatentPreview,
    set_tiling,
    swap_in_decoder,
    wants_tiling,
)
from lcm_live.engine.hooks import DenoisedRecorder, StepCallback, StepEvent, stop_check
from lcm_live.engine.interrupt import install_block_checks
from lcm_live.engine.model import LoadedModel
from lcm_live.engine.postprocess import to_pil
from lcm_live.engine.prompts import PromptCache
from lcm_live.engine.request import GenerationRequest, GenerationResult
from lcm_live.engine.validation import (
    DEFAULT_GUIDANCE,
    check_control,
    check_lcm_img2img_schedule,
    prepare_init_image,
    resolve_guidance,
    resolve_size,
    validate_request,
)
from lcm_live.errors import UserError

# The image-to-image twin of each text-to-image pipeline, sharing its components (diffusers' from_pipe).
IMG2IMG_TWIN = {
    "LatentConsistencyModelPipeline": "LatentConsistencyModelImg2ImgPipeline",
    "StableDiffusionPipeline": "StableDiffusionImg2ImgPipeline",
    "StableDiffusionXLPipeline": "StableDiffusionXLImg2ImgPipeline",
}


@dataclass
class EngineInfo:
    model: str
    kind: str  # "lcm" (full LCM, w-embedding) or "lcm-lora"
    arch: str  # "sd15" or "sdxl"
    device: str
    dtype: str
    native_width: int
    native_height: int
    default_guidance_scale: float
    decoder: str  # "vae" or "taesd"
    notice: str | None = None
    loras: list[dict[str, Any]] = field(default_factory=list)  # [{"source": ..., "scale": ...}]
    speedups: list[str] = field(default_factory=list)  # what engine/speedups.py applied (channels_last, ...)
    scheduler: str = "LCMScheduler"
    controlnet: str | None = None  # --controlnet, as given: "control" generations take a control_image
    version: str = __version__

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Engine:
    """A loaded model, ready to generate. Build with :meth:`from_settings` (loads the model), or directly from a
    :class:`LoadedModel` already on ``device`` in ``dtype`` (tests, tools)."""

    def __init__(self, loaded: LoadedModel, settings: EngineSettings | None = None, device: Any = None,
                 dtype: Any = None, *, speedups: list[str] | None = None):
        self.loaded = loaded
        self.settings = settings or EngineSettings(model=loaded.name)
        self.pipe = loaded.pipe
        from lcm_live.engine.scheduler import diffusers_class_name, use_host_scheduler

        use_host_scheduler(self.pipe)  # LCMScheduler's function, without waiting for the device at each step
        self.device = device if device is not None else self.pipe.device
        self.dtype = dtype if dtype is not None else self.pipe.unet.dtype
        self.pipe.set_progress_bar_config(disable=True)  # progress goes through the step callback
        # taesd or auto (from_settings resolves them before the speed-ups; built directly, here).
        self.settings, _ = swap_in_decoder(self.settings, self.pipe, loaded.arch, device=self.device, dtype=self.dtype)
        self._taesd = self.pipe.vae if self.settings.decoder == "taesd" else None
        self.prompts = PromptCache(self.settings.prompt_cache_size)
        self._img2img = None
        self._control = None  # the ControlNet twin pipeline, built on first use
        self._preview = LatentPreview(self.pipe.vae, taesd=self._taesd, scale_factor=self.pipe.vae_scale_factor)
        self._lock = threading.Lock()  # one generation at a time
        self._preview_lock = threading.Lock()
        if loaded.controlnet is not None and type(self.pipe.unet).__name__ == "OpenVINOUNet":
            from lcm_live.engine.openvino_controlnet import run_in_openvino

            run_in_openvino(loaded.controlnet, self.pipe.unet)  # the ControlNet beside the OpenVINO UNet
            speedups = [*(speedups or []), "openvino:controlnet"]
        if not hasattr(self.pipe.unet, "_orig_mod"):  # not torch.compile'd (engine/interrupt.py)
            install_block_checks(self.pipe.unet)  # should_stop is read between the UNet's blocks too
        self.info = EngineInfo(
            model=loaded.name, kind=loaded.kind, arch=loaded.arch, device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."), native_width=loaded.native_width,
            native_height=loaded.native_height, default_guidance_scale=DEFAULT_GUIDANCE[loaded.kind],
            decoder=self.settings.decoder, notice=loaded.notice,
            loras=[{"source": s, "scale": float(w)} for s, w in loaded.loras], speedups=list(speedups or []),
            scheduler=diffusers_class_name(self.pipe.scheduler), controlnet=loaded.controlnet_name,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_settings(cls, settings: EngineSettings, *, progress: bool = True) -> Engine:
        """Resolve device and dtype, load the model (engine/loading.py), apply speed-ups, build the engine."""
        from lcm_live.engine.devices import resolve_device, resolve_dtype, try_xformers
        from lcm_live.engine.loading import load_model

        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device).dtype
        speedups = _speedups_module()
        if speedups is not None and hasattr(speedups, "check_speedups"):
            speedups.check_speedups(settings, device, dtype)  # refuse impossible flags before a long load
        loaded = load_model(settings, device=device, dtype=dtype, progress=progress)
        applied = []
        # The decoder is swapped in before the speed-ups, so that they (channels_last, ...) apply to the one in use.
        asked = settings.decoder
        settings, decoder = swap_in_decoder(settings, loaded.pipe, loaded.arch, device=device, dtype=dtype)
        if asked == "auto":
            applied.append(f"decoder:{decoder}")
        if device.type == "cuda":
            applied += try_xformers(loaded.pipe)
        if speedups is not None:
            applied += list(speedups.apply_speedups(loaded.pipe, settings, device, dtype) or [])
        return cls(loaded, settings, device, dtype, speedups=applied)

    # ------------------------------------------------------------------ generation
    @property
    def compiled(self) -> bool:
        """Whether the UNet is torch.compile'd (its first call at each shape compiles)."""
        return any(name.startswith("torch.compile") for name in self.info.speedups)

    @property
    def lcm_img2img(self) -> bool:
        """Whether image-to-image runs LCM's own pipeline: every step runs, whatever the strength."""
        return IMG2IMG_TWIN.get(type(self.pipe).__name__) == "LatentConsistencyModelImg2ImgPipeline"

    def _img2img_pipe(self) -> Any:
        if self._img2img is None:
            import diffusers

            name = IMG2IMG_TWIN.get(type(self.pipe).__name__)
            if name is None:
                raise UserError(f"image-to-image is not supported for {type(self.pipe).__name__}", field="image")
            # unet and vae passed explicitly: from_pipe drops components whose class it does not expect, such as
            # a swapped-in AutoencoderTiny (TAESD) or the OpenVINO UNet wrapper from engine/speedups.py. dtype
            # too: without it from_pipe casts every component (shared with self.pipe) to float32.
            self._img2img = getattr(diffusers, name).from_pipe(self.pipe, unet=self.pipe.unet, vae=self.pipe.vae,
                                                               dtype=self.dtype)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def _pipe_for(self, prep: Prepared) -> Any:
        """The pipeline a request runs on: image-to-image's, ControlNet's (both built on first use) or the base."""
        if prep.img2img:
            return self._img2img_pipe()
        if prep.request.control_image is None:
            return self.pipe
        if self._control is None:
            from lcm_live.engine.controlnet import control_pipeline

            self._control = control_pipeline(self.pipe, self.loaded.controlnet, self.loaded.arch, self.dtype)
        return self._control

    def generate(self, request: GenerationRequest, callback: StepCallback | None = None, *,
                 should_stop: Callable[[], str | None] | None = None) -> GenerationResult:
        """Text-to-image, or image-to-image when ``request.image`` is set. ``callback`` gets a StepEvent after
        every denoising step; if it raises :class:`Cancelled` the run stops before the next UNet call and
        ``Cancelled`` propagates to the caller. ``should_stop()`` (a reason, or None) is also read inside each UNet
        evaluation (engine/interrupt.py): a reason stops the run there with ``Cancelled(reason)``. Bad values
        raise UserError (with ``field``)."""
        prep = self._prepare(request)

        def on_step(step: int, total: int, timestep: int, latents: Any) -> None:
            if callback is not None:
                callback(StepEvent(step=step, total=total, timestep=timestep, latents=latents))

        with stop_check(should_stop):
            images, warnings, timings = self._call([prep], on_step)
        return GenerationResult(images=list(images), parameters=self._parameters(prep, warnings[0]), timings=timings)

    def generate_batch(self, requests: list[GenerationRequest],
                       callbacks: list[StepCallback | None] | None = None) -> list[GenerationResult]:
        """Several requests, those with equal batch keys in ONE pipeline call (engine/batching.py): one result
        per request, in order, each with its own seed, parameters and image (equal to what ``generate`` gives
        alone, up to float rounding). ``callbacks[i]`` gets request i's StepEvents (latents of shape (1, C, h, w));
        a member whose callback raises drops out, the call stops when all have. Nothing raises per member: a
        result's ``error`` holds its UserError, Cancelled or engine exception (and ``images`` is empty)."""
        return run_batch(self, requests, callbacks)

    def _prepare(self, request: GenerationRequest) -> Prepared:
        """Validate ``request`` and resolve guidance, CFG, size, seed and negative prompt."""
        validate_request(request, lcm_img2img=self.lcm_img2img)
        check_control(request, self.info.controlnet)
        guidance_scale, do_cfg = resolve_guidance(request, self.loaded.kind)
        width, height = resolve_size(request, self.loaded.native_width, self.loaded.native_height)
        seed = request.seed if request.seed is not None else secrets.randbits(32)
        negative = (request.negative_prompt or None) if do_cfg else None
        return Prepared(request, guidance_scale, do_cfg, width, height, seed, negative)

    def _call(self, preps: list[Prepared], on_step: StepHook) -> tuple[Any, list[list[str]], dict[str, float]]:
        """ONE pipeline call for requests with equal resolved keys (one request: exactly the plain call). Returns
        the output images, each member's prompt warnings and the timings; ``on_step(step, total, timestep, x0)``
        sees the whole batch's x0 after each step and stops the call by raising."""
        import torch

        first = preps[0]
        request = first.request
        with self._lock:
            t0 = time.perf_counter()
            pipe = self._pipe_for(first)
            if first.img2img:
                check_lcm_img2img_schedule(pipe, request)
            # 1. Prompt embeddings: from the cache, or one text-encoder pass per new prompt.
            embeds = [self.prompts.get(self.pipe, p.request.prompt, p.negative, do_cfg=first.do_cfg)[0] for p in preps]
            t_text = time.perf_counter()

            # 2. Decoder: tiled for large images (or when forced).
            set_tiling(pipe.vae, wants_tiling(self.settings.tiled_vae, first.width, first.height))

            # 3. The per-step hook: the step's x0 prediction as preview latents, cancellation by exception.
            use_tensor_input = "denoised" in getattr(pipe, "_callback_tensor_inputs", [])
            recorder = contextlib.nullcontext() if use_tensor_input else DenoisedRecorder(pipe.scheduler)
            marks = {"last_step": None}

            def on_step_end(p, i, t, tensors):
                marks["last_step"] = time.perf_counter()
                x0 = tensors.get("denoised") if use_tensor_input else recorder.last
                timestep = getattr(p.scheduler, "last_timestep", None)  # int(t) would wait for the device
                on_step(i + 1, int(p.num_timesteps), int(t) if timestep is None else timestep,
                        tensors["latents"] if x0 is None else x0)
                return {}

            # One generator per request: member i's noise comes from generator[i], as it would alone.
            generators = [torch.Generator("cpu").manual_seed(p.seed) for p in preps]
            kwargs: dict[str, Any] = concat_embeddings([e.kwargs for e in embeds])
            kwargs.update(
                num_inference_steps=request.num_inference_steps, guidance_scale=first.guidance_scale,
                num_images_per_prompt=request.num_images_per_prompt,
                generator=generators[0] if len(preps) == 1 else generators,
                output_type="pt" if request.output_type == "pil" else request.output_type,  # see postprocess
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents", "denoised"] if use_tensor_input else ["latents"],
            )
            if first.img2img:
                images = [prepare_init_image(p.request.image, p.width, p.height) for p in preps]
                kwargs.update(image=images[0] if len(preps) == 1 else images, strength=request.strength)
            else:
                from lcm_live.engine.scheduler import initial_latents

                batch = len(preps) * request.num_images_per_prompt
                kwargs.update(width=first.width, height=first.height,
                              latents=initial_latents(pipe, batch, first.width, first.height, kwargs["generator"],
                                                      self.device, self.dtype))
                if request.control_image is not None:
                    controls = [prepare_init_image(p.request.control_image, p.width, p.height) for p in preps]
                    kwargs.update(image=controls[0] if len(preps) == 1 else controls,
                                  controlnet_conditioning_scale=float(request.controlnet_conditioning_scale))

            # 4. Denoise and decode.
            with recorder:  # a Cancelled raised by the hook propagates from here
                output = pipe(**kwargs)
            images = to_pil(output.images) if request.output_type == "pil" else output.images
            t_end = time.perf_counter()

        last = marks["last_step"] or t_end
        timings = {
            "text_encoder": t_text - t0,  # ~0 on a prompt-cache hit
            "unet": last - t_text,  # the denoising loop (img2img: includes encoding the init image)
            "decode": t_end - last,
            "total": t_end - t0,
        }
        return images, [list(e.warnings) for e in embeds], timings

    def _parameters(self, prep: Prepared, warnings: list[str]) -> dict[str, Any]:
        """Every resolved parameter of one request (what the image's metadata records)."""
        request = prep.request
        parameters = {
            "prompt": request.prompt,
            "negative_prompt": prep.negative,
            "model": self.loaded.name,
            "kind": self.loaded.kind,
            "arch": self.loaded.arch,
            "loras": [dict(x) for x in self.info.loras],
            "num_inference_steps": request.num_inference_steps,
            "guidance_scale": prep.guidance_scale,
            "seed": prep.seed,
            "width": prep.width,
            "height": prep.height,
            "num_images_per_prompt": request.num_images_per_prompt,
            "mode": "img2img" if prep.img2img else "control" if request.control_image is not None else "txt2img",
            "device": self.info.device,
            "dtype": self.info.dtype,
            "decoder": self.info.decoder,
            "scheduler": self.info.scheduler,
            "lcm_live_version": __version__,
            "warnings": list(warnings),
        }
        if prep.img2img:
            parameters["strength"] = request.strength
        if request.control_image is not None:
            parameters.update(controlnet=self.info.controlnet,
                              controlnet_conditioning_scale=float(request.controlnet_conditioning_scale))
        return parameters

    # ------------------------------------------------------------------ previews and warm-up
    def decode_preview(self, latents: Any, index: int = 0) -> Any:
        """A cheap PIL preview of step latents (StepEvent.latents): TAESD when loaded, else a linear map.

        Safe to call from inside a step callback (it does not take the generation lock) or from another thread.
        """
        with self._preview_lock:  # only guards the one-time calibration
            return self._preview(latents, index)

    def warmup(self, width: int | None = None, height: int | None = None, num_inference_steps: int = 4,
               max_batch_size: int = 1) -> dict:
        """One throw-away generation at this size (first-call kernel selection, allocator growth), and the
        preview's one-time calibration (without TAESD); the generation's timings. With a compiled UNet
        (``--compile``) also one batch of each size 2..``max_batch_size``: each new batch size recompiles it (and
        records its CUDA graph), which would otherwise stall the first frames that arrive together."""
        with self._preview_lock:
            self._preview.calibrate_once()
        result = self.generate(GenerationRequest(prompt="warm-up", num_inference_steps=num_inference_steps,
                                                 width=width, height=height, seed=0))
        if self.loaded.controlnet is not None:
            # Lines mode's first frame: the ControlNet, and on OpenVINO the UNet's IR with residual inputs
            # (minutes to convert), here rather than mid-session.
            from PIL import Image

            self.generate(GenerationRequest(prompt="warm-up", num_inference_steps=num_inference_steps, width=width,
                                            height=height, seed=0, control_image=Image.new("RGB", (64, 64))))
        if self.compiled:
            for n in range(2, max_batch_size + 1):
                batch = self.generate_batch([GenerationRequest(prompt="warm-up", seed=i, width=width, height=height,
                                                               num_inference_steps=num_inference_steps)
                                             for i in range(n)])
                if batch[0].error is not None:  # generate_batch reports per member; a warm-up fails loudly
                    raise batch[0].error
        if self.calibrate(width, height):  # 4 steps whatever the warm-up's: timesteps from 999 down to 259
            result = self.generate(GenerationRequest(prompt="warm-up", num_inference_steps=num_inference_steps,
                                                     width=width, height=height, seed=0))  # the int8 UNet's first
        return result.timings

    def calibrate(self, width: int | None = None, height: int | None = None, num_inference_steps: int = 4,
                  max_generations: int = 64) -> int:
        """Generations over varied prompts while the UNet backend records calibration inputs (``--quantize
        int8`` on OpenVINO: it quantizes once it has enough, see engine/openvino_int8.py); how many ran (0 when
        nothing calibrates). Call after a first generation at this size (which compiles the shape)."""
        if not getattr(self.pipe.unet, "calibrating", False):
            return 0
        from lcm_live.engine.openvino_int8 import CALIBRATION_PROMPTS

        runs = 0
        unet = self.pipe.unet
        while unet.recording:
            if runs == max_generations:
                raise RuntimeError(f"int8 calibration still recording after {runs} generations")
            self.generate(GenerationRequest(prompt=CALIBRATION_PROMPTS[runs % len(CALIBRATION_PROMPTS)],
                                            num_inference_steps=num_inference_steps, width=width, height=height,
                                            seed=runs + 1))
            runs += 1
        unet.wait_quantized()
        return runs


def _speedups_module() -> Any:
    """engine/speedups.py (channels_last, torch.compile, OpenVINO, quantization), or None where it is absent."""
    try:
        from lcm_live.engine import speedups
    except ModuleNotFoundError as exc:
        if exc.name != "lcm_live.engine.speedups":
            raise
        return None
    return speedups
