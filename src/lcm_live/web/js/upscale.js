// Keep and upscale: a kept frame (history.js) made 2x or 4x larger by the server (POST /api/upscale: tiled
// image-to-image with the frame's own prompt and seed, or the ESRGAN-family model the server was started with:
// `serve --upscaler`, offered in #upscale-method when /api/info names one), its progress read tile by tile from the
// NDJSON stream, the PNG (with its parameters) handed to the browser as a download.

import { downloadBlob, errorText } from "./output.js";

const NDJSON = "application/x-ndjson";
// How much each tile is redrawn (the route's default: details redrawn, the layout kept). Image-to-image runs
// floor(steps x strength) steps, so a frame made in fewer than ceil(1 / strength) steps is upscaled with that many
// (a 2-step frame at 0.3 would run none: the server refuses it, naming strength and steps).
export const UPSCALE_STRENGTH = 0.3;

// The route's "upscaler" choices, as the method picker shows them.
const METHODS = [
  ["lcm", "Tiled LCM", "Lanczos, then each tile redrawn with the frame's own prompt and seed"],
  ["esrgan", "ESRGAN", "the server's ESRGAN model alone (no redraw)"],
  ["esrgan+lcm", "ESRGAN + LCM", "the server's ESRGAN model, then each tile redrawn with the frame's prompt and seed"],
];

/**
 * Offer the server's ESRGAN model beside the tiled LCM (info: /api/info, or the hello's): the #upscale-method
 * picker is filled and shown when info.upscaler names one, hidden (and back to "lcm") when not.
 */
export function showUpscalers(info, select = document.getElementById("upscale-method")) {
  if (!select) return;
  const u = info && info.upscaler;
  if (!u) {
    select.replaceChildren();
    select.hidden = true;
    return;
  }
  const kept = select.value;
  select.replaceChildren(...METHODS.map(([value, label, title]) => {
    const o = document.createElement("option");
    o.value = value;
    o.textContent = value === "lcm" ? label : `${label} (${u.architecture} ${u.scale}×)`;
    o.title = value === "lcm" ? title : `${title}: ${u.name}`;
    return o;
  }));
  select.value = METHODS.some(([v]) => v === kept) ? kept : "lcm";
  select.hidden = false;
}

/** The method picked in #upscale-method ("lcm" while the server offers no other). */
export function pickedUpscaler(select = document.getElementById("upscale-method")) {
  return select && !select.hidden && select.value ? select.value : "lcm";
}

/** What the upscale takes from a frame: its picture and the parameters its tiles are redrawn with. */
export function upscaleBody(info, imageBase64, scale, upscaler = "lcm") {
  const p = info.params || {};
  const body = { image: imageBase64, scale, strength: UPSCALE_STRENGTH };
  if (upscaler !== "lcm") body.upscaler = upscaler; // left out for "lcm": the route's default (and older servers')
  for (const name of ["prompt", "negative_prompt", "num_inference_steps", "guidance_scale"]) {
    if (p[name] !== undefined && p[name] !== null) body[name] = p[name];
  }
  if (body.num_inference_steps) {
    body.num_inference_steps = Math.max(body.num_inference_steps, Math.ceil(1 / UPSCALE_STRENGTH - 1e-9));
  }
  body.seed = info.seed ?? p.seed;
  return body;
}

/** Each complete line of an NDJSON byte stream, parsed, as it arrives. */
async function* ndjson(stream) {
  const reader = stream.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { done, value } = await reader.read();
    buffered += decoder.decode(value || new Uint8Array(), { stream: !done });
    let nl;
    while ((nl = buffered.indexOf("\n")) >= 0) {
      const line = buffered.slice(0, nl).trim();
      buffered = buffered.slice(nl + 1);
      if (line) yield JSON.parse(line);
    }
    if (done) break;
  }
  if (buffered.trim()) yield JSON.parse(buffered);
}

/** "data:image/png;base64,..." -> a Blob (fetch of a data: URL is outside the page's connect-src). */
function dataUrlBlob(url) {
  const [head, data] = url.split(",", 2);
  const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: head.slice(5).split(";")[0] || "image/png" });
}

function blobToBase64(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(String(r.result).split(",", 2)[1]);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

/**
 * Upscale a kept frame; onProgress(tile, tiles, stage) after each tile (stage "esrgan" for the ESRGAN model's,
 * undefined for the LCM pass's). Resolves with {blob, width, height}; rejects with the server's error (named field
 * and fix) as an Error.
 */
export async function upscaleEntry(entry, { scale = 2, upscaler = "lcm", onProgress = () => {} } = {}) {
  const body = upscaleBody(entry.info, await blobToBase64(entry.frame), scale, upscaler);
  const res = await fetch("api/upscale", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: NDJSON },
    body: JSON.stringify(body),
    credentials: "same-origin",
  });
  if (!res.ok) throw new Error(await errorText(res));
  for await (const msg of ndjson(res.body)) {
    if (msg.type === "upscale") onProgress(msg.tile, msg.tiles, msg.stage);
    else if (msg.type === "error") throw new Error(msg.message || msg.code);
    else if (msg.type === "upscaled") return { blob: dataUrlBlob(msg.image), width: msg.width, height: msg.height };
  }
  throw new Error("the upscale stopped before its picture came (the server went away?)");
}

/**
 * The viewer's "Keep and upscale": pin the frame (keep(entry)), upscale it at the scale and with the method picked
 * (#upscale-method unless `upscaler` is given), say each tile in `status`, download the PNG. Errors go to onError.
 */
export async function keepAndUpscale(entry, { keep, scale, status, onError, upscaler = pickedUpscaler() }) {
  status.hidden = false;
  status.textContent = `Upscaling ×${scale}…`;
  try {
    await keep(entry);
    const { blob, width, height } = await upscaleEntry(entry, {
      scale,
      upscaler,
      onProgress: (tile, tiles, stage) => {
        const what = stage === "esrgan" ? "ESRGAN tile" : "tile";
        status.textContent = `Upscaling ×${scale}: ${what} ${tile} of ${tiles}`;
      },
    });
    status.textContent = `Upscaled to ${width}×${height}: saved.`;
    downloadBlob(blob, `lcm-live-${entry.info.seed}-x${scale}.png`);
  } catch (err) {
    status.textContent = "";
    status.hidden = true;
    onError(`Upscale failed: ${err.message}`);
  }
}
