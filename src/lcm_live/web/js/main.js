// The studio page: wires the prompt, the canvas, the schema-built settings and the live output to the WebSocket.
// Protocol: docs/protocol.md. Every input sends the full params at once; the server keeps only the newest.

import { Banners } from "./banner.js";
import { Blends } from "./blends.js";
import { SketchCanvas, usesCanvas } from "./canvas.js";
import { Connection } from "./connection.js";
import { showConnectionState } from "./connstate.js";
import { Conditioning } from "./conditioning.js";
import { Controls, schemaProperties } from "./controls.js";
import { setupFeeds } from "./feeds.js";
import { setupHistory } from "./historybar.js";
import { setupLayers } from "./layerbar.js";
import { setupModels } from "./models.js";
import { FramePacer, StrokeStream } from "./pacing.js";
import { FpsMeter, InputLog, OutputView, errorText } from "./output.js";
import { setupBroadcast } from "./broadcast.js";
import { setupPopout } from "./popout.js";
import { setupRecording } from "./recorder.js";
import { applyEntry, restoreEntry, saveEntry } from "./restore.js";
import { setupToolbar } from "./toolbar.js";
import { showUpscalers } from "./upscale.js";

const $ = (id) => document.getElementById(id);

const els = {
  prompt: $("prompt"),
  counter: $("prompt-counter"),
  negative: $("negative-prompt"),
  negativeWrap: $("negative-wrap"),
  controlsForm: $("controls"),
  connText: $("conn-text"),
  busyText: $("busy-text"),
  fps: $("fps"),
  latency: $("latency"),
  model: $("model-info"),
  save: $("save"),
  apply: $("apply"),
  outputWrap: $("output-wrap"),
};

const banners = new Banners($("banner-error"), $("banner-notice"));
const sketch = new SketchCanvas($("sketch"));
const output = new OutputView({ img: $("output"), empty: $("output-empty"), badge: $("step-badge"), info: $("frame-info") });
const fps = new FpsMeter();
const inputs = new InputLog();
const pacer = new FramePacer(); // one frame in flight while input streams in (pacing.js)
// The camera and the screen (feeds.js) feed the canvas; their watchdogs must not supersede a slow frame.
const feeds = setupFeeds(sketch, {
  cameraButton: $("camera"),
  screenButton: $("screen"),
  busy: () => pacer.inFlight(),
  beforeStart: () => {
    // A camera frame or a screen is a picture: in lines mode, its edges are what a line ControlNet can follow.
    if (state.mode === "control" && state.controls?.values().control_preprocess === "invert") {
      state.controls.set("control_preprocess", "edges");
      sendParams();
    }
    return useCanvasMode();
  },
  onError: (text, source) => banners.show(text, { source }),
  onDone: (source) => banners.clear(source),
});
const wsUrl = new URL("ws", location.href);
wsUrl.protocol = location.protocol === "https:" ? "wss:" : "ws:";
const conn = new Connection(wsUrl.href);

const state = {
  mode: "txt2img",
  controls: null, // Controls, once the schema is known
  schemaText: "", // the schema they were built from
  fields: null, // names the server accepts
  promptMaxLength: undefined, // from the schema: shown by the counter, never enforced by cutting the text
  wantSend: false, // input arrived before the schema: send once the controls exist
  serverBusy: false,
};

// ---------------------------------------------------------------- params

function currentParams() {
  state.controls.nextSeed();
  const all = {
    mode: state.mode,
    prompt: els.prompt.value,
    negative_prompt: els.negative.disabled ? "" : els.negative.value,
    ...state.controls.values(),
    regions: layers.regionParams(), // those whose layers were sent (layerbar.js)
    ...blends.values(),
    ...models.values(), // model, lora_scales (models.js)
    ...conditioning.values(), // ip_adapter_scale; several ControlNets: the per-net lists (conditioning.js)
  };
  const params = {};
  for (const name of state.fields) if (name in all) params[name] = all[name];
  return params;
}

