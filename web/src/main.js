// The graph explorer: wires the canvas view to the panels and the server's API.

import "./style.css";
import { api } from "./api.js";
import { GraphView } from "./graphview.js";
import { headsBox } from "./heads.js";
import {
  applyClick, describe as describeNode, describeIntervention, fmt, interventionSpecs, jobProgress, newIntervention,
  pageKey, percent, quotedTokens, relabel, searchMatches, selectedFeatures, shade, togglePinned, visibleText,
  withoutSupernode, withSupernode
} from "./model.js";

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
};

const state = {
  path: null, // the open graph, relative to the served folder
  view: null, // what /api/graph returned
  selected: new Set(), // node ids (ctrl/⌘-click adds)
  focus: null, // the node whose panel is shown
  pinned: [],
  supernodes: [],
  interventions: [], // {node} or {supernode}, with mode and value
  pages: new Map(), // "layer:feature" -> feature page (or an Error)
};

const view = new GraphView($("graph"), { hover: onHover, click: onClick });

// -- messages ----------------------------------------------------------------------------------------

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

async function guarded(fn) {
  try {
    return await fn();
  } catch (err) {
    showMessage(err.message);
    setTimeout(() => showMessage(""), 6000);
    return undefined;
  }
}

// -- graphs ------------------------------------------------------------------------------------------

async function loadGraphList(select) {
  const graphs = await api.graphs();
  const box = $("graph-select");
  box.replaceChildren(...graphs.map((g) => el("option", { value: g.path }, `${g.path} — ${g.prompt ?? ""}`.slice(0, 90))));
  if (!graphs.length) {
    showMessage("No graph files here yet: make one with “New graph…” or `cltrace attribute`.");
    return;
  }
  const wanted = select || new URLSearchParams(location.search).get("graph") || graphs[0].path;
  box.value = wanted;
  await openGraph(wanted);
}

async function openGraph(path, keepView = false) {
  const threshold = Number($("threshold").value);
  const data = await api.graph(path, threshold, 0.98);
  const changed = path !== state.path;
  state.path = path;
  state.view = data;
  if (changed) {
    state.selected.clear();
    state.focus = null;
    state.interventions = [];
    state.pages.clear();
    $("iv-result").replaceChildren(); // a result belongs to the graph it ran on
    const url = new URLSearchParams(location.search);
    url.set("graph", path);
    history.replaceState(null, "", `?${url}`);
  }
  state.pinned = data.state.pinned;
  state.supernodes = data.state.supernodes;
  showMessage("");
  const md = data.metadata;
  $("prompt-line").textContent = md.prompt ?? "";
  $("counts").textContent = `${data.nodes.length} of ${md.n_nodes_full} nodes, ${data.edges.weight.length} of ${md.n_edges_full} edges`;
  syncHighlights();
  view.setGraph(data, keepView && !changed);
  renderWork();
  renderInterventions();
  renderNodePanel();
  applySearch();
}

function nodeById(id) {
  const i = view.byId?.get(id);
  return i === undefined ? null : view.nodes[i];
}

function syncHighlights() {
  view.highlight.selected = state.selected;
  view.highlight.pinned = new Set(state.pinned);
  view.highlight.supernodes = state.supernodes;
  if (view.onlyPinned) view.setOnlyPinned(true);
  view.requestDraw();
}

async function saveWork() {
  const saved = await guarded(() => api.saveState(state.path, { pinned: state.pinned, supernodes: state.supernodes }));
  if (saved) {
    state.pinned = saved.pinned;
    state.supernodes = saved.supernodes;
  }
  syncHighlights();
  renderWork();
}

// -- hover and click ---------------------------------------------------------------------------------

const describe = (n) => describeNode(n, state.view.metadata.tokens);

async function featurePage(n) {
  const key = pageKey(n);
  if (!state.pages.has(key)) {
    state.pages.set(key, api.feature(state.path, n.layer, n.feature).catch((err) => err));
  }
  return state.pages.get(key);
}

