"""The worker thread alone: size-1 mailbox per slot, round-robin between slots, cancellation, stop."""

from __future__ import annotations

import threading

import pytest

from lcm_live.config import StudioSettings
from lcm_live.studio.fake_engine import FakeEngine
from lcm_live.studio.metrics import StudioMetrics
from lcm_live.studio.params import default_params_model
from lcm_live.studio.worker import Job, Worker, is_oom

from .conftest import wait_until

pytestmark = pytest.mark.timeout(30)


class Recorder:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wants_preview(self):
        return True

    def on_frame(self, job, image, *, final, **kwargs):
        if final:
            self.log.append(("frame", self.name, job.params.prompt))

    def on_error(self, job, code, message, field):
        self.log.append(("error", self.name, code))

    def on_done(self, job, outcome):
        self.log.append((outcome, self.name, job.params.prompt))


def make_worker(engine: FakeEngine) -> Worker:
    worker = Worker(lambda: engine, StudioSettings(), StudioMetrics())
    worker.start()
    wait_until(lambda: worker.ready, what="ready")
    return worker


def job(prompt: str, sink) -> Job:
    return Job(params=default_params_model()(prompt=prompt, num_inference_steps=2), sink=sink)


def test_round_robin_and_latest_wins_per_slot():
    engine = FakeEngine()
    worker = make_worker(engine)
    gate, blocked = threading.Event(), threading.Event()

    def hold_first(job, event):
        if job.params.prompt == "a0":
            blocked.set()
            gate.wait(10)

    worker.step_observer = hold_first
    log: list = []
    a, b, c = Recorder(log, "a"), Recorder(log, "b"), Recorder(log, "c")
    worker.submit("a", job("a0", a))
    assert blocked.wait(10)
    worker.submit("b", job("b1", b))
    worker.submit("c", job("c1", c))
    worker.submit("a", job("a1", a))  # a is running: a0 is superseded, a1 waits behind b and c
    worker.submit("b", job("b2", b))  # replaces b1 and keeps b's place in the order
    assert worker.queue_depth() == 3
    gate.set()
    wait_until(lambda: sum(1 for e in log if e[0] == "frame") == 3, what="three frames")
    worker.stop()
    assert [e[2] for e in log if e[0] == "frame"] == ["b2", "c1", "a1"]
    assert ("cancelled", "a", "a0") in log and ("replaced", "b", "b1") in log
    assert [c.prompt for c in engine.calls] == ["a0", "b2", "c1", "a1"]


def test_superseding_cancels_at_the_next_step():
    engine = FakeEngine(step_latency_s=0.02)
    worker = make_worker(engine)
    log: list = []
    sink = Recorder(log, "s")
    first_step = threading.Event()
    worker.step_observer = lambda job, event: first_step.set()
    worker.submit("s", Job(params=default_params_model()(prompt="long", num_inference_steps=8), sink=sink))
    assert first_step.wait(10)
    worker.submit("s", job("short", sink))
    wait_until(lambda: ("ok", "s", "short") in log, what="the new job")
    worker.stop()
    assert ("cancelled", "s", "long") in log
    assert engine.steps_run < 8 + 2
    assert worker.metrics.cancelled._value.get() == 1


def test_stop_cancels_waiting_and_running_jobs():
    engine = FakeEngine(step_latency_s=0.05)
    worker = make_worker(engine)
    log: list = []
    running = threading.Event()
    worker.step_observer = lambda job, event: running.set()
    worker.submit("a", Job(params=default_params_model()(num_inference_steps=8), sink=Recorder(log, "a")))
    assert running.wait(10)
    worker.submit("b", job("b", Recorder(log, "b")))
    worker.stop(5)
    assert not worker.alive and worker.state == "stopped"
    assert {e[1] for e in log if e[0] == "cancelled"} == {"a", "b"}
    with pytest.raises(RuntimeError):
        worker.submit("c", job("c", Recorder(log, "c")))


def test_is_oom():
    from lcm_live.studio.fake_engine import make_oom_error

    assert is_oom(make_oom_error())
    assert is_oom(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))
