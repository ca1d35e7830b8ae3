"""Several workers behind one studio (issue 15): placement, one session's frames on several workers at once in
input order, a worker that dies mid-session, and readiness per worker."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest

from lcm_live.config import StudioSettings
from lcm_live.studio.fake_engine import FakeEngine
from lcm_live.studio.pool import PACE_FRACTION

from .conftest import next_final, next_of, params, receive, running_studio, wait_until

pytestmark = pytest.mark.timeout(60)


class Killed(BaseException):
    """Escapes the worker's own error handling: its thread dies, as a worker with a fatal bug would."""


@contextlib.contextmanager
def pool_studio(engines: list[FakeEngine], **overrides):
    it = iter(engines)
    lock = threading.Lock()

    def factory(device=None):
        with lock:
            return next(it)

    with running_studio(engines[0], engine_factory=factory, devices=["cpu"] * len(engines), **overrides) as running:
        wait_until(lambda: running[2].worker.workers_ready == len(engines), what="every worker ready")
        yield running


def test_devices_must_be_devices():
    with pytest.raises(ValueError, match="gpu7"):
        StudioSettings(devices=["cpu", "gpu7"])


def test_readyz_counts_workers_and_sessions_spread_over_them():
    engines = [FakeEngine(step_latency_s=0.05), FakeEngine(step_latency_s=0.05)]
    with pool_studio(engines, max_sessions=2) as (client, _, studio):
        ready = client.get("/readyz").json()
        assert ready == {"status": "ready", "workers": {"ready": 2, "total": 2}}
        with client.websocket_connect("/ws") as a, client.websocket_connect("/ws") as b:
            assert receive(a)["workers"] == 2
            receive(b)
            a.send_text(params(prompt="a", num_inference_steps=4))
            b.send_text(params(prompt="b", num_inference_steps=4))
            next_final(a)
            next_final(b)
    assert len(engines[0].calls) == 1 and len(engines[1].calls) == 1  # one each: the least loaded took the second


def test_one_session_runs_on_several_workers_and_frames_come_in_input_order():
    engines = [FakeEngine(step_latency_s=0.3), FakeEngine(step_latency_s=0.02)]  # worker 0 slow, worker 1 fast
    with pool_studio(engines) as (client, _, studio), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="p0", num_inference_steps=2))  # worker 0: done in 0.6 s
        wait_until(lambda: len(engines[0].calls) == 1, what="p0 running on worker 0")  # not waiting: running
        ws.send_text(params(prompt="p1", num_inference_steps=2))  # worker 1, while p0 still runs: done first
        inputs = []
        while True:
            frame = next_of(ws, "frame")
            if frame["final"]:
                inputs.append((frame["input"], frame["params"]["prompt"]))
                if frame["params"]["prompt"] == "p1":
                    break
        # p0 is moot once p1's frame is out: stopped at its next step (or, finishing first, never sent)
        wait_until(lambda: studio.worker.workers[0].load() == 0, what="worker 0 to be done with p0")
        ws.send_text(params(prompt="p2", num_inference_steps=2))
        while (frame := next_final(ws))["params"]["prompt"] != "p2":
            inputs.append((frame["input"], frame["params"]["prompt"]))
    assert [p for _, p in inputs] == ["p1"]  # p0 finished after p1 was shown: never sent
    assert engines[0].calls[0].prompt == "p0" and engines[1].calls[0].prompt == "p1"
    assert studio.metrics.frames_dropped._value.get() + studio.metrics.cancelled._value.get() >= 1


def test_a_worker_that_dies_mid_session_loses_nothing():
    class Dying(FakeEngine):
        def generate(self, request, callback=None, *, should_stop=None):
            if request.prompt == "doomed":
                raise Killed("worker thread killed")
            return super().generate(request, callback, should_stop=should_stop)

    engines = [Dying(step_latency_s=0.02), FakeEngine(step_latency_s=0.02)]  # the first job goes to worker 0
    with pool_studio(engines) as (client, _, studio), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="doomed", seed=4))
        warning = next_of(ws, "warning")
        assert "worker stopped" in warning["message"]
        assert next_final(ws)["params"]["prompt"] == "doomed"  # its input ran again on the other worker
        wait_until(lambda: client.get("/readyz").json().get("workers", {}).get("ready") == 1, what="readyz 1 of 2")
        assert client.get("/readyz").status_code == 200
        ws.send_text(json.dumps({"type": "params", "prompt": "after", "seed": 5}))
        frame = next_final(ws)
        assert frame["params"]["prompt"] == "after" and frame["params"]["seed"] == 5
    assert studio.metrics.errors.labels(type="worker_lost")._value.get() == 1


