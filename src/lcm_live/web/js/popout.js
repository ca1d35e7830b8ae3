// The pop-out output window (popout.html): a second window that shows only the live frames, for a projector or a
// stream capture. The studio page sends it each final frame over a BroadcastChannel (same origin only) named
// after this tab (kept in sessionStorage, so a reload of the studio finds its pop-out again, and another studio tab
// has its own). Messages: {type: "frame", info, blob} page -> pop-out; {type: "hello"} pop-out -> page (it opened:
// the current frame is sent at once); {type: "ping"} page -> pop-out (the page (re)loaded: say hello).

export const CHANNEL_PREFIX = "lcm-live-popout-";
const TAB_KEY = "lcm-live-popout-channel";

/** This tab's channel name. */
export function channelName() {
  let id = sessionStorage.getItem(TAB_KEY);
  if (!id) {
    id = Math.random().toString(36).slice(2, 10);
    sessionStorage.setItem(TAB_KEY, id);
  }
  return CHANNEL_PREFIX + id;
}

export class PopoutFeed {
  /** current(): the frame on screen ({info, blob}) or null. */
  constructor(current) {
    this.current = current;
    this.name = channelName();
    this.channel = typeof BroadcastChannel === "function" ? new BroadcastChannel(this.name) : null;
    this.listening = false; // a pop-out said hello: frames are worth sending
    this.sent = 0;
    if (!this.channel) return;
    this.channel.addEventListener("message", (e) => {
      if (e.data?.type !== "hello") return;
      this.listening = true;
      const frame = this.current();
      if (frame) this.send(frame.info, frame.blob);
    });
    this.channel.postMessage({ type: "ping" }); // a pop-out left open across a reload of this page
  }

  /** A final frame: to the pop-out, if one is open. */
  frame(info, blob) {
    if (this.listening) this.send(info, blob);
  }

  send(info, blob) {
    this.channel.postMessage({ type: "frame", info, blob }); // a Blob is passed by reference, not copied
    this.sent += 1;
  }

  /** Open (or bring forward) the pop-out window. */
  open() {
    const url = new URL("static/popout.html", location.href);
    url.hash = this.name;
    return window.open(url.href, this.name, "popup,width=640,height=640");
  }
}

/** Wire the Pop out button; returns the PopoutFeed. */
export function setupPopout(button, current, onError) {
  const feed = new PopoutFeed(current);
  if (!feed.channel) {
    button.disabled = true;
    button.title = "This browser has no BroadcastChannel: the pop-out window cannot be fed";
    return feed;
  }
  button.addEventListener("click", () => {
    if (!feed.open()) onError("The browser blocked the pop-out window: allow pop-ups for this page.");
  });
  return feed;
}
