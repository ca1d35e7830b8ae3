"""`lcm-live generate PROMPT`: one LCM image (or a few) in 1 to 8 steps, saved as PNG with its parameters.

The conditionings' flags (``--image``, ``--control-image``, ``--mask``, ``--region MASK PROMPT``, ``--prompt-blend
PROMPT WEIGHT``, ``--seed-blend SEED WEIGHT``, ``--ip-adapter-image``, ...) come from the engine's registry
(engine/modes.py). The per-ControlNet ones (``--control-image``, ``--controlnet-conditioning-scale``,
``--control-guidance-start/end``) repeat, one per ``--controlnet`` in the same order (a number given once is for
all nets).

Everything the user can get wrong is checked before the model loads (bad values, unreadable init image, a bad
``--output``), and nothing is written until the image exists, so a failed run leaves no file behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from lcm_live.cli.common import add_engine_arguments, engine_settings_from_args
from lcm_live.errors import UserError, first_line


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="make an image from a prompt (text-to-image; image-to-image with --image; inpainting with "
                         "--image and --mask; region prompts with --region)",
        description="Generate images with a Latent Consistency Model in 1 to 8 steps. Prints where each image went.",
    )
    parser.add_argument("prompt", help="what to draw")
    g = parser.add_argument_group("generation (diffusers' names)")
    g.add_argument("--num-inference-steps", type=int, default=None, metavar="N",
                   help="1 to 8 (default: the model family's: 4 for LCMs, LCM-LoRA and TCD, 1 for SD-Turbo, "
                        "SDXL-Turbo and SDXS; README: the families' table)")
    g.add_argument("--guidance-scale", type=float, default=None, metavar="G",
                   help="default by model: full LCM 8.0 (w-embedding), LCM-LoRA 1.0 (no CFG)")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT",
                   help="only with classifier-free guidance: LCM-LoRA models with --guidance-scale above 1")
    g.add_argument("--seed", type=int, default=None, metavar="SEED", help="default: random (printed, and stored in the image)")
    g.add_argument("--width", type=int, default=None, metavar="W",
                   help="multiple of 8, 64 to 2048 (default: the model's size; with --image, the image's)")
    g.add_argument("--height", type=int, default=None, metavar="H",
                   help="multiple of 8, 64 to 2048 (default: the model's size; with --image, the image's)")
    g.add_argument("--num-images", type=int, default=1, metavar="N", help="images from this prompt (default: %(default)s)")
    add_conditioning_arguments(parser)
    g = parser.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="PATH",
                   help="a .png file (several images: PATH-1.png, ...); default: a new name under outputs/")
    g.add_argument("--metadata", default="none", choices=["none", "json"],
                   help="json: also write a .json sidecar next to each image (PNG text chunks are always written)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_arguments(parser)
    parser.set_defaults(run=run)


# How each kind of registry parameter (engine/modes.py) reads from the command line.
_ARG_KINDS: dict[str, dict] = {
    "image": {"metavar": "PATH"},
    "number": {"type": float, "metavar": "X"},
    "integer": {"type": int, "metavar": "N"},
    "regions": {"nargs": 2, "action": "append", "metavar": ("MASK", "PROMPT")},
    "prompt_blend": {"nargs": 2, "metavar": ("PROMPT", "WEIGHT")},
    "seed_blend": {"nargs": 2, "metavar": ("SEED", "WEIGHT")},
}


def add_conditioning_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per parameter of each conditioning in the registry (engine/modes.py), its help from there."""
    from lcm_live.engine import modes

    for conditioning in modes.CONDITIONINGS:
        g = parser.add_argument_group(conditioning.name.replace("_", " "))
        for param in conditioning.params:
            kind = _ARG_KINDS[param.type if param.type in ("image", "number", "integer") else param.name]
            default = param.default if param.type in ("number", "integer") else None
            shown = f" (default: {default})" if default is not None else ""
            if param.per_controlnet:  # repeatable: one per --controlnet, in order
                kind, shown = {**kind, "action": "append"}, shown + "; repeatable, one per --controlnet"
                default = None
            g.add_argument(param.flag, dest=param.name, default=default, help=param.description + shown, **kind)


def read_init_image(path: str, flag: str = "--image", field: str = "image"):
    """The init image (or another image flag's), fully decoded now (a truncated or bogus file fails here, not
    mid-generation)."""
    from PIL import Image, UnidentifiedImageError

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{flag} {path!r}: no such file", field=field)
    try:
        with Image.open(file) as image:
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        reason = first_line(exc)
        raise UserError(f"{flag} {path!r}: cannot read it as an image ({reason}); give a PNG, JPEG or WebP file",
                        field=field) from None


def _quiet_libraries() -> None:
    """Library chatter (torchvision hints, dtype-cast notes, diffusers' own truncation message) is not for the
    user of one command: keep their errors, and print our own warnings once, prefixed."""
    import logging
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("lcm_live.engine.prompts").setLevel(logging.ERROR)  # printed below as "warning: ..."


