"""Feature reuse (engine/feature_reuse.py): off it is the exact path; at a refresh evaluation it equals the exact
path; on a reused evaluation only the deep feature is old (the shallow blocks see the new input and timestep)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lcm_live.config import EngineSettings
from lcm_live.engine.architectures import build_pipeline
from lcm_live.engine.feature_reuse import (
    FeatureReuse,
    FeatureReuseUNet,
    capturing_deep_feature,
    shallow_forward,
)
from lcm_live.engine.speedups import apply_speedups, check_speedups
from lcm_live.engine.tiny import tiny_components, tiny_sdxl_components
from lcm_live.errors import UserError

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino not installed")


def inputs(unet, seed=0, batch=1):
    g = torch.Generator().manual_seed(seed)
    kw = {"encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, generator=g),
          "timestep_cond": torch.randn(batch, 32, generator=g)}
    if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text and size ids
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 40, generator=g),
                                   "time_ids": torch.randn(batch, 6, generator=g)}
    return torch.randn(batch, 4, 16, 16, generator=g), kw


def exact(unet, x, t, kw):
    with torch.no_grad():
        return unet(x, t, return_dict=False, **kw)[0]


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def unet(request, tmp_path_factory):
    build = tiny_components if request.param == "sd15" else tiny_sdxl_components
    return build(tokenizer_dir=tmp_path_factory.mktemp("tok"))["unet"]


def test_shallow_blocks_around_the_same_evaluations_feature_are_the_exact_output(unet):
    x, kw = inputs(unet, batch=2)
    with torch.no_grad(), capturing_deep_feature(unet) as store:
        out = unet(x, 500, return_dict=False, **kw)[0]
    assert store["feature"].shape == (2, 16, 16, 16)  # the up block before the last: 16 channels at full size
    with torch.no_grad():
        assert torch.equal(shallow_forward(unet, x, 500, deep_feature=store["feature"], **kw), out)


def test_interval_1_is_the_exact_path(unet):
    wrapped = FeatureReuseUNet(unet, FeatureReuse(1))
    x, kw = inputs(unet)
    for step, t in enumerate([999, 759, 499, 259]):
        x_t = x + 0.01 * step
        assert torch.equal(exact(wrapped, x_t, t, kw), exact(unet, x_t, t, kw))
    assert wrapped.reuse.reused_evaluations == 0 and wrapped.reuse.full_evaluations == 4


def test_reuse_refreshes_every_k_and_reuses_only_the_deep_feature(unet):
    reuse = FeatureReuse(3)
    wrapped = FeatureReuseUNet(unet, reuse)
    x, kw = inputs(unet)
    with torch.no_grad(), capturing_deep_feature(unet) as store:
        first = unet(x, 500, return_dict=False, **kw)[0]
    feature = store["feature"]
    assert torch.equal(exact(wrapped, x, 500, kw), first)  # evaluation 1: a refresh, the exact output
    for i in (1, 2):  # evaluations 2 and 3: a stroke later (a small change), the same deep feature
        x_i = x + 0.02 * i
        out = exact(wrapped, x_i, 500, kw)
        with torch.no_grad():
            assert torch.equal(out, shallow_forward(unet, x_i, 500, deep_feature=feature, **kw))
        assert not torch.equal(out, exact(unet, x_i, 500, kw))  # an approximation ...
        cos = torch.nn.functional.cosine_similarity(out.flatten(), exact(unet, x_i, 500, kw).flatten(), dim=0)
        assert cos > 0.9  # ... close to the exact output
    x_4 = x + 0.06
    assert torch.equal(exact(wrapped, x_4, 500, kw), exact(unet, x_4, 500, kw))  # evaluation 4: every K=3
    assert (reuse.full_evaluations, reuse.reused_evaluations) == (2, 2)
    assert reuse.last_refresh_reason == "every 3 evaluations"


@pytest.mark.parametrize("change", ["prompt", "shape", "seed"])
def test_a_new_prompt_size_or_seed_refreshes(unet, change):
    reuse = FeatureReuse(10)
    wrapped = FeatureReuseUNet(unet, reuse)
    x, kw = inputs(unet)
    exact(wrapped, x, 500, kw)
    if change == "prompt":
        kw = {**kw, "encoder_hidden_states": kw["encoder_hidden_states"] + 0.1}
    elif change == "shape":
        x = torch.nn.functional.interpolate(x, size=(8, 8))
    else:  # another seed: other noise at the same timestep, a large relative change
        x = 0.5 * x + 0.85 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    assert torch.equal(exact(wrapped, x, 500, kw), exact(unet, x, 500, kw))
    assert reuse.full_evaluations == 2
    assert reuse.last_refresh_reason.startswith("input moved" if change == "seed" else "conditioning or shape")


def test_reuse_between_steps_is_not_a_drift():
    """Another timestep is not compared with this one's input: steps of one generation reuse."""
    reuse = FeatureReuse(4, across_steps=True)
    x = torch.randn(1, 4, 8, 8)
    calls = []
    for t in (999, 499):
        reuse(x * (1 + t / 100), torch.tensor(t), ("c",), lambda: (calls.append("full") or x, x),
              lambda f: calls.append("shallow") or f)
    assert calls == ["full", "shallow"]