function sendParams() {
  pacer.drop("params"); // this send carries the newest params
  if (!state.controls) {
    state.wantSend = true;
    return;
  }
  conn.sendParams(currentParams());
}

function updateCounter() {
  const max = state.promptMaxLength;
  const n = els.prompt.value.length;
  els.counter.textContent = max ? `${n}/${max}` : "";
  // Too long is shown, never cut: the server names the limit and the text stays as typed.
  els.counter.classList.toggle("over", Boolean(max) && n > max);
}

function setupSchema(schema) {
  // A reconnect's hello repeats the schema: the controls stay as the user left them. A different one (the
  // model, loaded after the page fetched the provisional schema, brought its own size and guidance) rebuilds
  // them, keeping each value whose field is unchanged.
  const text = JSON.stringify(schema);
  if (state.controls && text === state.schemaText) return;
  const previous = state.controls && { values: state.controls.values(), props: state.controls.props };
  state.schemaText = text;
  state.promptMaxLength = schemaProperties(schema).prompt?.maxLength;
  state.controls = new Controls(els.controlsForm, schema);
  if (previous) {
    for (const [name, value] of Object.entries(previous.values)) {
      if (JSON.stringify(previous.props[name]) === JSON.stringify(state.controls.props[name])) {
        state.controls.set(name, value);
      }
    }
  }
  state.fields = state.controls.fieldNames;
  layers.build(state.fields);
  blends.build(schema);
  models.build(schemaProperties(schema));
  conditioning.build(schema);
  els.negativeWrap.hidden = !state.fields.includes("negative_prompt");
  const modeProp = schemaProperties(schema).mode;
  if (modeProp && Array.isArray(modeProp.enum)) {
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.closest("label").hidden = !modeProp.enum.includes(radio.value);
    }
    // A server without the mode the page is in (lines mode, after a restart without its ControlNet): text to image.
    if (!modeProp.enum.includes(state.mode)) setMode("txt2img");
  }
  state.controls.addEventListener("input", offerParams);
  state.controls.addEventListener("size", (e) => applySize(e.detail));
  applySize(state.controls.size());
  updateCounter();
  if (state.wantSend || els.prompt.value) sendParams();
}

function applySize({ width, height }) {
  if (!width || !height) return;
  sketch.resize(width, height);
  layers.resize(width, height);
  els.outputWrap.style.aspectRatio = `${width} / ${height}`;
}

// ---------------------------------------------------------------- canvas -> server

// While a stroke goes on, one frame in flight (pacing.js): the stroke's newest canvas waits for the frame on its
// way; the stroke's end goes at once. With nothing in flight, a stroke sends at most every STROKE_SEND_MS.
const canvasStream = new StrokeStream(pacer, "canvas", async (isStale) => {
  if (!usesCanvas(state.mode)) return;
  const blob = await sketch.toBlob();
  if (isStale() || !blob || !usesCanvas(state.mode)) return;
  conn.sendCanvas(blob);
});
const sendCanvasNow = canvasStream.now;
sketch.addEventListener("change", (e) => {
  if (usesCanvas(state.mode)) canvasStream.change(e.detail.final);
});

// The mask and the regions, painted over the canvas (layerbar.js), and the blends (blends.js).
const layers = setupLayers({ sketch, conn, pacer, mode: () => state.mode, sendParams });
const blends = new Blends();
blends.addEventListener("input", offerParams);
const conditioning = new Conditioning({ conn, onError: (text) => banners.show(text, { source: "upload" }) });
conditioning.addEventListener("input", offerParams);
// The model and style picker (models.js): a switch goes at once; a picked model's default size and steps follow.
const models = setupModels({
  conn,
  banners,
  onInput: (name) => (name === "model" ? sendParams() : offerParams()),
  onPreset: (defaults) => {
    if (!state.controls) return;
    for (const [name, value] of Object.entries(defaults)) if (value) state.controls.set(name, value);
    applySize(state.controls.size());
  },
});

