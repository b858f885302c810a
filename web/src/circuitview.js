// The circuit view: the prompt's tokens at the bottom, the circuit's supernodes as labelled boxes by
// layer and position, the output on top, signed edges between them; beside it the selected
// supernodes' labels, effect and validation, the circuit's own numbers, and the edits (rename,
// merge, split, each saved at once) and re-validation (a background job on the server).

import { api } from "./api.js";
import { el, followJob } from "./dom.js";
import {
  circuitLayout, circuitNumbers, deltaP, edgeShapes, editOf, labelLines, layerText, merged, renamed, splitOff, validationLines
} from "./circuit.js";
import { fmt, visibleText } from "./model.js";

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

/** Text cut to `n` characters, with an ellipsis where cut. */
const cut = (text, n) => (text.length > n ? `${text.slice(0, n - 1)}…` : text);

export class CircuitView {
  /** `svgEl` draws the circuit, `panelEl` holds its panel; `hooks.graphPath()` is the open graph,
   * `hooks.changed()` is called when a circuit appears or goes, `hooks.showInGraph(ids)` selects
   * nodes in the full graph. */
  constructor(svgEl, panelEl, hooks) {
    this.svg = svgEl;
    this.panel = panelEl;
    this.hooks = hooks;
    this.circuit = null;
    this.selected = []; // supernode ids, in click order
    this.job = null; // the last re-validation job's state
    this.error = "";
  }

  /** Loads the circuit of graph `path` (null: none) and draws it. */
  async open(path) {
    this.path = path;
    this.circuit = null;
    this.selected = [];
    this.job = null;
    this.error = "";
    if (path) {
      try {
        this.circuit = await api.circuit(path);
      } catch (err) {
        this.error = err.message;
      }
    }
    this.render();
    this.hooks.changed();
  }

  render() {
    this._draw();
    this._renderPanel();
  }

  // -- the diagram -----------------------------------------------------------------------------------

  _draw() {
    const c = this.circuit;
    if (!c) {
      this.svg.replaceChildren();
      return;
    }
    document.getElementById("circuit-prompt").textContent = c.prompt ?? "";
    const layout = circuitLayout(c);
    this.layout = layout;
    // shrunk to fit its pane, down to 60% (then it scrolls): a circuit is read whole
    const pane = this.svg.parentElement.getBoundingClientRect();
    const scale = Math.max(0.6, Math.min(1, (pane.width - 10) / layout.width, (pane.height - 30) / layout.height));
    this.svg.setAttribute("width", layout.width * scale);
    this.svg.setAttribute("height", layout.height * scale);
    this.svg.setAttribute("viewBox", `0 0 ${layout.width} ${layout.height}`);
    const edges = edgeShapes(layout).map((e) =>
      svg(
        "path",
        { class: `cedge ${e.sign}`, d: e.d, "stroke-width": e.width.toFixed(2), stroke: e.sign === "neg" ? "#dc2626" : "#2563eb", "stroke-opacity": "0.7", "data-source": e.source, "data-target": e.target },
        svg("title", {}, `${e.source} → ${e.target}: ${fmt(e.weight)}`),
      ),
    );
    const boxes = [...layout.boxes.values()].map((b) => (b.kind === "supernode" ? this._supernodeBox(b) : this._tokenBox(b)));
    this.svg.replaceChildren(svg("g", { class: "edges" }, edges), svg("g", { class: "boxes" }, boxes));
  }

  _tokenBox(b) {
    const text = b.kind === "input" ? visibleText(b.item.token) : visibleText(b.item.label);
    return svg(
      "g",
      { class: b.kind === "input" ? "ctoken" : "coutput", "data-id": b.id, transform: `translate(${b.x},${b.y})` },
      svg("rect", { width: b.w, height: b.h, rx: 5 }),
      svg("text", { x: b.w / 2, y: b.h / 2 + 4, "text-anchor": "middle" }, cut(text, 10)),
      svg("title", {}, b.kind === "input" ? `token ${b.item.pos}: “${visibleText(b.item.token)}”` : `output “${visibleText(b.item.label)}”`),
    );
  }