def test_a_sessions_jobs_start_paced_and_every_frame_is_sent():
    """Two inputs sent together on two workers start PACE_FRACTION x T/2 apart (T: the last generation time), so
    their frames do not finish in the same instant, where the older would be dropped (the rate fell towards one
    worker's)."""
    # T = 1 s (2 steps): b waits 0.25 s, far longer than a busy machine's hiccups (two frames posted in one
    # instant would leave only the newest to send: the session's rule for a client that does not keep up)
    engines = [FakeEngine(step_latency_s=0.5), FakeEngine(step_latency_s=0.5)]
    starts: dict[str, float] = {}
    with pool_studio(engines) as (client, _, studio), client.websocket_connect("/ws") as ws:
        studio.worker.step_observer = lambda job, event: starts.setdefault(job.params.prompt, job.started)
        receive(ws)
        ws.send_text(params(prompt="first", num_inference_steps=2))
        next_final(ws)  # the workers now know T
        wait_until(lambda: studio.worker.workers[0].load() + studio.worker.workers[1].load() == 0, what="idle")
        gap = PACE_FRACTION * min(w.last_generation_s for w in studio.worker.workers if w.last_generation_s) / 2
        ws.send_text(params(prompt="a", num_inference_steps=2))
        ws.send_text(params(prompt="b", num_inference_steps=2))
        assert [next_final(ws)["params"]["prompt"] for _ in range(2)] == ["a", "b"]
    assert starts["b"] - starts["a"] >= gap - 0.05  # held until its paced start, not on the second worker at once
    assert engines[0].calls[-1].prompt != engines[1].calls[-1].prompt  # one on each worker
    assert studio.metrics.frames_dropped._value.get() == 0


def test_a_newer_input_replaces_the_held_one():
    engines = [FakeEngine(step_latency_s=0.5), FakeEngine(step_latency_s=0.5)]  # b is held 0.25 s
    with pool_studio(engines) as (client, _, studio), client.websocket_connect("/ws") as ws:
        receive(ws)
        ws.send_text(params(prompt="first", num_inference_steps=2))
        next_final(ws)
        for prompt in ("a", "b", "c"):  # b is held for its start, then c replaces it there
            ws.send_text(params(prompt=prompt, num_inference_steps=2))
        prompts = [next_final(ws)["params"]["prompt"] for _ in range(2)]
    assert prompts == ["a", "c"]
    assert [c.prompt for e in engines for c in e.calls].count("b") == 0


def test_inputs_sent_together_each_get_a_free_worker_one_after_the_other():
    """Three inputs at once on three workers: all three run (none replaces another while a worker is free for it),
    paced one after the other, and every frame is sent in input order."""
    engines = [FakeEngine(step_latency_s=0.5) for _ in range(3)]  # T = 1 s: 0.17 s apart
    starts: dict[str, float] = {}
    with pool_studio(engines) as (client, _, studio), client.websocket_connect("/ws") as ws:
        studio.worker.step_observer = lambda job, event: starts.setdefault(job.params.prompt, job.started)
        receive(ws)
        ws.send_text(params(prompt="first", num_inference_steps=2))
        next_final(ws)
        for prompt in "abc":
            ws.send_text(params(prompt=prompt, num_inference_steps=2))
        assert [next_final(ws)["params"]["prompt"] for _ in range(3)] == ["a", "b", "c"]
    assert starts["a"] < starts["b"] < starts["c"]
    assert sorted(e.calls[-1].prompt for e in engines) == ["a", "b", "c"]  # one on each worker
    assert studio.metrics.frames_dropped._value.get() == 0


def test_the_first_engine_load_runs_alone_then_the_others_together():
    """diffusers' lazy imports are not safe from two threads at once: the pool's first load is made alone."""
    import time

    from lcm_live.studio.metrics import StudioMetrics
    from lcm_live.studio.pool import WorkerPool

    spans: list[tuple[float, float]] = []

    def factory():
        start = time.monotonic()
        engine = FakeEngine.from_settings(load_latency_s=0.3)
        spans.append((start, time.monotonic()))
        return engine

    pool = WorkerPool([factory] * 3, StudioSettings(), StudioMetrics())
    pool.start()
    try:
        wait_until(lambda: pool.workers_ready == 3, what="three workers ready")
    finally:
        pool.stop(2.0)
    first, *others = sorted(spans)
    assert all(start >= first[1] for start, _ in others)  # nobody loaded while the first did
    assert others[1][0] < others[0][1]  # the others, together
