// Thumbnails for the history strip, made off the main thread: the frame's blob goes to a worker (thumbworker.js;
// a Blob is passed by reference), which decodes and scales it; the bitmap comes back transferred and is handed to
// the thumbnail's canvas ("bitmaprenderer": no copy, no draw). Without workers, createImageBitmap on the page.

export class ThumbMaker {
  constructor() {
    this.pending = new Map(); // id -> canvas waiting for its bitmap
    this.made = 0;
    this.ms = 0; // main-thread time spent showing them (docs/benchmarks.md)
    this.worker = null;
    try {
      this.worker = new Worker(new URL("./thumbworker.js", import.meta.url), { type: "module" });
      this.worker.addEventListener("message", (e) => this.done(e.data.id, e.data.bitmap));
    } catch {
      this.worker = null; // no module workers here: the page makes them itself
    }
  }

  /** Fill `canvas` (its width and height already the thumbnail's pixels) with a scaled `blob`, later. */
  make(id, blob, canvas) {
    this.pending.set(id, canvas);
    const { width, height } = canvas;
    if (this.worker) {
      this.worker.postMessage({ id, blob, width, height });
      return;
    }
    createImageBitmap(blob, { resizeWidth: width, resizeHeight: height, resizeQuality: "medium" })
      .then((bitmap) => this.done(id, bitmap), () => this.done(id, null));
  }

  /** A frame left the strip before its thumbnail came: it is not shown. */
  forget(id) {
    this.pending.delete(id);
  }

  done(id, bitmap) {
    const canvas = this.pending.get(id);
    this.pending.delete(id);
    if (!bitmap) return; // undecodable: the button stays blank
    if (!canvas) {
      bitmap.close();
      return;
    }
    const t0 = performance.now();
    canvas.getContext("bitmaprenderer").transferFromImageBitmap(bitmap);
    this.made += 1;
    this.ms += performance.now() - t0;
  }
}
