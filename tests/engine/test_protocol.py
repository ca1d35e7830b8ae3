"""The engine's contract (engine/protocol.py): Engine and the studio's FakeEngine both satisfy EngineLike, with the
Protocol's own method signatures (names, order, keyword-only markers and defaults), not only its attribute names."""

from __future__ import annotations

import inspect

import pytest

from lcm_live.engine.protocol import EngineInfo, EngineLike

METHODS = [name for name, value in vars(EngineLike).items()
           if callable(value) and not name.startswith("_")]
PROPERTIES = [name for name, value in vars(EngineLike).items() if isinstance(value, property)]


def _shape(function) -> list[tuple[str, str, object]]:
    """(name, kind, default) of each parameter after self."""
    params = list(inspect.signature(function).parameters.values())[1:]
    return [(p.name, p.kind.name, p.default) for p in params]


def problems(cls: type) -> list[str]:
    found = []
    for name in METHODS:
        mine = getattr(cls, name, None)
        if mine is None:
            found.append(f"{cls.__name__}.{name} is missing")
        elif _shape(mine) != _shape(getattr(EngineLike, name)):
            found.append(f"{cls.__name__}.{name}{inspect.signature(mine)} != EngineLike.{name}"
                         f"{inspect.signature(getattr(EngineLike, name))}")
    return found  # the properties are read on instances (Engine.info is set in __init__)


def test_the_protocol_lists_what_the_studio_calls():
    assert set(METHODS) == {"generate", "generate_batch", "decode_preview", "warmup"}
    assert set(PROPERTIES) == {"info", "compiled", "lcm_img2img"}


@pytest.mark.parametrize("path", ["lcm_live.engine.pipeline:Engine", "lcm_live.studio.fake_engine:FakeEngine"])
def test_both_engines_have_the_protocols_signatures(path):
    import importlib

    module, name = path.split(":")
    assert problems(getattr(importlib.import_module(module), name)) == []


def test_a_drifted_signature_is_caught():
    class Drifted:
        info = property(lambda self: None)
        compiled = property(lambda self: False)
        lcm_img2img = property(lambda self: False)

        def generate(self, request, callback=None):  # should_stop missing
            ...

        def generate_batch(self, requests, callbacks=None):
            ...

        def decode_preview(self, latents):  # index missing
            ...

    found = problems(Drifted)
    assert [line.split("(")[0] for line in found] == ["Drifted.generate", "Drifted.decode_preview",
                                                      "Drifted.warmup is missing"]
    assert "should_stop" in found[0] and "index" in found[1]


def test_instances_are_engine_like_and_report_an_engine_info(lcm):
    from lcm_live.studio.fake_engine import FakeEngine

    for engine in (lcm, FakeEngine()):
        assert isinstance(engine, EngineLike)
        assert isinstance(engine.info, EngineInfo) and engine.compiled is False
    assert lcm.lcm_img2img is True and FakeEngine().lcm_img2img is False
