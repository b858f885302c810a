// The circuit view's logic apart from the page: where each box goes, how edges are drawn, the
// texts of a supernode and of the circuit's validation, and the edits (rename, merge, split) as the
// supernode lists that PUT /api/circuit takes. Plain data in, plain data out (node --test checks it).

import { fmt, percent, visibleText } from "./model.js";

export const BOX = { w: 190, h: 74 }; // a supernode's box
export const TOKEN = { w: 84, h: 26 }; // a prompt token's or the output's box
const GAP = { x: 26, y: 54 };
const MARGIN = 30;

/** A supernode's row key: its mean layer, to one decimal. */
const level = (sn) => Math.round((10 * sn.layers.reduce((a, b) => a + b, 0)) / Math.max(1, sn.layers.length)) / 10;

/** Boxes and edges of `circuit` (circuit.json): tokens along the bottom by position, supernodes above
 * them at their position, in rows by mean layer (lowest first), the output on top over the last
 * column. Returns {boxes: Map id -> {id, kind, x, y, w, h, item}, edges, width, height}, y down. */
export function circuitLayout(circuit) {
  const supernodes = circuit.supernodes || [];
  const inputs = circuit.inputs || [];
  const outputs = circuit.outputs || [];
  const positions = [...new Set([...inputs.map((e) => e.pos), ...supernodes.map((s) => s.pos)])].sort((a, b) => a - b);
  const column = new Map(positions.map((p, i) => [p, i]));
  const levels = [...new Set(supernodes.map(level))].sort((a, b) => a - b);
  const row = new Map(levels.map((l, i) => [l, i + 1])); // row 0: the tokens
  const cells = new Map(); // "row,col" -> supernodes, stable by id
  for (const sn of supernodes) {
    const key = `${row.get(level(sn))},${column.get(sn.pos)}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(sn);
  }
  const slots = positions.map(() => 0); // boxes side by side in the column's most crowded cell
  for (const [key, list] of cells) {
    const col = Number(key.split(",")[1]);
    slots[col] = Math.max(slots[col], list.length);
  }
  // a column is as wide as its boxes, or as a token where it has none
  const colWidth = slots.map((n) => (n ? n * (BOX.w + GAP.x) - GAP.x : TOKEN.w));
  const colX = [];
  let x = MARGIN;
  for (const w of colWidth) {
    colX.push(x);
    x += w + GAP.x;
  }
  const width = Math.max(x - GAP.x + MARGIN, 2 * MARGIN + BOX.w);
  const nRows = levels.length + 2;
  const rowY = (r) => MARGIN + (nRows - 1 - r) * (BOX.h + GAP.y); // row 0 at the bottom
  const colCentre = (col) => colX[col] + colWidth[col] / 2;
  const boxes = new Map();
  for (const [key, list] of cells) {
    const [r, col] = key.split(",").map(Number);
    list.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    list.forEach((sn, i) => {
      boxes.set(sn.id, { id: sn.id, kind: "supernode", x: colX[col] + i * (BOX.w + GAP.x), y: rowY(r), w: BOX.w, h: BOX.h, item: sn });
    });
  }
  for (const e of inputs) {
    const cx = colCentre(column.get(e.pos));
    boxes.set(e.id, { id: e.id, kind: "input", x: cx - TOKEN.w / 2, y: rowY(0) + BOX.h - TOKEN.h, w: TOKEN.w, h: TOKEN.h, item: e });
  }
  const last = positions.length ? colCentre(positions.length - 1) : width / 2;
  outputs.forEach((o, i) => {
    const cx = last + (i - (outputs.length - 1) / 2) * (TOKEN.w + GAP.x);
    boxes.set(o.id, { id: o.id, kind: "output", x: cx - TOKEN.w / 2, y: rowY(nRows - 1), w: TOKEN.w, h: TOKEN.h, item: o });
  });
  const edges = (circuit.edges || []).filter((e) => boxes.has(e.source) && boxes.has(e.target));
  return { boxes, edges, width, height: rowY(0) + BOX.h + MARGIN };
}

/** The largest |weight| of `edges`, or 1 without any. */
const maxWeight = (edges) => edges.reduce((m, e) => Math.max(m, Math.abs(e.weight)), 0) || 1;

/** Where on its box's side the k-th of n edges attaches: spread over the middle 60%, in order. */
const port = (box, k, n) => box.x + box.w * (0.2 + 0.6 * (n === 1 ? 0.5 : k / (n - 1)));

/** Each edge's SVG path (from the top of its source to the bottom of its target, a smooth curve;
 * a box's edges leave and arrive side by side, ordered by where their other ends are, so that they
 * do not cross at the box), stroke width (1 to 9 px by |weight|, the strongest widest) and sign. */
export function edgeShapes(layout) {
  const biggest = maxWeight(layout.edges);
  const box = (id) => layout.boxes.get(id);
  const centre = (id) => box(id).x + box(id).w / 2;
  const ends = (key, other) => {
    const byBox = new Map();
    layout.edges.forEach((e, i) => {
      if (!byBox.has(e[key])) byBox.set(e[key], []);
      byBox.get(e[key]).push(i);
    });
    const at = new Array(layout.edges.length);
    for (const [id, list] of byBox) {
      list.sort((a, b) => centre(layout.edges[a][other]) - centre(layout.edges[b][other]) || a - b);
      list.forEach((e, k) => (at[e] = port(box(id), k, list.length)));
    }
    return at;
  };
  const starts = ends("source", "target");
  const stops = ends("target", "source");
  return layout.edges.map((e, i) => {
    const y1 = box(e.source).y;
    const y2 = box(e.target).y + box(e.target).h;
    const bend = Math.max(20, Math.abs(y1 - y2) / 2);
    const [x1, x2] = [starts[i], stops[i]];
    return {
      ...e,
      d: `M${x1},${y1} C${x1},${y1 - bend} ${x2},${y2 + bend} ${x2},${y2}`,
      width: 1 + 8 * Math.sqrt(Math.abs(e.weight) / biggest),
      sign: e.weight < 0 ? "neg" : "pos",
    };
  });
}

// -- texts -------------------------------------------------------------------------------------------

/** "L17" or "L17-18" for a supernode's layers. */
export const layerText = (layers) => (layers.length === 1 ? `L${layers[0]}` : `L${layers[0]}-${layers[layers.length - 1]}`);

/** A label score as text: the number, or "not scored". */
const score = (x) => (x === null || x === undefined ? "not scored" : fmt(x, 2));

/** What a supernode's labels say, for its panel: [[heading, text, score]], unclear ones marked. */
export function labelLines(sn) {
  const scores = sn.label_scores || {};
  const lines = [];
  if (sn.input_label) lines.push(["detects", sn.input_label, score(scores.input)]);
  if (sn.output_label) lines.push(["says", sn.output_label, score(scores.output)]);
  if (!lines.length) lines.push(["label", "none yet", ""]);
  return lines;
}

/** A probability change in percentage points, signed: "+1.2%", "−0.9%". */
export const deltaP = (x) => (x === null || x === undefined ? "–" : `${x < 0 ? "−" : "+"}${Math.abs(100 * x).toFixed(1)}%`);

/** A relative drop as a signed change: 0.263 is "−26.3%", −0.013 (a rise) "+1.3%". */
const relativeChange = (drop) => deltaP(-drop);

/** The validation of one supernode in words: the target's probability change when it is ablated,
 * predicted by the replacement model and measured on the model, and the steering test. */
export function validationLines(sn) {
  const v = sn.validation;
  if (!v || !v.ablate) return [sn.edited ? "changed since the last validation: Re-validate" : "not validated yet"];
  const a = v.ablate;
  const lines = [`ablated: p ${percent(a.p_before)} → ${percent(a.p_after)}`, `Δp predicted ${deltaP(a.predicted)}, actual ${deltaP(a.actual)}`];
  if (v.steer) lines.push(`steered ×${fmt(v.steer.factor ?? 0, 2)}: ${v.steer.tokens.map((t) => `“${visibleText(t)}”`).join(" ")} ${v.steer.passed ? "up (pass)" : "not up (fail)"}`);
  return lines;
}

/** The circuit's own numbers: [[what, value]] (ablating the circuit, random features, Pearson r). */
export function circuitNumbers(circuit) {
  const rows = [["target", `“${visibleText(circuit.target?.label ?? "")}”${circuit.target?.probability !== undefined ? ` (p ${percent(circuit.target.probability)})` : ""}`]];
  rows.push(["supernodes", String((circuit.supernodes || []).length)]);
  if (circuit.coverage !== undefined) rows.push(["coverage", percent(circuit.coverage)]);
  const v = circuit.validation;
  if (!v) {
    rows.push(["validation", circuit.edited ? "supernodes changed: Re-validate" : "not validated yet"]);
    return rows;
  }
  const c = v.circuit_ablation || {};
  const r = v.random_ablation || {};
  rows.push(["circuit ablated", `p ${percent(c.p_before)} → ${percent(c.p_after)} (${relativeChange(c.relative_drop)})`]);
  rows.push(["random ablated", `${r.n_features} features × ${r.draws} draws: p ${relativeChange(r.relative_drop_mean)} on average`]);
  rows.push(["ratio", v.ratio === null || v.ratio === undefined ? "– (random features did not lower p)" : `${fmt(v.ratio, 3)}×`]);
  rows.push(["Pearson r", v.pearson_r === null || v.pearson_r === undefined ? "– (needs 3 supernodes)" : fmt(v.pearson_r, 3)]);
  if (circuit.edited) rows.push(["note", "supernodes changed since: Re-validate"]);
  return rows;
}

// -- edits: each gives the supernode list PUT /api/circuit takes ---------------------------------------

/** The circuit's supernodes as an edit: [{id, name, members}]. */
export const editOf = (circuit) => circuit.supernodes.map(({ id, name, members }) => ({ id, name, members: [...members] }));

/** Supernode `id` renamed (any text; blank keeps the old name). */
export function renamed(edit, id, name) {
  const text = name.trim();
  return edit.map((s) => (s.id === id && text ? { ...s, name: text } : s));
}

/** Supernodes `ids` (two or more) merged into the first, which keeps its id; `name` or the first's. */
export function merged(edit, ids, name = "") {
  const chosen = edit.filter((s) => ids.includes(s.id));
  if (chosen.length < 2) throw new Error("select two or more supernodes to merge (Ctrl/⌘-click)");
  const first = edit.find((s) => s.id === ids[0]) || chosen[0];
  const members = [...new Set(ids.flatMap((id) => edit.find((s) => s.id === id)?.members ?? []))];
  const into = { id: first.id, name: name.trim() || first.name, members };
  return edit.filter((s) => !ids.includes(s.id) || s.id === first.id).map((s) => (s.id === first.id ? into : s));
}

/** An id not in `edit`: `base.2`, `base.3`, … (still a valid supernode name). */
export function freshId(edit, base) {
  const taken = new Set(edit.map((s) => s.id));
  let k = 2;
  while (taken.has(`${base}.${k}`)) k++;
  return `${base}.${k}`;
}

/** `members` moved out of supernode `id` into a new supernode named `name`, placed after it. */
export function splitOff(edit, id, members, name = "") {
  const from = edit.find((s) => s.id === id);
  if (!from) throw new Error(`no supernode ${id}`);
  const moving = from.members.filter((m) => members.includes(m));
  if (!moving.length || moving.length === from.members.length) throw new Error("tick some of its members, not all, to split them off");
  const fresh = { id: freshId(edit, id), name: name.trim() || `${from.name} (split)`, members: moving };
  const out = [];
  for (const s of edit) {
    out.push(s.id === id ? { ...s, members: s.members.filter((m) => !moving.includes(m)) } : s);
    if (s.id === id) out.push(fresh);
  }
  return out;
}
