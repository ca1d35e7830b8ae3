"""The page's JS modules, one by one, in real Chromium (no server, no model: the files under a static HTTP server).

Controls follow whatever bounds a schema gives; a frame's JSON is paired with the binary after it; reconnects back
off exponentially up to a cap and stop after an idle close; latency is matched to the input a frame was made from;
the canvas undoes and redoes.
"""

from __future__ import annotations

import pytest

from .chromium import CHROMIUM, NO_CHROMIUM, js_module_page

pytestmark = pytest.mark.slow

if not CHROMIUM.exists():
    pytest.skip(NO_CHROMIUM, allow_module_level=True)


@pytest.fixture(scope="module")
def page():
    with js_module_page() as page:
        yield page


SCHEMA = {
    "properties": {
        "prompt": {"type": "string", "maxLength": 50, "default": ""},
        "num_inference_steps": {"type": "integer", "minimum": 2, "maximum": 6, "default": 3},
        "guidance_scale": {"anyOf": [{"type": "number", "minimum": 0.5, "maximum": 3}, {"type": "null"}],
                           "default": None},
        "width": {"type": "integer", "minimum": 320, "maximum": 640, "multipleOf": 64, "default": 384},
        "seed": {"type": "integer", "minimum": 10, "maximum": 20, "default": 12},
        "mode": {"$ref": "#/$defs/Mode", "default": "txt2img"},
    },
    "$defs": {"Mode": {"enum": ["txt2img", "img2img"], "type": "string"}},
}


def test_controls_take_every_bound_from_the_schema(page):
    got = page.evaluate("""async (schema) => {
        const { Controls, schemaProperties } = await import('./controls.js');
        const form = document.createElement('form');
        document.body.append(form);
        const c = new Controls(form, schema);
        const attrs = (id) => {
            const el = document.getElementById(id);
            return el && { min: el.min, max: el.max, step: el.step, value: el.value };
        };
        const out = {
            steps: attrs('ctl-num_inference_steps'), width: attrs('ctl-width'), seed: attrs('ctl-seed'),
            guidance: attrs('ctl-guidance_scale'), strength: attrs('ctl-strength'),
            values: c.values(), mode: schemaProperties(schema).mode.enum,
        };
        // A user moves the guidance slider: "auto" is off and the number is sent.
        const g = document.getElementById('ctl-guidance_scale');
        g.value = '1.5';
        g.dispatchEvent(new Event('input'));
        out.guidanceAfter = c.values().guidance_scale;
        // Unlocked seed: a fresh one, inside the schema's range, for every request.
        document.getElementById('ctl-seed-lock').click();
        out.seeds = Array.from({ length: 40 }, () => { c.nextSeed(); return c.values().seed; });
        form.remove();
        return out;
    }""", SCHEMA)
    assert got["steps"] == {"min": "2", "max": "6", "step": "1", "value": "3"}
    assert got["width"] == {"min": "320", "max": "640", "step": "64", "value": "384"}
    assert got["seed"]["min"] == "10" and got["seed"]["max"] == "20" and got["seed"]["value"] == "12"
    assert got["guidance"]["min"] == "0.5" and got["guidance"]["max"] == "3"
    assert got["strength"] is None  # not in this schema: no control, never sent
    assert got["values"] == {"num_inference_steps": 3, "guidance_scale": None, "width": 384, "seed": 12}
    assert got["guidanceAfter"] == 1.5
    assert got["mode"] == ["txt2img", "img2img"]
    assert all(10 <= s <= 20 for s in got["seeds"]) and len(set(got["seeds"])) > 1


def test_a_frame_json_is_paired_with_the_next_binary_only(page):
    got = page.evaluate("""async () => {
        const { Connection } = await import('./connection.js');
        const conn = new Connection('ws://127.0.0.1:9/ws');
        const frames = [];
        conn.addEventListener('frame', (e) => frames.push({ id: e.detail.info.id, type: e.detail.blob.type,
                                                            size: e.detail.blob.size }));
        const jpeg = new Uint8Array([0xff, 0xd8, 0xff, 0xe0, 1, 2, 3]).buffer;
        const webp = new Uint8Array([0x52, 0x49, 0x46, 0x46, 0, 0, 0, 0, 0x57, 0x45, 0x42, 0x50, 9]).buffer;
        conn.onMessage(jpeg);                                   // no frame JSON before it: dropped
        conn.onMessage(JSON.stringify({ type: 'frame', id: 1 }));
        conn.onMessage(jpeg);                                   // frame 1
        conn.onMessage(jpeg);                                   // already paired: dropped
        conn.onMessage(JSON.stringify({ type: 'frame', id: 2 }));
        conn.onMessage(JSON.stringify({ type: 'frame', id: 3 })); // 2 lost its image: 3 takes the next one
        conn.onMessage(webp);
        conn.onMessage('not json');                             // ignored, no throw
        return frames;
    }""")
    assert got == [{"id": 1, "type": "image/jpeg", "size": 7}, {"id": 3, "type": "image/webp", "size": 13}]


