// Broadcast: this page's final frames at a URL that OBS, VLC, ffmpeg or TouchDesigner can open (MJPEG), served by
// the studio (studio/broadcast.py; docs/protocol.md "broadcast"). The button asks the server to take the broadcast
// ({type: "broadcast", on}); the server's "broadcast" messages say whether this page holds it, its URLs and how
// many viewers watch. Wanted on survives a reconnect (it is asked again after the hello); another page taking the
// broadcast turns it off here, with a notice.

export class BroadcastToggle {
  /**
   * conn: the Connection; els: {button, line, url, copy, viewers}; onNotice(text), onError(text).
   */
  constructor(conn, els, { onNotice, onError }) {
    this.conn = conn;
    this.els = els;
    this.onNotice = onNotice;
    this.onError = onError;
    this.wanted = false; // the user turned it on (asked again after a reconnect)
    this.on = false; // the server said this page holds it
    els.button.addEventListener("click", () => this.set(!this.wanted));
    els.copy.addEventListener("click", () => this.copy());
    conn.addEventListener("hello", (e) => {
      this.on = false;
      if (e.detail.broadcast === false) { // the server allows no viewers (max_broadcast_viewers 0)
        this.wanted = false;
        els.button.disabled = true;
        els.button.title = "This server does not broadcast (max_broadcast_viewers is 0)";
      }
      if (this.wanted) this.send(true);
      this.render(null);
    });
    conn.addEventListener("broadcast", (e) => this.update(e.detail));
    conn.addEventListener("error", (e) => {
      if (e.detail.code !== "broadcast_off") return;
      this.wanted = false;
      this.render(null);
    });
  }

  set(on) {
    this.wanted = on;
    if (!this.send(on)) this.onError("Not connected: Broadcast starts when the studio is back.");
    this.render(null);
  }

  send(on) {
    return this.conn.sendControl({ type: "broadcast", on });
  }

  /** A "broadcast" message from the server. */
  update(msg) {
    this.on = msg.on === true;
    if (!this.on && msg.reason) {
      this.wanted = false;
      this.onNotice(`Broadcast stopped: ${msg.reason}.`);
    }
    this.render(msg);
  }

  render(msg) {
    const { button, line, url, viewers } = this.els;
    button.setAttribute("aria-pressed", String(this.wanted));
    button.textContent = this.wanted && !this.on ? "Broadcast…" : "Broadcast";
    if (msg && msg.url) {
      url.textContent = new URL(msg.url, location.href).href;
      const n = msg.viewers ?? 0;
      viewers.textContent = `${n} watching (at most ${msg.max_viewers})`;
    }
    line.hidden = !this.on;
    document.body.dataset.broadcast = this.on ? "on" : "off";
  }

  async copy() {
    const text = this.els.url.textContent;
    try {
      await navigator.clipboard.writeText(text);
      this.els.copy.textContent = "Copied";
      setTimeout(() => { this.els.copy.textContent = "Copy"; }, 1500);
    } catch {
      // No clipboard here (an http page off localhost): select the URL for a manual copy.
      const range = document.createRange();
      range.selectNodeContents(this.els.url);
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
    }
  }
}

/** Wire the Broadcast button and its URL line (index.html) to the connection; notices and errors as banners. */
export function setupBroadcast(conn, banners) {
  const $ = (id) => document.getElementById(id);
  return new BroadcastToggle(conn, {
    button: $("broadcast"), line: $("broadcast-line"), url: $("broadcast-url"), copy: $("broadcast-copy"),
    viewers: $("broadcast-viewers"),
  }, {
    onNotice: (text) => banners.show(text, { source: "broadcast", warning: true, autoHideMs: 8000 }),
    onError: (text) => banners.show(text, { source: "broadcast" }),
  });
}
