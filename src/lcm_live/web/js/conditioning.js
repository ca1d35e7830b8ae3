// The reference image (IP-Adapter) and several ControlNets, each with its own image and scale (docs/protocol.md,
// "Reference image and several ControlNets"). Shown only for what the server loaded: the reference with
// `ip_adapter_scale` in the schema; the per-net rows when the per-net fields are lists (two nets or more; one net
// keeps the plain Control strength / from / until settings). The reference image is the binary layer "i"; net k's
// image (k >= 1) the layer "n" k; net 0's is the canvas (lines mode). Pictures are fitted within MAX_SIDE pixels
// and sent as WebP (the server fits them to the frame; the image encoder takes 224 pixels).
//
// Events: "input" {name}  a scale moved (the caller paces and sends the params)

import { schemaProperties } from "./controls.js";

const $ = (id) => document.getElementById(id);
const MAX_SIDE = 768;
const PER_NET = [
  ["controlnet_conditioning_scale", "strength"],
  ["control_guidance_start", "from"],
  ["control_guidance_end", "until"],
];

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, String(v));
  }
  node.append(...children);
  return node;
}

/** A labelled slider row: {row, input}; onInput(value) as it moves. */
function slider(id, label, { min, max, step, value }, onInput) {
  const input = el("input", { type: "range", id, min, max, step });
  input.value = String(value);
  const out = el("output", { for: id, text: Number(value).toFixed(2) });
  input.addEventListener("input", () => {
    out.textContent = Number(input.value).toFixed(2);
    onInput(Number(input.value));
  });
  const row = el("div", { class: "cond-slider" }, [el("label", { for: id, text: label }), input, out]);
  return { row, input, out };
}

/** An image file (or Blob) -> a WebP within MAX_SIDE pixels (same picture, a size the server takes). */
export async function fitImage(file, maxSide = MAX_SIDE) {
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, maxSide / Math.max(bitmap.width, bitmap.height));
  const c = document.createElement("canvas");
  c.width = Math.max(1, Math.round(bitmap.width * scale));
  c.height = Math.max(1, Math.round(bitmap.height * scale));
  c.getContext("2d").drawImage(bitmap, 0, 0, c.width, c.height);
  bitmap.close();
  const webp = await new Promise((resolve) => c.toBlob(resolve, "image/webp", 0.9));
  return webp && webp.type === "image/webp" ? webp : new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

export class Conditioning extends EventTarget {
  /** conn: the Connection (layers go through it: kept and re-sent after a reconnect); onError(text). */
  constructor({ conn, onError }) {
    super();
    this.conn = conn;
    this.onError = onError;
    this.els = { reference: $("reference"), refFile: $("reference-file"), refImage: $("reference-image"),
                 refClear: $("reference-clear"), refScale: $("reference-scale"), nets: $("controlnets"),
                 list: $("controlnet-list") };
    this.props = {};
    this.names = [];
    this.netCount = 0; // with per-net lists: their length (2..8); else 0
    this.perNet = {}; // field -> [number per net]
    this.ipScale = null; // the reference's scale (null: the server has no IP-Adapter)
    this.thumbs = new Map(); // layer key -> object URL shown
    this.els.refFile.addEventListener("change", (e) => {
      this.pick("reference", e.target.files[0]);
      e.target.value = "";
    });
    this.els.refClear.addEventListener("click", () => this.setLayer("reference", null));
  }

  /** The schema's properties (schemaProperties(schema)): which parts show, with their bounds and defaults. */
  build(schema) {
    this.props = schemaProperties(schema);
    this.render();
  }

  render() {
    const ip = this.props.ip_adapter_scale;
    this.els.reference.hidden = !ip;
    if (ip && this.ipScale === null) this.ipScale = ip.default ?? 1;
    if (!ip) this.ipScale = null;
    this.els.refScale.replaceChildren();
    if (ip) {
      const s = slider("reference-scale-input", "Strength", { min: ip.minimum ?? 0, max: ip.maximum ?? 2, step: 0.01,
                                                              value: this.ipScale }, (v) => {
        this.ipScale = v;
        this.emit("input", { name: "ip_adapter_scale" });
      });
      this.els.refScale.append(s.row);
    }
    const scale = this.props.controlnet_conditioning_scale;
    const count = scale && scale.type === "array" ? scale.maxItems || 0 : 0;
    if (count !== this.netCount) {
      this.netCount = count;
      this.perNet = {};
      for (const [name] of PER_NET) {
        const p = this.props[name] || {};
        this.perNet[name] = Array.isArray(p.default) ? [...p.default] : new Array(count).fill(name === "control_guidance_end" ? 1 : 0);
      }
    }
    this.renderNets();
  }

