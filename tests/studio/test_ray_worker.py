"""The RayWorker's per-session rules (studio/ray_worker.py) on a scripted Serve handle, without a cluster: one
replica (the newest input cancels the running request), two (two in flight, one waiting that newer input replaces,
older requests cancelled on a newer frame), and a replica lost mid-generation (the session told, the same job again).
They skip, saying why, when ``import ray`` fails (the `ray` extra)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from PIL import Image

from lcm_live.config import StudioSettings

try:
    import ray  # noqa: F401

    RAY_MISSING = None
except ImportError as exc:
    RAY_MISSING = f"Ray Serve is the optional `ray` extra: pip install 'lcm-live[ray]' (make test installs it): {exc}"
needs_ray = pytest.mark.skipif(RAY_MISSING is not None, reason=RAY_MISSING or "")


class _Response:
    """A scripted DeploymentResponseGenerator: the test puts events (or an exception) in; cancel() ends it."""

    def __init__(self, payload: dict[str, Any]):
        import asyncio

        self.payload = payload
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def cancel(self) -> None:
        from ray.serve.exceptions import RequestCancelledError

        self.cancelled = True
        self.events.put_nowait(RequestCancelledError("scripted"))

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self.events.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            raise StopAsyncIteration
        return item


class _Handle:
    def __init__(self):
        self.responses: list[_Response] = []

    def options(self, **_: Any) -> _Handle:
        return self

    @property
    def generate(self) -> _Handle:
        return self

    def remote(self, payload: dict[str, Any]) -> _Response:
        self.responses.append(_Response(payload))
        return self.responses[-1]


class _Sink:
    def __init__(self):
        self.calls: list[tuple] = []

    def wants_preview(self) -> bool:
        return True

    def on_frame(self, job, image, **info) -> None:
        self.calls.append(("frame", job.params.prompt, image.size))

    def on_error(self, job, code, message, field) -> None:
        self.calls.append(("error", job.params.prompt, code))

    def on_done(self, job, outcome) -> None:
        self.calls.append(("done", job.params.prompt, outcome))

    def on_notice(self, job, message) -> None:
        self.calls.append(("notice", job.params.prompt, message))


def _scripted(replicas: int, script) -> list[tuple]:
    """Run ``script(worker, handle, job)`` on a RayWorker with ``replicas`` ready; the sink's calls."""
    import asyncio

    from lcm_live.studio.metrics import StudioMetrics
    from lcm_live.studio.params import build_params_model, parse_params
    from lcm_live.studio.ray_worker import RayWorker
    from lcm_live.studio.worker import Job

    settings = StudioSettings()
    model = build_params_model(settings)
    sink = _Sink()

    def job(prompt: str) -> Job:
        return Job(params=parse_params(model, {"prompt": prompt}), sink=sink)

    async def main() -> None:
        handle = _Handle()
        worker = RayWorker(handle, settings, StudioMetrics())
        worker._state, worker.workers_ready = "ready", replicas
        await script(worker, handle, job)
        await asyncio.sleep(0.05)

    asyncio.run(main())
    return sink.calls


def _final(prompt: str) -> list:
    from lcm_live.studio.ray_wire import frame_event

    return [("started",), frame_event(Image.new("RGB", (8, 8)), final=True, step=1, total=1, generation_s=0.1,
                                      parameters={"prompt": prompt}), ("done", "ok"), None]


async def _settle() -> None:
    import asyncio

    for _ in range(5):
        await asyncio.sleep(0.01)


@needs_ray
def test_ray_worker_one_replica_newest_input_cancels_the_running_request():
    async def script(worker, handle, job):
        worker.submit("s", job("a"))
        await _settle()
        worker.submit("s", job("b"))  # one replica: "a" is cancelled through Serve, "b" goes at once
        await _settle()
        assert [r.cancelled for r in handle.responses] == [True, False]
        for event in _final("b"):
            handle.responses[1].events.put_nowait(event)

    assert _scripted(1, script) == [("done", "a", "cancelled"), ("frame", "b", (8, 8)), ("done", "b", "ok")]


