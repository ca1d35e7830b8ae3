// The history strip (history.js keeps the frames): a thumbnail per final frame, oldest on the left, a slider and
// the arrow keys to scrub, and a viewer that shows the chosen frame large with its parameters and Restore, Apply,
// Save and Pin. "Back to live" (or Escape) closes the viewer; new frames keep coming into the strip meanwhile.
//
// Cost per frame (docs/benchmarks.md, "Studio page"): the entry and its button at once; the thumbnail is decoded
// and scaled in a worker (thumbs.js) and handed to its canvas when ready.

import { FrameHistory, SentInputs } from "./history.js";
import { PinStore } from "./pins.js";
import { ThumbMaker } from "./thumbs.js";
import { keepAndUpscale } from "./upscale.js";

const $ = (id) => document.getElementById(id);
const THUMB_HEIGHT = 56; // CSS pixels of a thumbnail (its width follows the frame's shape)

const MB = 1024 * 1024;

/** One line of a frame's parameters, for the viewer and the thumbnail's tooltip. */
export function describeParams(info) {
  const p = info.params || {};
  const parts = [];
  if (p.prompt) parts.push(`"${p.prompt}"`);
  if (p.model) parts.push(p.model);
  for (const [style, scale] of Object.entries(p.lora_scales || {})) parts.push(`${style} ${scale}`);
  parts.push(`seed ${info.seed ?? p.seed}`);
  if (p.num_inference_steps) parts.push(`${p.num_inference_steps} steps`);
  if (typeof p.guidance_scale === "number") parts.push(`guidance ${p.guidance_scale}`);
  if (p.mode && p.mode !== "txt2img" && typeof p.strength === "number") parts.push(`strength ${p.strength}`);
  if (p.mode) parts.push({ txt2img: "text to image", img2img: "sketch to image", control: "lines to image" }[p.mode] || p.mode);
  if (p.prompt_blend) parts.push(`blend "${p.prompt_blend.prompt}" ${p.prompt_blend.weight}`);
  if (p.seed_blend) parts.push(`seed blend ${p.seed_blend.seed} ${p.seed_blend.weight}`);
  if (Array.isArray(p.regions) && p.regions.length) parts.push(`${p.regions.length} region${p.regions.length > 1 ? "s" : ""}`);
  if (info.width && info.height) parts.push(`${info.width}×${info.height}`);
  return parts.join(" · ");
}

/**
 * Wire #history (index.html) to the connection's frames. onRestore(entry), onApply(entry), onSave(entry): the
 * viewer's buttons (the page does the work; each may return a promise). onError(text): pinning or upscaling failed.
 * Returns {history, frame(info, blob), select(id)}.
 */