def test_reconnects_back_off_exponentially_to_a_cap_and_not_after_an_idle_close(page):
    got = page.evaluate("""async () => {
        const { Connection } = await import('./connection.js');
        const conn = new Connection('ws://127.0.0.1:9/ws', { minDelayMs: 100, maxDelayMs: 1000 });
        conn.connect = () => {};  // count the waits only
        const waits = [];
        conn.addEventListener('state', (e) => waits.push(e.detail.retryInMs));
        for (let i = 0; i < 7; i++) { conn.scheduleReconnect(1006, ''); clearTimeout(conn.timer); conn.timer = null; }
        conn.onMessage(JSON.stringify({ type: 'hello' }));  // a successful session resets the backoff
        conn.scheduleReconnect(1012, ''); clearTimeout(conn.timer); conn.timer = null;
        conn.scheduleReconnect(1000, '');                   // idle close: no timer
        return { waits, idleTimer: conn.timer };
    }""")
    waits = got["waits"]
    bases = [100, 200, 400, 800, 1000, 1000, 1000, 100]
    for wait, base in zip(waits, bases, strict=False):
        assert 0.75 * base - 1 <= wait <= 1.25 * base + 1, (waits, bases)
    assert waits[-1] is None and got["idleTimer"] is None


def test_latency_is_measured_from_the_input_the_frame_was_made_from(page):
    got = page.evaluate("""async () => {
        const { InputLog, FpsMeter } = await import('./output.js');
        const log = new InputLog();
        log.add({ kind: 'params', at: 1000 });
        log.add({ kind: 'canvas', at: 1100 });
        log.add({ kind: 'params', at: 1900 });  // sent while the frame was generating: not in it
        const info = { timings: { generation_ms: 600, encode_ms: 50 } };
        const fps = new FpsMeter(3000);
        [0, 500, 1000, 1500, 2000].forEach((t) => fps.tick(t));
        return {
            source: log.sourceOf(info, 2000).at,          // started at 2000 - 650 = 1350
            canvas: log.sourceOf(info, 2000, 'canvas').at,
            untimed: log.sourceOf({}, 2000).at,           // no timings: the newest input
            fps: fps.fps(2000),
            fpsLater: fps.fps(9000),
        };
    }""")
    assert got == {"source": 1100, "canvas": 1100, "untimed": 1900, "fps": 2, "fpsLater": None}


def test_canvas_undo_redo_clear_and_resize(page):
    got = page.evaluate("""async () => {
        const { SketchCanvas } = await import('./canvas.js');
        const el = document.createElement('canvas');
        el.width = 64; el.height = 64;
        document.body.append(el);
        const sketch = new SketchCanvas(el);
        const px = () => Array.from(el.getContext('2d').getImageData(32, 32, 1, 1).data);
        const red = document.createElement('canvas');
        red.width = 8; red.height = 8;
        const rc = red.getContext('2d'); rc.fillStyle = '#ff0000'; rc.fillRect(0, 0, 8, 8);
        const changes = [];
        sketch.addEventListener('change', (e) => changes.push(e.detail.final));
        const out = { blank: px() };
        sketch.drawImage(red, 'stretch'); out.drawn = px();
        sketch.undo(); out.undone = px();
        sketch.redo(); out.redone = px();
        sketch.clear(); out.cleared = px();
        sketch.undo(); out.back = px();
        sketch.resize(96, 80); out.size = [el.width, el.height]; out.resized = px();
        out.blob = (await sketch.toBlob()).type;
        out.changes = changes;
        el.remove();
        return out;
    }""")
    white, red = [255, 255, 255, 255], [255, 0, 0, 255]
    assert got["blank"] == white and got["drawn"] == red and got["undone"] == white
    assert got["redone"] == red and got["cleared"] == white and got["back"] == red
    assert got["size"] == [96, 80] and got["resized"] == red
    assert got["blob"] == "image/webp"
    assert got["changes"] and all(got["changes"])  # whole-canvas actions are final changes (sent at once)


