"""Model presets and conditioning images on Ray Serve (issue 16): each generator replica's worker switches between
the presets (studio/switching.py), its ``model`` messages and what it holds reach the ingress (``GET /api/models``),
and a reference image and two ControlNets' images cross the Ray wire (studio/ray_wire.py) to the engine.

On a local Ray cluster of its own (one replica of tests/studio/ray_engines.py's engine, which paints what reached
it); the wire's size checks without one. Skips, saying why, when ``import ray`` fails."""

from __future__ import annotations

import io
import json
import urllib.request
from typing import Any

import pytest
from PIL import Image
from websockets.sync.client import connect

from lcm_live.config import ModelPreset, Settings, StudioSettings
from lcm_live.errors import UserError

from . import ray_engines
from .ray_engines import colour_at
from .test_ray_app import AUTH, TOKEN, _readyz, local_studio, needs_ray, next_of, params, wait_for

RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


# ---- without a cluster ---------------------------------------------------------------------------------------------
@needs_ray
def test_wire_images_are_checked_again_in_the_replica():
    from lcm_live.studio.ray_wire import check_images

    small = Image.new("RGB", (64, 64))
    limits = {"controlnets": 2, "max_pixels": 128 * 128, "max_side": 128}
    images = {"reference": small, "control_images": [small]}
    assert check_images(images, **limits) == images
    assert check_images(None, **limits) == {}
    with pytest.raises(UserError, match=r"ip_adapter_image: 256x64 is over") as err:
        check_images({"reference": Image.new("RGB", (256, 64))}, **limits)
    assert err.value.field == "ip_adapter_image"
    with pytest.raises(UserError, match="2 image\\(s\\) for a server with 2 ControlNet") as err:
        check_images({"control_images": [small, small]}, **limits)
    assert err.value.field == "control_images"
    with pytest.raises(UserError, match="unknown key 'canvas'"):
        check_images({"canvas": small}, **limits)
    with pytest.raises(UserError, match=r"control_images\[0\]: a bytes, not a picture"):
        check_images({"control_images": [b"png"]}, **limits)


@needs_ray
def test_serve_ray_takes_several_models(monkeypatch):
    """``serve --ray --model A --model B``: the presets go to the Ray application (they were refused before)."""
    from lcm_live.cli import main as cli_main
    from lcm_live.studio import ray_launch

    got: dict[str, Any] = {}
    monkeypatch.setattr(ray_launch, "serve_with_ray", lambda settings, options, **kw: got.update(s=settings) or 0)
    assert cli_main(["serve", "--ray", "--model", "a", "--model", "b", "--fake-engine", "{}"]) == 0
    assert [p.name for p in got["s"].models] == ["a", "b"]


@needs_ray
def test_serve_run_builder_reads_a_models_file(tmp_path, monkeypatch):
    """``serve run lcm_live.studio.ray_app:app models=models.toml``: the presets reach both deployments."""
    from lcm_live.studio.ray_app import app

    monkeypatch.delenv("LCM_LIVE_TOKEN", raising=False)
    path = tmp_path / "models.toml"
    path.write_text('[models.fast]\nmodel = "x"\n[models.slow]\nmodel = "y"\n')
    built = app({"models": str(path), "fake_engine": "{}"})
    settings = built._bound_deployment.init_args[1]
    generator_settings = built._bound_deployment.init_args[0]._bound_deployment.init_args[0]
    assert [p.name for p in settings.models] == [p.name for p in generator_settings.models] == ["fast", "slow"]
    with pytest.raises(UserError, match="model and models go apart"):
        app({"models": str(path), "model": "x"})


# ---- on a local cluster --------------------------------------------------------------------------------------------
def preset_studio(replicas: int, namespace: str):
    """A fixture's body: (http base, ws URL) of the studio with presets a and b on ``replicas`` replicas, each
    holding one preset at a time."""
    import ray.cloudpickle

    from lcm_live.studio.ray_app import RayOptions

    ray.cloudpickle.register_pickle_by_value(ray_engines)  # the replica imports lcm_live, not tests/
    settings = Settings(studio=StudioSettings(max_sessions=2, default_previews=False, token=TOKEN, max_loaded_models=1),
                        models=[ModelPreset(name="a", model="fake-a"), ModelPreset(name="b", model="fake-b")])
    options = RayOptions(replicas=replicas, cpus_per_replica=0.5, engine_factory=ray_engines.conditioned_factory)
    yield from local_studio(settings, options, namespace)


@pytest.fixture(scope="module")
def ray_presets():
    """(http base, ws URL) of the studio with presets a and b (one loaded at a time) on one replica."""
    yield from preset_studio(1, "lcm-live-tests-models")


def models_listed(base: str) -> dict[str, dict[str, Any]]:
    with urllib.request.urlopen(urllib.request.Request(base + "/api/models", headers=AUTH), timeout=5) as res:
        return {m["name"]: m for m in json.loads(res.read())["models"]}


