// The studio WebSocket (docs/protocol.md): reconnects with exponential backoff, keeps the newest params and the
// newest canvas so that nothing is lost while disconnected, and pairs each `frame` JSON with the ONE binary
// message that follows it.
//
// Events (CustomEvent, `detail` below):
//   state   {state: "connecting"|"open"|"closed", code, reason, retryInMs, opened}
//           opened: false when the handshake itself failed (refused, unreachable: the browser says 1006)
//   hello   the server's hello message
//   frame   {info, blob, receivedAt}   info: the frame JSON; blob: the image (image/jpeg or image/webp)
//   status  the status message
//   error   the error message ({code, message, field})
//   warning the warning message
//   model   a model message ({name, state, progress, message}: a model preset loading, ready or failed)
//   sent    {kind: "params"|"canvas"|"layer", at, payload}   at: performance.now() of the send

import { layerMessage } from "./layers.js";

const CLOSE_TEXT = {
  1000: "closed by the server",
  1001: "the server is going away",
  1008: "refused by the server (not authorized or wrong origin)",
  1009: "a message was too big for the server",
  1011: "internal server error",
  1012: "the server is restarting",
  1013: "the server is busy or still loading",
};

export function closeText(code) {
  return CLOSE_TEXT[code] || (code === 1006 ? "connection lost" : `closed (${code})`);
}

/** Sniff the image type from its magic bytes (the server sends JPEG or WebP). */
function imageType(bytes) {
  if (bytes.length >= 12 && bytes[0] === 0x52 && bytes[1] === 0x49 && bytes[8] === 0x57 && bytes[9] === 0x45) {
    return "image/webp"; // "RIFF....WEBP"
  }
  if (bytes.length >= 8 && bytes[0] === 0x89 && bytes[1] === 0x50) return "image/png";
  return "image/jpeg";
}

/** "mask" -> ["mask", 0]; "region:3" -> ["region", 3]. */
function layerOf(key) {
  const [layer, index] = key.split(":");
  return [layer, Number(index || 0)];
}