def test_pointer_strokes_from_pen_touch_and_mouse(page):
    got = page.evaluate("""async () => {
        const { SketchCanvas } = await import('./canvas.js');
        const el = document.createElement('canvas');
        el.width = 100; el.height = 100;
        el.style.width = '200px'; el.style.height = '200px';  // CSS scale 2: events map back to canvas pixels
        el.style.position = 'fixed'; el.style.left = '0px'; el.style.top = '0px';
        document.body.append(el);
        const sketch = new SketchCanvas(el);
        sketch.color = '#0000ff';
        sketch.size = 6;
        const px = (x, y) => Array.from(el.getContext('2d').getImageData(x, y, 1, 1).data).slice(0, 3);
        const fire = (type, o) => el.dispatchEvent(new PointerEvent(type, { bubbles: true, cancelable: true,
            isPrimary: true, button: 0, buttons: 1, ...o }));
        const changes = [];
        sketch.addEventListener('change', (e) => changes.push(e.detail.final));
        // A pen stroke along y=40 (client y=80), x from 10 to 90 (client 20..180).
        fire('pointerdown', { pointerId: 1, pointerType: 'pen', pressure: 0.6, clientX: 20, clientY: 80 });
        for (let x = 20; x <= 180; x += 20) fire('pointermove', { pointerId: 1, pointerType: 'pen', pressure: 0.6, clientX: x, clientY: 80 });
        // A second finger during the stroke is ignored.
        fire('pointerdown', { pointerId: 2, pointerType: 'touch', clientX: 100, clientY: 180 });
        fire('pointerup', { pointerId: 1, pointerType: 'pen', clientX: 180, clientY: 80 });
        const out = { stroke: px(50, 40), secondFinger: px(50, 90), changes: [...changes] };
        // A touch tap draws a dot; a right-button mouse press draws nothing.
        sketch.tool = 'brush';
        fire('pointerdown', { pointerId: 3, pointerType: 'touch', clientX: 40, clientY: 160 });
        fire('pointerup', { pointerId: 3, pointerType: 'touch', clientX: 40, clientY: 160 });
        fire('pointerdown', { pointerId: 4, pointerType: 'mouse', button: 2, buttons: 2, clientX: 160, clientY: 160 });
        fire('pointerup', { pointerId: 4, pointerType: 'mouse', button: 2, clientX: 160, clientY: 160 });
        out.tap = px(20, 80);
        out.rightClick = px(80, 80);
        // The eraser paints the background back.
        sketch.tool = 'eraser';
        fire('pointerdown', { pointerId: 5, pointerType: 'mouse', clientX: 100, clientY: 80 });
        fire('pointerup', { pointerId: 5, pointerType: 'mouse', clientX: 100, clientY: 80 });
        out.erased = px(50, 40);
        out.history = sketch.undoStack.length;
        out.mouseWidth = sketch.lineWidth({ pointerType: 'mouse' });  // 6 screen px on a canvas shown at 2x
        el.remove();
        return out;
    }""")
    blue, white = [0, 0, 255], [255, 255, 255]
    assert got["stroke"] == blue and got["secondFinger"] == white
    assert got["changes"][0] is False and got["changes"][-1] is True  # live while drawing, final on release
    assert got["tap"] == blue and got["rightClick"] == white
    assert got["erased"] == white
    assert got["history"] == 3  # pen stroke, tap, eraser: one undo step each
    assert got["mouseWidth"] == 3  # the brush size is in screen pixels: 3 canvas pixels here