export function setupHistory({ conn, onRestore, onApply, onSave, onError }) {
  const els = {
    strip: $("history-strip"), scrub: $("history-scrub"), usage: $("history-usage"), view: $("history-view"),
    image: $("history-image"), params: $("history-params"), restore: $("history-restore"),
    apply: $("history-apply"), save: $("history-save"), pin: $("history-pin"), close: $("history-close"),
    upscale: $("history-upscale"), scale: $("upscale-scale"), upscaleStatus: $("upscale-status"),
  };
  const sent = new SentInputs();
  conn.addEventListener("sent", (e) => sent.add(conn.sentCount, e.detail.kind, e.detail.payload));
  const history = new FrameHistory();
  const buttons = new Map(); // entry id -> its thumbnail button
  const thumbs = new ThumbMaker();
  let viewUrl = null;
  let selected = null; // the entry in the viewer (null: live)
  history.stats = { adds: 0, addMs: 0 }; // main-thread time (docs/benchmarks.md)

  history.addEventListener("change", (e) => {
    const { added, dropped } = e.detail;
    for (const entry of dropped) {
      buttons.get(entry.id)?.remove();
      buttons.delete(entry.id);
      thumbs.forget(entry.id);
      if (selected === entry) select(null);
    }
    if (added) addButton(added);
    renderBar();
  });

  function addButton(entry) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "history-thumb";
    b.setAttribute("role", "option");
    b.setAttribute("aria-selected", "false");
    b.tabIndex = -1;
    b.dataset.id = entry.id;
    b.dataset.pinned = String(entry.pinned);
    b.title = describeParams(entry.info);
    b.setAttribute("aria-label", `Frame: ${b.title}`);
    const canvas = document.createElement("canvas");
    canvas.height = Math.round(THUMB_HEIGHT * (window.devicePixelRatio || 1));
    canvas.width = Math.max(1, Math.round((canvas.height * (entry.info.width || 1)) / (entry.info.height || 1)));
    b.append(canvas);
    thumbs.make(entry.id, entry.frame, canvas);
    b.addEventListener("click", () => select(entry));
    // Oldest first: a pinned frame from an earlier visit goes before the live ones.
    const next = history.entries[history.entries.indexOf(entry) + 1];
    const before = next && buttons.get(next.id);
    if (before) els.strip.insertBefore(b, before);
    else els.strip.append(b);
    buttons.set(entry.id, b);
  }

  function renderBar() {
    const { frames, pinned, bytes, cap, limit } = history.usage();
    els.usage.textContent = `${frames} frame${frames === 1 ? "" : "s"}${pinned ? ` (${pinned} pinned)` : ""} · `
      + `${(bytes / MB).toFixed(1)} MB of ${Math.round(cap / MB)} MB · the last ${limit} are kept`;
    els.scrub.max = String(Math.max(0, frames - 1));
    els.scrub.disabled = frames === 0;
    const i = selected ? history.entries.indexOf(selected) : frames - 1;
    els.scrub.value = String(Math.max(0, i));
    els.strip.dataset.count = String(frames);
  }

  /** Show `entry` large (null: close the viewer, back to the live output). */
  function select(entry) {
    if (selected) buttons.get(selected.id)?.setAttribute("aria-selected", "false");
    selected = entry;
    document.body.dataset.historyView = String(entry !== null);
    if (viewUrl) URL.revokeObjectURL(viewUrl);
    viewUrl = null;
    els.view.hidden = entry === null;
    if (entry) {
      const b = buttons.get(entry.id);
      b.setAttribute("aria-selected", "true");
      b.scrollIntoView({ block: "nearest", inline: "nearest" });
      if (els.strip.contains(document.activeElement)) b.focus({ preventScroll: true }); // the keys follow it
      viewUrl = URL.createObjectURL(entry.frame);
      els.image.src = viewUrl;
      els.image.alt = entry.info.params?.prompt ? `Frame from the history: ${entry.info.params.prompt}` : "Frame";
      els.image.dataset.id = entry.id;
      els.params.textContent = describeParams(entry.info);
      els.pin.setAttribute("aria-pressed", String(entry.pinned));
      els.pin.textContent = entry.pinned ? "Pinned" : "Pin";
    }
    renderBar();
  }

  /** Move the selection by `delta` frames (from live: the newest). */
  function step(delta) {
    const n = history.entries.length;
    if (!n) return;
    const i = selected ? history.entries.indexOf(selected) : n;
    select(history.entries[Math.min(n - 1, Math.max(0, i + delta))]);
  }

  els.scrub.addEventListener("input", () => select(history.entries[Number(els.scrub.value)] || null));
  els.strip.addEventListener("keydown", (e) => {
    const n = history.entries.length;
    if (e.key === "ArrowLeft") step(-1);
    else if (e.key === "ArrowRight") step(1);
    else if (e.key === "Home" && n) select(history.entries[0]);
    else if (e.key === "End" && n) select(history.entries[n - 1]);
    else if (e.key === "Escape") select(null);
    else return;
    e.preventDefault();
  });
  els.view.addEventListener("keydown", (e) => {
    if (e.key === "Escape") select(null);
  });
  els.close.addEventListener("click", () => select(null));

  async function run(button, work) {
    if (!selected) return;
    button.disabled = true;
    try {
      await work(selected);
    } finally {
      button.disabled = false;
    }
  }
  els.restore.addEventListener("click", () => run(els.restore, onRestore));
  els.apply.addEventListener("click", () => run(els.apply, onApply));
  els.save.addEventListener("click", () => run(els.save, onSave));
  async function pin(entry, pinned) {
    try {
      await history.setPinned(entry, pinned);
    } catch (err) {
      onError(`Could not pin the frame (${(err && err.message) || err}): the browser's storage may be full.`);
    }
    const b = buttons.get(entry.id);
    if (b) b.dataset.pinned = String(entry.pinned);
    if (selected === entry) select(entry); // the Pin button's state
  }
  els.pin.addEventListener("click", () => run(els.pin, (entry) => pin(entry, !entry.pinned)));
  els.upscale.addEventListener("click", () => run(els.upscale, (entry) => keepAndUpscale(entry, {
    keep: (e) => pin(e, true), scale: Number(els.scale.value), status: els.upscaleStatus, onError,
  })));

  PinStore.open()
    .then((pins) => {
      history.pins = pins;
      if (!pins) els.pin.title = "This browser gives the page no storage (IndexedDB): a pinned frame lasts this visit only";
      return history.loadPins();
    })
    .catch((err) => onError(`Pinned frames could not be read: ${(err && err.message) || err}`));
  renderBar();

  return {
    history,
    thumbs,
    /** A final frame arrived: keep it with the input it was made from. */
    frame(info, blob) {
      const t0 = performance.now();
      history.add(info, blob, sent.stateAt(Number.isInteger(info.input) ? info.input : null));
      history.stats.adds += 1;
      history.stats.addMs += performance.now() - t0;
    },
    select: (id) => select(history.get(id)),
  };
}
