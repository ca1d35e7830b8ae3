// The two banners under the top bar: errors/warnings (dismissable, tagged with where they came from so that the
// right event clears them) and the server's standing notice (e.g. the offline fallback model).

export class Banners {
  /** @param {HTMLElement} errorEl @param {HTMLElement} noticeEl */
  constructor(errorEl, noticeEl) {
    this.errorEl = errorEl;
    this.noticeEl = noticeEl;
    this.source = null; // "connection" | "generation" | "save" | "warning" | ...
    this.timer = null;
    errorEl.querySelector(".banner-close").addEventListener("click", () => this.clear());
  }

  /**
   * Show one message. `source` tags it (clear(source) removes only that kind); `warning` uses the amber style;
   * `autoHideMs` hides it after a while (warnings).
   */
  show(text, { source = "generation", warning = false, autoHideMs = 0 } = {}) {
    clearTimeout(this.timer);
    this.source = source;
    this.errorEl.querySelector(".banner-text").textContent = text;
    this.errorEl.classList.toggle("is-warning", warning);
    this.errorEl.setAttribute("role", warning ? "status" : "alert");
    this.errorEl.dataset.source = source;
    this.errorEl.hidden = false;
    if (autoHideMs > 0) this.timer = setTimeout(() => this.clear(source), autoHideMs);
  }

  /** Hide the message (only if it came from `source`, when given). */
  clear(source = null) {
    if (source !== null && source !== this.source) return;
    clearTimeout(this.timer);
    this.source = null;
    this.errorEl.hidden = true;
  }

  notice(text) {
    this.noticeEl.querySelector(".banner-text").textContent = text || "";
    this.noticeEl.hidden = !text;
  }
}
