// Camera: a webcam as the sketch canvas' source, so sketch-to-image follows the camera. Each grab draws the
// current video frame over the canvas (filling it, the middle cropped to its shape) without an undo step per frame;
// the drawing from before the camera stays one undo away. The page grabs the next frame as each picture arrives (one
// frame in flight, as with strokes) and, should none arrive, at least every WATCHDOG_MS.

const WATCHDOG_MS = 1500;

export function cameraAvailable() {
  return Boolean(navigator.mediaDevices && typeof navigator.mediaDevices.getUserMedia === "function");
}

export class CameraFeed {
  /** @param sketch the SketchCanvas the frames go onto */
  constructor(sketch) {
    this.sketch = sketch;
    this.stream = null;
    this.video = null;
    this.grabs = 0;
    this.lastGrab = 0;
    this.watchdog = null;
    this.onChange = () => {}; // called when it turns on or off
  }

  get on() {
    return this.stream !== null;
  }

  /** Ask for the camera (the browser asks the user) and put its first frame on the canvas. */
  async start() {
    if (this.on) return;
    const stream = await navigator.mediaDevices.getUserMedia({
      video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false,
    });
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
    this.stream = stream;
    this.video = video;
    this.sketch.pushHistory(); // one undo step back to the drawing, however many frames follow
    this.grab();
    this.watchdog = setInterval(() => {
      if (performance.now() - this.lastGrab >= WATCHDOG_MS) this.grab();
    }, WATCHDOG_MS / 3);
    this.onChange();
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

  /** Draw the camera's current frame onto the canvas (a "change" the page sends); false when there is none. */
  grab() {
    if (!this.on || !this.video.videoWidth) return false;
    this.sketch.drawImage(this.video, "cover", { history: false });
    this.grabs += 1;
    this.lastGrab = performance.now();
    return true;
  }
}

/**
 * Wire the Camera button to `camera` (a CameraFeed): on starts it (after `beforeStart()`, which may return a
 * promise: the page switches to sketch mode), off stops it. Errors (no camera, permission refused) go to onError.
 */
export function setupCamera(button, camera, { beforeStart, onError, onDone }) {
  if (!cameraAvailable()) {  // browsers give pages a camera only in a secure context
    button.disabled = true;
    button.title = "The browser offers the camera only to https pages or on this computer (localhost)";
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
      const why = err && err.name === "NotAllowedError" ? "the browser or the user refused it; allow the camera "
        + "for this page" : `${(err && err.name) || "Error"}: ${(err && err.message) || err}`;
      onError(`Camera unavailable (${why}).`);
    } finally {
      button.disabled = false;
      render();
    }
  });
}
