"""The CUDA path on the tiny models: float16 against the CPU float32 reference, SDPA attention, channels_last,
torch.compile, TAESD in float16, bitsandbytes int8 / nf4 (parity and weight memory) and the Engine end to end.

Every test is marked ``gpu``: skipped where torch sees no CUDA device (tests/conftest.py). On a GPU machine:
``python -m pytest -m gpu tests/engine/test_cuda.py`` (scripts/gpu_check.sh runs it). Speed is never asserted.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from lcm_live.config import EngineSettings
from lcm_live.engine.architectures import build_pipeline
from lcm_live.engine.pipeline import Engine
from lcm_live.engine.request import GenerationRequest
from lcm_live.engine.speedups import CUDA_COMPILE_MODE, apply_speedups, quantize_linears_bitsandbytes

pytestmark = pytest.mark.gpu

SIZE = 64
PROMPT = "a red square on a blue floor"
FP16 = torch.float16


def tiny(device: str = "cpu", dtype=torch.float32):
    """The tiny LCM, built in float32 and then cast, so every variant holds the reference's weights."""
    pipe = build_pipeline("tiny", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def final_latents(pipe, seed: int = 0) -> torch.Tensor:
    out = pipe(PROMPT, num_inference_steps=2, guidance_scale=1.5, width=SIZE, height=SIZE,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")
    return out.images.detach().float().cpu()  # a copy: CUDA-graph outputs are reused by the next call


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().flatten().cpu(), b.detach().float().flatten().cpu()
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.fixture(scope="module")
def reference():
    """``reference[dtype][seed]``: final latents of the CPU path in ``dtype`` (float32 or float16), seeds 0 and 1.

    A CUDA run in float16 is compared with the CPU run in float16, not float32: the pipelines draw their noise
    from a CPU generator in the pipeline's dtype, and torch's CPU sampler gives float16 a different sequence
    from float32's in some builds (torch 2.11: cosine ~0 between the two noises, 2026-11-26 on an H200;
    scripts/gpu_conv_parity.py), so only a same-dtype run starts from the same noise."""
    out = {}
    for dtype in (torch.float32, FP16):
        pipe = tiny("cpu", dtype)
        out[dtype] = {seed: final_latents(pipe, seed) for seed in (0, 1)}
    return out


@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")


def test_float32_on_cuda_matches_the_cpu(reference):
    latents = final_latents(tiny("cuda", torch.float32))
    assert cosine(latents, reference[torch.float32][0]) > 0.999


def test_float16_on_cuda_matches_the_cpu_reference(reference):
    pipe = tiny("cuda", FP16)
    applied = apply_speedups(pipe, EngineSettings(model="tiny"), "cuda", FP16)
    assert applied[0].startswith("backend:torch (auto: torch on cuda") and "channels_last" in applied
    assert pipe.unet.dtype == FP16 and pipe.unet.device.type == "cuda"
    latents = final_latents(pipe)
    assert torch.isfinite(latents).all()
    assert cosine(latents, reference[FP16][0]) > 0.99


def test_sdpa_attention_and_channels_last_on_cuda():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pipe = tiny("cuda", FP16)
    apply_speedups(pipe, EngineSettings(model="tiny"), "cuda", FP16)
    for module in (pipe.unet, pipe.vae):
        processors = module.attn_processors
        assert processors and {type(p).__name__ for p in processors.values()} == {"AttnProcessor2_0"}
    for weight in (pipe.unet.conv_in.weight, pipe.unet.up_blocks[0].resnets[0].conv1.weight,
                   pipe.vae.decoder.conv_in.weight):
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()

    # The real models' attention shapes (sd15: 8 heads of 40 at 320 channels; 64 at 1280 in SDXL) run on fused
    # SDPA kernels here, not only on the math fallback: same result with the fallback ruled out.
    from diffusers.models.attention_processor import Attention

    for channels, heads in ((320, 8), (1280, 20)):
        attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads).to("cuda", FP16).eval()
        x = torch.randn(2, 1024, channels, device="cuda", dtype=FP16)
        with torch.no_grad():
            with sdpa_kernel([SDPBackend.MATH]):
                expected = attn(x)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
                fused = attn(x)
        assert cosine(fused, expected) > 0.999


def test_torch_compile_on_cuda_matches_eager(reference):
    eager = tiny("cuda", FP16)
    apply_speedups(eager, EngineSettings(model="tiny"), "cuda", FP16)
    expected = {seed: final_latents(eager, seed) for seed in (0, 1)}
    pipe = tiny("cuda", FP16)
    try:
        applied = apply_speedups(pipe, EngineSettings(model="tiny", compile=True), "cuda", FP16)
        assert applied[-1] == f"torch.compile({CUDA_COMPILE_MODE})"
        assert pipe.unet.config.time_cond_proj_dim == 32  # what the pipelines read still reaches the UNet
        first = final_latents(pipe, 0)  # compiles (and records CUDA graphs)
        again = final_latents(pipe, 0)  # replays
        other = final_latents(pipe, 1)  # replays on new inputs
    finally:
        torch._dynamo.reset()
    assert cosine(first, expected[0]) > 0.995 and cosine(other, expected[1]) > 0.995
    assert cosine(again, first) > 0.9999
    assert cosine(other, first) < 0.99  # a new seed gives new latents: the graph read its new inputs
    assert cosine(first, reference[FP16][0]) > 0.99


def test_taesd_float16_decode_on_cuda():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    taesd = AutoencoderTiny().eval()  # the taesd architecture (8x upsampling), random weights
    latents = torch.randn(1, 4, 32, 32, generator=torch.Generator("cpu").manual_seed(0))
    with torch.no_grad():
        expected = taesd.decode(latents).sample
        fast = taesd.to("cuda", FP16).to(memory_format=torch.channels_last)
        image = fast.decode(latents.to("cuda", FP16)).sample
    assert image.shape == (1, 3, 256, 256) and image.dtype == FP16
    assert torch.isfinite(image).all()
    assert cosine(image, expected) > 0.99


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bitsandbytes_quantized_unet_parity_and_weight_bytes(bnb, mode):
    pipe = tiny("cuda", FP16)
    expected = final_latents(pipe)
    linears = [m for m in pipe.unet.modules() if type(m) is torch.nn.Linear]
    fp16_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)

    applied = apply_speedups(pipe, EngineSettings(model="tiny", quantize=mode), "cuda", FP16)
    assert applied[-1] == f"{mode}:bitsandbytes({len(linears)} linears)"
    layer = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    quantized = [m for m in pipe.unet.modules() if isinstance(m, layer)]
    assert len(quantized) == len(linears) and not any(type(m) is torch.nn.Linear for m in pipe.unet.modules())
    assert all(m.weight.device.type == "cuda" for m in quantized)
    assert {m.weight.dtype for m in quantized} == ({torch.int8} if mode == "int8" else {torch.uint8})
    stored = sum(m.weight.numel() * m.weight.element_size() for m in quantized)
    if mode == "int8":
        assert stored * 2 == fp16_bytes  # one byte per weight
    else:
        assert stored * 4 <= fp16_bytes + 4 * len(quantized)  # two weights per byte (odd counts round up)

    latents = final_latents(pipe)
    assert torch.isfinite(latents).all()
    assert cosine(latents, expected) > 0.99


