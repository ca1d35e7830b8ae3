"""Model presets on several Ray replicas: each request goes to a replica that holds its preset (Serve's model
multiplexing: studio/ray_worker.py tags a request with its preset, studio/ray_app.py's replicas report theirs), so
sessions on two presets settle on one replica each instead of reloading on every frame.

On a local Ray cluster of its own with two replicas (tests/studio/ray_engines.py's engines, 0.3 s a load), each
holding one preset at a time. Skips, saying why, when ``import ray`` fails."""

from __future__ import annotations

import time
from typing import Any

import pytest
from websockets.sync.client import connect

from lcm_live.config import ModelPreset, StudioSettings

from .test_ray_app import AUTH, needs_ray, next_of, params
from .test_ray_models import models_listed, preset_studio


@pytest.fixture(scope="module")
def two_replicas():
    """(http base, ws URL) of the studio with presets a and b on two replicas, one preset loaded on each at most."""
    yield from preset_studio(2, "lcm-live-tests-multiplex")


@needs_ray
def test_a_request_is_tagged_with_its_preset_only_where_there_are_presets():
    from types import SimpleNamespace

    from lcm_live.studio.metrics import StudioMetrics
    from lcm_live.studio.models import ModelRegistry
    from lcm_live.studio.ray_worker import RayWorker

    def options(models: ModelRegistry, model: str | None) -> dict[str, Any]:
        worker = RayWorker(None, StudioSettings(), StudioMetrics(), models=models)
        return worker._request_options(SimpleNamespace(params=SimpleNamespace(model=model)))

    presets = ModelRegistry([ModelPreset(name="a", model="fake-a"), ModelPreset(name="b", model="fake-b")])
    assert options(presets, "b") == {"stream": True, "multiplexed_model_id": "b"}
    assert options(presets, None) == {"stream": True, "multiplexed_model_id": "a"}  # the default preset's name
    assert options(ModelRegistry.implicit_default(), None) == {"stream": True}  # one model: routed by load


@pytest.mark.slow
@pytest.mark.timeout(240)
@needs_ray
def test_each_preset_settles_on_a_replica_of_its_own(two_replicas):
    """16 frames alternating between presets a and b, one replica each holding one preset: routed by load alone,
    about every other frame lands on the replica holding the other preset and reloads (half of 15 on average; at
    most 2 in 0.4 % of runs; 10 loads when measured); routed by preset, b loads once (twice if a router had not yet
    heard from a replica)."""
    base, url = two_replicas
    loads: list[dict[str, Any]] = []
    with connect(url, additional_headers=AUTH, open_timeout=10) as ws:
        next_of(ws, "hello")
        for i in range(16):
            name = "ab"[i % 2]
            seen: list[dict[str, Any]] = []
            ws.send(params(prompt=f"frame {i}", model=name, num_inference_steps=2, seed=i))
            frame = next_of(ws, "final", timeout=30, seen=seen)
            assert frame["params"]["model"] == name
            loads += [m for m in seen if m["type"] == "model" and m["state"] == "loading" and m["progress"] == 0]
            time.sleep(0.5)  # a replica tells the routers what it holds every 0.1 s (through the controller)
    assert len(loads) <= 2, loads
    listed = models_listed(base)
    assert listed["a"]["state"] == "loaded" and listed["b"]["state"] == "loaded", listed  # one on each replica