def test_feature_reuse_and_the_flags_it_does_not_combine_with():
    assert FeatureReuse(1).interval == 1
    with pytest.raises(ValueError, match="feature_reuse=0"):
        FeatureReuse(0)
    for extra, field in ((dict(controlnet="x"), "controlnet"), (dict(compile=True, backend="torch"), "compile")):
        with pytest.raises(UserError, match=f"--{field}") as err:
            check_speedups(EngineSettings(model="tiny", feature_reuse=3, **extra), "cpu", torch.float32)
        assert err.value.field == field


def final_latents(pipe, steps=4):
    out = pipe("a red square on a blue floor", num_inference_steps=steps, guidance_scale=1.5, width=64, height=64,
               generator=torch.Generator("cpu").manual_seed(0), output_type="latent")
    return out.images.float()


def tiny():
    pipe = build_pipeline("tiny", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_engine_flag_wraps_the_torch_unet_and_reuses_between_steps():
    pipe = tiny()
    assert apply_speedups(pipe, EngineSettings(model="tiny", backend="torch"), "cpu", torch.float32) == \
        ["channels_last"]  # off (K = 1): nothing of feature reuse
    reference = final_latents(pipe)
    pipe = tiny()
    applied = apply_speedups(pipe, EngineSettings(model="tiny", backend="torch", feature_reuse=2,
                                                  feature_reuse_across_steps=True), "cpu", torch.float32)
    assert applied[-1] == "feature_reuse:2:across-steps" and isinstance(pipe.unet, FeatureReuseUNet)
    out = final_latents(pipe)
    assert pipe.unet.reuse.stats() == {"interval": 2, "full_evaluations": 2, "reused_evaluations": 2}
    assert not torch.equal(out, reference)
    assert torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0) > 0.9


@needs_openvino
def test_openvino_runs_the_two_graphs_as_the_torch_path_does(tmp_path):
    settings = EngineSettings(model="tiny", backend="openvino", openvino_cache_dir=str(tmp_path), feature_reuse=2,
                              feature_reuse_across_steps=True)
    torch_pipe = tiny()
    apply_speedups(torch_pipe, settings.model_copy(update={"backend": "torch"}), "cpu", torch.float32)
    pipe = tiny()
    applied = apply_speedups(pipe, settings, "cpu", torch.float32)
    assert applied[-2:] == ["openvino:float32", "feature_reuse:2:across-steps"]
    a, b = final_latents(pipe), final_latents(torch_pipe)
    assert pipe.unet.feature_reuse.stats() == torch_pipe.unet.reuse.stats()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9999
    names = sorted(p.parent.name.split("_")[0] for p in tmp_path.rglob("unet.xml"))
    assert names == ["shallow", "unet-feature"]  # two IRs of their own; the UNet's own one is not needed


def test_drift_is_measured_within_one_conditioning_only():
    """Another prompt's latents at a timestep are not this prompt's previous frame: after a conditioning change,
    reuse at a timestep seen before is not refused as a drift."""
    reuse = FeatureReuse(3, across_steps=True)
    calls = []

    def evaluate(x, t, cond):
        return reuse(x, torch.tensor(t), (cond,), lambda: (calls.append("full") or x, x),
                     lambda f: calls.append("shallow") or f)

    a, b = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    evaluate(a, 999, "p"), evaluate(a, 499, "p")  # prompt p: full, then reused at t=499
    evaluate(b, 999, "q"), evaluate(b, 499, "q")  # prompt q: a refresh, then reused (p's t=499 latents forgotten)
    assert calls == ["full", "shallow", "full", "shallow"]


def test_by_default_a_feature_serves_only_its_own_timestep_in_later_frames():
    """Between live frames: the second generation's steps each reuse the first's feature at the same timestep;
    within a generation no step reuses another's."""
    pipe = tiny()
    apply_speedups(pipe, EngineSettings(model="tiny", backend="torch", feature_reuse=3), "cpu", torch.float32)
    first = final_latents(pipe)
    assert pipe.unet.reuse.stats()["reused_evaluations"] == 0  # 4 steps, 4 timesteps: all full
    again = final_latents(pipe)  # the same seed and prompt: the same latents at each timestep
    assert pipe.unet.reuse.stats() == {"interval": 3, "full_evaluations": 4, "reused_evaluations": 4}
    assert torch.equal(again, first)  # the same input at each step: the cached feature is the exact one