def test_recorder_makes_a_webm_of_the_frames_with_their_log(page):
    got = page.evaluate("""async () => {
        const { SessionRecorder, recordableType, recordingName } = await import('./recorder.js');
        const frame = (colour) => {
            const c = document.createElement('canvas');
            c.width = 64; c.height = 32;
            const ctx = c.getContext('2d'); ctx.fillStyle = colour; ctx.fillRect(0, 0, 64, 32);
            return c;
        };
        const rec = new SessionRecorder();
        rec.addFrame(frame('#f00'), { seed: 0 });  // not recording: ignored
        rec.start(63, 63);  // odd sides: rounded to even ones for the encoder
        const size = [rec.canvas.width, rec.canvas.height];
        let twice = null;
        try { rec.start(64, 64); } catch (err) { twice = err.message; }
        for (const [i, colour] of ['#f00', '#0f0', '#00f'].entries()) {
            rec.addFrame(frame(colour), { seed: i, params: { prompt: `p${i}` } });
            await new Promise((r) => setTimeout(r, 60));
        }
        const recording = rec.recording;
        const { blob, frames, log } = await rec.stop();
        return { type: recordableType(), size, twice, recording, after: rec.recording, blobType: blob.type,
                 bytes: blob.size, frames, log,
                 name: recordingName(new Date(2026, 10, 26, 9, 5, 7)) };
    }""")
    assert got["type"].startswith("video/webm") and got["blobType"].startswith("video/webm")
    assert got["size"] == [64, 64] and got["twice"] == "already recording"
    assert got["recording"] is True and got["after"] is False
    assert got["bytes"] > 0 and got["frames"] == 3
    assert [e["seed"] for e in got["log"]] == [0, 1, 2] and got["log"][2]["params"] == {"prompt": "p2"}
    assert [e["width"] for e in got["log"]] == [64, 64, 64]
    times = [e["at_ms"] for e in got["log"]]
    assert times == sorted(times) and times[2] - times[0] >= 100
    assert got["name"] == "lcm-live-session-20261126-090507.webm"


def _camera_js(width: int, height: int, body: str) -> str:
    """A page function: the canvas and camera modules imported, ``el`` a width x height canvas and ``sketch`` its
    SketchCanvas, then ``body``."""
    return f"""async () => {{
        const {{ SketchCanvas }} = await import('./canvas.js');
        const {{ CameraFeed, cameraAvailable, changedPixels }} = await import('./camera.js');
        const el = document.createElement('canvas');
        el.width = {width}; el.height = {height};
        const sketch = new SketchCanvas(el);
""" + body + "\n    }"


def test_camera_frames_fill_the_canvas_with_one_undo_step(page):
    got = page.evaluate(_camera_js(64, 48, """
        document.body.append(el);
        const changes = [];
        sketch.addEventListener('change', (e) => changes.push(e.detail.final));
        const white = () => {
            const d = el.getContext('2d').getImageData(0, 0, 64, 48).data;
            for (let i = 0; i < d.length; i += 4) if (d[i] < 250 || d[i + 1] < 250 || d[i + 2] < 250) return false;
            return true;
        };
        const camera = new CameraFeed(sketch);
        const out = { available: cameraAvailable(), before: white(), grabbedOff: camera.grab() };
        const turns = [];
        camera.onChange = () => turns.push(camera.on);
        await camera.start();
        out.on = camera.on;
        out.after = white();
        await new Promise((r) => setTimeout(r, 100));
        out.second = camera.grab();
        out.grabs = camera.grabs;
        out.undo = sketch.undoStack.length;  // the drawing before the camera: one step, not one per frame
        const tracks = camera.stream.getTracks();
        camera.stop();
        out.ended = tracks.every((t) => t.readyState === 'ended');
        out.grabbedAfter = camera.grab();
        out.turns = turns;
        out.changes = [...changes];
        sketch.undo();
        out.undone = white();
        el.remove();
        return out;"""))
    assert got["available"] is True and got["before"] is True and got["grabbedOff"] is False
    assert got["on"] is True and got["after"] is False  # the camera's picture, not the white canvas
    assert got["second"] is True and got["grabs"] == 2 and got["undo"] == 1
    assert got["ended"] is True and got["grabbedAfter"] is False and got["turns"] == [True, False]
    assert got["changes"] == [True, True]  # each frame is a final change: sent at once
    assert got["undone"] is True  # one undo brings the drawing back


