// The layers painted over the sketch (the mask, the region masks) and the binary envelope that names them on the
// WebSocket (docs/protocol.md, "Binary with a layer envelope").
//
// A PaintLayer is an offscreen canvas of the canvas' pixel size whose alpha is the selection: painted pixels are
// opaque white, the rest transparent. It is sent as a PNG of white (selected) on black, the server's mask format.
//
// Events: "change" {final: boolean}  as SketchCanvas' (final=false while a stroke goes on)
//         "history" {canUndo, canRedo}

const MAX_HISTORY = 20; // ImageData snapshots, as the sketch keeps
// A pixel is selected from this alpha up: the server reads the PNG (white on black) as grey and calls a mask with
// no pixel at 128 or more all black (and refuses it), so a layer with only faint edges left is empty here too.
export const SELECTED_ALPHA = 128;
export const MAX_REGIONS = 8; // the server's bound (regions are numbered 0-7 in the envelope)

/** The layer codes of the envelope's fifth byte: reference is the IP-Adapter's image, control net k's (k >= 1). */
export const LAYER_CODES = { canvas: "c", mask: "m", region: "r", reference: "i", control: "n" };

/**
 * The 8-byte envelope: "LCML", the layer's code, the region's or the ControlNet's index (0 for the others), two
 * zero bytes.
 * @param {"canvas"|"mask"|"region"|"reference"|"control"} layer
 * @param {number} index 0-7 for a region, 1-7 for a ControlNet (net 0's image is the canvas), else 0
 */
export function envelopeHeader(layer, index = 0) {
  const code = LAYER_CODES[layer];
  if (!code) throw new Error(`unknown layer ${layer}: use canvas, mask, region, reference or control`);
  const [low, high] = layer === "region" ? [0, MAX_REGIONS - 1] : layer === "control" ? [1, 7] : [0, 0];
  if (!Number.isInteger(index) || index < low || index > high) {
    throw new Error(`layer ${layer} cannot have index ${index}`);
  }
  return new Uint8Array([0x4c, 0x43, 0x4d, 0x4c, code.charCodeAt(0), index, 0, 0]); // "LCML" code index 0 0
}

/** A layer message: the envelope followed by the image, or the envelope alone (image null) to clear the layer. */
export function layerMessage(layer, index, image) {
  const header = envelopeHeader(layer, index);
  return new Blob(image ? [header, image] : [header]);
}

export class PaintLayer extends EventTarget {
  constructor(width, height, name = "layer") {
    super();
    this.name = name;
    this.canvas = document.createElement("canvas");
    this.canvas.width = width;
    this.canvas.height = height;
    this.ctx = this.canvas.getContext("2d", { willReadFrequently: true });
    this.undoStack = [];
    this.redoStack = [];
    this.version = 0; // bumped by every change (what was sent is compared by it)
    this.emptyAt = -1; // the version `empty` was found at
    this.empty = true;
  }

  get width() { return this.canvas.width; }
  get height() { return this.canvas.height; }

