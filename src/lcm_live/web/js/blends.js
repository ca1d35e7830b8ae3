// Blends: a second prompt (the text embeddings interpolated) and a second seed (the initial noises slerped), each
// with a weight slider, off by default (sent as null), so a user can move smoothly between two prompts or two
// compositions. Shown only when the server's schema has `prompt_blend` / `seed_blend`; the weight's and the seed's
// bounds come from that schema.
//
// Events: "input" {name}  a blend changed (typing and slider drags: the caller paces them)

const $ = (id) => document.getElementById(id);

/** The `properties` of a nullable object field of a pydantic schema (`anyOf: [{$ref}, null]`), or null. */
export function blendProperties(schema, name) {
  const defs = schema.$defs || schema.definitions || {};
  const prop = (schema.properties || {})[name];
  if (!prop) return null;
  const resolve = (p) => (p && p.$ref ? defs[p.$ref.split("/").pop()] || {} : p || {});
  const options = Array.isArray(prop.anyOf) ? prop.anyOf.map(resolve) : [resolve(prop)];
  const object = options.find((o) => o.type === "object" || o.properties) || {};
  return object.properties || {};
}

function weightStep(prop) {
  if (prop.multipleOf) return prop.multipleOf;
  return ((prop.maximum ?? 1) - (prop.minimum ?? 0)) / 100;
}

export class Blends extends EventTarget {
  constructor() {
    super();
    this.els = {
      wrap: $("blends"),
      prompt: { wrap: $("prompt-blend"), on: $("prompt-blend-on"), value: $("prompt-blend-text"),
                weight: $("prompt-blend-weight"), out: $("prompt-blend-weight-value") },
      seed: { wrap: $("seed-blend"), on: $("seed-blend-on"), value: $("seed-blend-seed"),
              weight: $("seed-blend-weight"), out: $("seed-blend-weight-value"), random: $("seed-blend-random") },
    };
    this.fields = new Set(); // the blend fields the server takes
    for (const [key, name] of [["prompt", "prompt_blend"], ["seed", "seed_blend"]]) {
      const e = this.els[key];
      const changed = () => this.dispatchEvent(new CustomEvent("input", { detail: { name } }));
      e.on.addEventListener("change", changed);
      e.weight.addEventListener("input", () => {
        e.on.checked = true; // moving the weight means blending
        this.showWeight(e);
        changed();
      });
      e.value.addEventListener("input", () => {
        if (e.value.value.trim() !== "") e.on.checked = true;
        changed();
      });
    }
    const s = this.els.seed;
    s.random.addEventListener("click", () => {
      const min = Number(s.value.min || 0);
      const max = Number(s.value.max || 2 ** 32 - 1);
      const [r] = crypto.getRandomValues(new Uint32Array(1));
      s.value.value = String(min + (r % Math.min(max - min + 1, 2 ** 32)));
      s.on.checked = true;
      this.dispatchEvent(new CustomEvent("input", { detail: { name: "seed_blend" } }));
    });
  }

  /** Show the blends the schema offers, with its bounds (values the user set are kept when they still fit). */
  build(schema) {
    this.fields.clear();
    for (const [key, name, valueName] of [["prompt", "prompt_blend", "prompt"], ["seed", "seed_blend", "seed"]]) {
      const props = blendProperties(schema, name);
      const e = this.els[key];
      e.wrap.hidden = props === null;
      if (props === null) continue;
      this.fields.add(name);
      const w = props.weight || {};
      e.weight.min = String(w.minimum ?? 0);
      e.weight.max = String(w.maximum ?? 1);
      e.weight.step = String(weightStep(w));
      if (!e.weight.dataset.touched) {
        e.weight.value = String(typeof w.default === "number" ? w.default : 0.5);
        e.weight.dataset.touched = "true";
      }
      this.showWeight(e);
      // The seed's bounds; a too-long second prompt is not cut (the server names the limit, as for the prompt).
      const v = props[valueName] || {};
      if (key === "seed" && v.minimum !== undefined) e.value.min = String(v.minimum);
      if (key === "seed" && v.maximum !== undefined) e.value.max = String(v.maximum);
    }
    this.els.wrap.hidden = this.fields.size === 0;
  }

  showWeight(e) {
    e.out.textContent = Number(e.weight.value).toFixed(2);
  }

  /** Put back the blends a frame was made with (a field set to null: that blend off; absent: left as it is). */
  set(params) {
    const p = this.els.prompt;
    const s = this.els.seed;
    const pb = params.prompt_blend;
    const sb = params.seed_blend;
    if (pb !== undefined) {
      p.on.checked = pb !== null;
      if (pb) [p.value.value, p.weight.value] = [pb.prompt, String(pb.weight)];
      this.showWeight(p);
    }
    if (sb !== undefined) {
      s.on.checked = sb !== null;
      if (sb) [s.value.value, s.weight.value] = [String(sb.seed), String(sb.weight)];
      this.showWeight(s);
    }
  }

  /** {prompt_blend, seed_blend} for the params (only the fields the server takes): null while off. */
  values() {
    const out = {};
    const p = this.els.prompt;
    const s = this.els.seed;
    if (this.fields.has("prompt_blend")) {
      out.prompt_blend = p.on.checked ? { prompt: p.value.value, weight: Number(p.weight.value) } : null;
    }
    if (this.fields.has("seed_blend")) {
      // A half-typed seed is sent as typed: the server names the problem (as the main seed does).
      const seed = s.value.value.trim() === "" ? null : Number(s.value.value);
      out.seed_blend = s.on.checked ? { seed, weight: Number(s.weight.value) } : null;
    }
    return out;
  }
}
