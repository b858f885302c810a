// circuit.js: the circuit view's layout, texts and edits.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  BOX, circuitLayout, circuitNumbers, deltaP, edgeShapes, editOf, freshId, labelLines, layerText, merged, renamed, splitOff,
  TOKEN, validationLines,
} from "../src/circuit.js";

const sn = (id, layers, pos, extra = {}) => ({
  id, name: `name ${id}`, layers, pos, members: layers.map((l, i) => `${l}_${10 * Number(id.slice(1)) + i}_${pos}`), effect: 0.1, ...extra,
});

/** A circuit shaped like circuit.json: tokens at 2 and 5, supernodes at several layers and positions. */
function circuit() {
  return {
    prompt: "a b (c",
    tokens: ["<bos>", "a", " b", " (", "c", "d"],
    target: { label: "D", probability: 0.4 },
    coverage: 0.8,
    supernodes: [sn("s0", [1], 2), sn("s1", [3, 4], 5), sn("s2", [3, 4], 5, { effect: -0.2 }), sn("s3", [8], 5), sn("s4", [1], 5)],
    inputs: [{ id: "e2", token: " b", pos: 2 }, { id: "e5", token: "d", pos: 5 }],
    outputs: [{ id: "out", label: "D" }],
    edges: [
      { source: "e2", target: "s0", weight: 0.5 },
      { source: "s0", target: "s1", weight: 0.3 },
      { source: "s1", target: "out", weight: -0.9 },
      { source: "s3", target: "out", weight: 0.9 },
      { source: "s4", target: "ghost", weight: 1 }, // an end that is not in the circuit: not drawn
    ],
    validation: null,
  };
}

