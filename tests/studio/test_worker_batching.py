"""Stream batching in the worker: waiting jobs of several slots with one batch key run as one engine call."""

from __future__ import annotations

import threading

import pytest

from lcm_live.config import StudioSettings
from lcm_live.studio.batching import resolve_max_batch_size
from lcm_live.studio.fake_engine import FakeEngine
from lcm_live.studio.metrics import StudioMetrics
from lcm_live.studio.params import default_params_model
from lcm_live.studio.worker import Job, Worker

from .conftest import wait_until
from .test_worker import Recorder

pytestmark = pytest.mark.timeout(30)


def make_worker(engine: FakeEngine, **settings) -> Worker:
    worker = Worker(lambda: engine, StudioSettings(**settings), StudioMetrics())
    worker.start()
    wait_until(lambda: worker.ready, what="ready")
    return worker


def job(prompt: str, sink, **params) -> Job:
    params.setdefault("num_inference_steps", 2)
    return Job(params=default_params_model()(prompt=prompt, **params), sink=sink)


def hold(worker: Worker, prompt: str) -> tuple[threading.Event, threading.Event]:
    """Block the job with ``prompt`` at its first step until ``gate`` is set; ``blocked`` says it got there."""
    gate, blocked = threading.Event(), threading.Event()

    def observer(job, event):
        if job.params.prompt == prompt:
            blocked.set()
            gate.wait(10)

    worker.step_observer = observer
    return gate, blocked


def busy_worker(engine: FakeEngine):
    """A batching worker held inside job a0 of slot a, so that the jobs submitted next wait together.
    Returns (worker, gate, log, recorders of slots a, b, c, d); set ``gate`` to let a0 go on."""
    worker = make_worker(engine, max_batch_size=4)
    gate, blocked = hold(worker, "a0")
    log: list = []
    sinks = tuple(Recorder(log, n) for n in "abcd")
    worker.submit("a", job("a0", sinks[0]))
    assert blocked.wait(10)
    return worker, gate, log, sinks


def frames(log):
    return [e[2] for e in log if e[0] == "frame"]


def test_waiting_jobs_of_several_sessions_run_as_one_batch():
    engine = FakeEngine()
    worker, gate, log, (a, b, c, d) = busy_worker(engine)
    worker.submit("b", job("b1", b, seed=11))
    worker.submit("d", job("d1", d, num_inference_steps=3))  # another batch key: runs on its own
    worker.submit("c", job("c1", c, seed=12))
    gate.set()
    wait_until(lambda: len(frames(log)) == 4, what="four frames")
    worker.stop()
    assert engine.batch_sizes == [1, 2, 1]  # a0; then b1 + c1 in one call; then d1
    assert [r.prompt for r in engine.calls] == ["a0", "b1", "c1", "d1"]
    assert frames(log) == ["a0", "b1", "c1", "d1"]
    assert {e[1] for e in log if e[0] == "ok"} == {"a", "b", "c", "d"}  # each session its own frame
    histogram = worker.metrics.batch_size
    assert histogram._sum.get() == 4 and sum(b.get() for b in histogram._buckets) == 3


def test_each_member_gets_its_own_frame_and_seed():
    engine = FakeEngine()
    worker = make_worker(engine, max_batch_size=2)
    gate, blocked = hold(worker, "first")
    got: dict[str, tuple] = {}

    class Sink(Recorder):
        def on_frame(self, job, image, *, final, parameters, **kwargs):
            if final:
                got[self.name] = (image.getpixel((0, 0)), parameters["seed"], parameters["prompt"])

    worker.submit("x", job("first", Sink([], "x")))
    assert blocked.wait(10)
    worker.submit("p", job("same", Sink([], "p"), seed=1))
    worker.submit("q", job("same", Sink([], "q"), seed=2))
    gate.set()
    wait_until(lambda: {"p", "q"} <= set(got), what="both frames")
    worker.stop()
    assert engine.batch_sizes == [1, 2]
    assert got["p"][1:] == (1, "same") and got["q"][1:] == (2, "same")
    assert got["p"][0] == engine._image("same", 1, 512, 512).getpixel((0, 0)) != got["q"][0]


def test_a_job_superseded_mid_batch_is_dropped_and_the_others_run_on():
    engine = FakeEngine(step_latency_s=0.01)
    worker = make_worker(engine, max_batch_size=4)
    gate, blocked = hold(worker, "a0")
    log: list = []
    a, b, c = (Recorder(log, n) for n in "abc")
    superseded = threading.Event()

    def observer(job, event):
        if job.params.prompt == "a0":
            blocked.set()
            gate.wait(10)
        elif job.params.prompt == "b1" and not superseded.is_set():
            superseded.set()
            worker.submit("b", job_b2)  # while b1 runs in the batch with c1

    job_b2 = job("b2", b, num_inference_steps=4)
    worker.step_observer = observer
    worker.submit("a", job("a0", a))
    assert blocked.wait(10)
    worker.submit("b", job("b1", b, num_inference_steps=4))
    worker.submit("c", job("c1", c, num_inference_steps=4))
    gate.set()
    wait_until(lambda: ("ok", "b", "b2") in log and ("ok", "c", "c1") in log, what="c1 and b2")
    worker.stop()
    assert ("cancelled", "b", "b1") in log and "b1" not in frames(log)  # never sent stale
    assert engine.batch_sizes[:2] == [1, 2]  # b1 dropped out of its batch; c1 ran to the end in it
    assert worker.metrics.cancelled._value.get() == 1