/** Typing and slider drags: held while a frame is on its way, sent when it comes or when the input settles. */
function offerParams() {
  pacer.offer("params", sendParams, { settle: true });
}

async function setMode(mode) {
  // Params held for the old mode would go out in the new one while the canvas is still being encoded, ahead of
  // it (and a canvas mode waits for a canvas): the new mode's params go at the end, after the canvas.
  pacer.drop("params");
  state.mode = mode;
  document.body.dataset.mode = mode;
  layers.setMode(mode);
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.checked = radio.value === mode;
  if (usesCanvas(mode)) {
    await sendCanvasNow(); // the server waits for a canvas before the first sketch (or lines) frame
    await layers.syncMask(); // then the mask, before the params that start the frame
  } else {
    feeds.stop(); // the camera and the screen feed the canvas, which text to image ignores
    canvasStream.seq += 1; // an encode under way is not sent
    conn.sendCanvas(null);
  }
  sendParams();
}

/** The camera, an upload and Apply put a picture on the canvas: from text to image, switch to sketch mode;
 * a canvas mode the user chose (lines mode too) stays. May return a promise (the mode switch). */
function useCanvasMode() {
  return usesCanvas(state.mode) ? null : setMode("img2img");
}

// ---------------------------------------------------------------- server -> page

conn.addEventListener("sent", (e) => {
  inputs.add(e.detail);
  pacer.sent(conn.sentCount);
  renderBusy();
});

showConnectionState(conn, {
  text: els.connText,
  banners,
  onOffline: () => {
    state.serverBusy = false;
    pacer.reset();
    renderBusy();
  },
});

conn.addEventListener("hello", (e) => {
  document.body.dataset.session = e.detail.session || "";
  banners.clear("connection");
  if (e.detail.schema) setupSchema(e.detail.schema);
  if (e.detail.info) showInfo(e.detail.info);
  pacer.slots = e.detail.workers || 1; // several workers: as many frames in flight
});

conn.addEventListener("status", (e) => {
  state.serverBusy = e.detail.state === "busy";
  // An "idle" said before the server read our newest input (it counts what it read) is not the end of it.
  if (e.detail.state === "idle" && !(e.detail.inputs < conn.sentCount)) pacer.done();
  renderBusy();
});

conn.addEventListener("error", (e) => {
  const { code, message, field } = e.detail;
  const where = field && !(message || "").includes(field) ? ` (${field})` : "";
  banners.show(`${message || code}${where}`, { source: code === "capacity" || code === "not_ready" ? "connection" : "generation" });
  if (state.controls) state.controls.markInvalid(field);
  pacer.reset();
  renderBusy();
});

conn.addEventListener("warning", (e) => {
  banners.show(e.detail.message, { source: "warning", warning: true, autoHideMs: 8000 });
});

conn.addEventListener("frame", async (e) => {
  const { info, blob, receivedAt } = e.detail;
  const final = info.final !== false;
  let latency = null;
  if (final) {
    fps.tick(receivedAt);
    const source = inputs.sourceOf(info, receivedAt);
    latency = source ? receivedAt - source.at : null;
    els.latency.textContent = latency === null ? "–" : `${Math.round(latency)} ms`;
    output.describe(info, latency);
    banners.clear("generation");
    if (state.controls) state.controls.clearInvalid();
  }
  await output.show(info, blob, receivedAt);
  if (final) {
    recording.frame($("output"), info);
    pacer.done(latency, info.input ?? null); // what was held (a stroke's newest canvas, typed params) goes, now that this frame is in
    feeds.grab(); // with the camera or the screen on: its next frame
    history.frame(info, blob);
    popout.frame(info, blob);
  }
  els.save.disabled = !final;
  els.apply.disabled = false;
  renderBusy(final ? null : `step ${info.step}/${info.total}`);
});

function renderBusy(stepText = null) {
  const busy = state.serverBusy || pacer.pending;
  document.body.dataset.busy = String(busy);
  els.busyText.textContent = stepText || (busy ? "generating…" : "idle");
}

