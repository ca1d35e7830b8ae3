"""Model presets (studio/models.py): models.toml and --model parsing and refusals, the allowlist over the WebSocket
and REST, GET /api/models, and switches between presets on FakeEngines (studio/switching.py): progress messages,
readiness, the other session unaffected, LRU eviction, a failed load."""

from __future__ import annotations

import gc
import json
import threading
import weakref

import pytest

from lcm_live.config import ModelPreset, Settings, StudioSettings, StylePreset
from lcm_live.errors import UserError
from lcm_live.studio.app import create_app
from lcm_live.studio.fake_engine import FakeEngine, FakeEngineConfig
from lcm_live.studio.models import ModelRegistry, engine_settings_for, load_presets_file, presets_from_ids
from lcm_live.studio.params import build_params_model, parse_params

from .conftest import TOKEN, next_final, next_of, params, wait_until

GOOD_TOML = """
[models.fast]
model = "builtin:shapes"
width = 256
num_inference_steps = 2

[models.styled]
model = "/srv/models/sd15"
lcm_lora = "none"
[[models.styled.styles]]
name = "papercut"
lora = "/srv/loras/papercut.safetensors"
scale = 0.8
min = 0.0
max = 1.5
"""


# ---- parsing -------------------------------------------------------------------------------------------------
def test_models_toml_presets_in_file_order(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(GOOD_TOML)
    fast, styled = load_presets_file(path)
    assert (fast.name, fast.model, fast.width, fast.num_inference_steps) == ("fast", "builtin:shapes", 256, 2)
    assert styled.styles == [StylePreset(name="papercut", lora="/srv/loras/papercut.safetensors", scale=0.8,
                                         min=0.0, max=1.5)]
    base = Settings().engine
    settings = engine_settings_for(styled, base)
    assert settings.model == "/srv/models/sd15" and settings.lcm_lora == "none"
    assert [(s.source, s.scale) for s in settings.loras] == [("/srv/loras/papercut.safetensors", 0.8)]
    assert engine_settings_for(fast, base).lcm_lora == base.lcm_lora  # unset: the server's


@pytest.mark.parametrize("text, words", [
    ("[models.a]\nmodel = 'x'\nwidht = 512\n", ["'a'", "'widht'", "Extra inputs"]),
    ("[models.a]\nwidth = 512\n", ["'a'", "'model'", "required"]),
    ("[models.a]\nmodel = 'x'\n[[models.a.styles]]\nname = 's'\nlora = 'l'\nscale = 3.0\n",
     ["'a'", "styles.0", "outside min..max"]),
    ("[models.a]\nmodel = 'x'\n[[models.a.styles]]\nname = 's'\nlora = 'l'\n[[models.a.styles]]\nname = 's'\n"
     "lora = 'm'\n", ["'a'", "named more than once"]),
    ("[models.'a b']\nmodel = 'x'\n", ["'a b'", "letters, digits"]),
    ("[model.a]\nmodel = 'x'\n", ["unknown top-level key 'model'"]),
    ("models = 3\n", ["no presets"]),
    ("[models.a\n", ["not valid TOML"]),
])
def test_models_toml_refusals_name_the_preset_and_key(tmp_path, text, words):
    path = tmp_path / "models.toml"
    path.write_text(text)
    with pytest.raises(UserError) as err:
        load_presets_file(path)
    for word in words:
        assert word in err.value.message, err.value.message
    assert str(path) in err.value.message


def test_model_ids_are_the_preset_names_paths_by_their_last_part():
    presets = presets_from_ids(["SimianLuo/LCM_Dreamshaper_v7", "/srv/models/my-model", "builtin:shapes"])
    assert [p.name for p in presets] == ["SimianLuo/LCM_Dreamshaper_v7", "my-model", "builtin:shapes"]
    with pytest.raises(UserError, match="a second model named 'm'"):
        presets_from_ids(["/a/m", "/b/m"])


# ---- the allowlist -------------------------------------------------------------------------------------------
def two_presets(**style) -> list[ModelPreset]:
    styles = [StylePreset(name="ink", lora="/srv/ink.safetensors", scale=0.5, min=0.0, max=1.0, **style)]
    return [ModelPreset(name="a", model="/srv/models/a"), ModelPreset(name="b", model="org/b", styles=styles)]


def test_params_allowlist_and_style_bounds():
    model = build_params_model(StudioSettings(), models=ModelRegistry(two_presets()))
    assert model.model_json_schema()["properties"]["model"]["enum"] == ["a", "b"]
    assert parse_params(model, {}).model == "a"  # the first preset is the default
    with pytest.raises(UserError) as err:
        parse_params(model, {"model": "/etc/passwd"})
    assert err.value.field == "model" and "name one of a, b" in err.value.message
    assert parse_params(model, {"model": "b", "lora_scales": {"ink": 1.0}}).lora_scales == {"ink": 1.0}
    with pytest.raises(UserError) as err:
        parse_params(model, {"model": "b", "lora_scales": {"ink": 1.5}})
    assert err.value.field == "lora_scales.ink" and "0..1" in err.value.message  # refused, never clamped
    with pytest.raises(UserError, match="not a style of the model 'a'"):
        parse_params(model, {"model": "a", "lora_scales": {"ink": 0.5}})


def fake_factory(engines: dict[str, FakeEngine], *, fail: set[str] = frozenset(), load_latency_s: float = 0.0):
    """A factory of a FakeEngine per preset (recorded in ``engines`` by preset name)."""

    def factory(device=None, *, preset=None):
        name = preset.name if preset is not None else "implicit"
        if name in fail:
            raise UserError(f"--model {preset.model}: no such file or folder", field="model")
        engine = FakeEngine.from_settings(config=FakeEngineConfig(model=preset.model, load_latency_s=load_latency_s))
        engines[name] = engine
        return engine

    return factory


def models_app(presets, factory, **studio):
    studio.setdefault("allowed_hosts", ["testserver"])
    studio.setdefault("default_previews", False)
    return create_app(Settings(studio=StudioSettings(**studio), models=presets), factory)


def test_unknown_model_refused_over_ws_and_rest_and_the_session_keeps_its_params():
    from fastapi.testclient import TestClient

    engines: dict[str, FakeEngine] = {}
    app = models_app(two_presets(), fake_factory(engines))
    with TestClient(app) as client:
        wait_until(lambda: app.state.studio.worker.ready)
        with client.websocket_connect("/ws") as ws:
            hello = next_of(ws, "hello")
            assert [m["name"] for m in hello["models"]] == ["a", "b"]
            ws.send_text(params(prompt="one", seed=1))
            first = next_final(ws)
            ws.send_text(params(prompt="one", seed=1, model="../../etc"))
            err = next_of(ws, "error")
            assert err["code"] == "invalid_params" and err["field"] == "model" and "a, b" in err["message"]
            ws.send_text(params(prompt="one", seed=1, model="a"))  # the same as the last good input: no frame
            while (status := next_of(ws, "status"))["inputs"] < 3:
                pass
            assert status["state"] == "idle"
            assert first["params"]["model"] == "a"
        resp = client.post("/api/generate", json={"prompt": "x", "model": "/srv/models/a"})
        assert resp.status_code == 422 and resp.json()["field"] == "model"
        assert "/srv" not in json.dumps(client.get("/api/models").json())


def test_api_models_lists_presets_and_readiness_behind_the_token():
    from fastapi.testclient import TestClient

    engines: dict[str, FakeEngine] = {}
    app = models_app(two_presets(), fake_factory(engines), token=TOKEN)
    with TestClient(app) as client:
        wait_until(lambda: app.state.studio.worker.ready)
        assert client.get("/api/models").status_code == 401
        body = client.get("/api/models", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    a, b = body["models"]
    assert (a["name"], a["ready"], a["loaded"], a["default"], a["family"]) == ("a", True, True, True, "lcm")
    assert (b["name"], b["ready"], b["loaded"], b["default"], b["state"]) == ("b", False, False, False, "unloaded")
    assert b["styles"] == [{"name": "ink", "scale": 0.5, "min": 0.0, "max": 1.0}]
    assert "/srv" not in json.dumps(body)


# ---- switching -----------------------------------------------------------------------------------------------
def model_messages(ws, until_final: bool = True) -> tuple[list[dict], dict]:
    """The "model" messages before the next final frame, and that frame."""
    seen = []
    while True:
        msg = next_of(ws, "model", "frame")
        if msg["type"] == "model":
            seen.append(msg)
        elif msg["final"]:
            return seen, msg


def test_switch_loads_with_progress_and_the_other_session_keeps_its_model():
    from fastapi.testclient import TestClient

    engines: dict[str, FakeEngine] = {}
    app = models_app(two_presets(), fake_factory(engines), max_sessions=2, max_loaded_models=2)
    with TestClient(app) as client:
        studio = app.state.studio
        wait_until(lambda: studio.worker.ready)
        with client.websocket_connect("/ws") as one, client.websocket_connect("/ws") as two:
            next_of(one, "hello"), next_of(two, "hello")
            one.send_text(params(prompt="p", seed=1, model="b"))
            seen, frame = model_messages(one)
            assert [(m["name"], m["state"], m["progress"]) for m in seen] == [
                ("b", "loading", 0.0), ("b", "loading", 0.9), ("b", "ready", 1.0)]
            assert frame["params"]["model"] == "b" and engines["b"].calls[-1].prompt == "p"
            two.send_text(params(prompt="q", seed=2))  # the default, a: still loaded, no load said
            seen, frame = model_messages(two)
            assert seen == [] and frame["params"]["model"] == "a" and engines["a"].calls[-1].prompt == "q"
            one.send_text(params(prompt="p2", seed=1, model="a"))  # a switch to a loaded preset: ready, no load
            seen, frame = model_messages(one)
            assert [(m["name"], m["state"]) for m in seen] == [("a", "ready")]
            assert [m["loaded"] for m in client.get("/api/models").json()["models"]] == [True, True]
        assert len(engines["a"].calls) == 2 and len(engines["b"].calls) == 1


def test_lru_evicts_and_frees_the_least_recently_used_engine():
    from fastapi.testclient import TestClient

    engines: dict[str, FakeEngine] = {}
    presets = [*two_presets(), ModelPreset(name="c", model="org/c")]
    app = models_app(presets, fake_factory(engines), max_loaded_models=2)
    with TestClient(app) as client:
        studio = app.state.studio
        wait_until(lambda: studio.worker.ready)
        first_a = weakref.ref(engines.pop("a"))
        with client.websocket_connect("/ws") as ws:
            next_of(ws, "hello")
            for k, name in enumerate(["b", "c"]):  # a (the oldest) goes when c comes
                ws.send_text(params(prompt="p", seed=k, model=name))
                model_messages(ws)
            gc.collect()
            assert first_a() is None, "the evicted engine is still referenced"
            assert list(studio.worker.switcher.engines) == ["b", "c"]
            listed = {m["name"]: m for m in client.get("/api/models").json()["models"]}
            assert (listed["a"]["loaded"], listed["a"]["ready"]) == (False, True)  # known good, not in memory
            ws.send_text(params(prompt="p", seed=9, model="a"))  # back: loaded again, b evicted
            seen, _ = model_messages(ws)
            assert seen[0]["state"] == "loading" and list(studio.worker.switcher.engines) == ["c", "a"]


def test_a_failed_load_leaves_nothing_and_the_session_keeps_its_last_good_params():
    from fastapi.testclient import TestClient

    engines: dict[str, FakeEngine] = {}
    presets = [ModelPreset(name="a", model="org/a"), ModelPreset(name="b", model="/srv/models/broken")]
    app = models_app(presets, fake_factory(engines, fail={"b"}), max_loaded_models=2)
    with TestClient(app) as client:
        studio = app.state.studio
        wait_until(lambda: studio.worker.ready)
        with client.websocket_connect("/ws") as ws:
            next_of(ws, "hello")
            ws.send_text(params(prompt="p", seed=1))
            next_final(ws)
            session = next(iter(studio.sessions.values()))
            ws.send_text(params(prompt="p", seed=1, model="b"))
            loading = next_of(ws, "model")
            failed = next_of(ws, "model")
            assert (loading["state"], failed["state"], failed["progress"]) == ("loading", "error", None)
            err = next_of(ws, "error")
            assert err["code"] == "model_unavailable" and err["field"] == "model" and "/srv" not in err["message"]
            assert "broken: no such file" in err["message"]
            wait_until(lambda: session.params.model == "a", what="the session's last good params back")
            assert list(studio.worker.switcher.engines) == ["a"] and studio.worker.ready
            listed = {m["name"]: m for m in client.get("/api/models").json()["models"]}
            assert listed["b"]["state"] == "error" and not listed["b"]["ready"]
            ws.send_text(params(prompt="p2", seed=1))  # the session's params are its last good ones: model a
            assert next_final(ws)["params"]["model"] == "a"


def test_pool_workers_each_keep_their_own_lru():
    from fastapi.testclient import TestClient

    engines: dict[str, list[FakeEngine]] = {"a": [], "b": []}
    lock = threading.Lock()

    def factory(device=None, *, preset=None):
        engine = FakeEngine(FakeEngineConfig(model=preset.model))
        with lock:
            engines[preset.name].append(engine)
        return engine

    app = models_app(two_presets(), factory, devices=["cpu", "cpu"], max_loaded_models=1)
    with TestClient(app) as client:
        studio = app.state.studio
        wait_until(lambda: studio.worker.workers_ready == 2)
        with client.websocket_connect("/ws") as ws:
            next_of(ws, "hello")
            ws.send_text(params(prompt="p", seed=1, model="b"))
            model_messages(ws)
            held = [list(w.switcher.engines) for w in studio.worker.workers]
            assert sorted(held) == [["a"], ["b"]]  # one worker switched to b, the other still holds a
            ws.send_text(params(prompt="p", seed=2, model="b"))  # placed where b is: no second load
            seen, _ = model_messages(ws)
            assert seen == [] and len(engines["b"]) == 1


def test_style_scales_on_a_compiled_unet_are_refused_naming_the_flag():
    from types import SimpleNamespace

    from lcm_live.studio.switching import LoadedEngine, restyle

    class OptimizedModule:  # what torch.compile puts in pipe.unet
        pass

    preset = two_presets()[1]
    engine = SimpleNamespace(pipe=SimpleNamespace(unet=OptimizedModule()), compiled=True,
                             info=SimpleNamespace(speedups=["torch.compile(default, freezing)"]))
    loaded = LoadedEngine(engine, scales={"ink": 0.5})
    with pytest.raises(UserError) as err:
        restyle(loaded, preset, {"ink": 0.9})
    assert err.value.field == "lora_scales" and "--compile" in err.value.message
    assert "torch.compile" in err.value.message  # the speed-up in the way, named
    assert loaded.scales == {"ink": 0.5}  # nothing changed


def test_a_preset_default_the_params_would_refuse_fails_the_start_naming_it():
    from fastapi.testclient import TestClient

    engines: dict[str, FakeEngine] = {}
    presets = [ModelPreset(name="a", model="org/a"), ModelPreset(name="huge", model="org/h", width=4096)]
    app = models_app(presets, fake_factory(engines), exit_on_warmup_failure=False)
    with TestClient(app):
        worker = app.state.studio.worker
        wait_until(lambda: worker.state == "failed")
    assert "preset 'huge': width = 4096" in worker.detail and "MAX_SIZE" in worker.detail


def test_rest_generates_with_a_preset_and_says_which():
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    engines: dict[str, FakeEngine] = {}
    app = models_app(two_presets(), fake_factory(engines), max_loaded_models=2)
    with TestClient(app) as client:
        wait_until(lambda: app.state.studio.worker.ready)
        resp = client.post("/api/generate", json={"prompt": "x", "model": "b", "lora_scales": {"ink": 0.7}})
        assert resp.status_code == 200, resp.text
        meta = json.loads(Image.open(io.BytesIO(resp.content)).text["parameters"])
        assert meta["preset"] == "b" and meta["lora_scales"] == {"ink": 0.7} and "/srv" not in json.dumps(meta)
        assert engines["b"].calls[-1].prompt == "x"
        assert app.state.studio.worker.switcher.engines["b"].scales == {"ink": 0.7}  # a FakeEngine: recorded only


def test_jobs_waiting_through_another_sessions_load_do_not_time_out():
    from fastapi.testclient import TestClient

    engines: dict[str, FakeEngine] = {}
    app = models_app(two_presets(), fake_factory(engines, load_latency_s=0.8), max_sessions=2,
                     max_loaded_models=2, queue_wait_timeout_s=0.3)
    with TestClient(app) as client:
        wait_until(lambda: app.state.studio.worker.ready)
        with client.websocket_connect("/ws") as one, client.websocket_connect("/ws") as two:
            next_of(one, "hello"), next_of(two, "hello")
            one.send_text(params(prompt="p", model="b"))
            assert next_of(one, "model")["state"] == "loading"  # b loads for 0.8 s, past the 0.3 s queue limit
            two.send_text(params(prompt="q"))  # waits through the load: not a timeout
            assert next_final(two)["params"]["model"] == "a"
            assert model_messages(one)[1]["params"]["model"] == "b"


def test_a_preset_s_size_and_steps_apply_where_the_request_gives_none():
    presets = [ModelPreset(name="a", model="org/a"),
               ModelPreset(name="small", model="org/s", width=256, height=320, num_inference_steps=2)]
    model = build_params_model(StudioSettings(), models=ModelRegistry(presets))
    p = parse_params(model, {"model": "small", "prompt": "x"})
    assert (p.width, p.height, p.num_inference_steps, p.prompt) == (256, 320, 2, "x")
    p = parse_params(model, {"model": "small", "width": 512, "num_inference_steps": 4})  # the request's own win
    assert (p.width, p.height, p.num_inference_steps) == (512, 320, 4)
    assert parse_params(model, {"prompt": "x"}).width == model.model_fields["width"].default  # preset a: none
