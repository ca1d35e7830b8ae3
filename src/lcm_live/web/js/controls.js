// Generation settings built from the server's parameter schema (GET /api/schema, pydantic's JSON Schema).
// Every bound (minimum, maximum, multipleOf, default) comes from the schema; none is written in this page.
//
// Events: "input" {name}  any control changed (sent to the server at once; the newest params win)
//         "size" {width, height}  the size settled (slider released): the canvas follows it

/** The properties of a pydantic JSON Schema, with `$ref`s and `anyOf: [X, null]` unwrapped. */
export function schemaProperties(schema) {
  const defs = schema.$defs || schema.definitions || {};
  const resolve = (prop) => {
    if (prop && prop.$ref) {
      const name = prop.$ref.split("/").pop();
      return { ...defs[name], ...prop, $ref: undefined };
    }
    return prop;
  };
  const out = {};
  for (const [name, raw] of Object.entries(schema.properties || {})) {
    let prop = resolve(raw);
    let nullable = false;
    if (Array.isArray(prop.anyOf)) {
      const options = prop.anyOf.map(resolve);
      nullable = options.some((o) => o.type === "null");
      const real = options.find((o) => o.type !== "null") || {};
      prop = { ...real, ...prop, anyOf: undefined };
    }
    out[name] = { ...prop, nullable };
  }
  return out;
}

// What each known field looks like; labels and hints are the page's, bounds are the server's. `img2img` and
// `control`: the field is used only in that mode (dimmed in the others, by style.css).
const FIELDS = [
  { name: "num_inference_steps", label: "Steps", hint: "LCM needs 1-8 steps; more is slower and finer." },
  { name: "guidance_scale", label: "Guidance", hint: "How strongly the prompt steers the image." },
  { name: "strength", label: "Strength", hint: "Sketch mode: how far the drawing is changed.", img2img: true },
  // Only with a ControlNet on the server (lines mode).
  { name: "controlnet_conditioning_scale", label: "Control strength",
    hint: "Lines mode: how strongly the drawing guides the picture.", control: true },
  // With one ControlNet: the fraction of the steps it acts in (several nets: per-net rows, conditioning.js).
  { name: "control_guidance_start", label: "Control from",
    hint: "Lines mode: the ControlNet acts from this fraction of the steps...", control: true },
  { name: "control_guidance_end", label: "Control until", hint: "...to this one.", control: true },
  { name: "control_preprocess", label: "Canvas as",
    hint: "Lines mode: line ControlNets take white lines on black.", control: true,
    choices: { invert: "Drawing (inverted)", edges: "Photo or camera (its edges)", none: "As it is" } },
  // Only with a mask (mask.js): sketch and lines mode.
  { name: "mask_feather", label: "Mask feather",
    hint: "With a mask: how far (pixels) its edge blends the new picture into the kept one." },
  { name: "width", label: "Width", size: true },
  { name: "height", label: "Height", size: true },
  { name: "seed", label: "Seed" },
  { name: "previews", label: "Step previews", hint: "Show each step's preview before the final frame." },
];

/** A slider step for a number without `multipleOf`: about 100-200 positions over its range. */
function numberStep(prop) {
  if (prop.multipleOf) return prop.multipleOf;
  if (prop.type === "integer") return 1;
  const span = (prop.maximum ?? 1) - (prop.minimum ?? 0);
  return span <= 2 ? 0.01 : span <= 40 ? 0.1 : 1;
}

function decimals(step) {
  const s = String(step);
  return s.includes(".") ? s.length - s.indexOf(".") - 1 : 0;
}

/** A uniform-enough random integer in [min, max] (32 random bits; the schema's seed range is 32-bit). */
function randomSeed(min, max) {
  const [r] = crypto.getRandomValues(new Uint32Array(1));
  return min + (r % Math.min(max - min + 1, 2 ** 32));
}

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) node.append(c);
  return node;
}

export class Controls extends EventTarget {
  /**
   * @param {HTMLFormElement} form where the controls go (its content is replaced)
   * @param {object} schema the JSON Schema from the server
   */
  constructor(form, schema) {
    super();
    this.form = form;
    this.props = schemaProperties(schema);
    this.getters = {}; // name -> () => value for the params
    this.setters = {}; // name -> (value) => void
    this.wrappers = {}; // name -> the .control element (for error highlighting)
    this.seedLocked = true;
    form.replaceChildren();
    form.addEventListener("submit", (e) => e.preventDefault());
    for (const f of FIELDS) {
      const prop = this.props[f.name];
      if (!prop) continue; // the server does not take it: no control
      if (f.name === "seed") this.addSeed(f, prop);
      else if (prop.type === "boolean") this.addCheckbox(f, prop);
      else if (prop.type === "string" && Array.isArray(prop.enum)) this.addSelect(f, prop);
      else if (prop.type === "integer" || prop.type === "number") this.addSlider(f, prop);
    }
  }

  /** The names the server accepts (anything else in a params message is an error). */
  get fieldNames() {
    return Object.keys(this.props);
  }

  /** The params from these controls (only fields the schema has). */
  values() {
    const out = {};
    for (const [name, get] of Object.entries(this.getters)) {
      const v = get();
      if (v !== undefined) out[name] = v;
    }
    return out;
  }

  /** Called before each params send: an unlocked seed is a fresh random one for every request. */
  nextSeed() {
    if (!this.seedLocked && this.setters.seed) {
      const p = this.props.seed;
      this.setters.seed(randomSeed(p.minimum ?? 0, p.maximum ?? Number.MAX_SAFE_INTEGER));
    }
  }

  /** Lock (or unlock) the seed: locked, every frame uses the seed shown. */
  setSeedLocked(on) {
    this.seedLocked = on;
    if (this.lockInput) this.lockInput.checked = on;
  }

