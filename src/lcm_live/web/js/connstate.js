// What the page says about its connection: the status line ("connecting…", "connected", "offline (why), retry in
// …"), body[data-connection], and a banner when the server refused the page (a token, an origin) or a message.

import { closeText } from "./connection.js";
import { errorText } from "./output.js";

/**
 * Follow `conn`'s "state" events. text: the status line's element; banners: the Banners;
 * onOffline(): the connection is gone (nothing is in flight any more).
 */
export function showConnectionState(conn, { text, banners, onOffline }) {
  conn.addEventListener("state", (e) => {
    const { state: s, code, retryInMs } = e.detail;
    document.body.dataset.connection = s;
    if (s !== "open") delete document.body.dataset.session;
    if (s === "connecting") text.textContent = "connecting…";
    else if (s === "open") text.textContent = "connected";
    else {
      const wait = retryInMs ? `, retry in ${(retryInMs / 1000).toFixed(1)} s` : ", type or draw to reconnect";
      text.textContent = `offline (${closeText(code)})${wait}`;
      onOffline();
      if (code === 1008) {
        banners.show("The server refused this page: open the address that `lcm-live serve` printed " +
          "(with its ?token=…) once in this browser.", { source: "connection" });
      } else if (!e.detail.opened) {
        explainRefusedHandshake(banners);
      } else if (code === 1009) {
        banners.show("The canvas was too big for the server; try a smaller size.", { source: "connection" });
      }
    }
  });
}

/**
 * A refused handshake reaches the page only as "connection lost" (1006); ask an HTTP route why, so that a
 * missing token or a refused origin is said plainly instead of retrying in silence.
 */
async function explainRefusedHandshake(banners) {
  let res;
  try {
    res = await fetch("api/schema", { credentials: "same-origin" });
  } catch {
    return; // the server is down: the status line already says "offline"
  }
  if (res.status === 401 || res.status === 403) {
    banners.show(await errorText(res), { source: "connection" });
  }
}
