"""The roofline's two halves: FLOPs counted from the models (against independent counts) and the peak GEMM
measurement (positive, named). No speed is asserted."""

from __future__ import annotations

import pytest
import torch

from lcm_live.bench import flops as F
from lcm_live.bench.roofline import Peak, best_of, measure_peak, path_precision, path_roofline, roofline


def test_counter_matches_the_analytic_count_of_linear_and_conv():
    linear = torch.nn.Linear(64, 32)
    assert F.count_flops(lambda: linear(torch.randn(5, 64))) == 2 * 5 * 64 * 32
    conv = torch.nn.Conv2d(4, 8, kernel_size=3, padding=1)
    # Each output element: 4 x 3 x 3 multiply-adds; 8 x 10 x 12 outputs per image, 2 images.
    assert F.count_flops(lambda: conv(torch.randn(2, 4, 10, 12))) == 2 * (2 * 8 * 10 * 12) * (4 * 3 * 3)


def _tiny_unet(**overrides):
    from diffusers import UNet2DConditionModel

    config = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=16)
    torch.manual_seed(0)
    return UNet2DConditionModel(**(config | overrides)).eval()


def _hand_sum(module, run) -> float:
    """An independent count: each Linear and Conv2d's multiply-adds from its own shapes and the shapes it saw
    (forward hooks), plus attention's two matmuls (QK^T and AV) read off each attention module's inputs."""
    total = [0.0]

    def on_linear(m, args, out):
        total[0] += 2 * out.numel() * m.in_features

    def on_conv(m, args, out):
        total[0] += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def on_attention(m, args, kwargs, out):
        hidden = args[0]
        context = kwargs.get("encoder_hidden_states")
        context = hidden if context is None else context
        b, q_len, k_len, inner = hidden.shape[0], hidden.shape[1], context.shape[1], m.inner_dim
        total[0] += 2 * (2 * b * q_len * k_len * inner)  # scores, then the weighted sum

    from diffusers.models.attention_processor import Attention

    handles = []
    for sub in module.modules():
        if isinstance(sub, torch.nn.Linear):
            handles.append(sub.register_forward_hook(on_linear))
        elif isinstance(sub, torch.nn.Conv2d):
            handles.append(sub.register_forward_hook(on_conv))
        elif isinstance(sub, Attention):
            handles.append(sub.register_forward_hook(on_attention, with_kwargs=True))
    with torch.no_grad():
        run()
    for h in handles:
        h.remove()
    return total[0]


def test_unet_flops_equal_an_independent_hand_sum():
    unet = _tiny_unet(time_cond_proj_dim=16)
    inputs = F._unet_inputs(unet.config, 8, 8)
    real = {k: torch.randn(v.shape) for k, v in inputs.items()}
    counted = F.unet_flops(unet, 8, 8)  # on the meta twin
    assert counted == _hand_sum(unet, lambda: unet(**real))
    assert counted > 0


def test_flops_scale_with_the_latent_area_and_are_cached():
    unet = _tiny_unet()
    small, large = F.unet_flops(unet, 8, 8), F.unet_flops(unet, 16, 16)
    # Convolutions and per-token Linears scale with the area (x4), self-attention with its square (x16); the time
    # embedding and the prompt's keys and values do not grow at all.
    assert 3 * small < large < 16 * small
    key = F._key("unet", unet, 8, 8)
    assert F._CACHE[key] == small  # counted once per shape in this process
    F._CACHE[key] = 123.0
    assert F.unet_flops(unet, 8, 8) == 123.0
    del F._CACHE[key]


def test_meta_twin_sees_through_wrappers_and_allocates_nothing():
    unet = _tiny_unet()

    class Wrapper(torch.nn.Module):  # as the OpenVINO UNet keeps its torch UNet
        def __init__(self, inner):
            super().__init__()
            self._torch_unet = [inner]
            self.config = inner.config

    assert F.underlying(Wrapper(unet)) is unet
    twin = F.meta_twin(Wrapper(unet))
    assert type(twin) is type(unet)
    assert all(p.device.type == "meta" for p in twin.parameters())


