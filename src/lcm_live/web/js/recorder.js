// Record: the live output as a video (WebM), at the pace it happened. Each final frame is drawn onto a canvas whose
// stream a MediaRecorder encodes; a frame stays on screen in the video until the next one arrives, as it did on the
// page. Nothing leaves the browser: stopping hands back the video as a Blob for the page to download, with a log of
// every frame's parameters and time (saved beside it: every saved picture carries its parameters).

import { downloadBlob } from "./output.js";

const MIME_TYPES = ["video/webm;codecs=vp9", "video/webm;codecs=vp8", "video/webm"];

/** The first video type this browser can record, or null (no MediaRecorder or no canvas streams). */
export function recordableType() {
  if (typeof MediaRecorder === "undefined" || typeof HTMLCanvasElement.prototype.captureStream !== "function") {
    return null;
  }
  return MIME_TYPES.find((t) => MediaRecorder.isTypeSupported(t)) || null;
}

export class SessionRecorder {
  constructor() {
    this.recorder = null;
    this.frames = 0;
  }

  get recording() {
    return this.recorder !== null && this.recorder.state === "recording";
  }

  /** Start a video of width x height pixels (the output's size at the start; later frames are fitted into it). */
  start(width, height) {
    const mimeType = recordableType();
    if (!mimeType) throw new Error("this browser cannot record video (no MediaRecorder for WebM)");
    if (this.recording) throw new Error("already recording");
    this.canvas = document.createElement("canvas");
    // Video encoders want even sides.
    this.canvas.width = Math.max(2, Math.round(width / 2) * 2);
    this.canvas.height = Math.max(2, Math.round(height / 2) * 2);
    this.ctx = this.canvas.getContext("2d");
    this.ctx.fillStyle = "#000";
    this.ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    const stream = this.canvas.captureStream(0); // a frame only when requestFrame() says so
    this.track = stream.getVideoTracks()[0];
    this.chunks = [];
    this.frames = 0;
    this.log = [];
    this.startedAt = performance.now();
    this.recorder = new MediaRecorder(stream, { mimeType, videoBitsPerSecond: 8_000_000 });
    this.recorder.addEventListener("dataavailable", (e) => {
      if (e.data && e.data.size) this.chunks.push(e.data);
    });
    this.recorder.start(1000); // a chunk a second: a long recording is not one growing buffer
  }

  /**
   * Add a frame (an <img>, canvas or ImageBitmap), fitted into the video with black bars where shapes differ;
   * `info` (the frame's header: seed, size, params) goes into the log at the frame's time in the video.
   */
  addFrame(source, info = {}) {
    if (!this.recording) return;
    const sw = source.naturalWidth || source.width;
    const sh = source.naturalHeight || source.height;
    if (!sw || !sh) return;
    const { width, height } = this.canvas;
    const scale = Math.min(width / sw, height / sh);
    const w = sw * scale;
    const h = sh * scale;
    this.ctx.fillRect(0, 0, width, height);
    this.ctx.drawImage(source, (width - w) / 2, (height - h) / 2, w, h);
    this.track.requestFrame();
    this.frames += 1;
    this.log.push({
      at_ms: Math.round(performance.now() - this.startedAt), seed: info.seed, width: sw, height: sh,
      params: info.params,
    });
  }

  /** Stop; resolves to the video and its frames' log ({blob, frames, log}). */
  stop() {
    const recorder = this.recorder;
    if (!recorder) return Promise.reject(new Error("not recording"));
    return new Promise((resolve, reject) => {
      recorder.addEventListener("stop", () => {
        this.recorder = null;
        this.track.stop();
        resolve({ blob: new Blob(this.chunks, { type: recorder.mimeType }), frames: this.frames, log: this.log });
      }, { once: true });
      recorder.addEventListener("error", (e) => reject(e.error || new Error("recording failed")), { once: true });
      recorder.stop();
    });
  }
}

/** A file name for a recording started at `date`: lcm-live-session-YYYYMMDD-HHMMSS.webm (local time). */
export function recordingName(date) {
  const p = (n) => String(n).padStart(2, "0");
  return `lcm-live-session-${date.getFullYear()}${p(date.getMonth() + 1)}${p(date.getDate())}-`
    + `${p(date.getHours())}${p(date.getMinutes())}${p(date.getSeconds())}.webm`;
}

/**
 * Wire the Record button: Record starts a video at the output's size (the picture on screen opens it), Stop
 * downloads it and its log. `frameSize()`: {width, height} when nothing is on screen; `current()`: [img, info] of
 * the final frame on screen, or null. Returns {frame(img, info)}, to call with each final frame shown.
 */
export function setupRecording(button, { frameSize, current, onError, onDone }) {
  const recorder = new SessionRecorder();
  let name = "";
  if (!recordableType()) {
    button.disabled = true;
    button.title = "This browser cannot record video (no MediaRecorder for WebM)";
  }

  function render() {
    const n = recorder.frames;
    button.setAttribute("aria-pressed", String(recorder.recording));
    button.textContent = recorder.recording ? `Stop · ${n} frame${n === 1 ? "" : "s"}` : "Record";
  }

  button.addEventListener("click", async () => {
    if (!recorder.recording) {
      const shown = current();
      const img = shown && shown[0];
      const size = img && img.naturalWidth ? { width: img.naturalWidth, height: img.naturalHeight } : frameSize();
      try {
        recorder.start(size.width, size.height);
      } catch (err) {
        onError(`Record failed: ${err.message}`);
        return;
      }
      name = recordingName(new Date());
      if (shown) recorder.addFrame(...shown);
      render();
      return;
    }
    button.disabled = true;
    try {
      const { blob, log } = await recorder.stop();
      downloadBlob(blob, name);
      downloadBlob(new Blob([JSON.stringify({ video: name, frames: log }, null, 1)], { type: "application/json" }),
        `${name}.json`);
      onDone();
    } catch (err) {
      onError(`Record failed: ${err.message}`);
    } finally {
      button.disabled = false;
      render();
    }
  });

  return {
    frame(img, info) {
      if (!recorder.recording) return;
      recorder.addFrame(img, info);
      render();
    },
  };
}