  _supernodeBox(b) {
    const sn = b.item;
    const sign = sn.effect === null || sn.effect === undefined ? "" : sn.effect >= 0 ? "up" : "down";
    const classes = ["cnode", sign, sn.edited ? "edited" : "", this.selected.includes(sn.id) ? "selected" : ""].filter(Boolean).join(" ");
    const token = this.circuit.tokens?.[sn.pos];
    const says = sn.output_label || sn.input_label || "";
    const effect = sn.effect === null || sn.effect === undefined ? "effect –" : `effect ${sn.effect >= 0 ? "+" : ""}${fmt(sn.effect, 2)}`;
    const abl = sn.validation?.ablate;
    const check = abl ? ` · Δp ${deltaP(abl.predicted)} / ${deltaP(abl.actual)}` : "";
    return svg(
      "g",
      { class: classes, "data-id": sn.id, transform: `translate(${b.x},${b.y})`, onclick: (e) => this._click(sn.id, e) },
      svg("rect", { width: b.w, height: b.h, rx: 7 }),
      svg("text", { class: "name", x: 8, y: 17 }, cut(sn.name, 26)),
      svg("text", { class: "sub", x: 8, y: 33 }, `${layerText(sn.layers)} at “${cut(visibleText(token ?? String(sn.pos)), 8)}” · ${sn.members.length} features`),
      svg("text", { class: `sub${sn.unclear ? " unclear" : ""}`, x: 8, y: 49 }, sn.unclear ? "label unclear" : cut(says, 30)),
      svg("text", { class: "sub", x: 8, y: 65 }, `${effect}${check}`),
      svg("title", {}, `${sn.id}: ${sn.name}`),
    );
  }

  _click(id, event) {
    const additive = event.ctrlKey || event.metaKey || event.shiftKey;
    if (!additive) this.selected = this.selected.length === 1 && this.selected[0] === id ? [] : [id];
    else if (this.selected.includes(id)) this.selected = this.selected.filter((x) => x !== id);
    else this.selected = [...this.selected, id];
    this.render();
  }

  // -- the panel -------------------------------------------------------------------------------------

