// model.js: the explorer's logic apart from the page and the canvas.
import assert from "node:assert/strict";
import { test } from "node:test";

import { layout } from "../src/layout.js";
import {
  adjacency, applyClick, BUCKETS, DEFAULT_EDGES, defaultEdgeStep, describe, describeIntervention, edgeBucket, edgeSteps,
  fitTransform, fmt, interventionSpecs, jobProgress, maxAbsWeight, nearestNode, newIntervention, nodeGrid, pageKey,
  percent, quotedTokens, relabel, searchMatches, selectedFeatures, shade, strongestEdges, strongestFirst, togglePinned,
  visibleText, withoutSupernode, withSupernode, zoomTransform,
} from "../src/model.js";
import { graphNodes, random } from "./graphs.js";

const feature = (layer, index, pos, extra = {}) => ({ id: `${layer}_${index}_${pos}`, kind: "feature", layer, feature: index, pos, ...extra });

// -- texts -------------------------------------------------------------------------------------------

test("visibleText shows newlines, tabs and a leading space, and nothing else changes", () => {
  assert.equal(visibleText("a\nb\n"), "a⏎b⏎");
  assert.equal(visibleText("\tx\t"), "⇥x⇥");
  assert.equal(visibleText(" the"), "␣the");
  assert.equal(visibleText("  two"), "␣ two"); // only the first space: the token's own leading one
  assert.equal(visibleText("a b "), "a b ");
  assert.equal(visibleText(""), "");
  assert.equal(visibleText(null), "");
  assert.equal(visibleText(undefined), "");
  assert.equal(visibleText(7), "7");
});

test("fmt gives significant digits and a dash for a missing value", () => {
  assert.equal(fmt(0.123456), "0.123");
  assert.equal(fmt(1234.5), "1.23e+3");
  assert.equal(fmt(-2.5, 2), "-2.5");
  assert.equal(fmt(0), "0.00");
  assert.equal(fmt(null), "–");
  assert.equal(fmt(undefined), "–");
  assert.equal(percent(0.1234), "12.3%");
  assert.equal(percent(1), "100.0%");
});

test("quotedTokens quotes the first k token texts, whitespace made visible", () => {
  const list = [{ text: " a" }, { text: "b\n" }, { text: "c" }];
  assert.equal(quotedTokens(list, 2), "“␣a” “b⏎”");
  assert.equal(quotedTokens(list, 8), "“␣a” “b⏎” “c”");
  assert.equal(quotedTokens([], 5), "");
});

test("describe names each kind of node", () => {
  const tokens = ["<bos>", " The", "\n"];
  assert.equal(describe(feature(3, 17, 1), tokens), "feature 3:17");
  assert.equal(describe(feature(3, 17, 1, { label: "says hello" }), tokens), "says hello");
  assert.equal(describe({ kind: "error", layer: 2, pos: 1 }, tokens), "error of layer 2 at “␣The”");
  assert.equal(describe({ kind: "error", layer: 2, pos: 2 }, tokens), "error of layer 2 at “⏎”");
  assert.equal(describe({ kind: "error", layer: 2, pos: 9 }, tokens), "error of layer 2 at “9”"); // past the tokens: the position
  assert.equal(describe({ kind: "embedding", pos: 1, text: " The" }, tokens), "token “␣The”");
  assert.equal(describe({ kind: "logit", text: " cat", probability: 0.4567 }, tokens), "output “␣cat” (p = 45.7%)");
  assert.equal(pageKey(feature(3, 17, 1)), "3:17");
});

// -- selection, pins, supernodes ---------------------------------------------------------------------

test("a plain click selects one node; ctrl-click toggles; the background clears unless additive", () => {
  const selected = new Set();
  const [a, b] = [{ id: "a" }, { id: "b" }];
  assert.equal(applyClick(selected, null, a, false), "a");
  assert.deepEqual([...selected], ["a"]);
  assert.equal(applyClick(selected, "a", b, true), "b");
  assert.deepEqual([...selected], ["a", "b"]);
  assert.equal(applyClick(selected, "b", a, true), "a"); // toggled off, yet its panel shows
  assert.deepEqual([...selected], ["b"]);
  assert.equal(applyClick(selected, "a", null, true), "a"); // additive on the background: nothing changes
  assert.deepEqual([...selected], ["b"]);
  assert.equal(applyClick(selected, "a", a, false), "a");
  assert.deepEqual([...selected], ["a"]);
  assert.equal(applyClick(selected, "a", null, false), "a"); // the panel stays on the last node
  assert.deepEqual([...selected], []);
});

