// What the explorer computes, apart from the page and the canvas: texts, selection and pins, search,
// supernodes and interventions, edge strengths and neighbours, hit testing and the zoom. Plain data
// in, plain data out (or a Set changed in place where the view shares it), so node's test runner
// can check it without a browser.

export const BUCKETS = 6; // edge strength classes, one stroke() each

/** Whitespace made visible, as token texts need. */
export function visibleText(text) {
  return String(text ?? "").replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/^ /, "␣");
}

/** A number to `digits` significant digits; a dash for a missing one. */
export const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toPrecision(digits));

/** A probability as a percentage with one decimal. */
export const percent = (p) => `${(100 * p).toFixed(1)}%`;

/** Token texts in curly quotes, the first `k` of them. */
export const quotedTokens = (list, k) =>
  list
    .slice(0, k)
    .map((t) => `“${visibleText(t.text)}”`)
    .join(" ");

/** Where a feature's page is kept: "layer:feature". */
export const pageKey = (n) => `${n.layer}:${n.feature}`;

/** A node in words; `tokens` are the prompt's, for an error node's position. */
export function describe(n, tokens) {
  if (n.kind === "feature") return n.label || `feature ${n.layer}:${n.feature}`;
  if (n.kind === "error") return `error of layer ${n.layer} at “${visibleText(tokens[n.pos] ?? n.pos)}”`;
  if (n.kind === "embedding") return `token “${visibleText(n.text)}”`;
  return `output “${visibleText(n.text)}” (p = ${percent(n.probability)})`;
}

// -- selection, pins, supernodes ---------------------------------------------------------------------

/** A click on `node` (null: the background) changes the selection in place, as the page shows it:
 * a plain click selects that node alone (or nothing), an additive one toggles it. Returns the node
 * whose panel to show: the clicked one, or `focus` unchanged on the background. */
export function applyClick(selected, focus, node, additive) {
  if (!node) {
    if (!additive) selected.clear();
  } else if (additive) {
    if (selected.has(node.id)) selected.delete(node.id);
    else selected.add(node.id);
  } else {
    selected.clear();
    selected.add(node.id);
  }
  return node ? node.id : focus;
}

/** The pins with `id` added at the end, or taken out if it was there. */
export const togglePinned = (pinned, id) => (pinned.includes(id) ? pinned.filter((x) => x !== id) : [...pinned, id]);

/** The selected ids that are feature nodes, in selection order; `nodeById` gives a node or null. */
export const selectedFeatures = (selected, nodeById) => [...selected].filter((id) => nodeById(id)?.kind === "feature");

/** The supernodes with `name` (re)defined as `members`, last. */
export const withSupernode = (supernodes, name, members) => [...supernodes.filter((s) => s.name !== name), { name, members }];

/** Supernode `name` ungrouped: it leaves the list, and the interventions on it go too. */
export function withoutSupernode(supernodes, interventions, name) {
  return {
    supernodes: supernodes.filter((s) => s.name !== name),
    interventions: interventions.filter((iv) => iv.supernode !== name),
  };
}

/** Nodes whose label (or, unlabelled, text) contains the query, ignoring case and outer spaces. */
export function searchMatches(nodes, query) {
  const text = query.trim().toLowerCase();
  const matches = new Set();
  if (text) for (const n of nodes) if ((n.label || n.text || "").toLowerCase().includes(text)) matches.add(n.id);
  return matches;
}

/** A feature's new label on every node of that feature (one per position it is active at). */
export function relabel(nodes, layer, feature, label) {
  for (const m of nodes) if (m.kind === "feature" && m.layer === layer && m.feature === feature) m.label = label;
}

// -- interventions -----------------------------------------------------------------------------------

/** A new intervention on `target` ({node} or {supernode}): scale by 0, which switches it off. */
export const newIntervention = (target) => ({ ...target, mode: "scale", value: 0 });

/** The interventions as the API takes them: a node or a supernode, its mode and value. */
export const interventionSpecs = (interventions) =>
  interventions.map(({ node, supernode, mode, value }) => (node ? { node, mode, value } : { supernode, mode, value }));

/** What an intervention acts on, in words (a node that the threshold hides is named by placeholders). */
export const describeIntervention = (iv, nodeById, tokens) =>
  iv.node ? describe(nodeById(iv.node) || { kind: "feature", layer: "?", feature: "?" }, tokens) : `supernode ${iv.supernode}`;

/** A running job's progress line. */
export const jobProgress = (job) => `${job.stage}${job.total ? ` · ${job.done} of ${job.total} rows` : ""} · ${job.elapsed_s.toFixed(0)} s`;

/** How strongly a context token shows its activation: its share of the feature's maximum, 0..1. */
export const shade = (act, max) => Math.min(1, Math.max(0, act / Math.max(max, 1e-9))).toFixed(3);

// -- edges -------------------------------------------------------------------------------------------

