// layout.js: where each node of a graph goes on the canvas.
import assert from "node:assert/strict";
import { test } from "node:test";

import { layout, SPACING } from "../src/layout.js";
import { graphNodes, rowOf } from "./graphs.js";

const SHAPES = [
  { nLayers: 4, nPos: 5, nFeatures: 40, seed: 1 },
  { nLayers: 2, nPos: 1, nFeatures: 3, nLogits: 1, seed: 2 },
  { nLayers: 6, nPos: 9, nFeatures: 300, crowd: 30, nLogits: 10, seed: 3 },
  { nLayers: 12, nPos: 40, nFeatures: 2000, nLogits: 5, seed: 4 }, // a long prompt
];

const placed = (shape) => {
  const nodes = graphNodes(shape);
  const bounds = layout(nodes, shape.nLayers, shape.nPos);
  return { nodes, bounds };
};

const cellsOf = (nodes, nLayers) => {
  const cells = new Map();
  for (const n of nodes) {
    const key = `${rowOf(n, nLayers)},${n.pos}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  return [...cells.values()];
};

test("every node gets a finite position inside the returned bounds", () => {
  for (const shape of SHAPES) {
    const { nodes, bounds } = placed(shape);
    for (const n of nodes) {
      assert.ok(Number.isFinite(n.x) && Number.isFinite(n.y), `${n.id} at (${n.x}, ${n.y})`);
      assert.ok(n.x >= 0 && n.x <= bounds.width, `${n.id}: x ${n.x} outside 0..${bounds.width}`);
      assert.ok(n.y >= 0 && n.y <= bounds.height, `${n.id}: y ${n.y} outside 0..${bounds.height}`);
    }
    assert.equal(bounds.rows.length, shape.nLayers + 2);
    assert.equal(bounds.columns.length, shape.nPos);
  }
});

test("nodes sharing a cell keep at least the spacing between them", () => {
  for (const shape of SHAPES) {
    const { nodes } = placed(shape);
    for (const members of cellsOf(nodes, shape.nLayers))
      for (let i = 0; i < members.length; i++)
        for (let j = i + 1; j < members.length; j++) {
          const [a, b] = [members[i], members[j]];
          const d = Math.hypot(a.x - b.x, a.y - b.y);
          assert.ok(d >= SPACING - 1e-9, `${a.id} and ${b.id} are ${d} apart`);
        }
  }
});

test("rows are the layers in order: embeddings at the bottom, then layer 0 up, logits on top", () => {
  for (const shape of SHAPES) {
    const { nodes, bounds } = placed(shape);
    for (const a of nodes)
      for (const b of nodes)
        if (rowOf(a, shape.nLayers) < rowOf(b, shape.nLayers)) assert.ok(a.y > b.y, `${a.id} (y ${a.y}) is not below ${b.id} (y ${b.y})`);
    // the rows tile the height from the top (logits) down to the embeddings
    let y = 0;
    for (let r = bounds.rows.length - 1; r >= 0; r--) {
      assert.equal(bounds.rows[r].y, y);
      y += bounds.rows[r].height;
    }
    assert.equal(y, bounds.height);
  }
});

test("columns are the token positions left to right, and each cell stays inside its column", () => {
  for (const shape of SHAPES) {
    const { nodes, bounds } = placed(shape);
    let x = 0;
    for (const col of bounds.columns) {
      assert.equal(col.x, x);
      x += col.width;
    }
    for (const n of nodes) {
      if (n.kind === "logit") continue; // outputs may spread past their column, under their rotated labels
      const col = bounds.columns[n.pos];
      assert.ok(n.x > col.x && n.x < col.x + col.width, `${n.id} at x ${n.x} outside column ${n.pos}`);
    }
  }
});

test("a crowded cell wraps onto lines of at most 12 nodes, features by index, the error node last", () => {
  const shape = { nLayers: 3, nPos: 4, nFeatures: 0, crowd: 30, seed: 5 };
  const { nodes } = placed(shape);
  const cell = nodes.filter((n) => n.layer === 1 && n.pos === 2);
  assert.equal(cell.length, 31);
  const lines = new Map();
  for (const n of cell) lines.set(n.y, [...(lines.get(n.y) || []), n]);
  const topDown = [...lines.entries()].sort((a, b) => a[0] - b[0]).map(([, line]) => line.sort((a, b) => a.x - b.x));
  assert.deepEqual(
    topDown.map((line) => line.length),
    [12, 12, 7],
  );
  for (let i = 1; i < topDown.length; i++) assert.equal(topDown[i][0].y - topDown[i - 1][0].y, SPACING);
  const reading = topDown.flat();
  assert.deepEqual(
    reading.map((n) => n.id),
    [...cell.filter((n) => n.kind === "feature").sort((a, b) => a.feature - b.feature), ...cell.filter((n) => n.kind === "error")].map((n) => n.id),
  );
});

test("outputs spread along the top, the most probable first", () => {
  const shape = { nLayers: 3, nPos: 4, nFeatures: 5, nLogits: 6, seed: 6 };
  const { nodes } = placed(shape);
  const logits = nodes.filter((n) => n.kind === "logit").sort((a, b) => a.x - b.x);
  for (let i = 1; i < logits.length; i++) {
    assert.ok(logits[i - 1].probability >= logits[i].probability);
    assert.equal(logits[i].y, logits[0].y);
  }
});

test("a long prompt gets taller rows, so that the graph is about half as high as wide, up to a limit", () => {
  const tall = (nPos) => {
    const shape = { nLayers: 6, nPos, nFeatures: 0, nLogits: 0, seed: 7 };
    const { bounds } = placed(shape);
    const columns = bounds.columns.reduce((sum, c) => sum + c.width, 0);
    return { columns, height: bounds.height, gap: bounds.rows[0].height };
  };
  assert.equal(tall(3).gap, 44); // a short prompt: the least row gap
  const long = tall(30);
  assert.ok(Math.abs(long.height - 0.5 * long.columns) < 1e-9, `${long.columns} x ${long.height}`);
  assert.equal(tall(300).gap, 240); // a very long one: rows stop growing
});

test("the layout depends on the nodes alone, not on their order in the list", () => {
  const shape = { nLayers: 5, nPos: 6, nFeatures: 120, crowd: 15, nLogits: 4, seed: 8 };
  const a = graphNodes(shape);
  const b = graphNodes(shape).reverse();
  layout(a, shape.nLayers, shape.nPos);
  layout(b, shape.nLayers, shape.nPos);
  const where = (nodes) => Object.fromEntries(nodes.map((n) => [n.id, [n.x, n.y]]));
  assert.deepEqual(where(a), where(b));
});
