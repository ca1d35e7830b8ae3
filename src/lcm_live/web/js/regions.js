// Region prompts: up to MAX_REGIONS regions, each a colour, a prompt beside it and a layer painted with the brush;
// the main prompt covers the rest. Sent as `regions: [{prompt}]` in the params plus one "r" layer per region
// (docs/protocol.md), numbered in the order of the list. A region without a prompt or without paint is not sent,
// and the palette says so; removing a region renumbers the ones after it.

import { MAX_REGIONS, PaintLayer } from "./layers.js";

export const REGION_COLOURS = [
  "#f94144", "#43aa8b", "#277da1", "#f9c74f", "#9b5de5", "#f3722c", "#00bbf9", "#90be6d",
];
const REGION_ALPHA = 0.45;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, String(v));
  }
  node.append(...children);
  return node;
}

/**
 * What is sent for these regions: the ones with a prompt (not just spaces) and paint, in order (numbered 0, 1, ...
 * on the wire), and a line for each reason others are left out. regions: [{prompt: string, painted: boolean}].
 */
export function planRegions(regions) {
  const sent = [];
  const left = { noPrompt: [], unpainted: [], blank: [] }; // region numbers (from 1) by reason
  regions.forEach((r, i) => {
    const hasPrompt = r.prompt.trim() !== "";
    if (hasPrompt && r.painted) sent.push(i);
    else left[!hasPrompt && r.painted ? "noPrompt" : hasPrompt ? "unpainted" : "blank"].push(i + 1);
  });
  const say = (numbers, one, many) => (numbers.length === 1
    ? `Region ${numbers[0]}${one}` : `Regions ${numbers.join(", ")}${many}`);
  const notes = [];
  if (left.noPrompt.length) notes.push(say(left.noPrompt, " has no prompt: it is not sent.", " have no prompt: they are not sent."));
  if (left.unpainted.length) notes.push(say(left.unpainted, " is not painted yet: it is not sent.", " are not painted yet: they are not sent."));
  if (left.blank.length) notes.push(say(left.blank, ": give it a prompt and paint it.", ": give each a prompt and paint it."));
  return { sent, notes };
}

export class RegionPalette {
  /**
   * Wires #regions (the panel), #region-list, #region-add and #region-status of index.html.
   * onChange(final, typing): a region's paint (final false while a stroke goes on) or prompt (typing) changed.
   * onSelect(layer): paint on this region's layer (null: the user unselected it).
   */
  constructor(width, height, { onChange, onSelect }) {
    this.width = width;
    this.height = height;
    this.onChange = onChange;
    this.onSelect = onSelect;
    this.els = { panel: $("regions"), list: $("region-list"), add: $("region-add"), status: $("region-status") };
    this.regions = []; // {colour, layer, input, row, paint, remove}
    this.selected = null; // the region strokes go to
    this.sent = []; // the [{prompt}] of the params last sent (whose layers went before them)
    this.sentLayers = []; // index -> {layer, version} the server has as "region:index"
    this.overlay = null;
    this.els.add.addEventListener("click", () => {
      const region = this.add();
      if (!region) return;
      this.select(region); // painted next
      region.input.focus(); // and its prompt typed now
    });
    this.render();
  }

  /** Add a region (when fewer than MAX_REGIONS); returns it, or null. */
  add(prompt = "") {
    if (this.regions.length >= MAX_REGIONS) return null;
    const used = new Set(this.regions.map((r) => r.colour));
    const colour = REGION_COLOURS.find((c) => !used.has(c));
    const layer = new PaintLayer(this.width, this.height, "region");
    const region = { colour, layer };
    region.paint = el("button", { type: "button", class: "swatch region-swatch", "aria-pressed": "false" });
    region.paint.style.background = colour;
    region.input = el("input", { type: "text", class: "region-prompt", autocomplete: "off", spellcheck: "true" });
    region.input.value = prompt;
    region.label = el("label", { class: "visually-hidden" });
    region.remove = el("button", { type: "button", class: "tool region-remove", text: "×" });
    region.row = el("li", { class: "region" }, [region.paint, region.label, region.input, region.remove]);
    region.paint.addEventListener("click", () => this.select(this.selected === region ? null : region));
    region.input.addEventListener("input", () => {
      this.render();
      this.onChange(false, true);
    });
    region.remove.addEventListener("click", () => this.remove(region));
    layer.addEventListener("change", (e) => {
      if (e.detail.final) {
        // Regions do not overlap: where this one is painted, the others are not.
        for (const other of this.regions) if (other !== region) other.layer.subtract(layer);
        this.render();
      } else if (this.overlay) {
        this.overlay.update(); // mid-stroke: the picture only (the notes are for at rest)
      }
      this.onChange(e.detail.final);
    });
    this.regions.push(region);
    this.els.list.append(region.row);
    this.render();
    return region;
  }