/** The largest |weight|, or 1 when there are none (so that dividing by it is safe). */
export function maxAbsWeight(weights) {
  let maxAbs = 0;
  for (const w of weights) maxAbs = Math.max(maxAbs, Math.abs(w));
  return maxAbs || 1;
}

/** An edge's path among 2 * BUCKETS: positive ones first, then negative; strength classes by
 * sqrt(|w| / maxAbs), so that weak edges still spread over the classes. */
export function edgeBucket(weight, maxAbs) {
  const strength = Math.sqrt(Math.abs(weight) / maxAbs);
  return (weight < 0 ? BUCKETS : 0) + Math.min(BUCKETS - 1, Math.floor(strength * BUCKETS));
}

/** Edge indices by |weight|, strongest first (ties in edge order). */
export function strongestFirst(weights) {
  const order = Uint32Array.from({ length: weights.length }, (_, i) => i);
  return order.sort((a, b) => Math.abs(weights[b]) - Math.abs(weights[a]) || a - b);
}

/** How many of the strongest edges the full graph draws unless asked otherwise: a few hundred edges
 * keep the layout readable, where all of a pruned graph's (often 100,000) bury it. */
export const DEFAULT_EDGES = 300;
const EDGE_STEPS = [0, 25, 50, 100, 200, 300, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000, 500000];

/** The edge counts the slider offers for a graph of `total` edges: round steps below it, then all. */
export const edgeSteps = (total) => [...EDGE_STEPS.filter((s) => s < total), total];

/** The slider position of DEFAULT_EDGES among `steps` (all edges where there are fewer). */
export const defaultEdgeStep = (steps) => {
  const i = steps.indexOf(DEFAULT_EDGES);
  return i < 0 ? steps.length - 1 : i;
};

/** For each node, the indices of the edges that touch it (in or out), in edge order. */
export function adjacency(nNodes, source, target) {
  const adj = Array.from({ length: nNodes }, () => []);
  for (let e = 0; e < source.length; e++) {
    adj[source[e]].push(e);
    adj[target[e]].push(e);
  }
  return adj;
}

/** Node `i`'s strongest incoming and outgoing edges, at most `k` of each: [{node, weight}] by |weight|. */
export function strongestEdges(i, edgesOfNode, nodes, edges, k = 8) {
  const { source, target, weight } = edges;
  const inputs = [];
  const outputs = [];
  for (const e of edgesOfNode) {
    if (target[e] === i) inputs.push({ node: nodes[source[e]], weight: weight[e] });
    else outputs.push({ node: nodes[target[e]], weight: weight[e] });
  }
  const top = (list) => list.sort((a, b) => Math.abs(b.weight) - Math.abs(a.weight)).slice(0, k);
  return { inputs: top(inputs), outputs: top(outputs) };
}

// -- hit testing and the view ------------------------------------------------------------------------

/** Node indices by square cell of `cell` world units: "cx,cy" -> [index]. */
export function nodeGrid(nodes, cell) {
  const grid = new Map();
  nodes.forEach((n, i) => {
    const key = `${Math.floor(n.x / cell)},${Math.floor(n.y / cell)}`;
    if (!grid.has(key)) grid.set(key, []);
    grid.get(key).push(i);
  });
  return grid;
}

/** The shown node nearest (wx, wy) within `reach` world units, or null; it looks only in the
 * point's cell and the eight around it. */
export function nearestNode(grid, cell, nodes, wx, wy, reach, isShown) {
  const cx = Math.floor(wx / cell);
  const cy = Math.floor(wy / cell);
  let best = null;
  let bestD = reach * reach;
  for (let i = cx - 1; i <= cx + 1; i++)
    for (let j = cy - 1; j <= cy + 1; j++)
      for (const k of grid.get(`${i},${j}`) || []) {
        const n = nodes[k];
        if (!isShown(n)) continue;
        const d = (n.x - wx) ** 2 + (n.y - wy) ** 2;
        if (d < bestD) {
          bestD = d;
          best = n;
        }
      }
  return best;
}

/** The transform ({scale, tx, ty}: screen = world * scale + t) that centres `bounds` on a
 * width x height screen with a margin, within the zoom limits. */
export function fitTransform(bounds, width, height, pad = 60) {
  const sx = (width - 2 * pad) / Math.max(1, bounds.width);
  const sy = (height - 2 * pad) / Math.max(1, bounds.height);
  const scale = Math.max(0.02, Math.min(2.5, sx, sy));
  return { scale, tx: (width - bounds.width * scale) / 2, ty: (height - bounds.height * scale) / 2 };
}

/** The transform zoomed by `factor` (clamped to 0.02..20) about screen point (sx, sy), which stays put. */
export function zoomTransform({ scale, tx, ty }, factor, sx, sy) {
  const s = Math.max(0.02, Math.min(20, scale * factor));
  const k = s / scale;
  return { scale: s, tx: sx - (sx - tx) * k, ty: sy - (sy - ty) * k };
}
