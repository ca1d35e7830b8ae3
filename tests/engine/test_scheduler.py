"""HostLCMScheduler computes diffusers' LCMScheduler's function, bit for bit on a CPU, with its scalars on the host.

Whether it also keeps the CUDA loop free of waits is tests/engine/test_cuda.py's (a GPU machine's) business.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import EulerDiscreteScheduler, LCMScheduler
from diffusers.utils.torch_utils import randn_tensor

from lcm_live.engine.architectures import build_pipeline
from lcm_live.engine.scheduler import HostLCMScheduler, draw_noise, use_host_scheduler

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPE = (2, 4, 8, 8)


def schedulers(**config):
    base = LCMScheduler(**config)
    return base, HostLCMScheduler.from_config(base.config)


def run(scheduler, num_inference_steps, dtype, *, generator_list=False, set_kwargs=None, begin_index=None):
    """Every step's (prev_sample, denoised) for fixed model outputs, with seeded generators."""
    scheduler.set_timesteps(num_inference_steps, device="cpu", **(set_kwargs or {}))
    if begin_index is not None:
        scheduler.set_begin_index(begin_index)
    outputs = torch.Generator().manual_seed(99)
    sample = torch.randn(SHAPE, generator=outputs).to(dtype)
    generator = ([torch.Generator().manual_seed(s) for s in (5, 6)] if generator_list
                 else torch.Generator().manual_seed(5))
    steps = []
    timesteps = scheduler.timesteps[begin_index or 0:]
    for t in timesteps:
        model_output = torch.randn(SHAPE, generator=outputs).to(dtype)
        sample, denoised = scheduler.step(model_output, t, sample, generator=generator, return_dict=False)
        steps.append((sample, denoised))
    return steps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("num_inference_steps", [1, 2, 4, 8])
def test_steps_are_bit_identical_to_lcm_scheduler(dtype, prediction_type, num_inference_steps):
    base, host = schedulers(prediction_type=prediction_type, beta_schedule="scaled_linear", beta_start=0.00085,
                            beta_end=0.012)
    expected = run(base, num_inference_steps, dtype)
    got = run(host, num_inference_steps, dtype)
    assert len(got) == len(expected) == num_inference_steps
    for (prev, denoised), (prev_ref, denoised_ref) in zip(got, expected, strict=True):
        assert prev.dtype == prev_ref.dtype == dtype
        assert torch.equal(denoised, denoised_ref)
        assert torch.equal(prev, prev_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_batched_generators_strength_schedules_and_begin_index_match(dtype):
    for kwargs in ({"generator_list": True}, {"set_kwargs": {"strength": 0.5}},
                   {"begin_index": 1}, {"set_kwargs": {"original_inference_steps": 30}}):
        base, host = schedulers(timestep_scaling=10.0, set_alpha_to_one=False, clip_sample=True)
        expected, got = run(base, 4, dtype, **kwargs), run(host, 4, dtype, **kwargs)
        assert len(got) == len(expected) > 0, kwargs
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), kwargs


def test_the_schedule_is_kept_on_the_host_and_the_last_timestep_is_an_int():
    _, host = schedulers()
    host.set_timesteps(4, device="cpu")
    assert host.host_timesteps == host.timesteps.tolist() == [999, 759, 499, 259]
    assert host.last_timestep is None
    sample = torch.zeros(SHAPE)
    for expected in host.host_timesteps[:2]:
        sample = host.step(torch.randn(SHAPE), host.timesteps[host.step_index or 0], sample,
                           generator=torch.Generator().manual_seed(0)).prev_sample
        assert host.last_timestep == expected and isinstance(host.last_timestep, int)
    host.set_timesteps(2, device="cpu")  # a new call starts over
    assert host.last_timestep is None and host.host_timesteps == [999, 499]


def test_the_host_alphas_survive_add_noise_moving_the_device_copy():
    """Image-to-image calls add_noise after set_timesteps, which replaces alphas_cumprod (moved to the latents'
    device; zeros stand in for that copy here): step keeps using the host copy taken at the first set_timesteps."""
    base, host = schedulers()
    expected = run(base, 2, torch.float32)
    host.set_timesteps(2)
    host.alphas_cumprod = host.alphas_cumprod * 0  # whatever add_noise leaves there
    got = run(host, 2, torch.float32)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, expected, strict=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_noise_is_drawn_in_float32_and_cast(dtype):
    single = draw_noise(SHAPE, torch.Generator().manual_seed(3), torch.device("cpu"), dtype)
    assert single.dtype == dtype
    assert torch.equal(single, torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)).to(dtype))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    batch = draw_noise(SHAPE, gens, torch.device("cpu"), dtype)
    reference = randn_tensor(SHAPE, generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                             device=torch.device("cpu"), dtype=torch.float32).to(dtype)
    assert torch.equal(batch, reference)
    # Each member's noise is its own generator's, as it would be alone.
    assert torch.equal(batch[1:], draw_noise((1, *SHAPE[1:]), torch.Generator().manual_seed(2), "cpu", dtype))


