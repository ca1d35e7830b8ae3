// The sketch canvas: brush (size, colour, pen pressure), eraser, undo/redo, clear, images dropped onto it.
// Pointer events, so mouse, pen and touch all draw. The canvas keeps the generation size in pixels (CSS scales
// it to the column) and an opaque white background: it is sent as the init image in sketch mode, as the
// ControlNet's control image in lines mode.
//
// Strokes go to the sketch itself, or to the layer set with setTarget (a PaintLayer of layers.js: the mask, a
// region), which then emits its own "change"; undo and redo follow the same target.
//
// Events: "change" {final: boolean}  final=false while a stroke is in progress (throttled by the caller),
//         "history" {canUndo, canRedo}  of the target strokes go to

const BACKGROUND = "#ffffff";
const MAX_HISTORY = 20; // ImageData snapshots; a 768x768 one is ~2.4 MB

/** The modes that use the canvas: img2img ("Sketch to image", the init image) and control ("Lines to image",
 * the ControlNet's control image; offered only when the server has a ControlNet). Text to image ignores it. */
export const CANVAS_MODES = new Set(["img2img", "control"]);

export function usesCanvas(mode) {
  return CANVAS_MODES.has(mode);
}

export class SketchCanvas extends EventTarget {
  /** @param {HTMLCanvasElement} canvas */
  constructor(canvas) {
    super();
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.tool = "brush"; // "brush" | "eraser"
    this.color = "#000000";
    this.size = 12; // brush diameter in canvas pixels
    this.undoStack = [];
    this.redoStack = [];
    this.pointerId = null; // the one pointer drawing now (a second finger is ignored)
    this.last = null; // last point of the stroke, canvas pixels
    this.target = null; // a PaintLayer that strokes paint instead of the sketch (null: the sketch)
    this.stroke = null; // the surface the stroke in progress paints: the sketch or the target when it began
    this.forward = () => this.emitHistory(); // the target's history, said as the sketch's (the toolbar listens)
    this.fill();
    canvas.addEventListener("pointerdown", (e) => this.onDown(e));
    canvas.addEventListener("pointermove", (e) => this.onMove(e));
    canvas.addEventListener("pointerup", (e) => this.onUp(e));
    canvas.addEventListener("pointercancel", (e) => this.onUp(e));
    canvas.addEventListener("lostpointercapture", (e) => this.onUp(e));
    canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  }

  get width() { return this.canvas.width; }
  get height() { return this.canvas.height; }

  fill() {
    this.ctx.save();
    this.ctx.globalCompositeOperation = "source-over";
    this.ctx.fillStyle = BACKGROUND;
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.ctx.restore();
  }

  // ---- drawing ----

  /** Client coordinates -> canvas pixels (the element is scaled by CSS). */
  toCanvas(e) {
    const r = this.canvas.getBoundingClientRect();
    return {
      x: ((e.clientX - r.left) / r.width) * this.canvas.width,
      y: ((e.clientY - r.top) / r.height) * this.canvas.height,
    };
  }

  /** The stroke's width in canvas pixels: the brush size is in screen (CSS) pixels, so a brush looks the same
   * on a 64 px canvas (a model made at 64 px) as on a 1024 px one. */
  lineWidth(e) {
    // Pens report real pressure in [0, 1]; mice report a constant 0.5 while pressed, so ignore it for them.
    const pressure = e.pointerType === "pen" && e.pressure > 0 ? e.pressure : 1;
    const shown = this.canvas.getBoundingClientRect().width;
    const perCssPixel = shown > 0 ? this.canvas.width / shown : 1;
    return Math.max(1, this.size * perCssPixel * (0.3 + 0.7 * pressure));
  }

  onDown(e) {
    if (this.pointerId !== null) return;
    if (e.pointerType === "mouse" && e.button !== 0) return;
    e.preventDefault();
    this.pointerId = e.pointerId;
    try { this.canvas.setPointerCapture(e.pointerId); } catch { /* capture is a nicety */ }
    this.stroke = this.target || this;
    this.stroke.pushHistory();
    this.last = this.toCanvas(e);
    this.stroke.segment(this.last, this.last, this.lineWidth(e), this.tool === "eraser");
    this.stroke.emit("change", { final: false });
  }

  onMove(e) {
    if (e.pointerId !== this.pointerId) return;
    e.preventDefault();
    // Coalesced events: the points the browser merged into this one event (smooth lines on fast strokes).
    const events = typeof e.getCoalescedEvents === "function" ? e.getCoalescedEvents() : [];
    for (const ev of events.length ? events : [e]) {
      const p = this.toCanvas(ev);
      this.stroke.segment(this.last, p, this.lineWidth(ev), this.tool === "eraser");
      this.last = p;
    }
    this.stroke.emit("change", { final: false });
  }