// The fps readout decays to "–" when frames stop.
setInterval(() => {
  const v = fps.fps(performance.now());
  els.fps.textContent = v === null ? "–" : v.toFixed(1);
}, 500);

function showInfo(info) {
  conditioning.setInfo(info); // the ControlNets' names
  showUpscalers(info); // Keep and upscale: the server's ESRGAN model, when it has one
  const parts = [info.model, info.kind, info.device, info.dtype].filter(Boolean);
  els.model.textContent = parts.join(" · ");
  banners.notice(info.notice || "");
  // A full LCM has its guidance distilled in (a w-embedding): it cannot take a negative prompt at all.
  const takesNegative = info.kind !== "lcm";
  els.negative.disabled = !takesNegative;
  els.negative.placeholder = takesNegative
    ? "what to avoid (used when guidance is above 1)"
    : "this model (a full LCM) takes no negative prompt";
}

// ---------------------------------------------------------------- buttons

// Save: the frame on screen, which is the newest kept in the history (final frames go there as they come), with
// the canvas and layers the server had read when it made it.
els.save.addEventListener("click", () => {
  const entry = history.history.entries.at(-1);
  if (output.current?.info.final !== false && entry && state.fields) {
    saveEntry(entry, { fields: state.fields, button: els.save, banners });
  }
});

// Record (recorder.js) and Camera (camera.js): the final frames as a video; a webcam as the canvas.
const recording = setupRecording($("record"), {
  frameSize: () => (state.controls ? state.controls.size() : { width: sketch.width, height: sketch.height }),
  current: () => (output.current && output.current.info.final !== false ? [$("output"), output.current.info] : null),
  onError: (text) => banners.show(text, { source: "record" }),
  onDone: () => banners.clear("record"),
});
const popout = setupPopout($("popout"), () => output.current, (text) => banners.show(text, { source: "popout" }));
setupBroadcast(conn, banners); // this page's frames at an MJPEG URL for OBS, VLC, ffmpeg (broadcast.js)

// The history strip (historybar.js): Restore, Apply and Save a kept frame.
const history = setupHistory({
  conn,
  onRestore: async (entry) => {
    if (!state.controls) return;
    const off = await restoreEntry(entry, {
      controls: state.controls, prompt: els.prompt, negative: els.negative, blends, models, conditioning, sketch,
      layers, applySize, setMode, setSeedLocked: (on) => state.controls.setSeedLocked(on),
    });
    updateCounter();
    if (!off.length) banners.clear("history");
    else banners.show(`Restored, except what this server does not allow: ${off.join(", ")}.`, { source: "history", warning: true });
  },
  onApply: async (entry) => {
    await applyEntry(entry, sketch);
    await useCanvasMode();
  },
  onSave: (entry) => state.fields && saveEntry(entry, { fields: state.fields, button: $("history-save"), banners }),
  onError: (text) => banners.show(text, { source: "history" }),
});

els.apply.addEventListener("click", () => {
  const img = $("output");
  if (!img.naturalWidth) return;
  sketch.drawImage(img, "stretch");
  useCanvasMode();
});

setupToolbar(sketch, {
  onImage: useCanvasMode,
  onError: (text) => banners.show(text, { source: "upload" }),
});

// ---------------------------------------------------------------- prompt, mode

els.prompt.addEventListener("input", () => {
  updateCounter();
  offerParams();
});
els.negative.addEventListener("input", offerParams);
for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener("change", () => radio.checked && setMode(radio.value));
}

// ---------------------------------------------------------------- start

async function loadJson(path) {
  const res = await fetch(path, { credentials: "same-origin" });
  if (!res.ok) throw new Error(await errorText(res));
  return res.json();
}

loadJson("api/schema")
  .then(setupSchema)
  .catch(() => { /* not authorized or not ready yet: the hello brings the schema */ });
loadJson("api/info")
  .then(showInfo)
  .catch(() => { /* 503 while loading: the hello brings the info */ });
conn.start();