test("the selection is changed in place, since the view draws from the same Set", () => {
  const selected = new Set(["x"]);
  const shared = selected;
  applyClick(selected, null, { id: "y" }, false);
  assert.equal(shared, selected);
  assert.deepEqual([...shared], ["y"]);
});

test("togglePinned adds at the end or takes out, leaving the old list as it was", () => {
  const pins = ["a", "b"];
  assert.deepEqual(togglePinned(pins, "c"), ["a", "b", "c"]);
  assert.deepEqual(togglePinned(pins, "a"), ["b"]);
  assert.deepEqual(pins, ["a", "b"]);
  assert.deepEqual(togglePinned([], "a"), ["a"]);
});

test("selectedFeatures keeps the selected feature nodes that are in the graph, in selection order", () => {
  const nodes = new Map([
    ["f2", { kind: "feature" }],
    ["f1", { kind: "feature" }],
    ["e", { kind: "error" }],
    ["t", { kind: "embedding" }],
  ]);
  const nodeById = (id) => nodes.get(id) ?? null;
  assert.deepEqual(selectedFeatures(new Set(["f2", "e", "gone", "f1", "t"]), nodeById), ["f2", "f1"]);
  assert.deepEqual(selectedFeatures(new Set(), nodeById), []);
});

test("a supernode is defined once by name: a new definition replaces the old and goes last", () => {
  const old = [
    { name: "A", members: ["1"] },
    { name: "B", members: ["2"] },
  ];
  assert.deepEqual(withSupernode(old, "C", ["3"]), [...old, { name: "C", members: ["3"] }]);
  assert.deepEqual(withSupernode(old, "A", ["4", "5"]), [
    { name: "B", members: ["2"] },
    { name: "A", members: ["4", "5"] },
  ]);
  assert.equal(old.length, 2);
});

test("ungrouping a supernode drops the interventions on it and keeps the rest", () => {
  const supernodes = [
    { name: "A", members: ["1"] },
    { name: "B", members: ["2"] },
  ];
  const interventions = [
    { supernode: "A", mode: "scale", value: 0 },
    { node: "1", mode: "set", value: 2 },
    { supernode: "B", mode: "scale", value: 3 },
  ];
  const after = withoutSupernode(supernodes, interventions, "A");
  assert.deepEqual(after.supernodes, [{ name: "B", members: ["2"] }]);
  assert.deepEqual(after.interventions, interventions.slice(1));
  assert.deepEqual(withoutSupernode(supernodes, interventions, "Z"), { supernodes, interventions });
});

test("search matches labels, or texts when unlabelled, ignoring case and outer spaces", () => {
  const nodes = [
    feature(1, 5, 0, { label: "Capital Letters" }),
    feature(1, 6, 0, { label: "digits", text: "capital" }), // a label hides the text from search
    { id: "E_0", kind: "embedding", text: " Capitals" },
    { id: "0_1_0", kind: "error" },
  ];
  assert.deepEqual([...searchMatches(nodes, "  CAPITAL ")], ["1_5_0", "E_0"]);
  assert.deepEqual([...searchMatches(nodes, "digit")], ["1_6_0"]);
  assert.deepEqual([...searchMatches(nodes, "   ")], []);
  assert.deepEqual([...searchMatches(nodes, "")], []);
  assert.deepEqual([...searchMatches(nodes, "nowhere")], []);
});

test("relabel names a feature on every position it is active at, and no other feature", () => {
  const nodes = [feature(2, 7, 0), feature(2, 7, 3), feature(3, 7, 0), feature(2, 8, 0), { id: "0_2_0", kind: "error", layer: 2 }];
  relabel(nodes, 2, 7, "greeting");
  assert.deepEqual(
    nodes.map((n) => n.label),
    ["greeting", "greeting", undefined, undefined, undefined],
  );
});

// -- interventions -----------------------------------------------------------------------------------

test("interventions start as switching off, and reach the API as node or supernode specs", () => {
  assert.deepEqual(newIntervention({ node: "1_5_0" }), { node: "1_5_0", mode: "scale", value: 0 });
  assert.deepEqual(newIntervention({ supernode: "S" }), { supernode: "S", mode: "scale", value: 0 });
  const list = [
    { node: "1_5_0", mode: "set", value: 3 },
    { supernode: "S", mode: "scale", value: -1 },
  ];
  assert.deepEqual(interventionSpecs(list), list);
  assert.deepEqual(Object.keys(interventionSpecs([{ node: "n", mode: "scale", value: 0, extra: 1 }])[0]), ["node", "mode", "value"]);
});

