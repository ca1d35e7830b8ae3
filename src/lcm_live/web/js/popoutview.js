// The pop-out window's script (popout.html): shows each frame the studio tab sends on its BroadcastChannel (the
// channel's name is this window's URL fragment; popout.js). Double-click: full screen.

import { CHANNEL_PREFIX } from "./popout.js";

const name = decodeURIComponent(location.hash.slice(1));
const img = document.querySelector("img");
const note = document.querySelector("p");
let url = null;
let frames = 0;

if (!name.startsWith(CHANNEL_PREFIX) || typeof BroadcastChannel !== "function") {
  note.textContent = "Open this window with the studio's Pop out button.";
} else {
  const channel = new BroadcastChannel(name);
  channel.addEventListener("message", (e) => {
    const msg = e.data || {};
    if (msg.type === "ping") channel.postMessage({ type: "hello" });
    if (msg.type !== "frame" || !(msg.blob instanceof Blob)) return;
    const old = url;
    url = URL.createObjectURL(msg.blob);
    img.src = url;
    img.hidden = false;
    note.hidden = true;
    frames += 1;
    document.body.dataset.frames = String(frames);
    img.dataset.frameId = String(msg.info?.id ?? "");
    img.alt = msg.info?.params?.prompt ? `Generated image: ${msg.info.params.prompt}` : "Generated image";
    const done = img.decode ? img.decode().catch(() => {}) : Promise.resolve();
    done.then(() => old && URL.revokeObjectURL(old));
  });
  channel.postMessage({ type: "hello" });
}

document.addEventListener("dblclick", () => {
  if (document.fullscreenElement) document.exitFullscreen();
  else document.documentElement.requestFullscreen?.().catch(() => {});
});