def test_use_host_scheduler_replaces_only_a_plain_lcm_scheduler():
    pipe = build_pipeline("tiny", dtype=torch.float32)
    config = dict(pipe.scheduler.config)
    assert use_host_scheduler(pipe) is True
    assert type(pipe.scheduler) is HostLCMScheduler
    assert {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")} == \
        {k: v for k, v in config.items() if not k.startswith("_")}
    assert use_host_scheduler(pipe) is True  # already one: kept
    pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    assert use_host_scheduler(pipe) is False and type(pipe.scheduler) is EulerDiscreteScheduler


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_whole_pipeline_call_gives_the_same_latents(dtype):
    def final(scheduler_cls):
        pipe = build_pipeline("tiny", dtype=torch.float32).to(dtype=dtype)
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red square", num_inference_steps=4, guidance_scale=1.5, width=64, height=64,
                    generator=torch.Generator().manual_seed(7), output_type="latent").images

    assert torch.equal(final(HostLCMScheduler), final(LCMScheduler))


def test_initial_latents_are_prepare_latents_noise_in_every_dtype():
    """The engine passes these as ``latents=``: in float32 exactly what the pipeline would draw, and in a half
    dtype the same noise rounded (not a half-precision draw, which some torch builds sample differently)."""
    from lcm_live.engine.scheduler import initial_latents

    pipe = build_pipeline("tiny", dtype=torch.float32)
    expected = pipe.prepare_latents(2, 4, 64, 48, torch.float32, torch.device("cpu"),
                                    torch.Generator().manual_seed(11))
    ours = initial_latents(pipe, 2, 48, 64, torch.Generator().manual_seed(11), "cpu", torch.float32)
    f = pipe.vae_scale_factor
    assert ours.shape == (2, 4, 64 // f, 48 // f) and torch.equal(ours, expected)
    half = initial_latents(pipe, 2, 48, 64, torch.Generator().manual_seed(11), "cpu", torch.float16)
    assert half.dtype == torch.float16 and torch.equal(half, expected.half())


def test_a_seed_gives_the_same_image_in_every_dtype_even_where_half_draws_differ(monkeypatch):
    """Some torch builds (2.11, CUDA machines) draw a different sequence for float16/bfloat16 than for float32 from
    one CPU seed. Simulated here by a torch.randn whose half-precision draws are negated: diffusers' pipeline in
    bfloat16 then starts elsewhere than in float32, the engine (float32 draws, cast) does not."""
    from lcm_live.config import EngineSettings
    from lcm_live.engine.model import LoadedModel
    from lcm_live.engine.pipeline import Engine
    from lcm_live.engine.request import GenerationRequest

    real_randn = torch.randn
    half = (torch.float16, torch.bfloat16)

    def skewed_randn(*args, dtype=None, **kwargs):
        if dtype in half:
            return (-real_randn(*args, dtype=torch.float32, **kwargs)).to(dtype)
        return real_randn(*args, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch, "randn", skewed_randn)

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0))

    def engine_latents(dtype):
        pipe = build_pipeline("tiny", dtype=torch.float32).to(dtype=dtype)
        engine = Engine(LoadedModel(pipe=pipe, kind="lcm", arch="sd15", name="tiny", native_width=64,
                                    native_height=64), EngineSettings(model="tiny"), "cpu", dtype)
        return engine.generate(GenerationRequest("a red square", seed=4, num_inference_steps=4,
                                                 output_type="latent")).images[0]

    def diffusers_latents(dtype):
        pipe = build_pipeline("tiny", dtype=torch.float32).to(dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        return pipe("a red square", num_inference_steps=4, guidance_scale=8.0, width=64, height=64,
                    generator=torch.Generator().manual_seed(4), output_type="latent").images[0]

    assert cos(diffusers_latents(torch.bfloat16), diffusers_latents(torch.float32)) < 0.5  # the skew bites
    assert cos(engine_latents(torch.bfloat16), engine_latents(torch.float32)) > 0.99


def test_set_timesteps_keeps_lcm_schedulers_signature_and_custom_timesteps():
    import inspect

    def names(cls):
        return [(p.name, p.default) for p in inspect.signature(cls.set_timesteps).parameters.values()]

    assert names(HostLCMScheduler) == names(LCMScheduler)
    base, host = schedulers()
    for scheduler in (base, host):
        scheduler.set_timesteps(timesteps=[999, 759, 499, 259], device="cpu")
    assert host.host_timesteps == base.timesteps.tolist() == [999, 759, 499, 259]