@needs_ray
def test_ray_worker_two_replicas_two_in_flight_then_one_waiting_that_newer_input_replaces():
    async def script(worker, handle, job):
        jobs = [job(prompt) for prompt in "abcd"]
        for j in jobs:
            worker.submit("s", j)
            await _settle()
        assert len(handle.responses) == 2 and not any(r.cancelled for r in handle.responses)  # c, then d, wait
        for event in _final("b"):  # b's frame first: b's place goes to d
            handle.responses[1].events.put_nowait(event)
        await _settle()
        worker.cancel_older("s", jobs[1].id)  # as the session does on b's final frame: a's would be dropped
        await _settle()
        assert handle.responses[0].cancelled and len(handle.responses) == 3
        assert json.loads(handle.responses[2].payload["params"])["prompt"] == "d"
        for event in _final("d"):
            handle.responses[2].events.put_nowait(event)

    calls = _scripted(2, script)
    assert ("done", "c", "replaced") in calls and ("done", "a", "cancelled") in calls
    assert [c for c in calls if c[0] == "frame"] == [("frame", "b", (8, 8)), ("frame", "d", (8, 8))]


@needs_ray
def test_ray_worker_lost_replica_tells_the_session_and_runs_its_newest_input_again(monkeypatch):
    from ray.exceptions import ActorDiedError

    import lcm_live.studio.ray_worker as ray_worker

    monkeypatch.setattr(ray_worker, "RETRY_DELAY_S", 0.01)

    async def script(worker, handle, job):
        worker.submit("s", job("a"))
        await _settle()
        handle.responses[0].events.put_nowait(("started",))
        handle.responses[0].events.put_nowait(ActorDiedError())  # its replica is gone mid-generation
        await _settle()
        assert len(handle.responses) == 2 and handle.responses[1].payload == handle.responses[0].payload
        for event in _final("a"):
            handle.responses[1].events.put_nowait(event)

    calls = _scripted(2, script)
    assert calls[0][:2] == ("notice", "a") and "runs again" in calls[0][2]
    assert calls[1:] == [("frame", "a", (8, 8)), ("done", "a", "ok")]


@needs_ray
def test_ray_worker_observes_the_replicas_steps_and_batch_sizes():
    """With a step_observer set, requests ask for steps and the observer gets each (no latents); "done" carries the
    replica's batch sizes into the ingress's lcm_live_batch_size."""
    import asyncio

    from lcm_live.studio.metrics import StudioMetrics
    from lcm_live.studio.params import build_params_model, parse_params
    from lcm_live.studio.ray_worker import RayWorker
    from lcm_live.studio.worker import Job

    settings, metrics, sink, steps = StudioSettings(), StudioMetrics(), _Sink(), []
    job = Job(params=parse_params(build_params_model(settings), {"prompt": "a"}), sink=sink)

    async def main() -> None:
        handle = _Handle()
        worker = RayWorker(handle, settings, metrics)
        worker._state, worker.workers_ready = "ready", 1
        worker.step_observer = lambda j, event: steps.append((j.params.prompt, event.step, event.total, event.latents))
        worker.submit("s", job)
        await _settle()
        assert handle.responses[0].payload["steps"] is True
        for event in [("started",), ("step", 1, 2, 999), ("step", 2, 2, 499), *_final("a")[1:2], ("done", "ok", [1, 3]),
                      None]:
            handle.responses[0].events.put_nowait(event)
        await _settle()

    asyncio.run(main())
    assert steps == [("a", 1, 2, None), ("a", 2, 2, None)]
    assert sink.calls == [("frame", "a", (8, 8)), ("done", "a", "ok")]
    assert metrics.batch_size._sum.get() == 4 and _count(metrics.batch_size) == 2


def _count(histogram) -> float:
    return next(s.value for m in histogram.collect() for s in m.samples if s.name.endswith("_count"))


@needs_ray
def test_generator_replica_streams_steps_when_asked_and_its_batch_sizes_once():
    """The replica's side (studio/ray_app.py's Generator, its class run here without Serve, on a FakeEngine)."""
    import asyncio

    from lcm_live.config import Settings
    from lcm_live.studio.ray_app import Generator

    replica = Generator.func_or_class(Settings(studio=StudioSettings(default_previews=False)),
                                      json.dumps({"step_latency_s": 0.01}))

    async def events(steps: bool) -> list[tuple]:
        payload = {"params": json.dumps({"prompt": "a", "num_inference_steps": 2}), "steps": steps}
        return [event async for event in replica.generate(payload)]

    try:
        with_steps = asyncio.run(events(True))
        without = asyncio.run(events(False))
    finally:
        replica.worker.stop(1.0)
    assert [e[:2] for e in with_steps if e[0] == "step"] == [("step", 1), ("step", 2)]
    assert not [e for e in without if e[0] == "step"]
    assert with_steps[-1][:3] == ("done", "ok", [1]) and without[-1][:3] == ("done", "ok", [1])  # counted once
    held = without[-1][3]  # and what the replica holds: the one implicit preset (GET /api/models on the ingress)
    assert held["replica"] == replica.replica and list(held["loaded"]) == list(replica.models.names)