  onUp(e) {
    if (e.pointerId !== this.pointerId) return;
    this.pointerId = null;
    this.last = null;
    const stroke = this.stroke;
    this.stroke = null;
    if (stroke !== this) stroke.changed(true);
    else this.emit("change", { final: true });
  }

  /** Strokes (and undo/redo) go to `layer` (a PaintLayer), or back to the sketch with null. */
  setTarget(layer) {
    if (layer === this.target) return;
    if (this.target) this.target.removeEventListener("history", this.forward);
    this.target = layer;
    if (layer) layer.addEventListener("history", this.forward);
    this.emitHistory();
  }

  segment(a, b, width, erase = this.tool === "eraser") {
    const ctx = this.ctx;
    ctx.save();
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = width;
    // The eraser paints the background: the init image must stay opaque.
    ctx.strokeStyle = erase ? BACKGROUND : this.color;
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    // A zero-length line with round caps draws a dot (a tap).
    ctx.lineTo(b.x + (a.x === b.x && a.y === b.y ? 0.01 : 0), b.y);
    ctx.stroke();
    ctx.restore();
  }

  // ---- whole-canvas actions (each one undoable) ----

  clear() {
    this.pushHistory();
    this.fill();
    this.emit("change", { final: true });
  }

  /**
   * Draw an image (ImageBitmap, HTMLImageElement, canvas, video) onto the canvas.
   * fit "contain": letterboxed on white (uploads keep their proportions); "stretch": fills the canvas (Apply: the
   * output already has the canvas' aspect ratio); "cover": fills it, cropping the middle (camera frames).
   * history false: no undo step (a camera frame every few hundred milliseconds).
   */
  drawImage(source, fit = "contain", { history = true } = {}) {
    const sw = source.naturalWidth || source.videoWidth || source.width;
    const sh = source.naturalHeight || source.videoHeight || source.height;
    if (!sw || !sh) return;
    if (history) this.pushHistory();
    this.fill();
    let w = this.canvas.width;
    let h = this.canvas.height;
    if (fit === "contain" || fit === "cover") {
      const scale = (fit === "contain" ? Math.min : Math.max)(w / sw, h / sh);
      w = sw * scale;
      h = sh * scale;
    }
    this.ctx.imageSmoothingQuality = "high";
    this.ctx.drawImage(source, (this.canvas.width - w) / 2, (this.canvas.height - h) / 2, w, h);
    this.emit("change", { final: true });
  }

  /** Change the pixel size (the generation size), stretching what is drawn. Not an undo step. */
  resize(width, height) {
    if (width === this.canvas.width && height === this.canvas.height) return;
    const old = document.createElement("canvas");
    old.width = this.canvas.width;
    old.height = this.canvas.height;
    old.getContext("2d").drawImage(this.canvas, 0, 0);
    this.canvas.width = width; // resets the context
    this.canvas.height = height;
    this.fill();
    this.ctx.imageSmoothingQuality = "high";
    this.ctx.drawImage(old, 0, 0, width, height);
    this.emit("change", { final: true });
  }

  // ---- history ----

  snapshot() {
    return this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
  }

  restore(data) {
    if (data.width === this.canvas.width && data.height === this.canvas.height) {
      this.ctx.putImageData(data, 0, 0);
      return;
    }
    // Taken before a resize: scale it to the current size.
    const tmp = document.createElement("canvas");
    tmp.width = data.width;
    tmp.height = data.height;
    tmp.getContext("2d").putImageData(data, 0, 0);
    this.fill();
    this.ctx.drawImage(tmp, 0, 0, this.canvas.width, this.canvas.height);
  }

  pushHistory() {
    this.undoStack.push(this.snapshot());
    if (this.undoStack.length > MAX_HISTORY) this.undoStack.shift();
    this.redoStack = [];
    this.emitHistory();
  }

  undo() {
    if (this.pointerId !== null) return;
    if (this.target) {
      this.target.undo();
      return;
    }
    if (!this.undoStack.length) return;
    this.redoStack.push(this.snapshot());
    this.restore(this.undoStack.pop());
    this.emitHistory();
    this.emit("change", { final: true });
  }

  redo() {
    if (this.pointerId !== null) return;
    if (this.target) {
      this.target.redo();
      return;
    }
    if (!this.redoStack.length) return;
    this.undoStack.push(this.snapshot());
    this.restore(this.redoStack.pop());
    this.emitHistory();
    this.emit("change", { final: true });
  }

  emitHistory() {
    const s = this.target || this;
    this.emit("history", { canUndo: s.undoStack.length > 0, canRedo: s.redoStack.length > 0 });
  }

  // ---- export ----

  /** The canvas as WebP (quality 0.85), or JPEG where the browser cannot encode WebP. */
  async toBlob() {
    const encode = (type) => new Promise((resolve) => this.canvas.toBlob(resolve, type, 0.85));
    const webp = await encode("image/webp");
    if (webp && webp.type === "image/webp") return webp;
    return encode("image/jpeg"); // Safari before 17 answers PNG for WebP
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
