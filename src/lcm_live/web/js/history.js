// Frame history: the last HISTORY_LIMIT final frames, each with what it was made from (its validated params and
// seed, the canvas and the layers the server had read when it made it: mask, regions, the reference image, the other
// ControlNets' images), within HISTORY_MEMORY_CAP bytes of images.
// Pinned frames are kept apart from both bounds and survive a reload (IndexedDB, pins.js); the rest is dropped
// oldest first. Images are kept as the compressed blobs they already are: the frame as the server sent it
// (JPEG/WebP), the canvas as the page sent it (WebP/PNG), the mask and region layers as PNGs; a blob shared by
// several frames (a canvas left as it was) is counted once.
//
// Which input made a frame: the server says how many input messages it had read (`input` of the frame JSON); the
// SentInputs log replays the sends of this connection up to that count. Without `input`, the newest state.
//
// Events: "change" {added: entry|null, dropped: [entry]}  entries were added, dropped, pinned or unpinned

export const HISTORY_LIMIT = 100; // frames kept (pinned ones not counted)
export const HISTORY_MEMORY_CAP = 64 * 1024 * 1024; // bytes of images kept for the frames that are not pinned
const LOG_LIMIT = 256; // sends replayed; older ones are folded into the base state

/**
 * The canvas and layers the page sent on this connection, in order, to answer: what had the server read after
 * its n-th input message? Fed with the Connection's "sent" events and its sentCount.
 */
export class SentInputs {
  constructor(limit = LOG_LIMIT) {
    this.limit = limit;
    this.reset();
  }

  reset() {
    this.base = { canvas: null, layers: new Map() }; // the state before the first logged send
    this.log = []; // {n, kind, payload}, n = the message's number on this connection (1, 2, ...)
    this.last = 0;
  }

  /** The n-th message of the connection was sent (a smaller n than before: a new connection). */
  add(n, kind, payload) {
    if (n <= this.last) this.reset();
    this.last = n;
    if (kind !== "canvas" && kind !== "layer") return;
    this.log.push({ n, kind, payload });
    if (this.log.length > this.limit) apply(this.base, this.log.shift());
  }

  /** {canvas: Blob|null, layers: Map key -> Blob} as of `count` messages read (null: all of them). */
  stateAt(count = null) {
    const state = { canvas: this.base.canvas, layers: new Map(this.base.layers) };
    for (const e of this.log) {
      if (count !== null && e.n > count) break;
      apply(state, e);
    }
    return state;
  }
}

function apply(state, { kind, payload }) {
  if (kind === "canvas") state.canvas = payload;
  else if (payload.image) state.layers.set(payload.key, payload.image);
  else state.layers.delete(payload.key);
}

let lastId = 0;

/** A new entry id, unique within this browser profile (pins from earlier visits included). */
function newId() {
  lastId = Math.max(lastId + 1, Date.now());
  return `${lastId}-${Math.random().toString(36).slice(2, 8)}`;
}

export class FrameHistory extends EventTarget {
  /** pins: a PinStore (pins.js) or null (nothing survives a reload). */
  constructor({ limit = HISTORY_LIMIT, memoryCap = HISTORY_MEMORY_CAP, pins = null } = {}) {
    super();
    this.limit = limit;
    this.memoryCap = memoryCap;
    this.pins = pins;
    this.entries = []; // oldest first: {id, info, frame, canvas, layers, pinned, at}
    this.refs = new Map(); // Blob -> how many entries hold it
    this.bytes = 0; // of the distinct blobs held
  }