@pytest.mark.parametrize("failure, code", [("error", "engine_error"), ("oom", "oom")])
def test_a_failed_batch_fails_only_its_members(failure, code):
    engine = FakeEngine(failures=["ok", failure])  # a0 fine, then the batch of b1 + c1 fails
    worker, gate, log, (a, b, c, d) = busy_worker(engine)
    worker.submit("b", job("b1", b))
    worker.submit("c", job("c1", c))
    worker.submit("d", job("d1", d, num_inference_steps=3))
    gate.set()
    wait_until(lambda: ("ok", "d", "d1") in log, what="d1 after the failed batch")
    assert ("error", "b", code) in log and ("error", "c", code) in log
    assert frames(log) == ["a0", "d1"]
    assert worker.metrics.errors.labels(type=code)._value.get() == 2  # two failed generations...
    assert worker.ready and worker.consecutive_failures == 0  # ...one failed call, and d1's success reset it
    worker.submit("b", job("b2", b))
    wait_until(lambda: ("ok", "b", "b2") in log, what="b serves again")
    worker.stop()


def test_cpu_default_is_one_job_per_call():
    engine = FakeEngine()  # device "cpu"
    worker = make_worker(engine)
    assert worker.max_batch_size == 1
    gate, blocked = hold(worker, "a0")
    log: list = []
    worker.submit("a", job("a0", Recorder(log, "a")))
    assert blocked.wait(10)
    worker.submit("b", job("b1", Recorder(log, "b")))
    worker.submit("c", job("c1", Recorder(log, "c")))
    gate.set()
    wait_until(lambda: len(frames(log)) == 3, what="three frames")
    worker.stop()
    assert engine.batch_sizes == [1, 1, 1]


def test_gpu_default_batches_up_to_max_sessions():
    worker = make_worker(FakeEngine(device="cuda"), max_sessions=3)
    assert worker.max_batch_size == 3
    worker.stop()


@pytest.mark.parametrize("compiled", [False, True])
def test_the_worker_warms_up_its_batch_size(caplog, compiled):
    engine = FakeEngine()
    engine.compiled = compiled  # as Engine.compiled: a torch.compile'd UNet
    with caplog.at_level("INFO", logger="lcm_live.studio"):
        worker = make_worker(engine, max_batch_size=3)
    try:
        assert worker.max_batch_size == 3 and engine.warmup_max_batch_size == 3
        said = "torch.compile compiles the UNet for batches of 1 to 3" in caplog.text
        assert said is compiled  # the long compile is announced before it starts
    finally:
        worker.stop()


def test_resolve_max_batch_size():
    assert resolve_max_batch_size(StudioSettings(), "cpu") == 1
    assert resolve_max_batch_size(StudioSettings(), "cuda:0") == 4
    assert resolve_max_batch_size(StudioSettings(max_sessions=6), "mps") == 6
    assert resolve_max_batch_size(StudioSettings(max_batch_size=2), "cpu") == 2
    assert resolve_max_batch_size(StudioSettings(max_sessions=8, max_batch_size=2), "cuda") == 2


def test_real_engine_batch_gives_each_session_its_single_image(tiny_lcm_dir):
    """Two sessions' frames in one call of the real Engine on the tiny LCM: one UNet call per step for both, and
    each session's frame equals the image its request gives alone."""
    import numpy as np

    from lcm_live.config import EngineSettings
    from lcm_live.engine.pipeline import Engine
    from lcm_live.studio.params import build_params_model

    engine = Engine.from_settings(EngineSettings(model=str(tiny_lcm_dir), device="cpu", dtype="float32",
                                                 backend="torch"), progress=False)
    settings = dict(min_size=64, default_width=64, default_height=64, warmup_width=64, warmup_height=64,
                    max_batch_size=2)
    model = build_params_model(StudioSettings(**settings))
    worker = make_worker(engine, **settings)
    gate, blocked = hold(worker, "hold")
    sizes: list[int] = []
    original = engine.pipe.unet.forward
    engine.pipe.unet.forward = lambda sample, *a, **k: sizes.append(sample.shape[0]) or original(sample, *a, **k)
    images: dict[str, object] = {}

    class Sink(Recorder):
        def on_frame(self, job, image, *, final, **kwargs):
            if final:
                images[self.name] = image

    try:
        worker.submit("h", Job(params=model(prompt="hold", num_inference_steps=1), sink=Sink([], "h")))
        assert blocked.wait(30)
        jobs = {"p": Job(params=model(prompt="a red circle", seed=1), sink=Sink([], "p")),
                "q": Job(params=model(prompt="a blue square", seed=2), sink=Sink([], "q"))}
        for slot, j in jobs.items():
            worker.submit(slot, j)
        gate.set()
        wait_until(lambda: {"p", "q"} <= set(images), timeout=60, what="both frames")
        worker.stop()
        assert sizes[1:] == [2] * jobs["p"].params.num_inference_steps  # after "hold": one call per step, batch 2
    finally:
        engine.pipe.unet.__dict__.pop("forward", None)
    for slot, j in jobs.items():
        alone = engine.generate(j.params.to_request()).images[0]
        diff = np.abs(np.asarray(images[slot]).astype(int) - np.asarray(alone).astype(int))
        assert diff.max() <= 1
