// The full graph's node panel and tooltip: a node's label, its feature page (contexts, promoted
// tokens), its strongest inputs and outputs, and the attention heads behind an edge across positions.

import { api } from "./api.js";
import { $, el, guarded } from "./dom.js";
import { headsBox } from "./heads.js";
import { describe as describeNode, fmt, pageKey, quotedTokens, relabel, shade, visibleText } from "./model.js";

const HINT = "Hover a node for its summary; click it for its page. Ctrl/⌘-click selects several.";

/** The panel and tooltip of the explorer's `state` and graph `view`; `actions` are what its buttons
 * do elsewhere: togglePin(id), addIntervention(target), relabelled(). */
export class NodePanel {
  constructor(state, view, actions) {
    this.state = state;
    this.view = view;
    this.actions = actions;
    // handed to the canvas and the other panels as plain functions
    this.hover = this.hover.bind(this);
    this.render = this.render.bind(this);
    this.focusNode = this.focusNode.bind(this);
  }

  nodeById(id) {
    const i = this.view.byId?.get(id);
    return i === undefined ? null : this.view.nodes[i];
  }

  describe(n) {
    return describeNode(n, this.state.view.metadata.tokens);
  }

  featurePage(n) {
    const { state } = this;
    const key = pageKey(n);
    if (!state.pages.has(key)) state.pages.set(key, api.feature(state.path, n.layer, n.feature).catch((err) => err));
    return state.pages.get(key);
  }

  hover(n, event) {
    const tip = $("tooltip");
    if (!n) {
      tip.hidden = true;
      return;
    }
    const lines = [el("strong", {}, this.describe(n)), el("div", { class: "muted" }, `${n.id} · ${n.kind} · layer ${n.layer} · pos ${n.pos}`)];
    if (n.kind === "feature") lines.push(el("div", {}, `activation ${fmt(n.activation)}`));
    const promoted = el("div", { class: "promoted" });
    lines.push(promoted);
    tip.replaceChildren(...lines);
    tip.dataset.node = n.id;
    tip.hidden = false;
    tip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - 350)}px`;
    tip.style.top = `${event.clientY + 14}px`;
    if (n.kind === "feature" && this.state.view.features_db) {
      this.featurePage(n).then((page) => {
        if (tip.dataset.node !== n.id || page instanceof Error) return;
        promoted.textContent = `promotes: ${quotedTokens(page.promoted, 5)}`;
      });
    }
  }

  render() {
    const { state } = this;
    const panel = $("node-panel");
    const n = state.focus && this.nodeById(state.focus);
    if (!n) {
      panel.replaceChildren(el("p", { class: "muted" }, HINT));
      return;
    }
    const pinned = state.pinned.includes(n.id);
    const buttons = el(
      "div",
      { class: "row" },
      el("button", { id: "pin-btn", type: "button", onclick: () => this.actions.togglePin(n.id) }, pinned ? "Unpin" : "Pin"),
      n.kind === "feature" ? el("button", { id: "iv-add", type: "button", onclick: () => this.actions.addIntervention({ node: n.id }) }, "Add to intervention") : null,
    );
    const parts = [el("h3", {}, this.describe(n)), el("div", { class: "muted" }, `${n.id} · activation ${fmt(n.activation)} · influence ${fmt(n.influence)}`), buttons];
    if (n.kind === "feature") parts.push(this.labelEditor(n));
    const { inputs, outputs } = this.view.neighbours(n.id);
    parts.push(el("h3", {}, "Strongest inputs"), this.edgeTable(inputs, n, "in"), el("h3", {}, "Strongest outputs"), this.edgeTable(outputs, n, "out"));
    parts.push(el("div", { id: "heads-panel" }));
    const pageBox = el("div", { id: "feature-page" });
    parts.push(pageBox);
    panel.replaceChildren(...parts);
    if (n.kind !== "feature") return;
    if (!state.view.features_db) {
      pageBox.append(el("p", { class: "muted" }, "No feature store for this graph: build one with `cltrace features build` to see contexts and promoted tokens."));
      return;
    }
    pageBox.append(el("p", { class: "muted" }, "Loading the feature page…"));
    this.featurePage(n).then((page) => {
      if (state.focus === n.id) pageBox.replaceChildren(...renderPage(page));
    });
  }

  labelEditor(n) {
    const { state } = this;
    const input = el("input", { id: "label-input", value: n.label || "", placeholder: "label this feature", maxlength: "500" });
    const save = async () => {
      const saved = await guarded(() => api.setLabel(state.path, n.layer, n.feature, input.value));
      if (!saved) return;
      relabel(state.view.nodes, n.layer, n.feature, saved.label);
      state.pages.delete(pageKey(n));
      this.render();
      this.actions.relabelled();
    };
    input.addEventListener("keydown", (e) => e.key === "Enter" && save());
    return el("div", { class: "row" }, input, el("button", { id: "label-save", type: "button", onclick: save }, "Save label"));
  }

  edgeTable(list, focus, direction) {
    if (!list.length) return el("p", { class: "muted" }, "none in the pruned graph");
    // an edge across positions went through attention: its heads, and why they attend, on request
    const showHeads = (node) => {
      const [source, target] = direction === "in" ? [node, focus] : [focus, node];
      $("heads-panel").replaceChildren(headsBox(el, this.state.path, source, target, target.kind === "logit" ? null : target.pos));
    };
    const row = ({ node, weight }) =>
      el(
        "tr",
        {},
        el("td", {}, el("button", { class: "link", type: "button", onclick: () => this.focusNode(node.id) }, this.describe(node).slice(0, 48))),
        el("td", { class: `num ${weight < 0 ? "neg" : "pos"}` }, fmt(weight)),
        el("td", {}, node.pos !== focus.pos ? el("button", { class: "link heads-link", type: "button", onclick: () => showHeads(node) }, "heads") : null),
      );
    return el("table", {}, list.map(row));
  }

  focusNode(id) {
    const { state } = this;
    state.selected.clear();
    state.selected.add(id);
    state.focus = id;
    this.view.requestDraw();
    this.render();
  }
}

function renderPage(page) {
  if (page instanceof Error) return [el("p", { class: "muted" }, page.message)];
  const tokens = (list) => quotedTokens(list, 8);
  const parts = [
    el("h3", {}, `Feature ${page.name}`),
    el("div", {}, el("strong", {}, "promotes "), tokens(page.promoted)),
    el("div", {}, el("strong", {}, "suppresses "), tokens(page.suppressed)),
    el("div", { class: "muted" }, `density ${(100 * page.density).toFixed(3)}% · max ${fmt(page.max_act)} · ${page.tokens_analysed.toLocaleString()} tokens`),
    el("h3", {}, "Top contexts"),
  ];
  for (const ex of page.top) {
    const token = (t, i) =>
      el("span", { class: `tok${i === ex.mark ? " mark" : ""}`, style: `background: rgba(245, 158, 11, ${shade(ex.acts[i], page.max_act)})`, title: fmt(ex.acts[i]) }, visibleText(t));
    parts.push(el("div", { class: "context", title: `activation ${fmt(ex.act)}` }, ex.texts.map(token)));
  }
  if (!page.top.length) parts.push(el("p", { class: "muted" }, "It never fired on the corpus."));
  return parts;
}
