// What the page does with a kept frame (history.js: the live one on screen, or one from the strip): Restore (its
// parameters, its canvas, its mask and regions, then the mode it was made in, which sends them all), Apply (its
// picture onto the canvas) and Save (rendered again through POST /api/generate as a PNG with its parameters).

import { usesCanvas } from "./canvas.js";
import { saveFrame } from "./output.js";

/** The params of a frame that the server takes (`fields`), with its exact seed, as Save sends them back. */
export function frameParams(info, fields) {
  const params = {};
  for (const name of fields) {
    if (info.params && name in info.params) params[name] = info.params[name];
  }
  params.seed = info.seed; // seeds are exact: the same seed and params give the same picture
  if ("previews" in params) params.previews = false;
  return params;
}

/** Paint a PaintLayer (layers.js) from a mask image (white = selected, as sent), one undo step. */
export async function paintLayerFrom(layer, blob) {
  const bitmap = await createImageBitmap(blob);
  const { ctx, width, height } = layer;
  layer.pushHistory();
  ctx.clearRect(0, 0, width, height);
  ctx.drawImage(bitmap, 0, 0, width, height);
  bitmap.close();
  const img = ctx.getImageData(0, 0, width, height);
  const d = img.data;
  for (let i = 0; i < d.length; i += 4) {
    d[i + 3] = d[i]; // grey (the red of white on black) -> the layer's alpha
    d[i] = d[i + 1] = d[i + 2] = 255;
  }
  ctx.putImageData(img, 0, 0);
  layer.changed();
}

/**
 * Restore a history entry (history.js) into the page. page: {controls, prompt, negative, blends, models,
 * conditioning, sketch, layers, applySize, setMode, setSeedLocked}: the page's parts (main.js). Fields the server
 * no longer takes are skipped. Returns what could not be restored as it was (restoreControls), [] when all was.
 */
export async function restoreEntry(entry, page) {
  const { info, canvas, layers } = entry;
  const p = info.params || {};
  const { controls } = page;
  // 1. The size first: the canvas and the layers are drawn at it.
  if (p.width && p.height) {
    controls.set("width", p.width);
    controls.set("height", p.height);
    page.applySize(controls.size());
  }
  // 2. The canvas (one undo step back to the drawing), the mask (used only if the frame had one), the regions.
  if (canvas) page.sketch.drawImage(await createImageBitmap(canvas), "stretch");
  const { mask, regions } = page.layers;
  if (usesCanvas(p.mode)) {
    mask.els.on.checked = layers.has("mask");
    if (layers.has("mask")) await paintLayerFrom(mask.layer, layers.get("mask"));
    else mask.render();
  }
  if (Array.isArray(p.regions)) {
    for (const r of [...regions.regions]) regions.remove(r);
    for (const [k, r] of p.regions.entries()) {
      const region = regions.add(r.prompt);
      if (region && layers.has(`region:${k}`)) await paintLayerFrom(region.layer, layers.get(`region:${k}`));
    }
  }
  page.conditioning.restore(p, layers); // the reference image and the other ControlNets' images, their scales
  // 3. The text, the blends, the settings and the exact seed, locked (so the same picture comes back).
  page.prompt.value = p.prompt ?? page.prompt.value; // no input event: the params go once, with the mode below
  if (typeof p.negative_prompt === "string" && !page.negative.disabled) page.negative.value = p.negative_prompt;
  page.blends.set(p);
  const off = page.models.restore(p) ? [] : [`model ${p.model} (not offered by this server)`];
  off.push(...restoreControls(controls, p, info.seed));
  page.setSeedLocked(true);
  // 4. The mode: sends the canvas, then the mask, then the params.
  await page.setMode(p.mode || "txt2img");
  return off;
}

/**
 * Set the settings a frame was made with; returns what could not be put back as it was ("width 768 (now 512)"):
 * a slider keeps to this server's bounds, which may not be those the frame was made under (a pinned frame from
 * another server, or another model's size), and the page says so instead of restoring something else in silence.
 */
export function restoreControls(controls, params, seed) {
  for (const [name, value] of Object.entries(params)) {
    if (name !== "seed") controls.set(name, value);
  }
  controls.set("seed", seed);
  const now = controls.values();
  const off = [];
  for (const [name, value] of Object.entries({ ...params, seed })) {
    if (typeof value === "number" && typeof now[name] === "number" && Math.abs(now[name] - value) > 1e-9) {
      off.push(`${name} ${value} (now ${now[name]})`);
    }
  }
  return off;
}

/** Apply: the frame's picture onto the canvas (one undo step), stretched to it as the live Apply does. */
export async function applyEntry(entry, sketch) {
  const bitmap = await createImageBitmap(entry.frame);
  sketch.drawImage(bitmap, "stretch");
  bitmap.close();
}

/**
 * Save a kept frame: its params and exact seed, the canvas and the layers it was made from (output.js saveFrame).
 * `button` says "Saving…" meanwhile; the outcome goes to `banners` (source "save").
 */
export async function saveEntry(entry, { fields, button, banners }) {
  const label = button.textContent;
  button.disabled = true;
  button.textContent = "Saving…";
  try {
    await saveFrame({ params: frameParams(entry.info, fields), canvasBlob: entry.canvas, layers: entry.layers });
    banners.clear("save");
  } catch (err) {
    banners.show(`Save failed: ${err.message}`, { source: "save" });
  } finally {
    button.textContent = label;
    button.disabled = false;
  }
}