@needs_ray
def test_the_session_scope_travels_to_the_replicas_engine():
    """job_payload carries the job's cache scope; the replica's request gets it (engine caches stay per client)."""
    import asyncio

    from lcm_live.config import Settings
    from lcm_live.studio.jobs import Job
    from lcm_live.studio.params import default_params_model
    from lcm_live.studio.ray_app import Generator
    from lcm_live.studio.ray_wire import job_payload

    replica = Generator.func_or_class(Settings(studio=StudioSettings(default_previews=False)), "{}")
    params = default_params_model().model_validate({"prompt": "scoped", "num_inference_steps": 1})
    payload = job_payload(Job(params=params, sink=None, scope="session-1234"))
    payload["params"] = json.dumps({"prompt": "scoped", "num_inference_steps": 1})  # as the ingress's params model

    async def run() -> list[tuple]:
        return [event async for event in replica.generate(payload)]

    try:
        events = asyncio.run(run())
    finally:
        replica.worker.stop(1.0)
    assert events[-1][:2] == ("done", "ok"), events
    assert [r.cache_scope for r in replica.worker.engine.calls] == ["session-1234"]


@needs_ray
def test_ray_worker_keeps_preset_readiness_by_replica():
    """A replica's ``model`` events go to the session and mark the app's registry; each "done" says what the
    replica holds, so a preset it evicted is no longer loaded there (GET /api/models)."""
    import asyncio

    from lcm_live.config import ModelPreset
    from lcm_live.studio.metrics import StudioMetrics
    from lcm_live.studio.models import ModelRegistry
    from lcm_live.studio.params import build_params_model, parse_params
    from lcm_live.studio.ray_worker import RayWorker
    from lcm_live.studio.worker import Job

    models = ModelRegistry([ModelPreset(name="a", model="x"), ModelPreset(name="b", model="y")])
    told: list[tuple] = []

    class Sink(_Sink):
        def on_model(self, job, name, state, progress, message, **detail) -> None:
            told.append((name, state, progress, detail))

    async def main() -> dict[str, str]:
        worker = RayWorker(_Handle(), StudioSettings(), StudioMetrics(), models=models)
        worker._held({"replica": "r1", "loaded": {"a": "sd15"}})  # the first description
        assert models.public()[0]["state"] == "loaded"
        params = parse_params(build_params_model(StudioSettings(), models=models), {"prompt": "p", "model": "b"})
        flight = type("F", (), {"job": Job(params=params, sink=Sink()), "settled": False})()
        await worker._on_event(flight, ("model", "b", "loading", 0.5, "reading", {"bytes_read": 5}, "r1"))
        loading = {m["name"]: m["state"] for m in models.public()}
        worker._held({"replica": "r1", "loaded": {"b": None}})  # a "done" after the switch: a was evicted
        return loading

    loading = asyncio.run(main())
    assert told == [("b", "loading", 0.5, {"bytes_read": 5})]
    assert loading == {"a": "loaded", "b": "loading"}
    assert {m["name"]: m["state"] for m in models.public()} == {"a": "unloaded", "b": "loaded"}


@needs_ray
def test_ray_worker_follows_what_the_replicas_hold_after_an_update():
    """The first description may come from a replica of the version being replaced: read again, follow the new."""
    import asyncio

    from lcm_live.studio.metrics import StudioMetrics
    from lcm_live.studio.ray_worker import RayWorker

    def described(model: str) -> dict[str, Any]:
        return {"info": {"model": model}, "lcm_img2img": False, "settings": StudioSettings().model_dump(mode="json"),
                "max_batch_size": 1}

    class Describe:
        def __init__(self):
            self.answers = [described("old"), described("old"), described("new")]

        async def _answer(self):
            return self.answers.pop(0)

        def remote(self):
            return self._answer()

    class Handle:
        describe = Describe()

    seen: list[str] = []

    async def main() -> None:
        worker = RayWorker(Handle(), StudioSettings(), StudioMetrics(), on_ready=lambda e: seen.append(e.info["model"]))
        await worker._connect()
        await worker._redescribe()  # the same: nothing to do
        await worker._redescribe()

    asyncio.run(main())
    assert seen == ["old", "new"]
