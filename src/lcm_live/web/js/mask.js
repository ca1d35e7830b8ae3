// The mask: where the picture is redrawn (white) and where it is kept (black), painted with the brush on a layer
// over the sketch. Sketch mode: inpainting (the canvas is kept outside the mask); lines mode: the server redraws
// the masked part of its last frame along the lines. Text to image ignores it. Sent as the "m" layer
// (docs/protocol.md); an empty mask is never sent (it would change nothing): the page says so instead.

import { PaintLayer } from "./layers.js";
import { usesCanvas } from "./canvas.js";

export const MASK_COLOUR = "#ff3b6b"; // the overlay's tint of the masked part
const MASK_ALPHA = 0.8; // of the stripes (layers.js), whose wash is lighter

const $ = (id) => document.getElementById(id);

export class MaskTool {
  /**
   * Wires the mask bar of index.html (#mask-on, #mask-show, #mask-invert, #mask-clear, #mask-hint).
   * onChange(final): the mask (or whether it is used) changed: sync() it, paced like strokes.
   * onSelect(): the user asked to paint on the mask (the Mask button, key M).
   */
  constructor(width, height, { onChange, onSelect }) {
    this.layer = new PaintLayer(width, height, "mask");
    this.onChange = onChange;
    this.els = { on: $("mask-on"), show: $("mask-show"), invert: $("mask-invert"), clear: $("mask-clear"),
                 hint: $("mask-hint"), select: $("layer-mask") };
    this.sentVersion = -1; // the layer version the server has
    this.mode = "txt2img";
    this.layer.addEventListener("change", (e) => {
      // Painting on the mask means using it (a stroke's first change is not final; Clear and Invert are).
      if (!e.detail.final && !this.on) this.els.on.checked = true;
      if (e.detail.final) this.render();
      else if (this.overlay) this.overlay.update(); // mid-stroke: the picture only (the hint is for at rest)
      onChange(e.detail.final);
    });
    this.els.on.addEventListener("change", () => {
      this.render();
      onChange(true);
    });
    this.els.show.addEventListener("click", () => {
      this.els.show.setAttribute("aria-pressed", String(!this.shown));
      this.render();
    });
    this.els.invert.addEventListener("click", () => this.layer.invert());
    this.els.clear.addEventListener("click", () => this.layer.clear());
    this.els.select.addEventListener("click", () => onSelect());
    this.overlay = null; // a LayerOverlay to update, set by the owner
    this.render();
  }

  /** The mask is used (its checkbox). */
  get on() { return this.els.on.checked; }

  /** The overlay shows it. */
  get shown() { return this.els.show.getAttribute("aria-pressed") === "true"; }

  /** The overlay's part: [{layer, colour, alpha}], empty when hidden. */
  overlayItems() {
    return this.shown ? [{ layer: this.layer, colour: MASK_COLOUR, alpha: MASK_ALPHA, striped: true }] : [];
  }

  /** The page's mode (sketch and lines mode use the mask). */
  setMode(mode) {
    this.mode = mode;
    this.render();
  }

  /** Strokes go to the mask (or not): its button shows it. */
  showSelected(selected) {
    this.els.select.setAttribute("aria-pressed", String(selected));
    if (selected && !this.shown) this.els.show.setAttribute("aria-pressed", "true"); // see what you paint
    if (selected && !this.on) {
      this.els.on.checked = true; // picking the mask means using it: nothing is sent until it is painted
      this.onChange(true);
    }
    this.render();
  }

  resize(width, height) {
    this.layer.resize(width, height);
  }

  /** What the empty-mask hint says, or null when there is nothing to say. */
  hintText() {
    if (!this.on || !usesCanvas(this.mode) || !this.layer.isEmpty()) return null;
    return "The mask is empty: paint the part to redraw with the Mask tool. Until then the whole picture changes " +
      "(no mask is sent).";
  }

  render() {
    const text = this.hintText();
    this.els.hint.hidden = text === null;
    if (text !== null) this.els.hint.textContent = text;
    if (this.overlay) this.overlay.update();
  }

  /**
   * Bring the server's mask in line with the page's: the PNG when the mask is used and painted, else clear it
   * (conn.sendLayer sends a clear only when the server may hold one). isStale(): a newer sync began.
   */
  async sync(conn, isStale = () => false) {
    this.render();
    if (!this.on || this.layer.isEmpty()) {
      this.sentVersion = -1;
      conn.sendLayer("mask", null);
      return;
    }
    const version = this.layer.version;
    if (version === this.sentVersion && conn.latestLayers.has("mask")) return; // the server has this one
    const png = await this.layer.toMaskBlob();
    if (isStale() || !png) return;
    this.sentVersion = version;
    conn.sendLayer("mask", png);
  }
}
