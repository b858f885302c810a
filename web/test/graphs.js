// Attribution-graph-shaped node lists for the tests: seeded, so that a failure can be replayed.

/** A small seeded generator of uniform numbers in [0, 1) (mulberry32). */
export function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Nodes as the server sends them: embeddings along the bottom, an error node per (layer, position),
 * features scattered with `crowd` of them in one cell, and `nLogits` outputs at the last position. */
export function graphNodes({ nLayers = 4, nPos = 5, nFeatures = 40, crowd = 0, nLogits = 3, seed = 1 } = {}) {
  const rand = random(seed);
  const pick = (n) => Math.floor(rand() * n);
  const nodes = [];
  for (let p = 0; p < nPos; p++) nodes.push({ id: `E_${p}`, kind: "embedding", layer: -1, pos: p, token: 100 + p, text: ` t${p}` });
  for (let l = 0; l < nLayers; l++) for (let p = 0; p < nPos; p++) nodes.push({ id: `0_${l}_${p}`, kind: "error", layer: l, pos: p });
  const seen = new Set();
  const feature = (layer, pos, index) => {
    const id = `${layer}_${index}_${pos}`;
    if (seen.has(id)) return;
    seen.add(id);
    nodes.push({ id, kind: "feature", layer, pos, feature: index, activation: rand() });
  };
  for (let i = 0; i < nFeatures; i++) feature(pick(nLayers), pick(nPos), pick(1000));
  for (let i = 0; i < crowd; i++) feature(1, 2, 2000 + i);
  for (let i = 0; i < nLogits; i++)
    nodes.push({ id: `L_${i}`, kind: "logit", layer: nLayers, pos: nPos - 1, token: 500 + i, text: `o${i}`, probability: rand() });
  return nodes;
}

/** The row layout.js puts a node on: embeddings 0, layer l at l + 1, logits at the top. */
export const rowOf = (n, nLayers) => (n.kind === "embedding" ? 0 : n.kind === "logit" ? nLayers + 1 : n.layer + 1);