  _renderPanel() {
    const c = this.circuit;
    if (!c) {
      this.panel.replaceChildren(el("p", { class: "muted" }, this.error || "No circuit for this graph."));
      return;
    }
    const numbers = circuitNumbers(c).map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v)));
    const parts = [
      el("section", {}, el("h3", {}, "Circuit"), el("table", { id: "circuit-numbers", class: "numbers" }, numbers), this._validateRow()),
      el("section", { id: "cv-selection" }, ...this._selectionParts()),
    ];
    this.panel.replaceChildren(...parts);
  }

  _validateRow() {
    const status = el("div", { id: "cv-status", class: this.job?.status === "error" ? "error" : "muted" }, this._jobText());
    const running = this.job && ["queued", "running", "cancelling"].includes(this.job.status);
    const button = el("button", { id: "cv-validate", type: "button", onclick: () => this.revalidate() }, "Re-validate");
    if (running) button.disabled = true;
    const bar = el("progress", { id: "cv-progress", max: String(this.job?.total || 1), value: String(this.job?.done || 0) });
    bar.hidden = !running;
    return el("div", {}, el("div", { class: "row" }, button, el("span", { class: "muted" }, "rebuild the edges and effects, ablate and steer again")), bar, status);
  }

  _jobText() {
    const j = this.job;
    if (!j) return "";
    if (j.status === "error") return j.error || "failed";
    if (j.status === "done") return `validated in ${j.elapsed_s.toFixed(0)} s`;
    return `${j.stage}${j.total ? ` · ${j.done} of ${j.total}` : ""} · ${j.elapsed_s.toFixed(0)} s`;
  }

  _selectionParts() {
    const chosen = this.selected.map((id) => this.circuit.supernodes.find((s) => s.id === id)).filter(Boolean);
    if (!chosen.length) return [el("p", { class: "muted" }, "Click a supernode for its labels and validation; Ctrl/⌘-click several to merge them.")];
    if (chosen.length > 1) {
      const name = el("input", { id: "cv-merge-name", placeholder: `name (default: ${chosen[0].name})`, maxlength: "100" });
      return [
        el("h3", {}, `${chosen.length} supernodes selected`),
        el("ul", {}, chosen.map((s) => el("li", {}, `${s.name} (${s.members.length} features)`))),
        el("div", { class: "row" }, name, el("button", { id: "cv-merge", type: "button", onclick: () => this._edit(merged(editOf(this.circuit), this.selected, name.value)) }, "Merge")),
      ];
    }
    return this._supernodeParts(chosen[0]);
  }

  _supernodeParts(sn) {
    const name = el("input", { id: "cv-name", value: sn.name, maxlength: "100" });
    const rename = () => this._edit(renamed(editOf(this.circuit), sn.id, name.value));
    name.addEventListener("keydown", (e) => e.key === "Enter" && rename());
    const labels = labelLines(sn).map(([what, text, score]) =>
      el("tr", {}, el("td", {}, what), el("td", { class: sn.unclear ? "unclear" : "" }, text), el("td", { class: "num" }, score)));
    const boxes = sn.members.map((m) => el("label", {}, el("input", { type: "checkbox", value: m }), ` ${m}`));
    const splitName = el("input", { id: "cv-split-name", placeholder: "new supernode's name", maxlength: "100" });
    const split = () => {
      const ticked = boxes.map((b) => b.firstChild).filter((b) => b.checked).map((b) => b.value);
      this._edit(() => splitOff(editOf(this.circuit), sn.id, ticked, splitName.value));
    };
    const effect = sn.effect === null || sn.effect === undefined ? "not computed: Re-validate" : `${sn.effect >= 0 ? "+" : ""}${fmt(sn.effect, 3)} (${sn.effect >= 0 ? "pushes the target up" : "pushes it down"})`;
    return [
      el("h3", {}, `Supernode ${sn.id}`),
      el("div", { class: "row" }, name, el("button", { id: "cv-rename", type: "button", onclick: rename }, "Rename")),
      el("table", { id: "cv-labels" }, labels),
      sn.unclear ? el("p", { class: "muted" }, "The labels did not pass their tests: read them as guesses.") : null,
      el("div", {}, el("strong", {}, "effect "), effect),
      el("div", { id: "cv-validation" }, validationLines(sn).map((line) => el("div", {}, line))),
      el("h3", {}, `Members (${sn.members.length})`, " ", el("button", { id: "cv-show", class: "link", type: "button", onclick: () => this.hooks.showInGraph(sn.members) }, "show in the full graph")),
      el("div", { id: "cv-members", class: "members" }, boxes),
      el("div", { class: "row" }, splitName, el("button", { id: "cv-split", type: "button", onclick: split }, "Split off ticked")),
    ];
  }

  /** Saves an edit (a supernode list, or a function giving one that may throw) and shows the result. */
  async _edit(edit) {
    try {
      const supernodes = typeof edit === "function" ? edit() : edit;
      const before = new Set(this.circuit.supernodes.map((s) => s.id));
      this.circuit = await api.saveCircuit(this.hooks.graphPath(), supernodes);
      const after = new Set(this.circuit.supernodes.map((s) => s.id));
      const added = [...after].filter((id) => !before.has(id));
      this.selected = [...this.selected.filter((id) => after.has(id)), ...added].slice(0, 1);
      this.error = "";
    } catch (err) {
      this.error = err.message;
    }
    this.render();
    if (this.error) this.panel.prepend(el("p", { id: "cv-error", class: "error" }, this.error));
  }

  /** Rebuilds and validates the circuit on the server, showing the job's progress, then its numbers. */
  async revalidate() {
    const path = this.hooks.graphPath();
    try {
      this.job = await api.validateCircuit(path);
    } catch (err) {
      this.job = { status: "error", error: err.message };
      this.render();
      return;
    }
    this.job = await followJob(this.job, api.job, (j) => {
      if (j.status === "done") return; // "validated" shows once the new circuit is loaded, with its numbers
      this.job = j;
      this._renderPanel();
    });
    if (this.job.status === "done" && this.hooks.graphPath() === path) {
      this.circuit = await api.circuit(path);
      const ids = new Set(this.circuit.supernodes.map((s) => s.id));
      this.selected = this.selected.filter((id) => ids.has(id));
    }
    this.render();
  }
}
