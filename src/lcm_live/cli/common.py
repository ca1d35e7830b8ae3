"""Flags shared by the commands that load a model (generate, serve, bench): diffusers-style names,
turned into the one settings object."""

from __future__ import annotations

import argparse

from lcm_live.config import COMPILE_MODES, DEFAULT_MODEL, EngineSettings, LoraSpec
from lcm_live.errors import UserError


def add_engine_arguments(parser: argparse.ArgumentParser, *, decoder: str = "vae") -> None:
    """``decoder``: the default of --decoder (generate: the full VAE, for the saved image's quality; serve: auto,
    the tiny decoder for live speed where it fits the model)."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, diffusers folder, single .safetensors file, or builtin:shapes (default: %(default)s)")
    g.add_argument("--lcm-lora", default="auto", metavar="auto|none|PATH_OR_ID",
                   help="LCM-LoRA for plain SD1.5/SDXL models (auto picks by architecture; ignored for full LCMs)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH_OR_ID[:SCALE]",
                   help="style LoRA stacked on the model, fused for speed; repeatable")
    g.add_argument("--controlnet", action="append", default=None, metavar="ID_OR_PATH",
                   help="a ControlNet for the model's architecture (hub id, diffusers folder, or a single "
                        ".safetensors file in the original layout): an image guides the layout (generate "
                        "--control-image; the studio's Lines mode); repeatable: several nets, each with its own "
                        "--control-image (in the same order)")
    g.add_argument("--ip-adapter", default=None, metavar="ID_OR_PATH",
                   help="an IP-Adapter for the model's architecture (a .safetensors file with its image_encoder "
                        "folder beside it, or ORG/NAME/PATH/FILE.safetensors on the hub): a reference image guides "
                        "content and style (generate --ip-adapter-image; the studio's reference layer)")
    g.add_argument("--scheduler", default="auto", choices=["auto", "lcm", "tcd", "euler-a", "euler-trailing"],
                   help="the sampler: auto detects the model's family (LCM, SD-Turbo, SDXL-Turbo, SDXS, "
                        "SDXL-Lightning, TCD, Hyper-SD) from its folder or name; the others override it (README: "
                        "the families' table)")
    g.add_argument("--eta", type=float, default=None, metavar="GAMMA",
                   help="TCD's gamma in [0, 1] with --scheduler tcd (default: the family's, 0.3; Hyper-SD 1.0)")
    g.add_argument("--cache-dir", default=None, help="Hugging Face cache folder (default: HF_HOME or ~/.cache/huggingface)")
    g = parser.add_argument_group("device")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--decoder", default=decoder, choices=["auto", "vae", "taesd"],
                   help="full VAE, the tiny decoder (madebyollin/taesd, taesdxl) for speed, or auto: the tiny "
                        "one when it fits the model's VAE and is available, else the full VAE (default: %(default)s)")
    g.add_argument("--taesd", default=None, metavar="ID_OR_PATH",
                   help="the tiny decoder to use with --decoder taesd (default: by architecture)")
    g.add_argument("--tiled-vae", default="auto", choices=["auto", "on", "off"],
                   help="tiled VAE decoding: auto turns it on past 1024x1024 pixels")
    g = parser.add_argument_group("speed-ups")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                   help="run the UNet in PyTorch or OpenVINO (CPU); auto: OpenVINO on a CPU with AMX or "
                        "avx512_bf16 when the [openvino] extra is installed, else torch (default: %(default)s)")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet (slow first run)")
    g.add_argument("--compile-mode", default="auto", choices=COMPILE_MODES,
                   help="with --compile: auto is reduce-overhead (CUDA graphs) on CUDA, default with weight "
                        "freezing on a CPU; max-autotune also tunes the kernels (many minutes per image shape)")
    g.add_argument("--quantize", default="none", choices=["none", "int8", "nf4"],
                   help="int8 (CPU: OpenVINO/NNCF or torch dynamic; CUDA: bitsandbytes) or nf4 (CUDA)")
    g.add_argument("--quantize-vae", default=None, choices=["none", "int8"],
                   help="int8 for the tiny autoencoder (--decoder taesd) on OpenVINO: its encode and decode "
                        "1.8-1.9x faster on a VNNI CPU; combines with --feature-reuse (default: none)")
    g.add_argument("--feature-reuse", type=int, default=None, metavar="K",
                   help="recompute the UNet's deep blocks every K evaluations and reuse them in between (DeepCache-"
                        "style: a feature computed at a timestep serves the next frames' evaluations there); 1: "
                        "off, the exact path (default: 1)")
    g.add_argument("--feature-reuse-across-steps", action="store_true", default=None,
                   help="with --feature-reuse: reuse between the steps of one generation too (DeepCache's own; "
                        "costly for few-step models, see docs/benchmarks.md)")
    g.add_argument("--token-merging", type=float, default=None, metavar="RATIO",
                   help="merge this fraction of the tokens in the highest-resolution attention (ToMe for SD; "
                        "pip install 'lcm-live[tome]'); 0: off (default: 0)")


def parse_lora(text: str) -> LoraSpec:
    """``PATH_OR_ID[:SCALE]``; a Windows drive letter (``C:\\x``) is not a scale."""
    source, scale = text, 1.0
    head, sep, tail = text.rpartition(":")
    if sep and head and not tail.startswith(("\\", "/")):
        try:
            scale = float(tail)
            source = head
        except ValueError:
            source, scale = text, 1.0
    if not source:
        raise UserError(f"--lora {text!r}: give a path or hub id, optionally with :SCALE (e.g. style.safetensors:0.8)")
    return LoraSpec(source=source, scale=scale)


def engine_settings_from_args(args: argparse.Namespace, **overrides) -> EngineSettings:
    values = dict(
        model=args.model,
        lcm_lora=args.lcm_lora,
        loras=[parse_lora(x) for x in args.lora],
        device=args.device,
        dtype=args.dtype,
        decoder=args.decoder,
        tiled_vae=args.tiled_vae,
        cache_dir=args.cache_dir,
    )
    # Flags added later: parsers (or hand-made namespaces) without them keep the settings' defaults.
    for name in ("taesd", "backend", "compile", "compile_mode", "quantize", "quantize_vae", "controlnet", "scheduler", "eta",
                 "feature_reuse", "feature_reuse_across_steps", "token_merging", "ip_adapter"):
        if getattr(args, name, None) is not None:
            values[name] = getattr(args, name)
    if isinstance(values.get("controlnet"), list) and len(values["controlnet"]) == 1:
        values["controlnet"] = values["controlnet"][0]  # one net: the settings' single form
    values.update(overrides)
    return EngineSettings(**values)
