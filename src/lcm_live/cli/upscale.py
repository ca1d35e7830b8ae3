"""`lcm-live upscale IN --scale 2|4`: a kept frame made 2 or 4 times larger, saved as PNG with its parameters.

With the same LCM by tiled image-to-image (engine/upscale.py: Lanczos up, tiles with overlap, each tile redrawn at
a low strength with the frame's own prompt and seed, feathered back together), or with an ESRGAN-family model
(``--upscaler PATH.safetensors``, through spandrel: engine/esrgan.py), optionally followed by the tiled LCM pass.
The frame's own parameters (its PNG chunks, as ``generate`` and the studio write them) fill the prompt, seed, steps
and guidance; flags override them. Everything checkable (the image, the pixel cap, ``--output``, the upscaler file)
is checked before a model loads.
"""

from __future__ import annotations

import argparse
import sys

from lcm_live.cli.common import add_engine_arguments, engine_settings_from_args
from lcm_live.config import DEFAULT_MODEL
from lcm_live.engine.upscale import DEFAULT_MAX_PIXELS, DEFAULT_STRENGTH, SCALES
from lcm_live.errors import UserError


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "upscale", help="make a kept frame 2 or 4 times larger (tiled LCM image-to-image, or an ESRGAN model)",
        description="Upscale an image with the LCM by tiled image-to-image (its prompt and seed read from the PNG's "
                    "parameters when present), or with an ESRGAN-family model (--upscaler). Prints where it went.",
    )
    parser.add_argument("image", metavar="IN", help="the image to upscale (PNG, JPEG or WebP)")
    parser.add_argument("--scale", type=int, default=2, choices=SCALES, help="2 or 4 (default: %(default)s)")
    g = parser.add_argument_group("tiled refinement (diffusers' names; default: the image's own parameters)")
    g.add_argument("--prompt", default=None, metavar="TEXT", help="each tile's prompt (default: the image's)")
    g.add_argument("--negative-prompt", default=None, metavar="TEXT")
    g.add_argument("--seed", type=int, default=None, metavar="SEED", help="default: the image's, else random")
    g.add_argument("--num-inference-steps", type=int, default=None, metavar="N",
                   help="1 to 8 (default: the image's, else the model family's)")
    g.add_argument("--guidance-scale", type=float, default=None, metavar="G", help="default: the image's, else the model's")
    g.add_argument("--strength", type=float, default=None, metavar="S",
                   help=f"how much each tile is redrawn, in (0, 1]; low keeps the image (default: {DEFAULT_STRENGTH}; "
                        "with LCM-LoRA models at least 1 / steps, so that a step runs)")
    g.add_argument("--tile-size", type=int, default=None, metavar="PX",
                   help="square tiles of this many pixels, a multiple of 8 (default: the model's native size)")
    g.add_argument("--tile-overlap", type=int, default=None, metavar="PX",
                   help="pixels neighbouring tiles share and blend over, 8 to half a tile (default: a quarter tile)")
    g = parser.add_argument_group("ESRGAN")
    g.add_argument("--upscaler", default=None, metavar="PATH.safetensors",
                   help="an ESRGAN-family super-resolution model (safetensors only; needs lcm-live[upscale]) instead "
                        "of Lanczos for the first step")
    g.add_argument("--no-refine", action="store_true",
                   help="with --upscaler: stop after it (no LCM pass, no model loaded)")
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help="refuse an output of more pixels than this, width * height (default: %(default)s = 4096²)")
    g = parser.add_argument_group("output")
    g.add_argument("--output", default=None, metavar="PATH", help="a .png file; default: a new name under outputs/")
    g.add_argument("--metadata", default="none", choices=["none", "json"],
                   help="json: also write a .json sidecar (PNG text chunks are always written)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_engine_arguments(parser)
    # --model's default here: the model the image was made with, where its parameters name one that can be loaded
    for action in parser._actions:
        if action.dest == "model":
            action.default = None
            action.help = (f"as generate's (default: the image's own model when its parameters name one that loads "
                           f"here: a builtin:NAME, a hub id or a path that exists; else {DEFAULT_MODEL})")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lcm_live.cli.generate import _quiet_libraries, read_init_image
    from lcm_live.engine.metadata import check_output_path, save_images
    from lcm_live.engine.upscale import UpscaleRequest, check_scale, frame_request, resolve_tiling, upscale

    # 1. Everything checkable without a model: the image, its parameters, the cap, the output, the flags.
    image = read_init_image(args.image, "IN", "image")
    frame = _frame_parameters(args.image)
    check_scale(args.scale, *image.size, args.max_pixels)
    if args.no_refine and args.upscaler is None:
        raise UserError("--no-refine leaves nothing to do without --upscaler PATH.safetensors", field="upscaler")
    if args.output is not None:
        check_output_path(args.output)
    request = UpscaleRequest(image=image, scale=args.scale, prompt=args.prompt or "",
                             negative_prompt=args.negative_prompt, seed=args.seed,
                             num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale,
                             strength=args.strength, tile_size=args.tile_size, tile_overlap=args.tile_overlap)
    if args.tile_size is not None:  # else the model's native size decides, once it is loaded
        resolve_tiling(args.tile_size, args.tile_overlap, args.tile_size)
    refine = not args.no_refine
    if refine:  # the tiles' generation values, as generate checks them before loading (the model's own bounds later)
        from lcm_live.engine.request import GenerationRequest
        from lcm_live.engine.validation import validate_request

        r = frame_request(request, frame)
        validate_request(GenerationRequest(prompt=r.prompt, negative_prompt=r.negative_prompt,
                                           num_inference_steps=r.num_inference_steps or 1,
                                           guidance_scale=r.guidance_scale, seed=r.seed, image=image,
                                           strength=r.strength if r.strength is not None else DEFAULT_STRENGTH),
                         lcm_img2img=True)
    if refine and not frame_request(request, frame).prompt:
        print("note: no --prompt and none in the image's parameters: the tiles are redrawn without a prompt",
              file=sys.stderr)
    model = args.model or _frame_model(frame)
    if args.model is None and model is not None and refine:
        print(f"note: refining with {model}, the image's own model (--model to choose another)", file=sys.stderr)
    settings = engine_settings_from_args(args, model=model or DEFAULT_MODEL)
    upscaler = None
    if args.upscaler is not None:
        from lcm_live.engine.devices import resolve_device
        from lcm_live.engine.esrgan import load_upscaler

        upscaler = load_upscaler(args.upscaler, device=str(resolve_device(settings.device)))

    # 2. The model (only for the tiled LCM pass).
    engine = None
    if refine:
        _quiet_libraries()
        from lcm_live.engine.pipeline import Engine

        engine = Engine.from_settings(settings, progress=not args.no_progress)
        if engine.info.notice:
            print(f"\n*** {engine.info.notice} ***\n", file=sys.stderr)
        recorded = frame.get("model")
        if isinstance(recorded, str) and recorded != engine.info.model and model != recorded:
            print(f"note: the image was made with {recorded}; refining with {engine.info.model} (--model)",
                  file=sys.stderr)

    # 3. Upscale, a progress bar over the tiles.
    from tqdm.auto import tqdm

    bar = tqdm(desc="upscaling", unit="tile", disable=not refine or args.no_progress, file=sys.stderr, leave=False)

    def on_tile(event) -> None:
        bar.total = event.tiles
        bar.update(1)

    try:
        result, parameters = upscale(engine, request, frame=frame, max_pixels=args.max_pixels, upscaler=upscaler,
                                     refine=refine, callback=on_tile)
    finally:
        bar.close()
    for warning in parameters.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)

    # 4. Save (atomically) and say where.
    paths = save_images([result], parameters, output=args.output, metadata=args.metadata)
    u = parameters["upscale"]
    tiles = f", {u['tiles']} tiles" if "tiles" in u else ""
    print(f"{u['source_width']}x{u['source_height']} -> {parameters['width']}x{parameters['height']} "
          f"({u['method']}{tiles})")
    for path in paths:
        print(f"saved {path}")
    return 0


def _frame_model(frame: dict) -> str | None:
    """The image's own model where its parameters name one that loads here: builtin:NAME, an org/name hub id, or
    a path that exists (the CLI records paths; the studio records only names)."""
    import re
    from pathlib import Path

    model = frame.get("model")
    if not isinstance(model, str) or not model:
        return None
    if model.startswith("builtin:") or Path(model).expanduser().exists():
        return model
    return model if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) else None


def _frame_parameters(path: str) -> dict:
    """The image's own parameters (lcm-live's PNG chunk), {} for another image or another format."""
    from lcm_live.engine.metadata import read_png_parameters

    try:
        params = read_png_parameters(path)
    except (ValueError, OSError):  # not a PNG, or a chunk that is not JSON: an image like any other
        return {}
    return params if isinstance(params, dict) else {}