def test_text_encoder_and_decoder_counts_match_the_real_modules():
    """The meta twins' counts equal the real modules' on CPU tensors, with attention as plain matmuls (the math
    SDPA backend): torch's fused CPU attention kernel is not in the counter's table, which is why the bench
    counts on the meta device, where attention decomposes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lcm_live.engine.architectures import build_pipeline

    pipe = build_pipeline("tiny")
    ids = torch.zeros(1, 77, dtype=torch.long)
    latents = torch.randn(1, pipe.vae.config.latent_channels, 32, 32)
    with sdpa_kernel(SDPBackend.MATH):
        assert F.text_encoder_flops(pipe.text_encoder) == F.count_flops(lambda: pipe.text_encoder(ids))
        assert F.decoder_flops(pipe.vae, 32, 32) == F.count_flops(lambda: pipe.vae.decode(latents))
    flops = F.pipeline_flops(pipe, 64, 64)
    assert set(flops) == {"unet", "decode", "encode", "text_encoder"} and all(v > 0 for v in flops.values())


@pytest.mark.parametrize("backend,dtype", [("torch", "float32"), ("torch", "bfloat16"), ("openvino", "bfloat16"),
                                           ("openvino", "int8")])
def test_peak_is_positive_and_names_its_backend_and_dtype(backend, dtype, monkeypatch):
    if backend == "openvino":
        pytest.importorskip("openvino")
    from lcm_live.bench import roofline as R

    monkeypatch.setattr(R, "CPU_N", 256)  # seconds, not minutes: the shape of the measurement, not its value
    peak = measure_peak(backend, dtype, repeats=2, refresh=True)
    assert peak.backend == backend and peak.dtype == dtype and peak.n == 256
    assert peak.tflops > 0 and peak.seconds > 0 and peak.threads == torch.get_num_threads()
    assert measure_peak(backend, dtype) is peak  # cached per process


def test_path_precision_follows_the_unet():
    assert path_precision("openvino", "bfloat16") == ("openvino", "bfloat16")
    assert path_precision("openvino", "bfloat16", "int8") == ("openvino", "int8")
    assert path_precision("torch", "float32") == ("torch", "float32")
    assert path_precision("torch", "float16", device="cuda") == ("cuda", "float16")


def test_roofline_fraction_is_achieved_over_peak():
    peak = Peak("torch", "float32", tflops=2.0, n=2048, seconds=1.0, threads=2)
    assert roofline(3e12, 2.0, peak) == {"achieved_tflops": 1.5, "peak_tflops": 2.0, "roofline_fraction": 0.75}
    r = path_roofline({"unet": 4, "decode": 1, "text_encoder": 1, "text_encoder_2": 1},
                      {"unet": 1.0, "decode": 0.5, "text_encoder": 0.1},
                      {"unet": 1e11, "decode": 2e11, "text_encoder": 1e10, "text_encoder_2": 3e10}, 2.0, peak)
    assert r["flops_per_call"] == pytest.approx(4e11 + 2e11 + 4e10)
    assert r["flops_by_stage"]["text_encoder"] == pytest.approx(4e10)  # both encoders under one stage
    assert r["roofline_fraction"] == pytest.approx(6.4e11 / 2.0 / 2e12)
    assert r["stage_fractions"]["unet"] == pytest.approx(4e11 / 1.0 / 2e12)


def test_the_peak_is_the_best_of_its_measurements():
    before = Peak("openvino", "bfloat16", tflops=0.3, n=2048, seconds=2.0, threads=2, median_tflops=0.2)
    after = Peak("openvino", "bfloat16", tflops=0.4, n=2048, seconds=3.0, threads=2, median_tflops=0.35)
    best = best_of(before, after, None)
    assert best.tflops == 0.4 and best.median_tflops == 0.35 and best.measurements == 2 and best.seconds == 5.0


def test_feature_reuse_and_token_merging_are_counted_as_they_run():
    """A reused evaluation counts the shallow blocks only (what runs them, on real tensors, by hand); a merged UNet
    counts the merged attention."""
    from lcm_live.engine.feature_reuse import (
        FeatureReuse,
        FeatureReuseUNet,
        capturing_deep_feature,
        shallow_forward,
    )

    unet = _tiny_unet(time_cond_proj_dim=16)
    wrapped = FeatureReuseUNet(unet, FeatureReuse(2))
    inputs = F._unet_inputs(unet.config, 8, 8)
    real = {k: torch.randn(v.shape) for k, v in inputs.items()}
    with torch.no_grad(), capturing_deep_feature(unet) as store:
        unet(**real)
    shallow = F.shallow_unet_flops(wrapped, 8, 8)
    assert shallow == _hand_sum(unet, lambda: shallow_forward(unet, deep_feature=store["feature"], **real))
    assert 0 < shallow < F.unet_flops(wrapped, 8, 8)
    assert F.reuse_of(wrapped) is wrapped.reuse and F.reuse_of(unet) is None

    pytest.importorskip("tomesd")
    from diffusers import UNet2DConditionModel

    from lcm_live.engine.tome import apply_token_merging

    def top_attention():
        torch.manual_seed(0)
        return UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4).eval()

    merged = top_attention()
    apply_token_merging(merged, 0.5)
    assert F.unet_flops(merged, 16, 16) < F.unet_flops(top_attention(), 16, 16)


def test_a_path_with_an_int8_autoencoder_is_held_to_each_stage_s_own_peak():
    from lcm_live.bench.roofline import mixed_peak

    bf16 = Peak("openvino", "bfloat16", 0.4, 2048, 1.0, 2, median_tflops=0.4)
    int8 = Peak("openvino", "int8", 0.8, 2048, 1.0, 2, median_tflops=0.8)
    flops = {"unet": 0.4e12, "decode": 0.8e12, "text_encoder": 0.0}
    assert mixed_peak(flops, {}, bf16) is bf16  # one precision: the UNet's peak as before
    mixed = mixed_peak(flops, {"decode": int8, "encode": int8}, bf16)
    # 1.2 TFLOP that would take 1 s (UNet at 0.4) + 1 s (decode at 0.8): 0.6 TFLOP/s, between the two peaks.
    assert mixed.tflops == pytest.approx(0.6) and mixed.dtype == "bfloat16+int8"
    out = path_roofline({"unet": 1, "decode": 1}, {"unet": 2.0, "decode": 1.0}, flops, 3.0, bf16,
                        {"decode": int8, "encode": int8})
    assert out["peak"]["tflops"] == pytest.approx(0.6)
    assert out["roofline_fraction"] == pytest.approx(1.2 / 3.0 / 0.6)
    # Each stage against its own GEMM: the UNet's bf16, the decoder's int8.
    assert out["stage_fractions"]["unet"] == pytest.approx(0.4 / 2.0 / 0.4)
    assert out["stage_fractions"]["decode"] == pytest.approx(0.8 / 1.0 / 0.8)
