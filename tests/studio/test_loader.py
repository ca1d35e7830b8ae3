"""Model loads off the worker thread (studio/loader.py, studio/worker_models.py) on FakeEngines: a slow load does
not hold up another session's frames on the same worker; byte progress arrives in order, rising, throttled; a
second request joins the load in flight; a session that asks for another preset meanwhile cancels the first load;
a failed load leaves nothing; with --max-loaded-models 1 the model in use stays until the new one is installed."""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import weakref
from collections import Counter
from pathlib import Path

import safetensors.torch
import torch

from lcm_live.config import ModelPreset
from lcm_live.engine import load_progress
from lcm_live.studio.fake_engine import FakeEngine, FakeEngineConfig
from lcm_live.studio.jobs import Job
from lcm_live.studio.loader import MAX_MESSAGES_PER_S, LoadTask, ModelLoader

from .conftest import next_final, next_of, params, wait_until
from .test_models import model_messages, models_app

PRESETS = [ModelPreset(name=n, model=f"org/{n}") for n in ("a", "b", "c")]


class Factory:
    """A FakeEngine per preset; a preset in ``gates`` waits for its event first, one in ``weights`` reads those
    safetensors files (announced, then read one by one ``pause_s`` apart), one in ``fail`` raises after that."""

    def __init__(self, *, gated=(), weights: list[Path] = (), fail=(), pause_s: float = 0.0):
        self.gates = {name: threading.Event() for name in gated}
        self.weights, self.fail, self.pause_s = list(weights), set(fail), pause_s
        self.calls: Counter[str] = Counter()
        self.built: dict[str, list[weakref.ref]] = {}

    def __call__(self, device=None, *, preset=None):
        name = preset.name
        self.calls[name] += 1
        if name in self.gates:
            assert self.gates[name].wait(20), "the test never opened the gate"
        if name != "a" and self.weights:
            load_progress.expect(self.weights)
            for path in self.weights:
                time.sleep(self.pause_s)
                safetensors.torch.load_file(str(path))
        engine = FakeEngine(FakeEngineConfig(model=preset.model))
        self.built.setdefault(name, []).append(weakref.ref(engine))
        if name in self.fail:
            raise RuntimeError(f"{name}: the disk went away")
        return engine


def weight_files(root: Path) -> list[Path]:
    files = []
    for component in ("text_encoder", "unet", "vae"):
        (root / component).mkdir(parents=True)
        path = root / component / "model.safetensors"
        safetensors.torch.save_file({f"w{k}": torch.zeros(4096) for k in range(8)}, str(path))
        files.append(path)
    return files


@contextlib.contextmanager
def two_sessions(factory: Factory, **studio_settings):
    """A studio on ``factory`` (presets a, b, c; a loaded at start) and two WebSocket sessions past their hello."""
    from fastapi.testclient import TestClient

    app = models_app(PRESETS, factory, max_sessions=2, **studio_settings)
    with TestClient(app) as client:
        studio = app.state.studio
        wait_until(lambda: studio.worker.ready)
        with client.websocket_connect("/ws") as one, client.websocket_connect("/ws") as two:
            next_of(one, "hello"), next_of(two, "hello")
            yield studio, one, two


def test_a_slow_load_does_not_hold_up_another_sessions_frames_on_the_same_worker():
    factory = Factory(gated=["b"])
    with two_sessions(factory) as (studio, one, two):  # --max-loaded-models: 1 on a CPU
        two.send_text(params(prompt="q", seed=0))
        assert next_final(two)["params"]["model"] == "a"  # two uses a: kept while b loads
        one.send_text(params(prompt="p", seed=1, model="b"))
        assert next_of(one, "model")["state"] == "loading"
        wait_until(lambda: factory.calls["b"] == 1, what="b's load started")
        for seed in range(1, 4):  # b's load is stuck: a still serves the other session
            two.send_text(params(prompt="q", seed=seed))
            assert next_final(two)["params"]["model"] == "a"
        assert list(studio.worker.switcher.engines) == ["a"]
        factory.gates["b"].set()
        seen, frame = model_messages(one)
        assert seen[-1]["state"] == "ready" and frame["params"]["model"] == "b"
        assert list(studio.worker.switcher.engines) == ["b"]  # max 1: a evicted once b was in
        two.send_text(params(prompt="q", seed=9))  # a again: loaded again, on the loader thread
        seen, frame = model_messages(two)
        assert seen[0]["state"] == "loading" and frame["params"]["model"] == "a"


def test_byte_progress_arrives_in_order_rising_to_the_total(tmp_path):
    from fastapi.testclient import TestClient

    factory = Factory(weights=weight_files(tmp_path), pause_s=0.15)  # > 1/10 s apart: each file said
    app = models_app(PRESETS, factory, max_loaded_models=2)
    with TestClient(app) as client:
        wait_until(lambda: app.state.studio.worker.ready)
        with client.websocket_connect("/ws") as ws:
            next_of(ws, "hello")
            ws.send_text(params(prompt="p", seed=1, model="b"))
            seen, frame = model_messages(ws)
    assert frame["params"]["model"] == "b"
    assert [m["state"] for m in seen] == ["loading"] * (len(seen) - 1) + ["ready"]
    progress = [m["progress"] for m in seen]
    assert progress[0] == 0.0 and progress[-2:] == [0.9, 1.0] and progress == sorted(progress)
    reads = [m for m in seen if "bytes_read" in m]
    total = sum(p.stat().st_size for p in factory.weights)
    assert [m["component"] for m in reads][-1] == "vae" and {"text_encoder", "unet"} <= {m["component"] for m in reads}
    assert all(m["bytes_total"] == total for m in reads) and reads[-1]["bytes_read"] == total
    assert [m["bytes_read"] for m in reads] == sorted(m["bytes_read"] for m in reads)
    assert "MB" in reads[-1]["message"] and "/" not in reads[-1]["message"]  # no path in what clients read