def _png(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def near(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """Within 2 per channel: the frame the client gets is encoded lossily (and the images were fitted)."""
    return max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 2


def _layer(code: bytes, data: bytes, index: int = 0) -> bytes:
    return b"LCML" + code + bytes([index]) + b"\0\0" + data


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_switching_presets_on_ray(ray_presets):
    """A switch loads the preset on the replica with ``model`` messages, the frame is the new preset's, and
    ``GET /api/models`` follows what the replica holds (one at a time: the other is evicted)."""
    base, url = ray_presets
    wait_for(lambda: models_listed(base)["a"]["state"] == "loaded", 20, "preset a loaded in /api/models")
    listed = models_listed(base)
    assert listed["a"]["default"] and listed["a"]["ready"] and listed["b"]["state"] == "unloaded"
    with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
        hello = next_of(ws, "hello")
        assert hello["schema"]["properties"]["model"]["enum"] == ["a", "b"]
        ws.send(params(prompt="one", model="b", num_inference_steps=2, seed=1))
        seen: list[dict[str, Any]] = []
        frame = next_of(ws, "final", timeout=30, seen=seen)
        states = [m["state"] for m in seen if m["type"] == "model" and m["name"] == "b"]
        assert states[0] == "loading" and states[-1] == "ready", seen
        assert frame["params"]["model"] == "b"
        listed = models_listed(base)
        assert (listed["b"]["state"], listed["a"]["state"]) == ("loaded", "unloaded")
        ws.send(params(prompt="two", model="nope", num_inference_steps=2))
        error = next_of(ws, "error")
        assert error["field"] == "model" and "one of a, b" in error["message"]  # the allowlist, before any Ray call
        ws.send(params(prompt="two", model="a", num_inference_steps=2, seed=1))
        assert next_of(ws, "final", timeout=30)["params"]["model"] == "a"
    assert models_listed(base)["a"]["state"] == "loaded"


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_reference_and_two_control_images_reach_the_engine(ray_presets):
    """The reference image (layer i), the canvas (net 0) and net 1's image (layer n1), with their scales, reach the
    replica's engine: its frame paints each one's colour and the scales."""
    base, url = ray_presets
    with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
        schema = next_of(ws, "hello")["schema"]["properties"]
        assert "ip_adapter_scale" in schema and schema["controlnet_conditioning_scale"]["type"] == "array"
        ws.send(_layer(b"i", _png(RED)))
        ws.send(_png(GREEN))  # the canvas: net 0's image in control mode (as it is: control_preprocess none)
        ws.send(_layer(b"n", _png(BLUE), index=1))
        ws.send(params(prompt="conditioned", mode="control", control_preprocess="none", num_inference_steps=2, seed=5,
                       width=256, height=256, ip_adapter_scale=0.5, controlnet_conditioning_scale=[0.8, 0.3]))
        frame = next_of(ws, "final", timeout=30)
        image = Image.open(io.BytesIO(frame["_bytes"]))
        assert near(colour_at(image, 0.25, 0.25), RED) and near(colour_at(image, 0.75, 0.25), GREEN)
        assert near(colour_at(image, 0.25, 0.75), BLUE) and near(colour_at(image, 0.75, 0.75), (50, 80, 30))
        ws.send(_layer(b"i", b""))  # the reference cleared: the next frame is made without it
        ws.send(params(prompt="conditioned", mode="control", control_preprocess="none", num_inference_steps=2, seed=6,
                       width=256, height=256, ip_adapter_scale=0.5, controlnet_conditioning_scale=[0.8, 0.3]))
        image = Image.open(io.BytesIO(next_of(ws, "final", timeout=30)["_bytes"]))
        assert near(colour_at(image, 0.25, 0.25), (0, 0, 0)) and near(colour_at(image, 0.75, 0.75), (0, 80, 30))


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_a_switch_between_tiny_real_models_on_a_replica(ray_presets, tiny_lcm_dir):
    """Last in the module: the application deployed again in place with two presets of the tiny diffusers LCM
    (tests/conftest.py), loaded by path in the replica through the real engine factory: a switch loads the other
    with its ``model`` messages and makes a real frame of it."""
    from ray import serve

    from lcm_live.config import EngineSettings
    from lcm_live.studio.ray_app import APP_NAME, RayOptions, build_application

    base, url = ray_presets
    presets = [ModelPreset(name="tiny-a", model=str(tiny_lcm_dir)), ModelPreset(name="tiny-b", model=str(tiny_lcm_dir))]
    settings = Settings(engine=EngineSettings(device="cpu", dtype="float32"), models=presets,
                        studio=StudioSettings(max_sessions=2, token=TOKEN, warmup_width=64, warmup_height=64))
    serve.run(build_application(settings, RayOptions(replicas=1, cpus_per_replica=1)), name=APP_NAME,
              route_prefix="/")
    wait_for(lambda: set(_safe_models(base)) == {"tiny-a", "tiny-b"}, 60, "the new ingress (the old one drains)")
    wait_for(lambda: _safe_models(base)["tiny-a"]["state"] == "loaded", 60, "tiny-a loaded on the replica")
    wait_for(lambda: _readyz(base).get("status") == "ready", 30, "the new ingress counting its replica")
    with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
        assert next_of(ws, "hello")["info"]["kind"] == "lcm"
        seen: list[dict[str, Any]] = []
        ws.send(params(prompt="a red circle", model="tiny-b", seed=3, width=64, height=64, num_inference_steps=2))
        frame = next_of(ws, "final", timeout=90, seen=seen)
        states = [m["state"] for m in seen if m["type"] == "model"]
        assert states[0] == "loading" and states[-1] == "ready", seen
        assert frame["params"]["model"] == "tiny-b" and frame["width"] == 64
        image = Image.open(io.BytesIO(frame["_bytes"])).convert("RGB")
        assert len(set(image.getdata())) > 16  # a decoded picture, not a flat colour
    listed = _safe_models(base)
    assert (listed["tiny-b"]["state"], listed["tiny-a"]["state"]) == ("loaded", "unloaded")  # one on a CPU


def _safe_models(base: str) -> dict[str, dict[str, Any]]:
    try:
        return models_listed(base)
    except OSError:
        return {}
