// Why attention moved an edge: the heads that carry it (GET /api/graph/heads) and, for a head,
// the (query node, key node) pairs that make it attend where it does (GET /api/graph/qk).

import { api } from "./api.js";
import { fmt, visibleText } from "./model.js";

/** A QK node in words: a feature with its label, an embedding with its token, a layer's
 * attention output or error, the biases. */
export function qkNodeText(node, tokens) {
  const at = `“${visibleText(tokens[node.pos] ?? String(node.pos))}”`;
  if (node.kind === "feature") return `${node.label || `feature ${node.layer}:${node.feature}`} @${at}`;
  if (node.kind === "embedding") return `token ${at}`;
  if (node.kind === "attention") return `attention L${node.layer} @${at}`;
  if (node.kind === "error") return `error L${node.layer} @${at}`;
  if (node.kind === "skip") return `skip L${node.layer} @${at}`;
  if (node.kind === "position") return `position @${at}`;
  return node.kind === "decoder_bias" ? "decoder biases" : "projection biases";
}

/** The box listing an edge's heads; clicking a head shows its QK pairs at the edge's target (query)
 * and source (key) positions. `el` builds elements as the page does. */
export function headsBox(el, path, source, target, queryPos) {
  const box = el("div", { id: "heads-box" }, el("p", { class: "muted" }, "Computing the heads that carry this edge…"));
  const qkBox = el("div", { id: "qk-box" });
  const showQk = (layer, head) => {
    qkBox.replaceChildren(el("p", { class: "muted" }, `Decomposing L${layer} H${head}…`));
    api
      .qk(path, layer, head, queryPos, source.pos)
      .then((body) => qkBox.replaceChildren(...qkTables(el, body)))
      .catch((err) => qkBox.replaceChildren(el("p", { class: "muted" }, err.message)));
  };
  api
    .heads(path, source.id, target.id)
    .then((body) => {
      const rows = body.heads.map(({ layer, head, loading }) =>
        el(
          "tr",
          {},
          el("td", {}, el("button", { class: "link head-link", type: "button", onclick: () => showQk(layer, head) }, `L${layer} H${head}`)),
          el("td", { class: `num ${loading < 0 ? "neg" : "pos"}` }, fmt(loading)),
        ),
      );
      box.replaceChildren(
        el("h3", {}, `Heads carrying ${fmt(body.total)}`),
        el("table", { id: "heads-table" }, rows),
        qkBox,
      );
    })
    .catch((err) => box.replaceChildren(el("p", { class: "muted" }, err.message)));
  return box;
}

function qkTables(el, body) {
  const out = [el("h3", {}, `L${body.layer} H${body.head} at “${visibleText(body.tokens[body.query_pos])}”`)];
  for (const key of body.keys) {
    out.push(
      el("div", { class: "muted" }, `key “${visibleText(body.tokens[key.key_pos])}” (${key.key_pos}): weight ${fmt(key.weight)}, score ${fmt(key.score)}`),
      el(
        "table",
        { class: "qk-pairs" },
        key.pairs.map((p) =>
          el(
            "tr",
            {},
            el("td", {}, qkNodeText(p.query, body.tokens)),
            el("td", {}, qkNodeText(p.key, body.tokens)),
            el("td", { class: `num ${p.value < 0 ? "neg" : "pos"}` }, fmt(p.value)),
          ),
        ),
      ),
    );
  }
  return out;
}