export class Connection extends EventTarget {
  /**
   * @param {string} url ws:// or wss:// URL of /ws
   * @param {{minDelayMs?: number, maxDelayMs?: number}} options backoff bounds in milliseconds
   */
  constructor(url, { minDelayMs = 500, maxDelayMs = 10000 } = {}) {
    super();
    this.url = url;
    this.minDelayMs = minDelayMs;
    this.maxDelayMs = maxDelayMs;
    this.ws = null;
    this.opened = false;
    this.attempt = 0; // consecutive failed connections; reset by a hello
    this.timer = null;
    this.pendingFrame = null; // frame JSON waiting for its binary image
    this.latestParams = null; // newest params (object), re-sent after every reconnect
    this.latestCanvas = null; // newest canvas (Blob) or null when the mode does not use it
    this.latestLayers = new Map(); // "mask", "region:K" -> the newest image (Blob) of that layer, re-sent on open
    this.sentCount = 0; // input messages sent on this connection (compared with a status's "inputs")
    this.stopped = false;
    window.addEventListener("online", () => this.reconnectNow());
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.reconnectNow();
    });
  }

  get isOpen() {
    return this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  /** Skip the remaining backoff wait (the network came back, the tab became visible). */
  reconnectNow() {
    if (this.stopped || this.ws !== null) return;
    clearTimeout(this.timer);
    this.timer = null;
    this.connect();
  }

  connect() {
    this.timer = null;
    this.pendingFrame = null;
    this.opened = false;
    this.emit("state", { state: "connecting" });
    let ws;
    try {
      ws = new WebSocket(this.url);
    } catch (err) {
      this.scheduleReconnect(1006, String(err));
      return;
    }
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    ws.onopen = () => {
      this.opened = true;
      this.sentCount = 0; // a new session on the server counts from zero too (status "inputs")
      this.emit("state", { state: "open" });
      // A new connection is a new session on the server: give it the newest canvas first (the canvas modes wait
      // for one), then the newest params.
      if (this.latestCanvas) this.rawSend("canvas", this.latestCanvas);
      for (const [key, image] of this.latestLayers) this.rawSend("layer", layerMessage(...layerOf(key), image), { key, image });
      if (this.latestParams) this.rawSend("params", JSON.stringify(this.latestParams), this.latestParams);
    };
    ws.onmessage = (event) => this.onMessage(event.data);
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.scheduleReconnect(event.code, event.reason);
    };
    // onerror is always followed by onclose, which does the work.
  }

  scheduleReconnect(code, reason) {
    // 1000: the server closed an idle session on purpose; come back with the next input, not on a timer (an
    // idle tab must not hold one of the server's few session places).
    if (this.stopped || code === 1000) {
      this.emit("state", { state: "closed", code, reason, retryInMs: null, opened: this.opened });
      this.timer = null;
      return;
    }
    // Exponential backoff with +-25% jitter so that many tabs do not reconnect in lockstep after a restart.
    const base = Math.min(this.maxDelayMs, this.minDelayMs * 2 ** this.attempt);
    const delay = Math.round(base * (0.75 + Math.random() * 0.5));
    this.attempt += 1;
    this.emit("state", { state: "closed", code, reason, retryInMs: delay, opened: this.opened });
    this.timer = setTimeout(() => this.connect(), delay); // connect() sets it back to null
  }

  onMessage(data) {
    if (typeof data !== "string") {
      const info = this.pendingFrame;
      this.pendingFrame = null;
      if (info === null) return; // a binary without its frame JSON: not ours to show
      const bytes = new Uint8Array(data);
      const blob = new Blob([bytes], { type: imageType(bytes) });
      this.emit("frame", { info, blob, receivedAt: performance.now() });
      return;
    }
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    switch (msg.type) {
      case "frame":
        this.pendingFrame = msg; // its image is the next binary message
        break;
      case "hello":
        this.attempt = 0;
        this.emit("hello", msg);
        break;
      case "status":
      case "error":
      case "warning":
      case "model":
      case "broadcast":
        this.emit(msg.type, msg);
        break;
      default:
        break;
    }
  }

  /** Send the full params (newest wins); kept and re-sent after a reconnect. */
  sendParams(params) {
    this.latestParams = { type: "params", ...params };
    if (this.isOpen) this.rawSend("params", JSON.stringify(this.latestParams), this.latestParams);
    else this.wake();
  }

  /** Send the canvas image (newest wins); `null` forgets it (text-to-image mode). */
  sendCanvas(blob) {
    this.latestCanvas = blob;
    if (blob && this.isOpen) this.rawSend("canvas", blob);
    else if (blob) this.wake();
  }

  /**
   * Send a layer's image (a Blob: PNG white on black), or null to clear that layer on the server.
   * key: "mask" or "region:K". A clear is sent only when the server may hold the layer.
   */
  sendLayer(key, image) {
    const had = this.latestLayers.has(key);
    if (image) this.latestLayers.set(key, image);
    else this.latestLayers.delete(key);
    if (!image && !had) return; // nothing to clear (a new session starts without layers)
    if (this.isOpen) this.rawSend("layer", layerMessage(...layerOf(key), image), { key, image });
    else if (image) this.wake();
  }

  /** A control message (not an input: the server does not count it, nor does the pacing); false when closed. */
  sendControl(message) {
    if (!this.isOpen) return false;
    try {
      this.ws.send(JSON.stringify(message));
      return true;
    } catch {
      return false;
    }
  }

  /** New input after an idle close: connect again (the newest input is sent on open). */
  wake() {
    if (!this.stopped && this.ws === null && this.timer === null) this.connect();
  }

  rawSend(kind, data, payload = data) {
    try {
      this.ws.send(data);
    } catch {
      return; // the close handler reconnects and re-sends the newest input
    }
    this.sentCount += 1;
    this.emit("sent", { kind, at: performance.now(), payload });
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