def test_progress_messages_are_throttled_but_each_stage_is_said():
    told: list[tuple] = []

    class Sink:
        def on_model(self, job, name, state, progress, message, **detail):
            told.append((state, progress, detail))

    loader = ModelLoader("w", build=lambda name: None, warm=lambda e, n: None, on_finished=lambda *a: None)
    task = LoadTask("b", waiters={"s": Job(params=None, sink=Sink())})
    t0 = time.monotonic()
    for k in range(200):  # a fast read: 200 tensors within a few ms
        loader._say(task, 0.02 + k / 1000, "reading", {"bytes_read": k})
    loader._say(task, 0.9, "warming up", {}, stage=True)
    elapsed = time.monotonic() - t0
    assert len(told) - 1 <= 1 + elapsed * MAX_MESSAGES_PER_S and told[-1][:2] == ("loading", 0.9)
    assert task.progress == 0.9  # a joiner is told where the load is now


def test_a_second_request_joins_the_load_in_flight():
    factory = Factory(gated=["b"])
    with two_sessions(factory, max_loaded_models=2) as (_, one, two):
        one.send_text(params(prompt="p", seed=1, model="b"))
        next_of(one, "model")
        two.send_text(params(prompt="q", seed=2, model="b"))
        assert next_of(two, "model")["state"] == "loading"  # joined: told at once
        factory.gates["b"].set()
        assert model_messages(one)[1]["params"]["model"] == "b"
        assert model_messages(two)[1]["params"]["model"] == "b"
        assert factory.calls["b"] == 1


def test_asking_for_another_preset_meanwhile_cancels_the_load_and_leaves_nothing():
    from fastapi.testclient import TestClient

    factory = Factory(gated=["b"])
    app = models_app(PRESETS, factory, max_loaded_models=2)
    with TestClient(app) as client:
        studio = app.state.studio
        wait_until(lambda: studio.worker.ready)
        with client.websocket_connect("/ws") as ws:
            next_of(ws, "hello")
            ws.send_text(params(prompt="p", seed=1, model="b"))
            next_of(ws, "model")
            wait_until(lambda: factory.calls["b"] == 1, what="b's load started")
            ws.send_text(params(prompt="p", seed=1, model="c"))  # b is not wanted any more
            wait_until(lambda: not studio.worker.loader.loading("b"), what="b's load cancelled")
            factory.gates["b"].set()  # b's factory returns: what it built is dropped
            seen, frame = model_messages(ws)
            assert frame["params"]["model"] == "c" and ("c", "ready") in [(m["name"], m["state"]) for m in seen]
            gc.collect()
            assert all(ref() is None for ref in factory.built["b"]), "the cancelled engine is still referenced"
            assert list(studio.worker.switcher.engines) == ["a", "c"]
            listed = {m["name"]: m for m in client.get("/api/models").json()["models"]}
            assert (listed["b"]["state"], listed["b"]["error"]) == ("unloaded", None)


def test_a_failed_load_fails_only_that_switch_and_leaves_nothing(tmp_path):
    factory = Factory(weights=weight_files(tmp_path), fail=["b"])
    with two_sessions(factory, max_loaded_models=2) as (studio, one, two):
        one.send_text(params(prompt="p", seed=1, model="b"))
        while (msg := next_of(one, "model"))["state"] == "loading":
            pass
        assert msg["state"] == "error" and "the disk went away" in msg["message"]
        err = next_of(one, "error")
        assert (err["code"], err["field"]) == ("model_unavailable", "model")
        two.send_text(params(prompt="q", seed=2))
        assert next_final(two)["params"]["model"] == "a"
        gc.collect()
        assert factory.built["b"] and all(ref() is None for ref in factory.built["b"])
        assert list(studio.worker.switcher.engines) == ["a"] and studio.worker.ready


def test_a_model_no_other_session_uses_is_freed_before_the_load():
    factory = Factory(gated=["b"])
    with two_sessions(factory) as (studio, one, _):  # --max-loaded-models 1; the second session sends nothing
        one.send_text(params(prompt="p", seed=1))
        assert next_final(one)["params"]["model"] == "a"
        first_a = factory.built.get("a", [])
        one.send_text(params(prompt="p", seed=1, model="b"))
        wait_until(lambda: factory.calls["b"] == 1, what="b's load started")
        assert list(studio.worker.switcher.engines) == []  # a went first: one model in memory at a time
        factory.gates["b"].set()
        assert model_messages(one)[1]["params"]["model"] == "b"
        gc.collect()
        assert all(ref() is None for ref in first_a)
