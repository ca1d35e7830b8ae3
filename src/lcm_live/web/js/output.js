// The live output: shows each frame (step previews, then the final one), keeps what Save needs, and measures
// frames per second and input-to-frame latency.

import { usesCanvas } from "./canvas.js";

/** Frames per second over the final frames of the last `windowMs` milliseconds. */
export class FpsMeter {
  constructor(windowMs = 3000) {
    this.windowMs = windowMs;
    this.times = [];
  }

  tick(now) {
    this.times.push(now);
    this.prune(now);
  }

  prune(now) {
    while (this.times.length && now - this.times[0] > this.windowMs) this.times.shift();
  }

  /** null until two frames are in the window. */
  fps(now) {
    this.prune(now);
    if (this.times.length < 2) return null;
    const span = (now - this.times[0]) / 1000;
    return span > 0 ? (this.times.length - 1) / span : null;
  }
}

/**
 * The inputs sent lately (params and canvas, with the time of sending), to answer: which input does this frame
 * show, and how long ago was it sent?
 */
export class InputLog {
  constructor(limit = 64) {
    this.limit = limit;
    this.entries = []; // {kind, at, payload}, oldest first
  }

  add(entry) {
    this.entries.push(entry);
    if (this.entries.length > this.limit) this.entries.shift();
  }

  /**
   * The newest input the server had when it started this frame's generation. The server reports how long the
   * frame spent generating and encoding (durations, so no clock sync is needed): the generation started about
   * `generation_ms + encode_ms` before the frame arrived. Without timings, the newest input.
   */
  sourceOf(info, receivedAt, kind = null) {
    const t = info.timings || {};
    const busyMs = (t.generation_ms || 0) + (t.encode_ms || 0);
    const startedAt = receivedAt - busyMs;
    let best = null;
    for (const e of this.entries) {
      if (kind && e.kind !== kind) continue;
      if (e.at <= startedAt + 1) best = e; // +1 ms: timer granularity
    }
    if (best) return best;
    const same = this.entries.filter((e) => !kind || e.kind === kind);
    return same.length ? same[same.length - 1] : null;
  }
}

export class OutputView {
  /**
   * @param {{img: HTMLImageElement, empty: HTMLElement, badge: HTMLElement, info: HTMLElement}} els
   */
  constructor(els) {
    this.els = els;
    this.current = null; // {info, blob} of the frame on screen
    this.url = null;
    this.seq = 0; // frames shown by this page, across reconnects (the server's ids restart per connection)
  }

  /** Show a frame; resolves once the image is decoded (so Apply can draw it). */
  show(info, blob, receivedAt) {
    const { img, empty, badge } = this.els;
    const url = URL.createObjectURL(blob);
    const old = this.url;
    this.url = url;
    this.current = { info, blob, receivedAt };
    img.src = url;
    img.hidden = false;
    empty.hidden = true;
    this.seq += 1;
    img.dataset.seq = String(this.seq);
    img.dataset.frameId = String(info.id);
    img.dataset.final = String(info.final !== false);
    img.dataset.seed = String(info.seed);
    img.dataset.mode = String((info.params && info.params.mode) || "");
    const prompt = info.params && info.params.prompt;
    img.alt = prompt ? `Generated image: ${prompt}` : "Generated image"; // what it shows, for screen readers
    if (info.final === false) {
      badge.textContent = `step ${info.step}/${info.total}`;
      badge.hidden = false;
    } else {
      badge.hidden = true;
    }
    const done = img.decode ? img.decode().catch(() => {}) : Promise.resolve();
    return done.then(() => {
      if (old) URL.revokeObjectURL(old);
    });
  }

  /** One line under the image: size, seed, steps and the server's own timings. */
  describe(info, latencyMs) {
    const t = info.timings || {};
    const parts = [`${info.width}×${info.height}`, `seed ${info.seed}`];
    if (info.total) parts.push(`${info.total} steps`);
    if (typeof t.generation_ms === "number") parts.push(`gen ${Math.round(t.generation_ms)} ms`);
    if (typeof t.queue_ms === "number") parts.push(`queue ${Math.round(t.queue_ms)} ms`);
    if (typeof latencyMs === "number") parts.push(`input→frame ${Math.round(latencyMs)} ms`);
    this.els.info.textContent = parts.join(" · ");
  }
}

/**
 * Save: render the shown frame again through POST /api/generate (same params and seed) and download the PNG.
 * layers: Map "mask" / "region:K" / "reference" / "control:K" -> the layer images sent (REST takes them inline:
 * `mask`, `regions[k].mask`, `ip_adapter_image`, `control_images[k-1]`).
 */
export async function saveFrame({ params, canvasBlob, layers = new Map() }) {
  const body = { ...params };
  if (usesCanvas(body.mode) && canvasBlob) body.image = await blobToBase64(canvasBlob);
  // REST inpaints the image it is given: in sketch mode the canvas (lines mode redraws the server's last frame,
  // which REST does not have: saved without the mask).
  if (body.mode === "img2img" && layers.get("mask")) body.mask = await blobToBase64(layers.get("mask"));
  if (Array.isArray(body.regions)) {
    body.regions = await Promise.all(body.regions.map(async (r, k) => {
      const mask = layers.get(`region:${k}`);
      return mask ? { ...r, mask: await blobToBase64(mask) } : r;
    }));
  }
  if ("ip_adapter_scale" in body && layers.get("reference")) {
    body.ip_adapter_image = await blobToBase64(layers.get("reference"));
  }
  if (body.mode === "control" && Array.isArray(body.controlnet_conditioning_scale)) {
    const nets = body.controlnet_conditioning_scale.length; // several nets: one image each after the canvas
    body.control_images = await Promise.all(Array.from({ length: nets - 1 }, (_, k) => {
      const blob = layers.get(`control:${k + 1}`);
      return blob ? blobToBase64(blob) : null;
    }));
  }
  const res = await fetch("api/generate", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  if (!res.ok) throw new Error(await errorText(res));
  downloadBlob(await res.blob(), `lcm-live-${params.seed}.png`);
}

/** Hand `blob` to the browser as a download named `name`. */
export function downloadBlob(blob, name) {
  const a = document.createElement("a");
  const url = URL.createObjectURL(blob);
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

/** The server's error as one line: `{code, message, field}`, or FastAPI's `{detail}`. */
export async function errorText(res) {
  let data = null;
  try {
    data = await res.json();
  } catch {
    return `HTTP ${res.status}`;
  }
  if (data && typeof data.message === "string") return data.message;
  const d = data && data.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d) && d.length) return `${(d[0].loc || []).slice(1).join(".")}: ${d[0].msg}`;
  return `HTTP ${res.status}`;
}

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).split(",", 2)[1]); // drop "data:image/webp;base64,"
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}