test("describeIntervention names its node, a node the threshold hides, or its supernode", () => {
  const nodes = new Map([["1_5_0", feature(1, 5, 0, { label: "fives" })]]);
  const nodeById = (id) => nodes.get(id) ?? null;
  assert.equal(describeIntervention({ node: "1_5_0" }, nodeById, []), "fives");
  assert.equal(describeIntervention({ node: "9_9_9" }, nodeById, []), "feature ?:?");
  assert.equal(describeIntervention({ supernode: "S" }, nodeById, []), "supernode S");
});

test("jobProgress shows the stage, the rows when known, and whole seconds", () => {
  assert.equal(jobProgress({ stage: "queued", total: 0, done: 0, elapsed_s: 0.4 }), "queued · 0 s");
  assert.equal(jobProgress({ stage: "attribution", total: 40, done: 12, elapsed_s: 7.6 }), "attribution · 12 of 40 rows · 8 s");
});

test("shade is an activation's share of the maximum, clamped to 0..1", () => {
  assert.equal(shade(2, 4), "0.500");
  assert.equal(shade(5, 4), "1.000");
  assert.equal(shade(-1, 4), "0.000");
  assert.equal(shade(0, 0), "0.000"); // a feature that never fired: no division by zero
});

// -- edges -------------------------------------------------------------------------------------------

test("maxAbsWeight is the largest magnitude, or 1 without edges", () => {
  assert.equal(maxAbsWeight([0.5, -2, 1]), 2);
  assert.equal(maxAbsWeight(new Float32Array([0.25, -0.5])), 0.5);
  assert.equal(maxAbsWeight([]), 1);
  assert.equal(maxAbsWeight([0, 0]), 1);
});

test("edgeBucket puts positive edges first, negative after, stronger in higher classes", () => {
  assert.equal(edgeBucket(2, 2), BUCKETS - 1); // the strongest edge: the top class, not past it
  assert.equal(edgeBucket(-2, 2), 2 * BUCKETS - 1);
  assert.equal(edgeBucket(0, 2), 0);
  assert.equal(edgeBucket(-1e-12, 2), BUCKETS);
  assert.equal(edgeBucket(-0, 2), 0); // a zero weight is drawn as a positive one
  let last = -1;
  for (let w = 0.01; w <= 1; w += 0.01) {
    const b = edgeBucket(w, 1);
    assert.ok(b >= last && b < BUCKETS);
    assert.equal(edgeBucket(-w, 1), b + BUCKETS);
    last = b;
  }
  assert.equal(edgeBucket(1 / 36, 1), 1); // sqrt: a 36th of the maximum is a sixth of the strength
});

const randomEdges = (nNodes, nEdges, seed) => {
  const rand = random(seed);
  const source = [];
  const target = [];
  const weight = [];
  for (let e = 0; e < nEdges; e++) {
    const a = Math.floor(rand() * nNodes);
    let b = Math.floor(rand() * nNodes);
    if (b === a) b = (a + 1) % nNodes;
    source.push(a);
    target.push(b);
    weight.push(rand() * 2 - 1);
  }
  return { source, target, weight };
};

test("strongestFirst orders edges by |weight|, ties in edge order, as a plain sort of pairs does", () => {
  for (const seed of [1, 2, 3]) {
    const { weight } = randomEdges(50, 500, seed);
    weight[7] = weight[3]; // a tie
    weight[9] = -weight[3]; // a tie across signs
    const expected = weight.map((w, e) => [Math.abs(w), e]).sort((a, b) => b[0] - a[0] || a[1] - b[1]).map(([, e]) => e);
    assert.deepEqual([...strongestFirst(weight)], expected);
    assert.deepEqual([...strongestFirst(new Float32Array(weight))].length, 500);
  }
  assert.deepEqual([...strongestFirst([])], []);
});

test("the edge slider's steps rise to the graph's own count, the default a few hundred", () => {
  for (const total of [0, 10, 300, 301, 97544, 1e6]) {
    const steps = edgeSteps(total);
    assert.equal(steps[steps.length - 1], total, "the last step draws every edge");
    for (let i = 1; i < steps.length; i++) assert.ok(steps[i] > steps[i - 1], "strictly rising");
    const d = steps[defaultEdgeStep(steps)];
    assert.equal(d, Math.min(DEFAULT_EDGES, total));
  }
  assert.equal(DEFAULT_EDGES, 300);
  assert.deepEqual(edgeSteps(120), [0, 25, 50, 100, 120]);
});