  /** The server's info: the nets' names (info.controlnets, in the per-net fields' order). */
  setInfo(info) {
    const names = Array.isArray(info.controlnets) ? info.controlnets : [];
    if (JSON.stringify(names) === JSON.stringify(this.names)) return;
    this.names = names;
    this.renderNets();
  }

  renderNets() {
    this.els.nets.hidden = this.netCount < 2;
    const rows = [];
    for (let k = 0; k < this.netCount; k++) {
      const name = this.names[k] || `net ${k + 1}`;
      const sliders = PER_NET.map(([field, label]) => {
        const item = (this.props[field] || {}).items || {};
        return slider(`cn-${k}-${field}`, label, { min: item.minimum ?? 0, max: item.maximum ?? 1, step: 0.01,
                                                   value: this.perNet[field][k] }, (v) => {
          this.perNet[field][k] = v;
          this.emit("input", { name: field });
        }).row;
      });
      const head = el("div", { class: "cond-head" }, [el("strong", { text: name })]);
      if (k === 0) {
        head.append(el("span", { class: "control-hint", text: "follows the canvas" }));
      } else {
        const key = `control:${k}`;
        const file = el("input", { type: "file", id: `cn-${k}-file`, class: "visually-hidden",
                                   accept: "image/png,image/jpeg,image/webp,image/gif,image/bmp" });
        file.addEventListener("change", (e) => {
          this.pick(key, e.target.files[0]);
          e.target.value = "";
        });
        const img = el("img", { class: "cond-thumb", alt: `${name}'s image`, "data-key": key });
        const clear = el("button", { type: "button", class: "tool", id: `cn-${k}-clear`, text: "Clear" });
        clear.addEventListener("click", () => this.setLayer(key, null));
        head.append(img, el("label", { class: "tool file-tool", for: file.id }, ["Image…", file]), clear);
      }
      rows.push(el("li", { class: "controlnet", "data-net": k }, [head, ...sliders]));
    }
    this.els.list.replaceChildren(...rows);
    for (const key of this.thumbs.keys()) this.showThumb(key);
  }

  /** An image file for a layer ("reference" or "control:k"), fitted and sent. */
  async pick(key, file) {
    if (!file) return;
    let blob;
    try {
      blob = await fitImage(file);
    } catch {
      this.onError(`Could not read ${file.name} as an image.`);
      return;
    }
    this.setLayer(key, blob);
  }

  /** Send a layer's image (null: clear it) and show it. */
  setLayer(key, blob) {
    this.conn.sendLayer(key, blob);
    const old = this.thumbs.get(key);
    if (old) URL.revokeObjectURL(old);
    if (blob) this.thumbs.set(key, URL.createObjectURL(blob));
    else this.thumbs.delete(key);
    this.showThumb(key);
  }

  showThumb(key) {
    const img = key === "reference" ? this.els.refImage : this.els.list.querySelector(`img[data-key="${key}"]`);
    const clear = key === "reference" ? this.els.refClear : $(`cn-${key.split(":")[1]}-clear`);
    const url = this.thumbs.get(key);
    if (img) {
      img.hidden = !url;
      if (url) img.src = url;
      else img.removeAttribute("src");
    }
    if (clear) clear.disabled = !url;
  }

  /** The params' ip_adapter_scale and, with several nets, the per-net lists (only the fields the server has). */
  values() {
    const out = {};
    if (this.ipScale !== null && this.props.ip_adapter_scale) out.ip_adapter_scale = this.ipScale;
    if (this.netCount >= 2) for (const [name] of PER_NET) out[name] = [...this.perNet[name]];
    return out;
  }

  /** Put back a kept frame's scales and images (history Restore); a layer the frame had not is cleared. */
  restore(params, layers) {
    if (typeof params.ip_adapter_scale === "number" && this.ipScale !== null) this.ipScale = params.ip_adapter_scale;
    for (const [name] of PER_NET) {
      if (this.netCount >= 2 && Array.isArray(params[name]) && params[name].length === this.netCount) {
        this.perNet[name] = [...params[name]];
      }
    }
    if (this.ipScale !== null) this.setLayer("reference", layers.get("reference") || null);
    for (let k = 1; k < this.netCount; k++) {
      if (params.mode === "control") this.setLayer(`control:${k}`, layers.get(`control:${k}`) || null);
    }
    this.render(); // the sliders at the restored values
  }

  emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}
