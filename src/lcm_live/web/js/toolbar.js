// The drawing toolbar: brush/eraser, brush size, colour palette, undo/redo/clear, images uploaded or dropped
// onto the canvas, and keyboard shortcuts (Ctrl+Z / Ctrl+Shift+Z / Ctrl+Y, B, E).

const PALETTE = [
  "#000000", "#ffffff", "#6b7280", "#7c4a2d", "#e53935", "#fb8c00", "#fdd835",
  "#43a047", "#1e88e5", "#8ecae6", "#8e24aa", "#f48fb1",
];

const $ = (id) => document.getElementById(id);

/**
 * Wire the toolbar of index.html to `sketch` (a SketchCanvas).
 * onImage(): an image was placed on the canvas (upload or drop); onError(text): it could not be read.
 */
export function setupToolbar(sketch, { onImage, onError }) {
  $("tool-brush").addEventListener("click", () => setTool("brush"));
  $("tool-eraser").addEventListener("click", () => setTool("eraser"));
  $("undo").addEventListener("click", () => sketch.undo());
  $("redo").addEventListener("click", () => sketch.redo());
  $("clear").addEventListener("click", () => sketch.clear());
  sketch.addEventListener("history", (e) => {
    $("undo").disabled = !e.detail.canUndo;
    $("redo").disabled = !e.detail.canRedo;
  });

  function setTool(tool) {
    sketch.tool = tool;
    $("tool-brush").setAttribute("aria-pressed", String(tool === "brush"));
    $("tool-eraser").setAttribute("aria-pressed", String(tool === "eraser"));
  }

  const sizeInput = $("brush-size");
  sizeInput.addEventListener("input", () => {
    sketch.size = Number(sizeInput.value);
    $("brush-size-value").textContent = sizeInput.value;
  });

  async function placeImageFile(file) {
    if (!file || !file.type.startsWith("image/")) return;
    try {
      const bitmap = await createImageBitmap(file);
      sketch.drawImage(bitmap, "contain");
      bitmap.close();
      onImage();
    } catch {
      onError(`Could not read ${file.name} as an image.`);
    }
  }

  $("upload").addEventListener("change", (e) => {
    placeImageFile(e.target.files[0]);
    e.target.value = ""; // the same file again is a new upload
  });
  const canvasWrap = document.querySelector(".canvas-wrap");
  canvasWrap.addEventListener("dragover", (e) => e.preventDefault());
  canvasWrap.addEventListener("drop", (e) => {
    e.preventDefault();
    placeImageFile(e.dataTransfer.files[0]);
  });

  function buildPalette() {
    const palette = $("palette");
    const swatches = [];
    const select = (color) => {
      sketch.color = color;
      if (sketch.tool === "eraser") setTool("brush");
      for (const s of swatches) s.setAttribute("aria-pressed", String(s.dataset.color === color));
    };
    for (const color of PALETTE) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "swatch";
      b.dataset.color = color;
      b.style.background = color;
      b.setAttribute("aria-label", `Colour ${color}`);
      b.addEventListener("click", () => select(color));
      swatches.push(b);
      palette.append(b);
    }
    const custom = document.createElement("input");
    custom.type = "color";
    custom.id = "custom-colour";
    custom.value = "#ff5500";
    custom.addEventListener("input", () => select(custom.value));
    const label = document.createElement("label");
    label.className = "custom-colour";
    label.append(custom, "custom");
    label.htmlFor = custom.id;
    palette.append(label);
    select(PALETTE[0]);
  }
  buildPalette();

  document.addEventListener("keydown", (e) => {
    const typing = e.target.closest && e.target.closest("textarea, input[type=number], input[type=text]");
    if (typing) return;
    const mod = e.ctrlKey || e.metaKey;
    const key = e.key.toLowerCase();
    if (mod && key === "z") {
      e.preventDefault();
      if (e.shiftKey) sketch.redo();
      else sketch.undo();
    } else if (mod && key === "y") {
      e.preventDefault();
      sketch.redo();
    } else if (!mod && !e.altKey && key === "b") {
      setTool("brush");
    } else if (!mod && !e.altKey && key === "e") {
      setTool("eraser");
    }
  });
}
