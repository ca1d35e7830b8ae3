"""Where does the tiny model on CUDA part from its CPU float32 reference? A diagnosis for scripts/gpu_check.sh.

On an H200 (2026-11-26) the tiny random LCM in float16 on CUDA gave final latents at cosine ~0 against the CPU
float32 path, while float16 on the CPU matches it at 0.999999. This script runs the same UNet call and the same
2-step pipeline on CPU float32 and on several CUDA variants, and for the UNet hooks every module, so the first
module whose output parts from the reference is named.

    python scripts/gpu_tiny_parity.py [--device cuda]     (--device cpu: a dry run of the script itself)
"""

from __future__ import annotations

import argparse
import contextlib

import torch

PROMPT = "a red square on a blue floor"


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().flatten().cpu(), b.detach().float().flatten().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def tiny(device: str, dtype: torch.dtype):
    from lcm_live.engine.architectures import build_pipeline

    pipe = build_pipeline("tiny", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def record_outputs(module: torch.nn.Module) -> tuple[list, list]:
    """Forward hooks on every submodule: (names in call order, first tensor output of each)."""
    names, outputs = [], []

    def hook(name):
        def fn(_module, _args, out):
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            if isinstance(out, torch.Tensor):
                names.append(name)
                outputs.append(out.detach().float().cpu())
        return fn

    for name, sub in module.named_modules():
        if name:
            sub.register_forward_hook(hook(name))
    return names, outputs


def unet_inputs(pipe) -> dict:
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        states = pipe.text_encoder(ids)[0]
    g = torch.Generator("cpu").manual_seed(0)
    return dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor(999),
                encoder_hidden_states=states, timestep_cond=torch.randn(1, 32, generator=g), ids=ids)


def final_latents(pipe) -> torch.Tensor:
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=1.5, width=64, height=64,
               generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    return out.images.detach().float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ref_pipe = tiny("cpu", torch.float32)
    inputs = unet_inputs(ref_pipe)
    ids = inputs.pop("ids")
    ref_names, ref_outs = record_outputs(ref_pipe.unet)
    with torch.no_grad():
        ref_eps = ref_pipe.unet(**inputs).sample
    ref_states = inputs["encoder_hidden_states"]
    ref_final = final_latents(ref_pipe)
    print(f"reference (cpu float32): |eps| max {ref_eps.abs().max():.3g}, |final| max {ref_final.abs().max():.3g}")

    variants = [("float32", torch.float32, None, False), ("float16", torch.float16, None, False),
                ("float16 channels_last", torch.float16, None, True),
                ("float16 math-SDPA", torch.float16, [SDPBackend.MATH], False),
                ("bfloat16", torch.bfloat16, None, False)]
    for label, dtype, backends, channels_last in variants:
        pipe = tiny(device, dtype)
        if channels_last:
            pipe.unet.to(memory_format=torch.channels_last)
        names, outs = record_outputs(pipe.unet)
        kernel = sdpa_kernel(backends) if backends else contextlib.nullcontext()
        with torch.no_grad(), kernel:
            states = pipe.text_encoder(ids.to(device))[0]
            moved = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
            eps = pipe.unet(**moved).sample
            final = final_latents(pipe)
        first_bad = next((f"{n} ({cosine(o, r):.4f})" for n, o, r in zip(names, outs, ref_outs, strict=False)
                          if o.shape == r.shape and cosine(o, r) < 0.99), "none")
        print(f"{device} {label:<22} text_encoder {cosine(states, ref_states):.5f}  unet {cosine(eps, ref_eps):.5f}"
              f"  finite {bool(torch.isfinite(eps).all())}  final_latents {cosine(final, ref_final):.5f}"
              f"  first module below 0.99: {first_bad}  (order same: {names == ref_names})")
        del pipe


if __name__ == "__main__":
    main()