test("adjacency lists each edge under both of its ends", () => {
  const edges = randomEdges(30, 200, 11);
  const adj = adjacency(30, edges.source, edges.target);
  assert.equal(adj.length, 30);
  for (let i = 0; i < 30; i++) {
    const expected = [];
    for (let e = 0; e < 200; e++) if (edges.source[e] === i || edges.target[e] === i) expected.push(e);
    assert.deepEqual(adj[i], expected);
  }
  assert.deepEqual(adjacency(3, [], []), [[], [], []]);
});

test("strongestEdges gives a node's k strongest inputs and outputs by |weight|", () => {
  const nodes = Array.from({ length: 30 }, (_, i) => ({ id: `n${i}` }));
  const edges = randomEdges(30, 300, 12);
  const adj = adjacency(30, edges.source, edges.target);
  for (const k of [1, 3, 8, 100]) {
    for (let i = 0; i < 30; i++) {
      const { inputs, outputs } = strongestEdges(i, adj[i], nodes, edges, k);
      const expect = (mine, other) => {
        const all = [];
        for (let e = 0; e < 300; e++) if (mine[e] === i) all.push({ node: nodes[other[e]], weight: edges.weight[e] });
        return all.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, k);
      };
      assert.deepEqual(inputs, expect(edges.target, edges.source));
      assert.deepEqual(outputs, expect(edges.source, edges.target));
    }
  }
});

// -- hit testing and the view ------------------------------------------------------------------------

test("nearestNode finds the closest shown node within reach, as a search of every node does", () => {
  const nodes = graphNodes({ nLayers: 5, nPos: 6, nFeatures: 200, crowd: 20, nLogits: 4, seed: 13 });
  const bounds = layout(nodes, 5, 6);
  const cell = 24;
  const grid = nodeGrid(nodes, cell);
  assert.equal([...grid.values()].flat().length, nodes.length);
  const hidden = new Set(nodes.filter((_, i) => i % 5 === 0).map((n) => n.id));
  const rand = random(14);
  for (const [reach, isShown] of [
    [6, () => true],
    [24, () => true],
    [10, (n) => !hidden.has(n.id)],
  ]) {
    for (let t = 0; t < 2000; t++) {
      const wx = rand() * bounds.width;
      const wy = rand() * bounds.height;
      let best = null;
      let bestD = reach * reach;
      for (const n of nodes) {
        const d = (n.x - wx) ** 2 + (n.y - wy) ** 2;
        if (isShown(n) && d < bestD) [best, bestD] = [n, d];
      }
      assert.equal(nearestNode(grid, cell, nodes, wx, wy, reach, isShown), best);
    }
  }
  const n = nodes[7];
  assert.equal(nearestNode(grid, cell, nodes, n.x + 1, n.y, 6, () => true), n);
  assert.equal(nearestNode(grid, cell, nodes, n.x + 1, n.y, 6, (m) => m !== n) === n, false);
});

test("fitTransform centres the whole graph on the screen with a margin", () => {
  const bounds = { width: 1000, height: 400 };
  const { scale, tx, ty } = fitTransform(bounds, 800, 600);
  assert.equal(scale, (800 - 120) / 1000); // the width limits it
  assert.equal(tx, 60);
  assert.ok(Math.abs(ty + bounds.height * scale - (600 - ty)) < 1e-9); // as much room below as above
  assert.equal(fitTransform({ width: 10, height: 10 }, 800, 600).scale, 2.5); // a tiny graph: at most 2.5x
  assert.equal(fitTransform({ width: 1e7, height: 10 }, 800, 600).scale, 0.02); // a huge one: at least 0.02x
});

test("zooming keeps the world point under the cursor in place, within the zoom limits", () => {
  const before = { scale: 1.5, tx: -40, ty: 25 };
  const [sx, sy] = [300, 200];
  const world = [(sx - before.tx) / before.scale, (sy - before.ty) / before.scale];
  for (const factor of [0.5, 0.9, 1, 1.1, 3]) {
    const after = zoomTransform(before, factor, sx, sy);
    assert.ok(Math.abs(after.scale - before.scale * factor) < 1e-12);
    assert.ok(Math.abs(world[0] * after.scale + after.tx - sx) < 1e-9);
    assert.ok(Math.abs(world[1] * after.scale + after.ty - sy) < 1e-9);
  }
  assert.equal(zoomTransform(before, 100, sx, sy).scale, 20);
  assert.equal(zoomTransform(before, 1e-6, sx, sy).scale, 0.02);
  assert.deepEqual(before, { scale: 1.5, tx: -40, ty: 25 });
});
