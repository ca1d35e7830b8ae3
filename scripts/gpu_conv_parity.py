"""Second step of the tiny-model CUDA diagnosis (scripts/gpu_tiny_parity.py found the tiny UNet's ``conv_in`` parting
from the CPU float32 reference inside the pipeline at 32x32 latents, while the same UNet matched at 8x8).

Compares conv2d on CUDA (float16, bfloat16; cuDNN on and off; channels_last) with the CPU float32 result over the
tiny and real shapes, the pipeline's first UNet input on both devices, and the tiny UNet at 32x32 and 64x64.

    python scripts/gpu_conv_parity.py [--device cuda]
"""

from __future__ import annotations

import argparse

import torch
from gpu_tiny_parity import PROMPT, cosine, tiny  # scripts/ is on sys.path when run as a script

NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def conv_table(device: str) -> None:
    for cin, cout, size in ((4, 8, 32), (4, 8, 8), (4, 8, 64), (4, 32, 32), (8, 8, 32), (4, 320, 64), (8, 16, 32)):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        x = torch.randn(1, cin, size, size)
        with torch.no_grad():
            ref = conv(x)
        row = []
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            for cudnn in (True, False):
                for cl in (False, True):
                    torch.backends.cudnn.enabled = cudnn
                    c = conv.to(device, dtype)
                    xx = x.to(device, dtype)
                    if cl:
                        c, xx = c.to(memory_format=torch.channels_last), xx.to(memory_format=torch.channels_last)
                    with torch.no_grad():
                        row.append(f"{NAMES[dtype]}{'' if cudnn else '-nocudnn'}{'-cl' if cl else ''} "
                                   f"{cosine(c(xx), ref):.4f}")
        torch.backends.cudnn.enabled = True
        print(f"conv {cin}->{cout} at {size}x{size}: " + "  ".join(row))


def pipeline_inputs(device: str) -> None:
    seen = {}
    for dev, dtype in (("cpu", torch.float32), (device, torch.float16), (device, torch.bfloat16)):
        for cudnn in (True, False):
            if dev == "cpu" and not cudnn:
                continue
            torch.backends.cudnn.enabled = cudnn
            pipe = tiny(dev, dtype)
            got: list = []
            pipe.unet.conv_in.register_forward_hook(
                lambda m, a, o, got=got: got.append((a[0].detach().float().cpu(), o.detach().float().cpu())))
            out = pipe(PROMPT, num_inference_steps=2, guidance_scale=1.5, width=64, height=64,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="latent").images.float().cpu()
            key = f"{dev} {str(dtype)[6:]}{'' if cudnn else ' cudnn off'}"
            seen[key] = (got, out)
            ref_got, ref_out = seen["cpu float32"]
            print(f"pipeline {key:<24} step-1 conv_in input {cosine(got[0][0], ref_got[0][0]):.5f} output "
                  f"{cosine(got[0][1], ref_got[0][1]):.5f}  step-2 input {cosine(got[1][0], ref_got[1][0]):.5f}"
                  f"  final {cosine(out, ref_out):.5f}")
    torch.backends.cudnn.enabled = True


def unet_sizes(device: str) -> None:
    ref_pipe = tiny("cpu", torch.float32)
    fast = tiny(device, torch.float16)
    g = torch.Generator("cpu").manual_seed(0)
    states = torch.randn(1, 77, 32, generator=g)
    cond = torch.randn(1, 32, generator=g)
    for size in (8, 16, 32, 64):
        x = torch.randn(1, 4, size, size, generator=g)
        with torch.no_grad():
            ref = ref_pipe.unet(x, 999, states, timestep_cond=cond).sample
            out = fast.unet(x.to(device, torch.float16), 999, states.to(device, torch.float16),
                            timestep_cond=cond.to(device, torch.float16)).sample
        print(f"tiny unet at {size}x{size}: float16 on {device} vs cpu float32 {cosine(out, ref):.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    device = parser.parse_args().device
    if device == "cuda":
        print("cudnn", torch.backends.cudnn.version())
    conv_table(device)
    unet_sizes(device)
    pipeline_inputs(device)


if __name__ == "__main__":
    main()