  /** A stroke segment in canvas pixels: paint (opaque white) or erase (transparent). */
  segment(a, b, width, erase = false) {
    const ctx = this.ctx;
    ctx.save();
    ctx.globalCompositeOperation = erase ? "destination-out" : "source-over";
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = width;
    ctx.strokeStyle = "#ffffff";
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x + (a.x === b.x && a.y === b.y ? 0.01 : 0), b.y); // a tap draws a dot
    ctx.stroke();
    ctx.restore();
    this.version += 1;
    // A painted stroke 2 px or wider has opaque pixels: no need to scan the layer for them at every move.
    if (!erase && width >= 2) [this.empty, this.emptyAt] = [false, this.version];
  }

  /** Take away what `other` (a PaintLayer of the same size) covers: regions do not overlap. */
  subtract(other) {
    this.ctx.save();
    this.ctx.globalCompositeOperation = "destination-out";
    this.ctx.drawImage(other.canvas, 0, 0);
    this.ctx.restore();
    this.version += 1;
  }

  /** Nothing selected: no pixel with an alpha of SELECTED_ALPHA or more (found once per version). */
  isEmpty() {
    if (this.emptyAt === this.version) return this.empty;
    const data = this.ctx.getImageData(0, 0, this.width, this.height).data;
    let empty = true;
    for (let i = 3; i < data.length; i += 4) {
      if (data[i] >= SELECTED_ALPHA) {
        empty = false;
        break;
      }
    }
    [this.empty, this.emptyAt] = [empty, this.version];
    return empty;
  }

  /** Alpha of one pixel, 0-255 (tests and the curious). */
  alphaAt(x, y) {
    return this.ctx.getImageData(x, y, 1, 1).data[3];
  }

  // ---- whole-layer actions (each one undoable, each a final change) ----

  clear() {
    this.pushHistory();
    this.ctx.clearRect(0, 0, this.width, this.height);
    this.changed();
  }

  /** Selected <-> not selected. */
  invert() {
    this.pushHistory();
    const img = this.ctx.getImageData(0, 0, this.width, this.height);
    const d = img.data;
    for (let i = 0; i < d.length; i += 4) {
      d[i] = d[i + 1] = d[i + 2] = 255;
      d[i + 3] = 255 - d[i + 3];
    }
    this.ctx.putImageData(img, 0, 0);
    this.changed();
  }

  /** Follow the canvas' pixel size, stretching what is painted. Not an undo step. */
  resize(width, height) {
    if (width === this.width && height === this.height) return;
    const old = document.createElement("canvas");
    old.width = this.width;
    old.height = this.height;
    old.getContext("2d").drawImage(this.canvas, 0, 0);
    this.canvas.width = width;
    this.canvas.height = height;
    this.ctx.drawImage(old, 0, 0, width, height);
    this.undoStack = [];
    this.redoStack = [];
    this.emitHistory();
    this.changed();
  }

  changed(final = true) {
    this.version += 1;
    this.emit("change", { final });
  }

  // ---- history ----

  pushHistory() {
    this.undoStack.push(this.ctx.getImageData(0, 0, this.width, this.height));
    if (this.undoStack.length > MAX_HISTORY) this.undoStack.shift();
    this.redoStack = [];
    this.emitHistory();
  }

  undo() {
    if (!this.undoStack.length) return;
    this.redoStack.push(this.ctx.getImageData(0, 0, this.width, this.height));
    this.ctx.putImageData(this.undoStack.pop(), 0, 0);
    this.emitHistory();
    this.changed();
  }

  redo() {
    if (!this.redoStack.length) return;
    this.undoStack.push(this.ctx.getImageData(0, 0, this.width, this.height));
    this.ctx.putImageData(this.redoStack.pop(), 0, 0);
    this.emitHistory();
    this.changed();
  }

  emitHistory() {
    this.emit("history", { canUndo: this.undoStack.length > 0, canRedo: this.redoStack.length > 0 });
  }

  // ---- export ----

  /** The selection as a PNG, white (selected) on black, the canvas' size: the server reads it as grey. */
  toMaskBlob() {
    const out = document.createElement("canvas");
    out.width = this.width;
    out.height = this.height;
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#000000";
    ctx.fillRect(0, 0, out.width, out.height);
    ctx.drawImage(this.canvas, 0, 0);
    return new Promise((resolve) => out.toBlob(resolve, "image/png"));
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

/** Diagonal stripes of `colour` over a lighter wash of it, `size` pixels a tile: the mask's look, unlike any
 * region's flat colour. */
export function stripes(colour, size = 12) {
  const tile = document.createElement("canvas");
  tile.width = size;
  tile.height = size;
  const ctx = tile.getContext("2d");
  ctx.globalAlpha = 0.45;
  ctx.fillStyle = colour;
  ctx.fillRect(0, 0, size, size);
  ctx.globalAlpha = 1;
  ctx.strokeStyle = colour;
  ctx.lineWidth = size / 4;
  ctx.beginPath();
  for (const o of [-size, 0, size]) { // three lines: the tile repeats without seams
    ctx.moveTo(o, size);
    ctx.lineTo(o + size, 0);
  }
  ctx.stroke();
  return ctx.createPattern(tile, "repeat");
}

const STRIPE_CSS_PX = 12; // the mask's stripes, in screen pixels whatever the canvas' size

/**
 * The translucent picture of the layers over the sketch: each region in its colour, the mask striped, drawn on a
 * canvas element that lies over the sketch and lets the pointer through (style.css: #layer-overlay). It has the
 * element's screen resolution (not the layers'): on a 64 px canvas shown at 500 px the stripes stay fine and the
 * layers' pixels show as the square pixels the server gets.
 */
export class LayerOverlay {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.tint = document.createElement("canvas");
    // -> [{layer: PaintLayer, colour: "#rrggbb", alpha: 0..1, striped?: boolean}], set by the owner
    this.sources = () => [];
    this.frame = 0;
    this.patterns = new Map(); // "colour size" -> CanvasPattern
    if (typeof ResizeObserver === "function") new ResizeObserver(() => this.update()).observe(canvas);
  }

  /** Redraw at the next animation frame (many changes during a stroke make one redraw). */
  update() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.draw();
    });
  }

  draw() {
    const items = this.sources();
    const shown = this.canvas.getBoundingClientRect();
    const dpr = window.devicePixelRatio || 1;
    const fallback = items.length ? items[0].layer : this.canvas; // not laid out (hidden): the layers' size
    const width = shown.width ? Math.round(shown.width * dpr) : fallback.width;
    const height = shown.height ? Math.round(shown.height * dpr) : fallback.height;
    if (this.canvas.width !== width || this.canvas.height !== height) {
      this.canvas.width = width;
      this.canvas.height = height;
    }
    this.ctx.clearRect(0, 0, width, height);
    this.tint.width = width;
    this.tint.height = height;
    const t = this.tint.getContext("2d");
    t.imageSmoothingEnabled = false; // the layers' pixels as they are sent
    const stripe = Math.max(4, Math.round(STRIPE_CSS_PX * (shown.width ? dpr : 1)));
    for (const { layer, colour, alpha, striped } of items) {
      // The layer's alpha, filled with its colour (or stripes), laid over at `alpha`.
      t.globalCompositeOperation = "source-over";
      t.clearRect(0, 0, width, height);
      t.drawImage(layer.canvas, 0, 0, width, height);
      t.globalCompositeOperation = "source-in";
      t.fillStyle = striped ? this.pattern(colour, stripe) : colour;
      t.fillRect(0, 0, width, height);
      this.ctx.globalAlpha = alpha;
      this.ctx.drawImage(this.tint, 0, 0);
    }
    this.ctx.globalAlpha = 1;
  }

  pattern(colour, size) {
    const key = `${colour} ${size}`;
    if (!this.patterns.has(key)) this.patterns.set(key, stripes(colour, size));
    return this.patterns.get(key);
  }
}
