// Camera: a webcam as the sketch canvas' source, so sketch-to-image follows the camera. Each grab draws the
// current video frame over the canvas (filling it, the middle cropped to its shape) without an undo step per frame;
// the drawing from before the camera stays one undo away. The page grabs the next frame as each picture arrives (one
// frame in flight, as with strokes) and, should none arrive, every WATCHDOG_MS while no frame is on its way (a new
// canvas would supersede a slow frame, and on a CPU no frame would ever finish).
// A still scene is not sent again and again (StreamDiffusion's similarity filter, deterministic here): a frame is
// skipped when no pixel of its 32x24 grey thumbnail moved by more than CHANGE_LEVEL (0-255) from the last sent
// one's. Each thumbnail pixel averages a few hundred camera pixels, so sensor noise stays far below that level,
// while a small object moving in one corner still crosses it. A camera on a still desk then leaves the machine
// idle instead of re-making the same picture.

const WATCHDOG_MS = 1500;
const THUMB_W = 32;
const THUMB_H = 24;

const CHANGE_LEVEL = 8;

/** How many pixels of two equal-length grey thumbnails (0-255) differ by more than `level`. */
export function changedPixels(a, b, level = CHANGE_LEVEL) {
  let n = 0;
  for (let i = 0; i < a.length; i++) n += Math.abs(a[i] - b[i]) > level;
  return n;
}

export function cameraAvailable() {
  return Boolean(navigator.mediaDevices && typeof navigator.mediaDevices.getUserMedia === "function");
}

export function screenAvailable() {
  return Boolean(navigator.mediaDevices && typeof navigator.mediaDevices.getDisplayMedia === "function");
}

/** The webcam's stream (the browser asks the user). */
export function openCamera() {
  return navigator.mediaDevices.getUserMedia({
    video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false,
  });
}

/** A screen, window or tab the user picks (getDisplayMedia): a video source like the camera. */
export function openScreen() {
  return navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 15 } }, audio: false });
}

export class CameraFeed {
  /**
   * @param sketch the SketchCanvas the frames go onto
   * @param open () => Promise<MediaStream>: openCamera, or openScreen (screen capture goes the same path)
   */
  constructor(sketch, open = openCamera) {
    this.sketch = sketch;
    this.open = open;
    this.stream = null;
    this.video = null;
    this.grabs = 0;
    this.lastGrab = 0;
    this.watchdog = null;
    this.onChange = () => {}; // called when it turns on or off
    this.busy = () => false; // a frame is on its way: the watchdog waits (a new frame would supersede it)
    this.skipped = 0; // frames left out as too like the last one sent
    this.lastThumb = null;
    this.thumbCanvas = null;
  }

  get on() {
    return this.stream !== null;
  }

  /** Ask for the camera (the browser asks the user) and put its first frame on the canvas. */
  async start() {
    if (this.on) return;
    const stream = await this.open();
    const video = document.createElement("video");
    video.muted = true;
    video.playsInline = true;
    video.srcObject = stream;
    try {
      await video.play();
    } catch (err) {
      for (const track of stream.getTracks()) track.stop();
      throw err;
    }
    this.attach(video, stream);
    // The browser's own "Stop sharing" (screen capture), or a camera unplugged: the feed ends.
    for (const track of stream.getVideoTracks()) track.addEventListener("ended", () => this.stop());
    this.sketch.pushHistory(); // one undo step back to the drawing, however many frames follow
    this.grab();
    this.watchdog = setInterval(() => {
      if (!this.busy() && performance.now() - this.lastGrab >= WATCHDOG_MS) this.grab();
    }, WATCHDOG_MS / 3);
    this.onChange();
  }

  /** Use `video` (anything drawImage takes) as the frames of `stream` (whose tracks stop() ends). */
  attach(video, stream) {
    this.video = video;
    this.stream = stream;
    this.lastThumb = null;
  }

  stop() {
    if (!this.on) return;
    clearInterval(this.watchdog);
    this.watchdog = null;
    for (const track of this.stream.getTracks()) track.stop();
    this.stream = null;
    this.video = null;
    this.onChange();
  }

  /**
   * Draw the camera's current frame onto the canvas (a "change" the page sends); false when there is none, or
   * when it is too like the last one sent (a still scene).
   */
  grab() {
    if (!this.on || !(this.video.videoWidth || this.video.width)) return false;
    this.lastGrab = performance.now();
    const thumb = this.thumbnail();
    if (this.lastThumb && changedPixels(thumb, this.lastThumb) === 0) {
      this.skipped += 1;
      return false;
    }
    this.lastThumb = thumb;
    this.sketch.drawImage(this.video, "cover", { history: false });
    this.grabs += 1;
    return true;
  }

  /** The current frame as a THUMB_W x THUMB_H grey thumbnail (a Float32Array, 0-255). */
  thumbnail() {
    if (!this.thumbCanvas) {
      this.thumbCanvas = document.createElement("canvas");
      this.thumbCanvas.width = THUMB_W;
      this.thumbCanvas.height = THUMB_H;
    }
    const ctx = this.thumbCanvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(this.video, 0, 0, THUMB_W, THUMB_H);
    const rgba = ctx.getImageData(0, 0, THUMB_W, THUMB_H).data;
    const grey = new Float32Array(THUMB_W * THUMB_H);
    for (let i = 0; i < grey.length; i++) {
      grey[i] = 0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2];
    }
    return grey;
  }
}

/**
 * Wire the Camera (or Screen) button to `camera` (a CameraFeed): on starts it (after `beforeStart()`, which may
 * return a promise: the page switches to sketch mode), off stops it. Errors (no camera, permission refused) go to
 * onError. what: the source's name in messages; available: whether the browser offers it to this page.
 */
export function setupCamera(button, camera, { beforeStart, onError, onDone, what = "camera",
                                              available = cameraAvailable() }) {
  if (!available) {  // browsers give pages a camera and the screen only in a secure context
    button.disabled = true;
    button.title = `The browser offers the ${what} only to https pages or on this computer (localhost)`;
    return;
  }
  const render = () => button.setAttribute("aria-pressed", String(camera.on));
  camera.onChange = render;
  button.addEventListener("click", async () => {
    if (camera.on) {
      camera.stop();
      return;
    }
    button.disabled = true;
    try {
      await beforeStart();
      await camera.start();
      onDone();
    } catch (err) {
      const why = err && err.name === "NotAllowedError" ? `the browser or the user refused it; allow the ${what} `
        + "for this page" : `${(err && err.name) || "Error"}: ${(err && err.message) || err}`;
      onError(`${what[0].toUpperCase()}${what.slice(1)} unavailable (${why}).`);
    } finally {
      button.disabled = false;
      render();
    }
  });
}