def test_without_a_camera_or_a_recorder_the_buttons_say_why(page):
    got = page.evaluate("""async () => {
        const { CameraFeed, setupCamera } = await import('./camera.js');
        const { setupRecording } = await import('./recorder.js');
        const saved = { devices: Object.getOwnPropertyDescriptor(Navigator.prototype, 'mediaDevices'),
                        recorder: window.MediaRecorder };
        Object.defineProperty(Navigator.prototype, 'mediaDevices', { get: () => undefined, configurable: true });
        window.MediaRecorder = undefined;
        const camera = document.createElement('button');
        const record = document.createElement('button');
        try {
            setupCamera(camera, new CameraFeed(null), { beforeStart() {}, onError() {}, onDone() {} });
            setupRecording(record, { frameSize: () => ({ width: 64, height: 64 }), current: () => null,
                                     onError() {}, onDone() {} });
        } finally {
            Object.defineProperty(Navigator.prototype, 'mediaDevices', saved.devices);
            window.MediaRecorder = saved.recorder;
        }
        return { camera: [camera.disabled, camera.title], record: [record.disabled, record.title],
                 restored: typeof navigator.mediaDevices.getUserMedia };
    }""")
    assert got["camera"][0] is True and "https" in got["camera"][1]
    assert got["record"][0] is True and "cannot record video" in got["record"][1]
    assert got["restored"] == "function"


def test_a_still_camera_scene_is_not_sent_again(page):
    got = page.evaluate(_camera_js(64, 64, """
        const sent = [];
        sketch.addEventListener('change', () => sent.push(1));
        const scene = document.createElement('canvas');  // stands in for the video: a still scene
        scene.width = 160; scene.height = 120;
        const ctx = scene.getContext('2d');
        const paint = (colour, x) => { ctx.fillStyle = '#888'; ctx.fillRect(0, 0, 160, 120);
                                       ctx.fillStyle = colour; ctx.fillRect(x, 30, 40, 40); };
        paint('#f00', 10);
        const camera = new CameraFeed(sketch);
        camera.attach(scene, { getTracks: () => [] });
        const out = { first: camera.grab(), still: camera.grab(), again: camera.grab() };
        ctx.fillStyle = 'rgba(255,255,255,0.01)'; ctx.fillRect(0, 0, 160, 120);  // sensor-noise-sized change
        out.noise = camera.grab();
        ctx.fillStyle = '#00f'; ctx.fillRect(150, 110, 10, 10);  // something small appears in a corner
        out.corner = camera.grab();
        paint('#f00', 90);  // the object moved
        out.moved = camera.grab();
        out.grabs = camera.grabs; out.skipped = camera.skipped; out.sent = sent.length;
        out.diff = changedPixels(new Float32Array([0, 10, 20, 50]), new Float32Array([3, 10, 29, 30]));
        camera.stop();
        return out;"""))
    assert got["first"] is True and got["still"] is False and got["again"] is False and got["noise"] is False
    assert got["corner"] is True and got["moved"] is True
    assert (got["grabs"], got["skipped"], got["sent"]) == (3, 3, 3)
    assert got["diff"] == 2  # 9 and 20 are above the level of 8; 3 and 0 are not


def test_a_refused_camera_says_how_to_allow_it(page):
    got = page.evaluate("""async () => {
        const { setupCamera } = await import('./camera.js');
        const button = document.createElement('button');
        const errors = [];
        const refusing = { on: false, stop() {}, async start() {
            throw new DOMException('Permission denied', 'NotAllowedError'); } };
        let switched = 0;
        setupCamera(button, refusing, { beforeStart() { switched += 1; }, onError: (t) => errors.push(t),
                                        onDone() {} });
        button.click();
        await new Promise((r) => setTimeout(r, 50));
        return { errors, switched, pressed: button.getAttribute('aria-pressed'), disabled: button.disabled };
    }""")
    assert got["switched"] == 1 and got["pressed"] == "false" and got["disabled"] is False
    assert got["errors"] == ["Camera unavailable (the browser or the user refused it; allow the camera for this "
                             "page)."]


def test_the_camera_watchdog_waits_while_a_frame_is_on_its_way(page):
    """A camera frame sent while a slow frame generates would supersede it: on a CPU no frame would ever finish."""
    got = page.evaluate(_camera_js(64, 48, """
        const camera = new CameraFeed(sketch);
        let busy = true;
        camera.busy = () => busy;
        await camera.start();  // its first frame goes at once
        await new Promise((r) => setTimeout(r, 2200));
        const whileBusy = camera.grabs;
        busy = false;
        await new Promise((r) => setTimeout(r, 2200));
        const after = camera.grabs;
        camera.stop();
        return { whileBusy, after };"""))
    assert got["whileBusy"] == 1 and got["after"] >= 2