const centreX = (b) => b.x + b.w / 2;
const overlaps = (a, b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h;

test("tokens at the bottom, the output on top, supernodes between them by mean layer", () => {
  const { boxes, width, height } = circuitLayout(circuit());
  const all = [...boxes.values()];
  const out = boxes.get("out");
  for (const b of all) {
    assert.ok(b.x >= 0 && b.y >= 0 && b.x + b.w <= width && b.y + b.h <= height, `${b.id} inside`);
    if (b.kind === "supernode") {
      assert.ok(b.y > out.y, "below the output");
      for (const e of ["e2", "e5"]) assert.ok(b.y < boxes.get(e).y, "above the tokens");
    }
  }
  // higher mean layer, higher on the page (smaller y); equal mean layers share a row
  const y = (id) => boxes.get(id).y;
  assert.ok(y("s4") > y("s1") && y("s1") > y("s3"));
  assert.equal(y("s1"), y("s2"));
  assert.equal(y("s0"), y("s4"));
  assert.equal(y("e2"), y("e5"));
});

test("columns are positions left to right, no two boxes overlap, and a token sits under its column", () => {
  const { boxes } = circuitLayout(circuit());
  const all = [...boxes.values()];
  for (let i = 0; i < all.length; i++) for (let j = i + 1; j < all.length; j++) assert.ok(!overlaps(all[i], all[j]), `${all[i].id} / ${all[j].id}`);
  assert.ok(centreX(boxes.get("s0")) < centreX(boxes.get("s1")));
  assert.ok(boxes.get("s0").x + BOX.w <= boxes.get("s1").x, "position 2 wholly left of position 5");
  // the cell (layers 3-4, position 5) holds two boxes side by side, so its column is two boxes wide
  assert.equal(boxes.get("s2").x - boxes.get("s1").x > BOX.w, true);
  assert.ok(Math.abs(centreX(boxes.get("e2")) - centreX(boxes.get("s0"))) < 1, "a lone box is centred over its token");
  assert.equal(boxes.get("e2").w, TOKEN.w);
  assert.ok(centreX(boxes.get("out")) > centreX(boxes.get("e2")), "the output over the last position");
});

test("the layout does not depend on the order of the supernodes in the file", () => {
  const a = circuitLayout(circuit());
  const c = circuit();
  c.supernodes.reverse();
  const b = circuitLayout(c);
  for (const [id, box] of a.boxes) assert.deepEqual([box.x, box.y], [b.boxes.get(id).x, b.boxes.get(id).y], id);
});

test("edges join the top of the source to the bottom of the target, wider when stronger, signed", () => {
  const layout = circuitLayout(circuit());
  const shapes = edgeShapes(layout);
  assert.deepEqual(shapes.map((s) => s.target), ["s0", "s1", "out", "out"]); // the edge to a missing end is left out
  const [toS0, , neg, pos] = shapes;
  const a = layout.boxes.get("e2");
  const b = layout.boxes.get("s0");
  // a box's only edge on a side attaches at the middle of that side
  assert.ok(toS0.d.startsWith(`M${a.x + a.w / 2},${a.y} `) && toS0.d.endsWith(` ${b.x + b.w / 2},${b.y + b.h}`));
  // two edges into "out": side by side on its bottom, the one from further left on the left
  const end = (s) => s.d.split(" ").at(-1).split(",").map(Number);
  const out = layout.boxes.get("out");
  const [xn, yn] = end(neg);
  const [xp, yp] = end(pos);
  assert.equal(yn, out.y + out.h);
  assert.equal(yp, out.y + out.h);
  assert.ok(xn > out.x && xp < out.x + out.w && xn !== xp);
  const cx = (id) => centreX(layout.boxes.get(id));
  assert.equal(xn < xp, cx("s1") <= cx("s3")); // on a tie, in edge order: s1's edge is listed first
  assert.equal(neg.sign, "neg");
  assert.equal(pos.sign, "pos");
  assert.equal(neg.width, pos.width); // |weight| alone sets the width
  assert.equal(pos.width, 9); // the strongest
  assert.ok(toS0.width < pos.width && toS0.width > 1);
  assert.deepEqual(edgeShapes(circuitLayout({ supernodes: [], inputs: [], outputs: [], edges: [] })), []);
});

test("a circuit without supernodes or tokens still lays out", () => {
  const { boxes, width, height } = circuitLayout({ supernodes: [], inputs: [], outputs: [{ id: "out", label: "x" }], edges: [] });
  assert.equal(boxes.size, 1);
  assert.ok(width > 0 && height > 0 && Number.isFinite(boxes.get("out").x));
});

test("texts: layers, labels with scores or unclear, validation or why there is none", () => {
  assert.equal(deltaP(-0.0091), "−0.9%");
  assert.equal(deltaP(0.2), "+20.0%");
  assert.equal(deltaP(null), "–");
  assert.equal(layerText([17]), "L17");
  assert.equal(layerText([3, 5, 9]), "L3-9");
  const s = sn("s0", [1], 2, { input_label: "'(' before an acronym", output_label: "says 'DA'", label_scores: { input: 0.86, output: null } });
  assert.deepEqual(labelLines(s), [["detects", "'(' before an acronym", "0.86"], ["says", "says 'DA'", "not scored"]]);
  assert.deepEqual(labelLines(sn("s1", [1], 2)), [["label", "none yet", ""]]);
  assert.deepEqual(validationLines(s), ["not validated yet"]);
  assert.deepEqual(validationLines({ ...s, edited: true, validation: null }), ["changed since the last validation: Re-validate"]);
  const v = { ablate: { predicted: -0.31, actual: -0.28, p_before: 0.41, p_after: 0.13 }, steer: { tokens: ["DA"], factor: 2, passed: true } };
  assert.deepEqual(validationLines({ ...s, validation: v }), ["ablated: p 41.0% → 13.0%", "Δp predicted −31.0%, actual −28.0%", "steered ×2.0: “DA” up (pass)"]);
});

test("the circuit's numbers: before validation, after it, and once edited", () => {
  const c = circuit();
  assert.deepEqual(circuitNumbers(c).map((r) => r[0]), ["target", "supernodes", "coverage", "validation"]);
  assert.equal(circuitNumbers(c)[3][1], "not validated yet");
  c.validation = {
    circuit_ablation: { p_before: 0.41, p_after: 0.05, relative_drop: 0.88 },
    random_ablation: { n_features: 14, draws: 3, relative_drop_mean: 0.02 },
    ratio: 44,
    pearson_r: 0.91,
  };
  const rows = Object.fromEntries(circuitNumbers(c));
  assert.equal(rows["circuit ablated"], "p 41.0% → 5.0% (−88.0%)");
  assert.equal(rows["random ablated"], "14 features × 3 draws: p −2.0% on average");
  assert.equal(rows.ratio, "44.0×");
  assert.equal(rows["Pearson r"], "0.910");
  assert.equal(rows.target, "“D” (p 40.0%)");
  assert.equal(rows.note, undefined);
  c.edited = true;
  assert.equal(Object.fromEntries(circuitNumbers(c)).note, "supernodes changed since: Re-validate");
  c.validation.pearson_r = null;
  assert.match(Object.fromEntries(circuitNumbers(c))["Pearson r"], /needs 3/);
  c.validation.random_ablation.relative_drop_mean = -0.013; // random features raised p
  c.validation.ratio = null;
  assert.equal(Object.fromEntries(circuitNumbers(c))["random ablated"], "14 features × 3 draws: p +1.3% on average");
  assert.match(Object.fromEntries(circuitNumbers(c)).ratio, /did not lower/);
});

test("rename changes one name, ignores a blank one, and leaves the input alone", () => {
  const edit = editOf(circuit());
  const r = renamed(edit, "s1", "  says D  ");
  assert.equal(r[1].name, "says D");
  assert.deepEqual(r.filter((_, i) => i !== 1), edit.filter((_, i) => i !== 1));
  assert.deepEqual(renamed(edit, "s1", "   "), edit);
  assert.equal(edit[1].name, "name s1");
});

test("merge unions the members into the first selected, which keeps its id and place", () => {
  const edit = editOf(circuit());
  const m = merged(edit, ["s3", "s0"], "");
  assert.deepEqual(m.map((s) => s.id), ["s1", "s2", "s3", "s4"]);
  assert.deepEqual(m[2], { id: "s3", name: "name s3", members: [...edit[3].members, ...edit[0].members] });
  assert.equal(merged(edit, ["s0", "s1", "s2"], "late")[0].name, "late");
  assert.equal(merged(edit, ["s0", "s1", "s2"])[0].members.length, 5);
  assert.throws(() => merged(edit, ["s0"]), /two or more/);
  assert.throws(() => merged(edit, ["s0", "nope"]), /two or more/);
});

test("split moves the ticked members into a new supernode after it; none or all is refused; ids stay fresh", () => {
  const edit = editOf(circuit());
  const [a, b] = edit[1].members;
  const s = splitOff(edit, "s1", [b], "second half");
  assert.deepEqual(s.map((x) => x.id), ["s0", "s1", "s1.2", "s2", "s3", "s4"]);
  assert.deepEqual(s[1].members, [a]);
  assert.deepEqual(s[2], { id: "s1.2", name: "second half", members: [b] });
  assert.equal(splitOff(edit, "s1", [a])[2].name, "name s1 (split)");
  assert.throws(() => splitOff(edit, "s1", []), /not all/);
  assert.throws(() => splitOff(edit, "s1", [a, b]), /not all/);
  assert.throws(() => splitOff(edit, "s1", ["9_9_9"]), /not all/);
  assert.throws(() => splitOff(edit, "zz", [a]), /no supernode/);
  assert.equal(freshId(s, "s1"), "s1.3");
  assert.equal(freshId(edit, "s1"), "s1.2");
});