  set(name, value) {
    if (this.setters[name]) this.setters[name](value);
  }

  markInvalid(field) {
    this.clearInvalid();
    const w = field && this.wrappers[field];
    if (w) w.dataset.invalid = "true";
  }

  clearInvalid() {
    for (const w of Object.values(this.wrappers)) delete w.dataset.invalid;
  }

  changed(name) {
    this.clearInvalid();
    this.dispatchEvent(new CustomEvent("input", { detail: { name } }));
  }

  wrap(f, children, hintText) {
    const w = el("div", {
      class: "control", "data-field": f.name,
      "data-img2img-only": f.img2img ? "true" : null, "data-control-only": f.control ? "true" : null,
    });
    w.append(...children);
    if (hintText) w.append(el("p", { class: "control-hint", text: hintText }));
    this.wrappers[f.name] = w;
    this.form.append(w);
    return w;
  }

  addSlider(f, prop) {
    const id = `ctl-${f.name}`;
    const step = numberStep(prop);
    const digits = decimals(step);
    const min = prop.minimum ?? prop.exclusiveMinimum ?? 0;
    const max = prop.maximum ?? prop.exclusiveMaximum ?? min + 100;
    const input = el("input", { type: "range", id, name: f.name, min, max, step });
    const out = el("output", { for: id });
    // A nullable field without a default means "the server decides" (e.g. the model's guidance): an Auto box.
    const hasDefault = typeof prop.default === "number";
    let auto = null;
    input.value = String(hasDefault ? prop.default : min);
    const show = () => {
      out.textContent = auto && auto.checked ? "auto" : Number(input.value).toFixed(digits);
    };
    const head = el("div", { class: "control-head" }, [el("label", { for: id, text: f.label }), out]);
    const row = el("div", { class: "control-row" }, [input]);
    if (!hasDefault && prop.nullable) {
      auto = el("input", { type: "checkbox", id: `${id}-auto`, checked: true });
      row.append(el("label", { class: "check", for: `${id}-auto` }, [auto, "auto"]));
      auto.addEventListener("change", () => { show(); this.changed(f.name); });
    }
    const read = () => (prop.type === "integer" ? parseInt(input.value, 10) : Number(input.value));
    input.addEventListener("input", () => {
      if (auto) auto.checked = false;
      show();
      this.changed(f.name);
    });
    if (f.size) {
      // The canvas is resized when the slider is released, not at every position (each resize resamples it).
      input.addEventListener("change", () => this.dispatchEvent(new CustomEvent("size", { detail: this.size() })));
    }
    this.getters[f.name] = () => (auto && auto.checked ? (prop.nullable ? null : undefined) : read());
    this.setters[f.name] = (v) => {
      if (v === null && auto) auto.checked = true; // "the server decides", as it was
      if (v === null || v === undefined) {
        show();
        return;
      }
      input.value = String(v);
      if (auto) auto.checked = false;
      show();
    };
    show();
    this.wrap(f, [head, row], f.hint);
  }

  addCheckbox(f, prop) {
    const id = `ctl-${f.name}`;
    const input = el("input", { type: "checkbox", id, name: f.name, checked: prop.default === true });
    input.addEventListener("change", () => this.changed(f.name));
    this.getters[f.name] = () => input.checked;
    this.setters[f.name] = (v) => { input.checked = Boolean(v); };
    this.wrap(f, [el("label", { class: "check", for: id }, [input, f.label])], f.hint);
  }

  /** A choice among the schema's `enum` values (shown with the field's own labels where it has them). */
  addSelect(f, prop) {
    const id = `ctl-${f.name}`;
    const select = el("select", { id, name: f.name }, prop.enum.map((value) => el("option", {
      value, text: (f.choices && f.choices[value]) || value, selected: value === prop.default,
    })));
    select.addEventListener("change", () => this.changed(f.name));
    this.getters[f.name] = () => select.value;
    this.setters[f.name] = (v) => { select.value = String(v); };
    const head = el("div", { class: "control-head" }, [el("label", { for: id, text: f.label })]);
    this.wrap(f, [head, el("div", { class: "control-row" }, [select])], f.hint);
  }

  addSeed(f, prop) {
    const id = `ctl-${f.name}`;
    const min = prop.minimum ?? 0;
    const max = prop.maximum ?? Number.MAX_SAFE_INTEGER;
    const input = el("input", { type: "number", id, name: f.name, min, max, step: 1, inputmode: "numeric" });
    input.value = String(typeof prop.default === "number" ? prop.default : randomSeed(min, max));
    const lock = el("input", { type: "checkbox", id: `${id}-lock`, checked: true });
    this.lockInput = lock;
    const dice = el("button", { type: "button", class: "tool", "aria-label": "Randomize seed", title: "New random seed", text: "Random" });
    input.addEventListener("input", () => this.changed(f.name));
    lock.addEventListener("change", () => {
      this.seedLocked = lock.checked;
      this.changed(f.name);
    });
    dice.addEventListener("click", () => {
      input.value = String(randomSeed(min, max));
      this.changed(f.name);
    });
    // An empty or half-typed number is sent as typed: the server names the problem instead of the page guessing.
    this.getters[f.name] = () => (input.value.trim() === "" ? undefined : Number(input.value));
    this.setters[f.name] = (v) => { input.value = String(v); };
    const head = el("div", { class: "control-head" }, [el("label", { for: id, text: f.label })]);
    const row = el("div", { class: "control-row" }, [
      input, dice, el("label", { class: "check", for: `${id}-lock` }, [lock, "lock"]),
    ]);
    this.wrap(f, [head, row], "Locked: the same seed for every frame, so the picture changes only with your input.");
  }

  size() {
    const v = this.values();
    return { width: v.width, height: v.height };
  }
}
