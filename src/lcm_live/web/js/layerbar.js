// What the brush paints on (the drawing, the mask, a region) and how the layers reach the server: the mask bar,
// the region palette, their overlay over the sketch, and their strokes paced as the sketch's are (one frame in
// flight while a stroke goes on; the stroke's end at once). The server's side: docs/protocol.md.

import { usesCanvas } from "./canvas.js";
import { LayerOverlay } from "./layers.js";
import { MaskTool } from "./mask.js";
import { StrokeStream } from "./pacing.js";
import { RegionPalette } from "./regions.js";

const $ = (id) => document.getElementById(id);

// After the page resizes the canvas, the new canvas and the new mask reach the server one after the other; in
// between it fits the old mask to the new canvas and says so. The page's next message is the mask at the right
// size, so that note (and only it, for a moment) is not shown.
const RESIZE_NOTE = /^the mask is \d+x\d+; fitted to the canvas/;
const RESIZE_QUIET_MS = 3000;

/**
 * sketch: the SketchCanvas; conn: the Connection; pacer: the FramePacer;
 * mode(): the page's mode; sendParams(): send the full params now.
 */
export function setupLayers({ sketch, conn, pacer, mode, sendParams }) {
  const { width, height } = sketch;
  const overlay = new LayerOverlay($("layer-overlay"));

  // 1. The mask: sent (or cleared) in sketch and lines mode; text to image ignores it and the canvas alike.
  const maskStream = new StrokeStream(pacer, "mask", async (isStale) => {
    if (usesCanvas(mode())) await mask.sync(conn, isStale);
  });
  const mask = new MaskTool(width, height, {
    onChange: (final) => maskStream.change(final),
    onSelect: () => paintOn("mask"),
  });

  // 2. The regions: in every mode; their layers go before the params that name them.
  const regionStream = new StrokeStream(pacer, "regions", (isStale) => regions.sync(conn, sendParams, isStale));
  const regions = new RegionPalette(width, height, {
    onChange: (final, typing) => {
      if (typing) pacer.offer("regions", regionStream.now, { settle: true });
      else regionStream.change(final);
    },
    onSelect: (layer) => paintOn(layer ? "region" : "sketch", layer),
  });

  mask.overlay = overlay;
  regions.overlay = overlay;
  overlay.sources = () => [...regions.overlayItems(), ...mask.overlayItems()];

  // 3. What strokes paint on. The mask button toggles back to the drawing.
  function paintOn(target, layer = null) {
    if (target === "mask" && sketch.target === mask.layer) target = "sketch";
    sketch.setTarget(target === "mask" ? mask.layer : target === "region" ? layer : null);
    $("layer-sketch").setAttribute("aria-pressed", String(target === "sketch"));
    mask.showSelected(target === "mask");
    if (target !== "region") regions.unselect();
    document.body.dataset.paintOn = target;
  }
  $("layer-sketch").addEventListener("click", () => paintOn("sketch"));
  document.addEventListener("keydown", (e) => {
    const typing = e.target.closest && e.target.closest("textarea, input[type=number], input[type=text]");
    if (typing || e.ctrlKey || e.metaKey || e.altKey || $("layerbar").hidden) return;
    const key = e.key.toLowerCase();
    if (key === "m") paintOn("mask");
    else if (key === "d") paintOn("sketch");
  });
  paintOn("sketch");

  let resizedAt = -Infinity;
  conn.addEventListener("warning", (e) => {
    // Registered before main.js' listener, which shows warnings: this one may stop it.
    if (RESIZE_NOTE.test(e.detail.message || "") && performance.now() - resizedAt < RESIZE_QUIET_MS) {
      e.stopImmediatePropagation();
    }
  });

  return {
    mask,
    regions,
    /** Show what the server's schema offers: the mask with `mask_feather`, the palette with `regions`. */
    build(fields) {
      $("layerbar").hidden = !fields.includes("mask_feather");
      $("regions").hidden = !fields.includes("regions");
      if ($("layerbar").hidden && sketch.target === mask.layer) paintOn("sketch");
    },
    setMode(m) {
      mask.setMode(m);
    },
    resize(w, h) {
      if (w !== mask.layer.width || h !== mask.layer.height) resizedAt = performance.now();
      mask.resize(w, h);
      regions.resize(w, h);
    },
    /** The mask now (after the canvas, before the params: a mode switch). */
    syncMask: () => maskStream.now(),
    /** The `regions` of the params. */
    regionParams: () => regions.params(),
  };
}
