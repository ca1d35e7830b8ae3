// The model and style picker: the presets the server allows (GET /api/models, and the hello's "models"), each with
// its readiness; the chosen one goes in the params' `model`, its style LoRAs' scales (sliders, within each style's
// min..max) in `lora_scales`. A switch loads the model on the server's loader thread (the worker keeps serving the
// other sessions), which says how it goes in "model" messages ({name, state: "loading"|"ready"|"error", progress:
// 0..1|null, message}, and while the weights are read {component, bytes_read, bytes_total}: at most 10 a second);
// the page shows a progress bar (its tooltip the bytes) and, on an error, goes back to the model this session still
// has (the server keeps its last good params).
// Shown only when the schema has `model` and there is something to pick (two presets, or styles).
//
// Events: "input" {name: "model"|"lora_scales"}  the choice changed (the caller sends the params)
//         "preset" {width, height, num_inference_steps}  a newly picked model's defaults (null: none)

const $ = (id) => document.getElementById(id);

const STATE_TEXT = { loaded: "loaded", loading: "loading…", error: "failed", unloaded: "not loaded" };

/** A preset's line in the picker: its name, its family and how ready it is. */
export function presetLabel(p) {
  const state = p.state === "unloaded" && p.ready ? "ready, not in memory" : STATE_TEXT[p.state] || p.state || "";
  return [p.name, p.family, state].filter(Boolean).join(" · ");
}

export class ModelPicker extends EventTarget {
  constructor() {
    super();
    this.els = { wrap: $("models"), select: $("model-select"), status: $("model-status"),
                 progress: $("model-progress"), styles: $("model-styles") };
    this.presets = []; // from the server, in its order (the first is the default)
    this.enabled = false; // the schema has `model`
    this.scales = new Map(); // preset name -> Map style -> the scale the user set
    this.current = null; // the preset the server runs for this session (its last "ready", or the default)
    this.els.select.addEventListener("change", () => {
      const preset = this.preset();
      this.renderStyles();
      if (preset) {
        this.emit("preset", { width: preset.width, height: preset.height,
                              num_inference_steps: preset.num_inference_steps });
      }
      this.emit("input", { name: "model" });
    });
  }

  /** The schema's `model` field (its enum: the allowlist) decides whether the picker is used at all. */
  build(schemaProps) {
    this.enabled = Boolean(schemaProps.model);
    this.render();
  }

  /** The server's list of presets ({models: [...]} of GET /api/models, or the hello's "models"). */
  setPresets(list) {
    if (!Array.isArray(list)) return;
    const chosen = this.els.select.value;
    this.presets = list;
    if (this.current === null) this.current = (list.find((p) => p.default) || list[0] || {}).name ?? null;
    const options = list.map((p) => {
      const o = document.createElement("option");
      o.value = p.name;
      o.textContent = presetLabel(p);
      o.dataset.state = p.state || "";
      return o;
    });
    this.els.select.replaceChildren(...options);
    this.els.select.value = list.some((p) => p.name === chosen) ? chosen : this.current ?? "";
    this.render();
  }

  /** The preset picked in the select (or null). */
  preset() {
    return this.presets.find((p) => p.name === this.els.select.value) || null;
  }

  render() {
    const many = this.presets.length > 1 || this.presets.some((p) => p.styles && p.styles.length);
    this.els.wrap.hidden = !(this.enabled && many);
    this.renderStyles();
  }

