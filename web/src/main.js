// The graph explorer: wires the circuit view, the full graph's canvas and the panels to the server's API.

import "./style.css";
import { api } from "./api.js";
import { CircuitView } from "./circuitview.js";
import { $, el, guarded, showMessage } from "./dom.js";
import { GraphView } from "./graphview.js";
import { interventionPanel } from "./interventions.js";
import { defaultEdgeStep, edgeSteps, applyClick, searchMatches, selectedFeatures, togglePinned, withoutSupernode, withSupernode } from "./model.js";
import { newGraphDialog } from "./newgraph.js";
import { NodePanel } from "./nodepanel.js";

const state = {
  path: null, // the open graph, relative to the served folder
  view: null, // what /api/graph returned
  selected: new Set(), // node ids (ctrl/⌘-click adds)
  focus: null, // the node whose panel is shown
  pinned: [],
  supernodes: [],
  interventions: [], // {node} or {supernode}, with mode and value
  pages: new Map(), // "layer:feature" -> feature page (or an Error)
  edgeLimit: null, // how many of the strongest edges the full graph draws (null: the default, Infinity: all)
  tab: "graph", // "circuit" or "graph"
  opened: false, // whether a graph was opened yet (the address's ?view= counts for the first only)
};

const handlers = { click: onClick }; // the canvas's hover and click
const view = new GraphView($("graph"), handlers);
const interventions = interventionPanel(state, nodeById);
const panel = new NodePanel(state, view, { togglePin, addIntervention: interventions.add, relabelled: applySearch });
handlers.hover = panel.hover;
const circuit = new CircuitView($("circuit"), $("circuit-panel"), { graphPath: () => state.path, changed: renderTabs, showInGraph });

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
  $("prompt-line").textContent = data.metadata.prompt ?? "";
  setupEdgeSlider(data.edges.weight.length);
  syncHighlights();
  view.setGraph(data, keepView && !changed, edgeLimit());
  showCounts();
  renderWork();
  interventions.render();
  panel.render();
  applySearch();
  if (changed) {
    await circuit.open(data.has_circuit ? path : null);
    // a graph opens on its circuit where it has one; the address may ask for a view on the first
    const asked = state.opened ? null : new URLSearchParams(location.search).get("view");
    state.opened = true;
    showTab(asked === "graph" || asked === "circuit" ? asked : circuit.circuit ? "circuit" : "graph");
  }
}

function nodeById(id) {
  const i = view.byId?.get(id);
  return i === undefined ? null : view.nodes[i];
}