  /**
   * Keep a final frame. info: its JSON (params, seed...); frame: its image; canvas, layers: what it was made
   * from ({canvas, layers} of SentInputs.stateAt). Only what the frame's mode used is kept. Returns the entry.
   */
  add(info, frame, { canvas = null, layers = new Map() } = {}, { pinned = false, id = null, at = Date.now() } = {}) {
    const params = info.params || {};
    const canvasMode = params.mode === "img2img" || params.mode === "control";
    const kept = new Map();
    if (canvasMode && layers.has("mask")) kept.set("mask", layers.get("mask"));
    const regions = Array.isArray(params.regions) ? params.regions.length : 0;
    for (let k = 0; k < regions; k++) if (layers.has(`region:${k}`)) kept.set(`region:${k}`, layers.get(`region:${k}`));
    // The reference image guided it when the server has an IP-Adapter; the extra ControlNets' images in lines mode.
    if (typeof params.ip_adapter_scale === "number" && layers.has("reference")) kept.set("reference", layers.get("reference"));
    for (let k = 1; k <= 7 && params.mode === "control"; k++) {
      if (layers.has(`control:${k}`)) kept.set(`control:${k}`, layers.get(`control:${k}`));
    }
    const entry = { id: id || newId(), info, frame, canvas: canvasMode ? canvas : null, layers: kept, pinned, at };
    this.entries.push(entry);
    for (const blob of blobsOf(entry)) this.hold(blob);
    const dropped = this.trim();
    this.emit({ added: dropped.includes(entry) ? null : entry, dropped });
    return entry;
  }

  /** Drop the oldest frames that are not pinned while over the count or the memory cap (never the newest). */
  trim() {
    const dropped = [];
    let unpinned = this.entries.filter((e) => !e.pinned).length;
    while (unpinned > 1 && (unpinned > this.limit || this.bytes > this.memoryCap)) {
      const i = this.entries.findIndex((e) => !e.pinned);
      const [entry] = this.entries.splice(i, 1);
      for (const blob of blobsOf(entry)) this.release(blob);
      dropped.push(entry);
      unpinned -= 1;
    }
    return dropped;
  }

  hold(blob) {
    const n = this.refs.get(blob) || 0;
    if (n === 0) this.bytes += blob.size;
    this.refs.set(blob, n + 1);
  }

  release(blob) {
    const n = this.refs.get(blob) || 0;
    if (n <= 1) {
      this.refs.delete(blob);
      this.bytes -= blob.size;
    } else {
      this.refs.set(blob, n - 1);
    }
  }

  get(id) {
    return this.entries.find((e) => e.id === id) || null;
  }

  /** {frames, pinned, bytes, cap}: what the strip says about itself. bytes: all distinct images held. */
  usage() {
    return { frames: this.entries.length, pinned: this.entries.filter((e) => e.pinned).length,
             bytes: this.bytes, cap: this.memoryCap, limit: this.limit };
  }

  /** Pin (kept across reloads) or unpin (back under the bounds: the oldest may go at once). */
  async setPinned(entry, pinned) {
    if (entry.pinned === pinned) return;
    if (this.pins) {
      if (pinned) await this.pins.put(toRecord(entry));
      else await this.pins.delete(entry.id);
    }
    entry.pinned = pinned;
    this.emit({ added: null, dropped: pinned ? [] : this.trim() });
  }

  /** The frames pinned in earlier visits, put back (oldest first) before the live ones. */
  async loadPins() {
    if (!this.pins) return 0;
    const records = await this.pins.all();
    records.sort((a, b) => a.at - b.at);
    const known = new Set(this.entries.map((e) => e.id));
    const restored = [];
    for (const r of records) {
      if (known.has(r.id)) continue;
      const entry = { id: r.id, info: r.info, frame: r.frame, canvas: r.canvas || null,
                      layers: new Map(r.layers || []), pinned: true, at: r.at };
      for (const blob of blobsOf(entry)) this.hold(blob);
      restored.push(entry);
    }
    this.entries = [...restored, ...this.entries];
    for (const entry of restored) this.emit({ added: entry, dropped: [] });
    return restored.length;
  }

  emit(detail) {
    this.dispatchEvent(new CustomEvent("change", { detail }));
  }
}

function blobsOf(entry) {
  return [entry.frame, entry.canvas, ...entry.layers.values()].filter(Boolean);
}

/** What IndexedDB keeps of a pinned entry (Blobs are stored as they are). */
function toRecord(entry) {
  return { id: entry.id, at: entry.at, info: entry.info, frame: entry.frame, canvas: entry.canvas,
           layers: [...entry.layers.entries()] };
}