@pytest.mark.parametrize("mode, most, min_cosine", [("int8", 0.55, 0.99), ("nf4", 0.30, 0.98)])
def test_bitsandbytes_frees_gpu_memory(bnb, mode, most, min_cosine):
    """A 4096x4096 layer (SDXL's feed-forward scale): the GPU holds about half (int8) or a quarter (nf4) of the
    float16 bytes once quantized, statistics included, and the outputs stay close."""
    gc.collect()
    torch.cuda.empty_cache()
    x = torch.randn(16, 4096, device="cuda", dtype=FP16)
    # cuBLAS / cuBLASLt take their workspaces from torch's allocator at the first GEMM: before the baseline.
    warm = torch.randn(8, 4096, device="cuda", dtype=FP16)
    torch.nn.functional.linear(x, warm, torch.zeros(8, device="cuda", dtype=FP16))
    torch.mm(x, warm.t())
    del warm
    base = torch.cuda.memory_allocated()
    model = torch.nn.Sequential(torch.nn.Linear(4096, 4096)).to("cuda", FP16).eval()
    fp16_bytes = torch.cuda.memory_allocated() - base
    with torch.no_grad():
        expected = model(x).float().cpu()
    assert quantize_linears_bitsandbytes(model, mode, device="cuda", dtype=FP16) == 1
    gc.collect()
    quantized_bytes = torch.cuda.memory_allocated() - base
    assert quantized_bytes < most * fp16_bytes, (quantized_bytes, fp16_bytes)
    with torch.no_grad():
        out = model(x).float().cpu()
    assert torch.isfinite(out).all() and cosine(out, expected) > min_cosine


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    """A tiny AutoencoderTiny saved as a folder (matches the tiny VAE's 2x)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("taesd")
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(folder)
    return folder


def _init_image():
    from PIL import Image

    x = np.linspace(0, 255, SIZE, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (SIZE, 1)), np.tile(x[:, None], (1, SIZE)), np.full((SIZE, SIZE), 90, np.uint8)], -1)
    return Image.fromarray(rgb, "RGB")


def test_engine_text_to_image_and_img2img_on_cuda(tiny_lcm_dir):
    engine = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cuda"), progress=False)
    # the CPU in float16 too: the same noise (see the reference fixture)
    cpu = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float16",
                                              backend="torch"), progress=False)
    info = engine.info
    assert info.device.startswith("cuda") and info.dtype == "float16" and "channels_last" in info.speedups

    events = []
    result = engine.generate(GenerationRequest(PROMPT, seed=3, num_inference_steps=2, width=SIZE, height=SIZE),
                             callback=events.append)
    assert result.images[0].size == (SIZE, SIZE) and result.parameters["device"].startswith("cuda")
    assert [e.step for e in events] == [1, 2] and events[-1].latents.device.type == "cuda"

    for extra in ({}, {"image": _init_image(), "strength": 0.5}):
        request = GenerationRequest(PROMPT, seed=3, num_inference_steps=2, width=SIZE, height=SIZE,
                                    output_type="latent", **extra)
        assert cosine(engine.generate(request).images[0], cpu.generate(request).images[0]) > 0.99
    img2img = engine.generate(GenerationRequest(PROMPT, seed=3, num_inference_steps=2, image=_init_image(),
                                                strength=0.5))
    assert img2img.images[0].size == (SIZE, SIZE) and img2img.parameters["mode"] == "img2img"


def test_engine_float16_on_cuda_starts_from_a_float32_seeds_noise(tiny_lcm_dir):
    """The engine draws text-to-image noise in float32 and casts it (engine/scheduler.py), so a float16 CUDA
    image follows the float32 CPU image of the same seed even where torch's CPU sampler draws float16
    differently (torch 2.11): the comparison the diffusers pipelines alone fail (see the reference fixture)."""
    cuda = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cuda"), progress=False)
    cpu = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32",
                                              backend="torch"), progress=False)
    assert cuda.info.dtype == "float16"
    for seed in (0, 1):
        request = GenerationRequest(PROMPT, seed=seed, num_inference_steps=2, width=SIZE, height=SIZE,
                                    output_type="latent")
        assert cosine(cuda.generate(request).images[0], cpu.generate(request).images[0]) > 0.99


def _waits_in_the_loop(engine, request, read_back: bool = False) -> list[str]:
    """The host-device waits torch reports from the first step's callback to the last's (steps 2 to N);
    ``read_back``: each step's callback also reads a value of the step's latents back to the host."""
    import warnings

    engine.generate(request)  # warm: first-call allocations and lazy inits are not the loop's

    def watch(event):
        torch.cuda.set_sync_debug_mode("warn" if event.step < event.total else 0)
        if read_back and event.step < event.total:
            float(event.latents.flatten()[0])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = engine.generate(request, callback=watch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert result.images[0].size == (SIZE, SIZE)
    # torch says "called a synchronizing CUDA operation" per wait (and, once per process, that the debug mode is
    # a prototype: not a wait)
    return [str(w.message) for w in caught if "called a synchronizing" in str(w.message)]


@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_the_denoising_loop_never_waits_for_the_gpu(tiny_lcm_dir, img2img):
    """Steps 2 to 4 (UNet calls, scheduler steps, re-noising, the engine's step hook) never make the host wait
    for the device (engine/scheduler.py). The first step may: it finds its schedule index, as diffusers does;
    the end must: the image comes back to the host. A step hook that reads a value back makes the same watch see
    waits, so the watch works. (The engine's loop takes the scheduler's scalars from the host whatever scheduler
    object holds the LCMScheduler config: engine/sampling.py.)"""
    extra = {"image": _init_image(), "strength": 0.5} if img2img else {}
    request = GenerationRequest(PROMPT, seed=3, num_inference_steps=4, width=SIZE, height=SIZE, **extra)
    engine = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cuda"), progress=False)
    assert type(engine.pipe.scheduler).__name__ == "HostLCMScheduler"
    assert _waits_in_the_loop(engine, request) == []

    assert _waits_in_the_loop(engine, request, read_back=True)  # a value read back: a wait at every step


def test_engine_with_taesd_on_cuda(tiny_lcm_dir, taesd_dir):
    engine = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cuda", decoder="taesd",
                                                 taesd=str(taesd_dir)), progress=False)
    vae = engine.pipe.vae
    assert type(vae).__name__ == "AutoencoderTiny" and vae.dtype == FP16 and vae.device.type == "cuda"
    result = engine.generate(GenerationRequest(PROMPT, seed=0, num_inference_steps=2, width=SIZE, height=SIZE))
    assert result.images[0].size == (SIZE, SIZE) and result.parameters["decoder"] == "taesd"
    pixels = np.asarray(result.images[0])
    assert pixels.std() > 0  # not a blank (NaN -> black) image


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_engine_quantized_on_cuda(bnb, tiny_lcm_dir, mode):
    engine = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cuda", quantize=mode),
                                  progress=False)
    assert any(s.startswith(f"{mode}:bitsandbytes(") for s in engine.info.speedups)
    result = engine.generate(GenerationRequest(PROMPT, seed=0, num_inference_steps=2, width=SIZE, height=SIZE))
    assert result.images[0].size == (SIZE, SIZE)
