// Pacing: one frame in flight while input streams in (a stroke, typing, a slider drag).
//
// The server keeps only the newest input and stops the generation it supersedes, which is right for one change and
// wrong for a stream of them: on a machine slower than the stream (a CPU at 0.5-10 s a frame) every input would
// supersede the frame in flight, and no picture would come until the stream ended. So while a frame is on its way,
// input is held, the newest of each kind ("canvas", "params") replacing the one held before, and goes out:
// - when the frame arrives (or the server says it is idle);
// - when the stream ends: a stroke's end at once, typing when no key came for SETTLE_MS;
// - after holdLimitMs() should no frame come at all (twice the last frame's time, at least MIN_HOLD_MS).
// On a GPU, where a frame takes less than a keystroke's gap, nothing is ever held for long.

export const SETTLE_MS = 400;
export const MIN_HOLD_MS = 1500;

export class FramePacer {
  constructor({ settleMs = SETTLE_MS, minHoldMs = MIN_HOLD_MS, now = () => performance.now() } = {}) {
    this.settleMs = settleMs;
    this.minHoldMs = minHoldMs;
    this.now = now;
    this.pending = false; // input sent, no frame or idle status since
    // Frames that may be in flight at once: the server's workers (hello "workers"; studio/pool.py runs a session's
    // frames on several at once). Counted in input messages: `sentCount` sent, `answered` of them read by the server
    // when it made the newest frame (its "input").
    this.slots = 1;
    this.sentCount = 0;
    this.answered = 0;
    this.sentAt = 0; // when the last input went out
    this.frameMs = null; // input-to-frame time of the last final frame
    this.held = new Map(); // kind -> the send function of its newest held input
    this.holdTimer = null;
    this.settleTimers = new Map(); // kind -> timer that ends its stream
    this.heldCount = 0; // inputs held back so far (for tests and the curious)
  }

  /** How long input waits for a frame in flight before it goes anyway (should the frame never come). */
  holdLimitMs() {
    return Math.max(this.minHoldMs, 2 * (this.frameMs || 0));
  }

  /** An input was sent and its frame has not come yet (nor has the server gone idle), within holdLimitMs. */
  inFlight() {
    return this.pending && this.sentCount - this.answered >= this.slots && this.now() - this.sentAt < this.holdLimitMs();
  }

  /**
   * New input of one kind: `send` sends it. It goes now when nothing is in flight or when `final` (a stroke's end);
   * otherwise it is held. With `settle`, a held input also goes once no newer input of its kind came for settleMs.
   */
  offer(kind, send, { final = false, settle = false } = {}) {
    this.clearSettle(kind);
    if (final || !this.inFlight()) {
      this.held.delete(kind);
      send();
      return;
    }
    this.held.set(kind, send);
    this.heldCount += 1;
    if (this.holdTimer === null) this.holdTimer = setTimeout(() => this.flush(), this.holdLimitMs());
    if (settle) this.settleTimers.set(kind, setTimeout(() => this.flush(kind), this.settleMs));
  }

  /** Send what is held: every kind, or just `kind`. */
  flush(kind = null) {
    const kinds = kind === null ? [...this.held.keys()] : [kind];
    if (kind === null) {
      clearTimeout(this.holdTimer);
      this.holdTimer = null;
    }
    for (const k of kinds) {
      this.clearSettle(k);
      const send = this.held.get(k);
      this.held.delete(k);
      if (send) send();
    }
  }

  /** Forget a held input of this kind (a newer one of it was sent by other means). */
  drop(kind) {
    this.clearSettle(kind);
    this.held.delete(kind);
  }

  clearSettle(kind) {
    clearTimeout(this.settleTimers.get(kind));
    this.settleTimers.delete(kind);
  }

  /** The connection sent an input. */
  sent(count = this.sentCount + 1) {
    if (count <= this.answered) this.answered = count - 1; // a new connection: the server counts from zero again
    this.pending = true;
    this.sentAt = this.now();
    this.sentCount = count;
  }

  /**
   * A final frame came (with its input-to-frame latency, when known, and `input`: how many input messages the
   * server had read when it made it), or the server went idle (every input answered): held input goes.
   */
  done(latencyMs = null, input = null) {
    this.answered = input === null ? this.sentCount : Math.max(this.answered, input);
    this.pending = this.sentCount > this.answered;
    if (latencyMs !== null) this.frameMs = latencyMs;
    this.flush();
  }

  /** The connection closed or the input failed: nothing is in flight. Held input waits for the next input. */
  reset() {
    this.pending = false;
    this.answered = this.sentCount;
  }
}

export const STROKE_SEND_MS = 120; // while a stroke goes on with nothing in flight, send at most this often

/**
 * The strokes of one surface (the sketch, the mask, the regions) paced as one kind of input: its newest state waits
 * for the frame in flight (FramePacer), the stroke's end goes at once, and with nothing in flight a stroke sends at
 * most every STROKE_SEND_MS. `send(isStale)` encodes and sends the newest state; an encode overtaken by a newer
 * one checks isStale() before sending, so an older picture never replaces a newer one.
 */
export class StrokeStream {
  constructor(pacer, kind, send, { intervalMs = STROKE_SEND_MS } = {}) {
    this.pacer = pacer;
    this.kind = kind;
    this.send = send;
    this.intervalMs = intervalMs;
    this.timer = null;
    this.seq = 0;
    this.sending = false; // an encode is under way: its input is not "in flight" yet, but will be
    this.dirty = false; // the surface changed during that encode
    this.now = this.now.bind(this);
  }

  /** The surface changed (`final`: a stroke's end or a whole-surface action). */
  change(final) {
    if (!final && this.sending) {
      this.dirty = true; // offered again once the send went out (held then, while its frame is on its way)
      return;
    }
    if (final || this.pacer.inFlight()) {
      this.pacer.offer(this.kind, this.now, { final });
    } else if (this.timer === null) {
      this.timer = setTimeout(this.now, this.intervalMs);
    }
  }

  /** Send the newest state now; resolves once it went out (or was overtaken). */
  async now() {
    clearTimeout(this.timer);
    this.timer = null;
    this.pacer.drop(this.kind); // this send carries the newest state
    const seq = ++this.seq;
    this.sending = true;
    this.dirty = false;
    try {
      await this.send(() => seq !== this.seq);
    } finally {
      if (seq === this.seq) {
        this.sending = false;
        if (this.dirty) {
          this.dirty = false;
          this.change(false);
        }
      }
    }
  }
}
