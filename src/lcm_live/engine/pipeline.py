"""The engine: one loaded LCM (full LCM or LCM-LoRA), text-to-image and image-to-image, one callback per step.

This is the interface the CLI, the studio and the benchmarks use::

    engine = Engine.from_settings(settings.engine)
    result = engine.generate(GenerationRequest("a cyberpunk city, neon", seed=1), callback=on_step)

Seeds are portable: noise always comes from ``torch.Generator("cpu").manual_seed(seed)``, as diffusers' docs
recommend, so a seed gives the same image here and in any other diffusers tool (bit-exact at CPU float32).
One generation runs at a time per engine (a lock); the studio calls it from one worker thread.
``engine.generate_batch(requests, callbacks)`` runs requests that share a batch key (size, steps, guidance, ...)
as one call, each with its own prompt, seed and image (stream batching: engine/batching.py).

The engine runs its own denoising loop (engine/generation.py, engine/sampling.py) on the loaded pipeline's
components (UNet, ControlNet, VAE or TAESD, text encoders, the LCMScheduler's schedule); what a request may
compose (init image, control image, mask, region prompts, blends) is declared in engine/modes.py. At ``--device cpu
--dtype float32`` its images equal diffusers' own pipelines' (tests/engine/test_pipeline*.py, test_controlnet.py).
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Callable
from typing import Any

from lcm_live import __version__
from lcm_live.config import EngineSettings
from lcm_live.engine import modes
from lcm_live.engine.batching import Prepared, StepHook, run_batch
from lcm_live.engine.controlnet import controlnet_nets
from lcm_live.engine.decoders import LatentPreview, set_tiling, swap_in_decoder, wants_tiling
from lcm_live.engine.families import step_note
from lcm_live.engine.hooks import StepCallback, StepEvent, stop_check
from lcm_live.engine.interrupt import install_block_checks
from lcm_live.engine.masks import mask_window, prepare_mask, region_weights
from lcm_live.engine.model import LoadedModel
from lcm_live.engine.prompts import PromptCache
from lcm_live.engine.protocol import EngineInfo
from lcm_live.engine.request import GenerationRequest, GenerationResult
from lcm_live.engine.validation import (
    check_lcm_img2img_schedule,
    prepare_init_image,
    resolve_guidance,
    resolve_size,
    validate_request,
)
from lcm_live.errors import UserError


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
        from lcm_live.engine.families import default_family

        # The family's sampler and defaults (engine/families.py); eta: TCD's gamma, --eta or the family's.
        self.family = loaded.family or default_family(loaded.kind)
        self.sampler = self.family.scheduler
        eta = getattr(self.settings, "eta", None)
        self.eta = eta if eta is not None else self.family.eta
        self.device = device if device is not None else self.pipe.device
        self.dtype = dtype if dtype is not None else self.pipe.unet.dtype
        self.pipe.set_progress_bar_config(disable=True)  # progress goes through the step callback
        # taesd or auto (from_settings resolves them before the speed-ups; built directly, here).
        self.settings, _ = swap_in_decoder(self.settings, self.pipe, loaded.arch, device=self.device, dtype=self.dtype)
        self._taesd = self.pipe.vae if self.settings.decoder == "taesd" else None
        self.prompts = PromptCache(self.settings.prompt_cache_size)
        from lcm_live.engine.init_latents import InitLatents

        self.init_latents = InitLatents()  # img2img: the picture's encoding, by pixels (engine/init_latents.py)
        from diffusers.image_processor import VaeImageProcessor

        # Control images as diffusers' ControlNet pipelines take them: RGB in [0, 1], not normalised.
        self.control_processor = VaeImageProcessor(vae_scale_factor=self.pipe.vae_scale_factor,
                                                   do_convert_rgb=True, do_normalize=False)
        self._preview = LatentPreview(self.pipe.vae, taesd=self._taesd, scale_factor=self.pipe.vae_scale_factor)
        self._lock = threading.Lock()  # one generation at a time
        self._preview_lock = threading.Lock()
        self.controlnets = controlnet_nets(loaded.controlnet)  # in load order: the per-net params' order
        if self.controlnets and type(self.pipe.unet).__name__ == "OpenVINOUNet":
            from lcm_live.engine.openvino_controlnet import run_in_openvino

            for net in self.controlnets:  # each net its own IR beside the OpenVINO UNet (residuals summed after)
                run_in_openvino(net, self.pipe.unet)
            speedups = [*(speedups or []), "openvino:controlnet" + (f"x{len(self.controlnets)}"
                                                                     if len(self.controlnets) > 1 else "")]
        self.ip_embeddings = None  # the reference images' embeddings, cached by pixels (engine/ip_adapter.py)
        if loaded.ip_adapter_name is not None:
            from lcm_live.engine.ip_adapter import ImageEmbeddings

            self.ip_embeddings = ImageEmbeddings(self.pipe, self.device)
        if not hasattr(self.pipe.unet, "_orig_mod"):  # not torch.compile'd (engine/interrupt.py)
            install_block_checks(self.pipe.unet)  # should_stop is read between the UNet's blocks too
        self.info = EngineInfo(
            model=loaded.name, kind=loaded.kind, arch=loaded.arch, device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."), native_width=loaded.native_width,
            native_height=loaded.native_height, default_guidance_scale=self.family.guidance_scale,
            decoder=self.settings.decoder, notice=loaded.notice,
            loras=[{"source": s, "scale": float(w)} for s, w in loaded.loras], speedups=list(speedups or []),
            scheduler=diffusers_class_name(self.pipe.scheduler), controlnet=loaded.controlnet_name,
            controlnets=list(loaded.controlnet_names or ([loaded.controlnet_name] if self.controlnets else [])),
            ip_adapter=loaded.ip_adapter_name,
            family=self.family.name, default_num_inference_steps=self.family.num_inference_steps,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_settings(cls, settings: EngineSettings, *, progress: bool = True) -> Engine:
        """Resolve device and dtype, load the model (engine/loading.py), apply speed-ups, build the engine."""
        from lcm_live.engine.devices import resolve_device, resolve_dtype, try_xformers
        from lcm_live.engine.loading import load_model

        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device).dtype
        settings = _torch_for_ip_adapter(settings)
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
    def caps(self) -> modes.ModelCaps:
        """What the loaded model offers requests (engine/modes.py)."""
        return modes.ModelCaps(controlnet=self.info.controlnet, controlnets=len(self.controlnets),
                               ip_adapter=self.info.ip_adapter, lcm_img2img=self.lcm_img2img)

    @property
    def compiled(self) -> bool:
        """Whether the UNet is torch.compile'd (its first call at each shape compiles)."""
        return any(name.startswith("torch.compile") for name in self.info.speedups)

    @property
    def static_shapes(self) -> bool:
        """Whether the UNet is compiled per input shape (OpenVINO IR, torch.compile): a new shape costs seconds to
        minutes, so the engine avoids making new ones (no mask windows)."""
        return self.compiled or type(self.pipe.unet).__name__ == "OpenVINOUNet"

    @property
    def lcm_img2img(self) -> bool:
        """Whether image-to-image runs as LCM's own pipeline (LatentConsistencyModelImg2ImgPipeline): every step
        runs, on the schedule shortened by the strength; else as SD's (``steps * strength`` steps run)."""
        return type(self.pipe).__name__ == "LatentConsistencyModelPipeline"

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
        """Several requests, those with equal batch keys in ONE call (engine/batching.py): one result
        per request, in order, each with its own seed, parameters and image (equal to what ``generate`` gives
        alone, up to float rounding). ``callbacks[i]`` gets request i's StepEvents (latents of shape (1, C, h, w));
        a member whose callback raises drops out, the call stops when all have. Nothing raises per member: a
        result's ``error`` holds its UserError, Cancelled or engine exception (and ``images`` is empty)."""
        return run_batch(self, requests, callbacks)

    def _prepare(self, request: GenerationRequest) -> Prepared:
        """Validate ``request``; resolve guidance, CFG, size, seed and negative prompt; fit its images and masks."""
        if request.num_inference_steps is None:  # the family's default (engine/families.py)
            request = dataclasses.replace(request, num_inference_steps=self.family.num_inference_steps)
        validate_request(request, lcm_img2img=self.lcm_img2img)
        modes.check(request, self.caps)  # the ControlNets' and the IP-Adapter's checks (engine/modes.py)
        if request.guidance_scale is None:
            request = dataclasses.replace(request, guidance_scale=self.family.guidance_scale)
        guidance_scale, do_cfg = resolve_guidance(request, self.loaded.kind)
        width, height = resolve_size(request, self.loaded.native_width, self.loaded.native_height)
        seed = request.seed if request.seed is not None else secrets.randbits(32)
        negative = (request.negative_prompt or None) if do_cfg else None
        prep = Prepared(request, guidance_scale, do_cfg, width, height, seed, negative)
        steps_note = step_note(self.family, request.num_inference_steps)
        prep.notes += [steps_note] if steps_note else []
        if request.image is not None:
            if self.lcm_img2img:
                check_lcm_img2img_schedule(self.pipe.scheduler, request)
            prep.init_image = prepare_init_image(request.image, width, height)
        if request.control_image is not None:  # one per net (None: that net sits out)
            prep.control_image = [None if image is None else prepare_init_image(image, width, height)
                                  for image in modes.per_net(request.control_image, len(self.controlnets))]
        if request.mask_image is not None:
            prep.mask, note = prepare_mask(request.mask_image, width, height, request.mask_feather)
            prep.notes += [note] if note else []
            # The mask's window (engine/masks.py): not for 9-channel UNets (they see the whole picture), nor
            # where the UNet compiles per shape (OpenVINO, torch.compile: each new window would cost a conversion)
            if self.pipe.unet.config.in_channels == 4 and not request.regions and not self.static_shapes:
                side = min(self.loaded.native_width, self.loaded.native_height) // 2
                prep.mask_box = mask_window(prep.mask, self.pipe.vae_scale_factor, side)
        if request.regions:
            prep.region_weights, notes = region_weights([r.mask_image for r in request.regions], width, height,
                                                        self.pipe.vae_scale_factor)
            prep.notes += notes
        return prep

    def _call(self, preps: list[Prepared], on_step: StepHook) -> tuple[Any, list[list[str]], dict[str, float]]:
        """ONE denoising loop for requests with equal resolved keys (engine/generation.py). Returns the output
        images, each member's warnings and the timings; ``on_step(step, total, timestep, x0)`` sees the whole
        batch's x0 after each step and stops the call by raising."""
        from lcm_live.engine.generation import run_call

        first = preps[0]
        with self._lock:
            # Decoder: tiled for large images (or when forced).
            set_tiling(self.pipe.vae, wants_tiling(self.settings.tiled_vae, first.width, first.height))
            return run_call(self, preps, on_step)

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
            "mode": prep.mode,
            "device": self.info.device,
            "dtype": self.info.dtype,
            "decoder": self.info.decoder,
            "scheduler": self.info.scheduler,
            "family": self.family.name,
            "lcm_live_version": __version__,
            "warnings": list(warnings),
        }
        if prep.img2img:
            parameters["strength"] = request.strength
        if request.control_image is not None:
            n = len(self.controlnets)
            if n == 1:
                parameters.update(controlnet=self.info.controlnet,
                                  controlnet_conditioning_scale=float(request.controlnet_conditioning_scale))
            else:
                parameters.update(controlnet=list(self.info.controlnets),
                                  controlnet_conditioning_scale=[float(x) for x in modes.per_net(
                                      request.controlnet_conditioning_scale, n)])
            for name in ("control_guidance_start", "control_guidance_end"):
                value = getattr(request, name)
                if value != (0.0 if name.endswith("start") else 1.0):
                    parameters[name] = ([float(x) for x in value] if isinstance(value, (list, tuple))
                                        else float(value))
        if request.ip_adapter_image is not None:
            parameters.update(ip_adapter=self.info.ip_adapter, ip_adapter_scale=float(request.ip_adapter_scale))
        if request.mask_image is not None:
            parameters["mask_feather"] = request.mask_feather
        if request.regions:
            parameters["regions"] = [{"prompt": r.prompt} for r in request.regions]
        if request.prompt_blend is not None:
            parameters["prompt_blend"] = {"prompt": request.prompt_blend.prompt,
                                          "weight": float(request.prompt_blend.weight)}
        if request.seed_blend is not None:
            parameters["seed_blend"] = {"seed": request.seed_blend.seed, "weight": float(request.seed_blend.weight)}
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
        self._warm_encoder(width, height)
        if self.controlnets or self.ip_embeddings is not None:
            # Lines mode's first frame: the ControlNets, and on OpenVINO the UNet's IR with residual inputs
            # (minutes to convert), here rather than mid-session; the IP-Adapter's image encoder's first call.
            from PIL import Image

            blank = Image.new("RGB", (64, 64))
            control = None
            if self.controlnets:
                control = [blank] * len(self.controlnets) if len(self.controlnets) > 1 else blank
            self.generate(GenerationRequest(prompt="warm-up", num_inference_steps=num_inference_steps, width=width,
                                            height=height, seed=0, control_image=control,
                                            ip_adapter_image=blank if self.ip_embeddings is not None else None))
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

    def _warm_encoder(self, width: int | None, height: int | None) -> None:
        """Sketch mode's first frame encodes the canvas: the encoder's first call at this size (on OpenVINO its
        conversion and compile, seconds on a CPU) happens here rather than in a session's first sketch frame."""
        import torch

        width, height = resolve_size(GenerationRequest(prompt="", width=width, height=height),
                                     self.loaded.native_width, self.loaded.native_height)
        with torch.inference_mode():
            self.pipe.vae.encode(torch.zeros(1, 3, height, width, device=self.device, dtype=self.dtype))

    def calibrate(self, width: int | None = None, height: int | None = None, num_inference_steps: int = 4,
                  max_generations: int = 64) -> int:
        """int8 calibration generations (engine/calibration.py); how many ran (0 when nothing calibrates)."""
        from lcm_live.engine.calibration import calibrate

        return calibrate(self, width, height, num_inference_steps, max_generations)


def _torch_for_ip_adapter(settings: EngineSettings) -> EngineSettings:
    """An IP-Adapter changes the UNet's attention (torch processors with image inputs), which the OpenVINO UNet's IR
    does not carry: ``--backend auto`` becomes torch with it, an explicit ``--backend openvino`` is refused."""
    if not settings.ip_adapter or settings.backend == "torch":
        return settings
    if settings.backend == "openvino":
        raise UserError("--ip-adapter runs on the torch backend (the OpenVINO UNet's IR has no image inputs): drop "
                        "--backend openvino (auto picks torch with an IP-Adapter) or drop --ip-adapter",
                        field="backend")
    return settings.model_copy(update={"backend": "torch"})


def _speedups_module() -> Any:
    """engine/speedups.py (channels_last, torch.compile, OpenVINO, quantization), or None where it is absent."""
    try:
        from lcm_live.engine import speedups
    except ModuleNotFoundError as exc:
        if exc.name != "lcm_live.engine.speedups":
            raise
        return None
    return speedups