  /** A slider per style LoRA of the picked preset, at the scale the user left it (else the preset's). */
  renderStyles() {
    const preset = this.preset();
    const styles = (preset && preset.styles) || [];
    const kept = this.scales.get(preset?.name) || new Map();
    this.els.styles.replaceChildren(...styles.map((s, i) => {
      const id = `style-scale-${i}`;
      const row = document.createElement("div");
      row.className = "style-scale";
      const label = document.createElement("label");
      label.htmlFor = id;
      label.textContent = s.name;
      const input = document.createElement("input");
      Object.assign(input, { type: "range", id, min: String(s.min), max: String(s.max), step: String(stepOf()) });
      input.value = String(kept.has(s.name) ? kept.get(s.name) : s.scale);
      input.dataset.style = s.name;
      const out = document.createElement("output");
      out.htmlFor = id;
      const show = () => { out.textContent = Number(input.value).toFixed(2); };
      show();
      input.addEventListener("input", () => {
        show();
        if (!this.scales.has(preset.name)) this.scales.set(preset.name, new Map());
        this.scales.get(preset.name).set(s.name, Number(input.value));
        this.emit("input", { name: "lora_scales" });
      });
      row.append(label, input, out);
      return row;
    }));
  }

  /** {model, lora_scales} for the params (nothing until the server listed its presets). */
  values() {
    const preset = this.preset();
    if (!this.enabled || !preset) return {};
    const kept = this.scales.get(preset.name) || new Map();
    return { model: preset.name, lora_scales: Object.fromEntries(kept) };
  }

  /** Put back a kept frame's model and style scales (history Restore); false when this server lacks its model. */
  restore(params) {
    if (!params.model || !this.enabled) return true; // made without a model choice: nothing to put back
    if (!this.presets.some((p) => p.name === params.model)) return false;
    this.els.select.value = params.model;
    this.scales.set(params.model, new Map(Object.entries(params.lora_scales || {})));
    this.renderStyles();
    return true;
  }

  /**
   * A "model" message. Returns the text for an error banner, or null. Readiness changed: the caller refreshes the
   * list (GET /api/models).
   */
  onMessage({ name, state, progress, message, component, bytes_read: bytesRead, bytes_total: bytesTotal }) {
    const bar = this.els.progress;
    this.els.status.textContent = message || `${name}: ${state}`;
    this.els.status.dataset.state = state;
    bar.hidden = state !== "loading";
    if (state === "loading" && typeof progress === "number") bar.value = progress;
    else if (state === "loading") bar.removeAttribute("value"); // indeterminate
    bar.title = typeof bytesRead === "number" ? `${component}: ${formatBytes(bytesRead)} of ${formatBytes(bytesTotal)}`
      : "";
    bar.dataset.component = component || "";
    if (state === "ready") this.current = name;
    if (state === "error") {
      // The session keeps its last good params: the picker follows it back to the model it still has.
      if (this.current !== null && this.els.select.value === name) {
        this.els.select.value = this.current;
        this.renderStyles();
      }
      return message || `The model ${name} could not be loaded.`;
    }
    return null;
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** Bytes as the page shows them: "12.3 MB". */
export function formatBytes(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  return `${Math.round(n / 1e3)} kB`;
}

/** 0.01 from the style's min: the preset's scales (0.8, 1.25) are positions of the slider, not snapped. */
function stepOf() {
  return 0.01;
}

/**
 * Wire #models (index.html) to the connection: the hello's list, "model" messages (progress, readiness, errors:
 * a banner with source "model") and GET /api/models after each. onInput(name): the choice changed (send the
 * params); onPreset({width, height, num_inference_steps}): a picked model's defaults (null: none).
 */
export function setupModels({ conn, banners, onInput, onPreset }) {
  const picker = new ModelPicker();
  picker.addEventListener("input", (e) => onInput(e.detail.name));
  picker.addEventListener("preset", (e) => onPreset(e.detail));
  const refresh = () => fetch("api/models", { credentials: "same-origin" })
    .then((res) => (res.ok ? res.json() : null))
    .then((data) => data && picker.setPresets(data.models))
    .catch(() => { /* offline: the next hello brings the list */ });
  conn.addEventListener("hello", (e) => picker.setPresets(e.detail.models));
  conn.addEventListener("model", (e) => {
    const error = picker.onMessage(e.detail);
    if (error) banners.show(error, { source: "model" });
    else if (e.detail.state === "ready") banners.clear("model");
    refresh(); // readiness per model, as the server keeps it
  });
  refresh();
  return picker;
}