function onHover(n, event) {
  const tip = $("tooltip");
  if (!n) {
    tip.hidden = true;
    return;
  }
  const lines = [el("strong", {}, describe(n)), el("div", { class: "muted" }, `${n.id} · ${n.kind} · layer ${n.layer} · pos ${n.pos}`)];
  if (n.kind === "feature") lines.push(el("div", {}, `activation ${fmt(n.activation)}`));
  const promoted = el("div", { class: "promoted" });
  lines.push(promoted);
  tip.replaceChildren(...lines);
  tip.dataset.node = n.id;
  tip.hidden = false;
  tip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - 350)}px`;
  tip.style.top = `${event.clientY + 14}px`;
  if (n.kind === "feature" && state.view.features_db) {
    featurePage(n).then((page) => {
      if (tip.dataset.node !== n.id || page instanceof Error) return;
      promoted.textContent = `promotes: ${quotedTokens(page.promoted, 5)}`;
    });
  }
}

function onClick(n, event) {
  const additive = event.ctrlKey || event.metaKey || event.shiftKey;
  state.focus = applyClick(state.selected, state.focus, n, additive);
  view.requestDraw();
  renderNodePanel();
  renderWork();
}

// -- the node panel: label, feature page, strongest inputs and outputs --------------------------------

function renderNodePanel() {
  const panel = $("node-panel");
  const n = state.focus && nodeById(state.focus);
  if (!n) {
    panel.replaceChildren(el("p", { class: "muted" }, "Hover a node for its summary; click it for its page. Ctrl/⌘-click selects several."));
    return;
  }
  const pinned = state.pinned.includes(n.id);
  const buttons = el(
    "div",
    { class: "row" },
    el("button", { id: "pin-btn", type: "button", onclick: () => togglePin(n.id) }, pinned ? "Unpin" : "Pin"),
    n.kind === "feature" ? el("button", { id: "iv-add", type: "button", onclick: () => addIntervention({ node: n.id }) }, "Add to intervention") : null,
  );
  const parts = [el("h3", {}, describe(n)), el("div", { class: "muted" }, `${n.id} · activation ${fmt(n.activation)} · influence ${fmt(n.influence)}`), buttons];
  if (n.kind === "feature") parts.push(labelEditor(n));
  const { inputs, outputs } = view.neighbours(n.id);
  parts.push(el("h3", {}, "Strongest inputs"), edgeTable(inputs, n, "in"), el("h3", {}, "Strongest outputs"), edgeTable(outputs, n, "out"));
  parts.push(el("div", { id: "heads-panel" }));
  const pageBox = el("div", { id: "feature-page" });
  parts.push(pageBox);
  panel.replaceChildren(...parts);
  if (n.kind === "feature") {
    if (!state.view.features_db) {
      pageBox.append(el("p", { class: "muted" }, "No feature store for this graph: build one with `cltrace features build` to see contexts and promoted tokens."));
    } else {
      pageBox.append(el("p", { class: "muted" }, "Loading the feature page…"));
      featurePage(n).then((page) => {
        if (state.focus === n.id) pageBox.replaceChildren(...renderPage(page));
      });
    }
  }
}

function labelEditor(n) {
  const input = el("input", { id: "label-input", value: n.label || "", placeholder: "label this feature", maxlength: "500" });
  const save = async () => {
    const saved = await guarded(() => api.setLabel(state.path, n.layer, n.feature, input.value));
    if (!saved) return;
    relabel(state.view.nodes, n.layer, n.feature, saved.label);
    state.pages.delete(pageKey(n));
    renderNodePanel();
    applySearch();
  };
  input.addEventListener("keydown", (e) => e.key === "Enter" && save());
  return el("div", { class: "row" }, input, el("button", { id: "label-save", type: "button", onclick: save }, "Save label"));
}

function edgeTable(list, focus, direction) {
  if (!list.length) return el("p", { class: "muted" }, "none in the pruned graph");
  // an edge across positions went through attention: its heads, and why they attend, on request
  const showHeads = (node) => {
    const [source, target] = direction === "in" ? [node, focus] : [focus, node];
    $("heads-panel").replaceChildren(headsBox(el, state.path, source, target, target.kind === "logit" ? null : target.pos));
  };
  return el(
    "table",
    {},
    list.map(({ node, weight }) =>
      el(
        "tr",
        {},
        el("td", {}, el("button", { class: "link", type: "button", onclick: () => focusNode(node.id) }, describe(node).slice(0, 48))),
        el("td", { class: `num ${weight < 0 ? "neg" : "pos"}` }, fmt(weight)),
        el("td", {}, node.pos !== focus.pos
          ? el("button", { class: "link heads-link", type: "button", onclick: () => showHeads(node) }, "heads")
          : null),
      ),
    ),
  );
}

function focusNode(id) {
  state.selected.clear();
  state.selected.add(id);
  state.focus = id;
  view.requestDraw();
  renderNodePanel();
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
    parts.push(
      el(
        "div",
        { class: "context", title: `activation ${fmt(ex.act)}` },
        ex.texts.map((t, i) =>
          el(
            "span",
            { class: `tok${i === ex.mark ? " mark" : ""}`, style: `background: rgba(245, 158, 11, ${shade(ex.acts[i], page.max_act)})`, title: fmt(ex.acts[i]) },
            visibleText(t),
          ),
        ),
      ),
    );
  }
  if (!page.top.length) parts.push(el("p", { class: "muted" }, "It never fired on the corpus."));
  return parts;
}

// -- pinned nodes and supernodes ----------------------------------------------------------------------

function togglePin(id) {
  state.pinned = togglePinned(state.pinned, id);
  saveWork().then(renderNodePanel);
}

function renderWork() {
  $("pinned-list").replaceChildren(
    ...(state.pinned.length
      ? state.pinned.map((id) =>
          el(
            "li",
            { "data-node": id },
            el("button", { class: "link", type: "button", onclick: () => focusNode(id) }, id),
            " ",
            el("button", { class: "link", type: "button", title: "unpin", onclick: () => togglePin(id) }, "×"),
          ),
        )
      : [el("li", { class: "muted" }, "Pin nodes to keep them here and view them alone.")]),
  );
  $("supernode-list").replaceChildren(
    ...state.supernodes.map((sn) =>
      el(
        "li",
        { "data-supernode": sn.name },
        el("strong", {}, sn.name),
        el("span", { class: "muted" }, `${sn.members.length} features`),
        el("button", { type: "button", onclick: () => addIntervention({ supernode: sn.name }) }, "Intervene"),
        el("button", { class: "link", type: "button", title: "ungroup", onclick: () => removeSupernode(sn.name) }, "×"),
      ),
    ),
  );
  const features = selectedFeatures(state.selected, nodeById);
  $("make-supernode").textContent = `Group ${features.length} selected`;
}

function makeSupernode() {
  const name = $("supernode-name").value.trim();
  const members = selectedFeatures(state.selected, nodeById);
  if (!name || !members.length) {
    showMessage("Select features (Ctrl/⌘-click) and name the supernode first.");
    setTimeout(() => showMessage(""), 4000);
    return;
  }
  state.supernodes = withSupernode(state.supernodes, name, members);
  $("supernode-name").value = "";
  saveWork();
}

function removeSupernode(name) {
  Object.assign(state, withoutSupernode(state.supernodes, state.interventions, name));
  saveWork();
  renderInterventions();
}

// -- interventions ------------------------------------------------------------------------------------

function addIntervention(target) {
  state.interventions.push(newIntervention(target));
  renderInterventions();
}

function renderInterventions() {
  $("iv-list").replaceChildren(
    ...(state.interventions.length
      ? state.interventions.map((iv, i) => {
          const what = describeIntervention(iv, nodeById, state.view.metadata.tokens);
          const mode = el("select", { onchange: (e) => (iv.mode = e.target.value) }, el("option", { value: "scale" }, "scale ×"), el("option", { value: "set" }, "set to"));
          mode.value = iv.mode;
          const value = el("input", { type: "number", step: "any", value: String(iv.value), onchange: (e) => (iv.value = Number(e.target.value)) });
          return el(
            "li",
            {},
            el("span", { title: iv.node || iv.supernode }, what.slice(0, 28)),
            mode,
            value,
            el("button", { class: "link", type: "button", onclick: () => (state.interventions.splice(i, 1), renderInterventions()) }, "×"),
          );
        })
      : [el("li", { class: "muted" }, "Add features or supernodes, choose scale or set, then Run.")]),
  );
}

async function runIntervention() {
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
  const prediction = r.graph_prediction.map((p) =>
    el(
      "tr",
      {},
      el("td", {}, `“${visibleText(p.label)}”`),
      el("td", { class: `num ${p.predicted < 0 ? "neg" : "pos"}` }, fmt(p.predicted)),
      el("td", { class: `num ${p.measured < 0 ? "neg" : "pos"}` }, fmt(p.measured)),
    ),
  );
  return [
    el("div", { class: "muted" }, r.interventions.join(", ")),
    el("h3", {}, "Top tokens"),
    el("table", { id: "iv-top" }, el("tr", {}, el("th", {}, "before"), el("th", { class: "num" }, "p"), el("th", {}, "after"), el("th", { class: "num" }, "p")), rows),
    el("h3", {}, "Graph's prediction (logit change)"),
    el("table", { id: "iv-prediction" }, el("tr", {}, el("th", {}, "output"), el("th", { class: "num" }, "predicted"), el("th", { class: "num" }, "measured")), prediction),
    el("p", { class: "muted" }, `${r.features_changed} feature activations changed.${r.not_in_graph.length ? ` Not in the graph: ${r.not_in_graph.join(", ")}` : ""}`),
  ];
}

// -- search and threshold -----------------------------------------------------------------------------

function applySearch() {
  const query = $("search").value;
  const matches = state.view ? searchMatches(state.view.nodes, query) : new Set();
  view.highlight.matches = matches;
  $("search").title = query.trim() ? `${matches.size} matching nodes` : "";
  view.requestDraw();
  return matches;
}

let thresholdTimer = null;
$("threshold").addEventListener("input", () => {
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  clearTimeout(thresholdTimer);
  thresholdTimer = setTimeout(() => guarded(() => openGraph(state.path, true)), 250);
});
$("search").addEventListener("input", applySearch);
$("search").addEventListener("keydown", (e) => {
  if (e.key !== "Enter") return;
  const first = [...applySearch()][0];
  if (first) focusNode(first);
});
$("only-pinned").addEventListener("change", (e) => view.setOnlyPinned(e.target.checked));
$("graph-select").addEventListener("change", (e) => guarded(() => openGraph(e.target.value)));
$("make-supernode").addEventListener("click", makeSupernode);
$("iv-run").addEventListener("click", runIntervention);

// -- new graph ----------------------------------------------------------------------------------------

const dialog = $("new-graph-dialog");
$("new-graph-btn").addEventListener("click", () => {
  $("job-status").textContent = "";
  $("job-progress").hidden = true;
  dialog.showModal();
});
$("new-close").addEventListener("click", () => dialog.close());
$("new-graph-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const status = $("job-status");
  const bar = $("job-progress");
  let job;
  try {
    job = await api.newGraph({
      prompt: $("new-prompt").value,
      name: $("new-name").value.trim() || null,
      like: state.path,
      max_feature_nodes: Number($("new-max").value),
    });
  } catch (err) {
    status.textContent = err.message;
    status.className = "error";
    return;
  }
  status.className = "muted";
  bar.hidden = false;
  while (job.status === "queued" || job.status === "running" || job.status === "cancelling") {
    bar.max = Math.max(1, job.total);
    bar.value = job.done;
    status.textContent = jobProgress(job);
    await new Promise((r) => {
      setTimeout(r, 300);
    });
    job = await api.job(job.id);
  }
  if (job.status === "error" || job.status === "cancelled") {
    status.textContent = job.error || "cancelled";
    status.className = "error";
    return;
  }
  bar.max = 1;
  bar.value = 1;
  status.textContent = `done: ${job.graph}`;
  dialog.close();
  await guarded(() => loadGraphList(job.graph));
});

// -- start, and hooks for tests and the benchmark -----------------------------------------------------

const startThreshold = new URLSearchParams(location.search).get("threshold");
if (startThreshold !== null) {
  $("threshold").value = startThreshold;
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
}

window.explorer = {
  view,
  state,
  openGraph,
  /** A node's position on the page (for tests that hover or click it). */
  pagePosition(id) {
    const n = nodeById(id);
    if (!n) return null;
    const s = view.screenOf(n);
    const box = view.canvas.getBoundingClientRect();
    return { x: box.left + s.x, y: box.top + s.y };
  },
  ready: guarded(() => loadGraphList()),
};
