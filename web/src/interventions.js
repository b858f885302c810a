// The intervention panel: features and supernodes to scale or set, the run, and its result beside
// the graph's prediction.

import { api } from "./api.js";
import { $, el } from "./dom.js";
import { describeIntervention, fmt, interventionSpecs, newIntervention, percent, visibleText } from "./model.js";

/** The panel over the explorer's `state`; `nodeById(id)` gives a node of the open graph or null. */
export function interventionPanel(state, nodeById) {
  function add(target) {
    state.interventions.push(newIntervention(target));
    render();
  }

  function item(iv, i) {
    const what = describeIntervention(iv, nodeById, state.view.metadata.tokens);
    const mode = el("select", { onchange: (e) => (iv.mode = e.target.value) }, el("option", { value: "scale" }, "scale ×"), el("option", { value: "set" }, "set to"));
    mode.value = iv.mode;
    const value = el("input", { type: "number", step: "any", value: String(iv.value), onchange: (e) => (iv.value = Number(e.target.value)) });
    const remove = () => {
      state.interventions.splice(i, 1);
      render();
    };
    return el("li", {}, el("span", { title: iv.node || iv.supernode }, what.slice(0, 28)), mode, value, el("button", { class: "link", type: "button", onclick: remove }, "×"));
  }

  function render() {
    $("iv-list").replaceChildren(
      ...(state.interventions.length
        ? state.interventions.map(item)
        : [el("li", { class: "muted" }, "Add features or supernodes, choose scale or set, then Run.")]),
    );
  }

  async function run() {
    if (!state.interventions.length) return;
    const box = $("iv-result");
    box.replaceChildren(el("p", { class: "muted" }, "Running…"));
    const body = {
      interventions: interventionSpecs(state.interventions),
      run_mode: $("iv-run-mode").value,
      freeze_attention: $("iv-freeze").checked,
      top: 8,
    };
    try {
      const r = await api.intervene(state.path, body);
      box.replaceChildren(...renderResult(r));
    } catch (err) {
      box.replaceChildren(el("p", { class: "error" }, err.message));
    }
  }

  $("iv-run").addEventListener("click", run);
  return { add, render };
}

function renderResult(r) {
  const rows = r.before.map((b, i) => {
    const a = r.after[i];
    return el(
      "tr",
      {},
      el("td", {}, `“${visibleText(b.text)}”`),
      el("td", { class: "num" }, percent(b.probability)),
      el("td", {}, a ? `“${visibleText(a.text)}”` : ""),
      el("td", { class: "num" }, a ? percent(a.probability) : ""),
    );
  });
  const signed = (x) => el("td", { class: `num ${x < 0 ? "neg" : "pos"}` }, fmt(x));
  const prediction = r.graph_prediction.map((p) => el("tr", {}, el("td", {}, `“${visibleText(p.label)}”`), signed(p.predicted), signed(p.measured)));
  return [
    el("div", { class: "muted" }, r.interventions.join(", ")),
    el("h3", {}, "Top tokens"),
    el("table", { id: "iv-top" }, el("tr", {}, el("th", {}, "before"), el("th", { class: "num" }, "p"), el("th", {}, "after"), el("th", { class: "num" }, "p")), rows),
    el("h3", {}, "Graph's prediction (logit change)"),
    el("table", { id: "iv-prediction" }, el("tr", {}, el("th", {}, "output"), el("th", { class: "num" }, "predicted"), el("th", { class: "num" }, "measured")), prediction),
    el("p", { class: "muted" }, `${r.features_changed} feature activations changed.${r.not_in_graph.length ? ` Not in the graph: ${r.not_in_graph.join(", ")}` : ""}`),
  ];
}