function showCounts() {
  const md = state.view.metadata;
  $("counts").textContent = `${state.view.nodes.length} of ${md.n_nodes_full} nodes, ${view.drawnEdges} of ${state.view.edges.weight.length} edges drawn (${md.n_edges_full} in the graph)`;
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

function onClick(n, event) {
  const additive = event.ctrlKey || event.metaKey || event.shiftKey;
  state.focus = applyClick(state.selected, state.focus, n, additive);
  view.requestDraw();
  panel.render();
  renderWork();
}

// -- the circuit view and the full graph: tabs --------------------------------------------------------

function showTab(tab) {
  state.tab = tab === "circuit" && circuit.circuit ? "circuit" : "graph";
  const onCircuit = state.tab === "circuit";
  $("circuit-wrap").hidden = !onCircuit;
  $("circuit-panel").hidden = !onCircuit;
  $("canvas-wrap").hidden = onCircuit;
  $("sidebar").hidden = onCircuit;
  for (const id of ["threshold-box", "edges-box", "search", "only-pinned-box", "counts"]) $(id).hidden = onCircuit;
  renderTabs();
  if (onCircuit) circuit.render(); // sized to its pane, now shown
  else view.resize();
  const url = new URLSearchParams(location.search);
  url.set("view", state.tab);
  history.replaceState(null, "", `?${url}`);
}

function renderTabs() {
  $("tab-circuit").disabled = !circuit.circuit;
  $("tab-circuit").title = circuit.circuit ? "The circuit: a few labelled supernodes" : "No circuit.json beside this graph: `cltrace trace` writes one";
  $("tab-circuit").classList.toggle("active", state.tab === "circuit");
  $("tab-graph").classList.toggle("active", state.tab === "graph");
}

/** The full graph with `ids` (a supernode's members) selected, the first one's panel open. */
function showInGraph(ids) {
  showTab("graph");
  state.selected.clear();
  for (const id of ids) if (nodeById(id)) state.selected.add(id);
  state.focus = [...state.selected][0] ?? null;
  view.requestDraw();
  panel.render();
  renderWork();
}

$("tab-circuit").addEventListener("click", () => showTab("circuit"));
$("tab-graph").addEventListener("click", () => showTab("graph"));

// -- pinned nodes and supernodes ----------------------------------------------------------------------

function togglePin(id) {
  state.pinned = togglePinned(state.pinned, id);
  saveWork().then(panel.render);
}

function renderWork() {
  const pin = (id) =>
    el(
      "li",
      { "data-node": id },
      el("button", { class: "link", type: "button", onclick: () => panel.focusNode(id) }, id),
      " ",
      el("button", { class: "link", type: "button", title: "unpin", onclick: () => togglePin(id) }, "×"),
    );
  $("pinned-list").replaceChildren(...(state.pinned.length ? state.pinned.map(pin) : [el("li", { class: "muted" }, "Pin nodes to keep them here and view them alone.")]));
  const group = (sn) =>
    el(
      "li",
      { "data-supernode": sn.name },
      el("strong", {}, sn.name),
      el("span", { class: "muted" }, `${sn.members.length} features`),
      el("button", { type: "button", onclick: () => interventions.add({ supernode: sn.name }) }, "Intervene"),
      el("button", { class: "link", type: "button", title: "ungroup", onclick: () => removeSupernode(sn.name) }, "×"),
    );
  $("supernode-list").replaceChildren(...state.supernodes.map(group));
  $("make-supernode").textContent = `Group ${selectedFeatures(state.selected, nodeById).length} selected`;
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
  interventions.render();
}

// -- search, threshold and edges ----------------------------------------------------------------------

function applySearch() {
  const query = $("search").value;
  const matches = state.view ? searchMatches(state.view.nodes, query) : new Set();
  view.highlight.matches = matches;
  $("search").title = query.trim() ? `${matches.size} matching nodes` : "";
  view.requestDraw();
  return matches;
}

/** The edge slider's steps for a graph of `total` edges, at the limit the person chose (kept across
 * graphs and thresholds: null is the default, Infinity all). */
function setupEdgeSlider(total) {
  const steps = edgeSteps(total);
  const slider = $("edges");
  slider.max = String(steps.length - 1);
  slider.steps = steps;
  const limit = state.edgeLimit ?? steps[defaultEdgeStep(steps)];
  let at = 0;
  while (at < steps.length - 1 && steps[at + 1] <= limit) at++;
  slider.value = String(at);
  showEdgeLimit();
}

/** The edges drawn: the chosen limit, at most all of them. */
function edgeLimit() {
  return state.edgeLimit ?? Number($("edges").steps[defaultEdgeStep($("edges").steps)]);
}

function showEdgeLimit() {
  const total = state.view.edges.weight.length;
  $("edges-value").textContent = edgeLimit() >= total ? "all" : edgeLimit().toLocaleString();
}

$("edges").addEventListener("input", (e) => {
  const steps = e.target.steps;
  const at = Number(e.target.value);
  state.edgeLimit = at === steps.length - 1 ? Infinity : steps[at];
  showEdgeLimit();
  view.setEdgeLimit(state.edgeLimit);
  showCounts();
});

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
  if (first) panel.focusNode(first);
});
$("only-pinned").addEventListener("change", (e) => {
  view.setOnlyPinned(e.target.checked);
  showCounts();
});
$("graph-select").addEventListener("change", (e) => guarded(() => openGraph(e.target.value)));
$("make-supernode").addEventListener("click", makeSupernode);
newGraphDialog(() => state.path, (path) => guarded(() => loadGraphList(path)));

// -- start, and hooks for tests and the benchmark -----------------------------------------------------

const startThreshold = new URLSearchParams(location.search).get("threshold");
if (startThreshold !== null) {
  $("threshold").value = startThreshold;
  $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
}
const startEdges = new URLSearchParams(location.search).get("edges"); // a count, or "all"
if (startEdges !== null) state.edgeLimit = startEdges === "all" ? Infinity : Math.max(0, Number(startEdges) || 0);

window.explorer = {
  view,
  circuit,
  state,
  openGraph,
  showTab,
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