def run(args: argparse.Namespace) -> int:
    from lcm_live.engine.metadata import check_output_path, save_images
    from lcm_live.engine.request import GenerationRequest, PromptBlend, Region, SeedBlend
    from lcm_live.engine.validation import validate_request

    # 1. Everything checkable without the model, first.
    image = read_init_image(args.image) if args.image else None
    nets = args.controlnet or []
    if bool(args.control_image) != bool(nets):
        raise UserError("--control-image and --controlnet go together: the ControlNet (a hub id or folder) and the "
                        "image that guides it", field="control_image")
    if args.control_image and len(args.control_image) != len(nets):
        raise UserError(f"{len(args.control_image)} --control-image for {len(nets)} --controlnet: give one image per "
                        "ControlNet, in the same order", field="control_image")
    control = [read_init_image(path, "--control-image", "control_image") for path in args.control_image or []]
    if bool(args.ip_adapter_image) != bool(args.ip_adapter):
        raise UserError("--ip-adapter-image and --ip-adapter go together: the IP-Adapter (a .safetensors file) and "
                        "the reference image that guides it", field="ip_adapter_image")
    reference = (read_init_image(args.ip_adapter_image, "--ip-adapter-image", "ip_adapter_image")
                 if args.ip_adapter_image else None)
    request = GenerationRequest(
        prompt=args.prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, seed=args.seed, width=args.width, height=args.height,
        num_images_per_prompt=args.num_images, image=image, strength=args.strength,
        control_image=(control[0] if len(control) == 1 else control) or None,
        **{name: _per_net(getattr(args, name), default, len(nets), name)
           for name, default in (("controlnet_conditioning_scale", 1.0), ("control_guidance_start", 0.0),
                                 ("control_guidance_end", 1.0))},
        ip_adapter_image=reference, ip_adapter_scale=args.ip_adapter_scale,
        mask_image=read_init_image(args.mask_image, "--mask", "mask_image") if args.mask_image else None,
        mask_feather=args.mask_feather,
        regions=[Region(prompt, read_init_image(mask, "--region", f"regions[{k}].mask_image"))
                 for k, (mask, prompt) in enumerate(args.regions or [])],
        prompt_blend=_blend(PromptBlend, args.prompt_blend, "--prompt-blend", str),
        seed_blend=_blend(SeedBlend, args.seed_blend, "--seed-blend", int),
    )
    # The model's own img2img bound and its family's default steps (None here) are checked once it is loaded.
    validate_request(dataclasses.replace(request, num_inference_steps=request.num_inference_steps or 1),
                     lcm_img2img=True)
    from lcm_live.engine import modes

    if request.control_image is not None:  # the model's own checks, as far as the flags tell them
        modes.BY_NAME["control_image"].check(request, modes.ModelCaps(controlnet=nets[0], controlnets=len(nets)))
    if request.ip_adapter_image is not None:
        modes.BY_NAME["ip_adapter_image"].check(request, modes.ModelCaps(ip_adapter=args.ip_adapter))
    if args.output is not None:
        check_output_path(args.output)
    settings = engine_settings_from_args(args)

    # 2. The model.
    _quiet_libraries()
    from lcm_live.engine.pipeline import Engine

    engine = Engine.from_settings(settings, progress=not args.no_progress)
    if engine.info.notice:
        print(f"\n*** {engine.info.notice} ***\n", file=sys.stderr)
    if settings.quantize_vae == "int8":  # its calibration is a warm-up's (serve, bench), not one image's
        print("note: --quantize-vae int8 quantizes the tiny autoencoder after a warm-up's calibration (serve, "
              "bench); a single generate records its inputs and decodes in bf16", file=sys.stderr)

    # 3. Generate, with a progress bar per step.
    result = _generate(engine, request, progress=not args.no_progress)
    for warning in result.parameters.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)

    # 4. Save (atomically) and say where.
    paths = save_images(result.images, result.parameters, output=args.output, metadata=args.metadata)
    p = result.parameters
    print(f"seed {p['seed']}, {p['num_inference_steps']} steps, guidance {p['guidance_scale']:g}, "
          f"{p['width']}x{p['height']}, {p['device']} {p['dtype']}, {result.timings['total']:.2f} s")
    for path in paths:
        print(f"saved {path}")
    return 0


def _per_net(values, default: float, nets: int, name: str):
    """A repeatable per-ControlNet number: the default, one value (for all nets) or one per net."""
    if not values:
        return default
    if len(values) == 1:
        return values[0]
    if len(values) != nets:
        flag = "--" + name.replace("_", "-")
        raise UserError(f"{len(values)} {flag} for {nets} --controlnet: give one (for all nets) or one per "
                        "ControlNet, in the same order", field=name)
    return list(values)


def _blend(cls, values, flag: str, first):
    """``--prompt-blend PROMPT WEIGHT`` / ``--seed-blend SEED WEIGHT`` as the engine's PromptBlend / SeedBlend."""
    if values is None:
        return None
    head, weight = values
    field = flag.removeprefix("--").replace("-", "_")
    try:
        head = first(head)
    except ValueError:
        raise UserError(f"{flag} {head!r} {weight!r}: the seed must be a whole number", field=f"{field}.seed") from None
    try:
        return cls(head, float(weight))
    except ValueError:
        raise UserError(f"{flag} {values[0]!r} {weight!r}: the weight must be a number from 0 to 1",
                        field=f"{field}.weight") from None


def _generate(engine, request, *, progress: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=request.num_inference_steps, desc="denoising", unit="step", disable=not progress,
               file=sys.stderr, leave=False)

    def on_step(event):
        if bar.total != event.total:  # img2img runs fewer steps than asked on some pipelines
            bar.total = event.total
        bar.update(1)

    try:
        return engine.generate(request, callback=on_step)
    finally:
        bar.close()