  /** Remove a region; the ones after it move up one number. */
  remove(region) {
    const i = this.regions.indexOf(region);
    if (i < 0) return;
    const focusNext = this.regions[i + 1]?.input || this.regions[i - 1]?.input || this.els.add;
    this.regions.splice(i, 1);
    region.row.remove();
    if (this.selected === region) this.select(null);
    this.render();
    focusNext.focus(); // the keyboard stays in the palette
    this.onChange(true);
  }

  /** Strokes go to this region's layer (null: back to what the owner picks). */
  select(region) {
    this.selected = region;
    this.onSelect(region ? region.layer : null);
    this.render();
  }

  /** The owner moved strokes elsewhere (the drawing, the mask). */
  unselect() {
    if (this.selected === null) return;
    this.selected = null;
    this.render();
  }

  resize(width, height) {
    this.width = width;
    this.height = height;
    for (const r of this.regions) r.layer.resize(width, height);
  }

  /** The overlay's part: each region in its colour. */
  overlayItems() {
    return this.regions.map((r) => ({ layer: r.layer, colour: r.colour, alpha: REGION_ALPHA }));
  }

  plan() {
    return planRegions(this.regions.map((r) => ({ prompt: r.input.value, painted: !r.layer.isEmpty() })));
  }

  render() {
    this.regions.forEach((r, i) => {
      const n = i + 1;
      const id = `region-prompt-${n}`;
      r.input.id = id;
      r.label.htmlFor = id;
      r.label.textContent = `Region ${n} prompt`;
      r.input.placeholder = `region ${n}: what goes where it is painted`;
      r.paint.setAttribute("aria-label", `Paint region ${n}`);
      r.paint.setAttribute("aria-pressed", String(this.selected === r));
      r.paint.title = `Paint region ${n} with the brush (the eraser takes it away)`;
      r.remove.setAttribute("aria-label", `Remove region ${n}`);
      r.remove.title = `Remove region ${n}`;
      r.row.dataset.selected = String(this.selected === r);
    });
    this.els.add.disabled = this.regions.length >= MAX_REGIONS;
    this.els.add.title = this.els.add.disabled ? `At most ${MAX_REGIONS} regions` : "Add a region with its own prompt";
    const { sent, notes } = this.plan();
    const lines = [];
    if (this.regions.length) lines.push(sent.length === 1 ? "1 region sent." : `${sent.length} regions sent.`);
    this.els.status.textContent = [...lines, ...notes].join(" ");
    this.els.status.hidden = this.regions.length === 0;
    if (this.overlay) this.overlay.update();
  }

  /** The `regions` of the params: those whose layers the server has. */
  params() {
    return this.sent.map((r) => ({ ...r }));
  }

  /**
   * Bring the server in line: the layers of the regions to send (changed ones only), then, when the list of
   * prompts changed, sendParams() (after the layers, so the server never waits for one), then clears for the
   * numbers no longer used. isStale(): a newer sync began.
   */
  async sync(conn, sendParams, isStale = () => false) {
    const { sent } = this.plan();
    const regions = sent.map((i) => this.regions[i]);
    for (const [j, r] of regions.entries()) {
      const had = this.sentLayers[j];
      if (had && had.layer === r.layer && had.version === r.layer.version && conn.latestLayers.has(`region:${j}`)) {
        continue;
      }
      const version = r.layer.version;
      const png = await r.layer.toMaskBlob();
      if (isStale() || !png) return;
      conn.sendLayer(`region:${j}`, png);
      this.sentLayers[j] = { layer: r.layer, version };
    }
    const list = regions.map((r) => ({ prompt: r.input.value }));
    if (JSON.stringify(list) !== JSON.stringify(this.sent)) {
      this.sent = list;
      sendParams();
    }
    // Clears after the params that no longer name them (before, the server would wait for the layer it lost).
    for (let j = regions.length; j < this.sentLayers.length; j++) conn.sendLayer(`region:${j}`, null);
    this.sentLayers.length = regions.length;
  }
}
