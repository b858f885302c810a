// The graph on a canvas. Edges and nodes are drawn once per zoom level into an offscreen canvas
// larger than the screen; panning only copies that bitmap, so it stays smooth with 100,000 edges.
// Only the strongest edges are drawn (`edgeLimit`, a slider on the page): all of a pruned graph's
// edges would bury its nodes. A hovered or selected node's own edges, every one of them, and the
// other highlights (pins, search hits, supernodes) are drawn on top every frame.

import { layout } from "./layout.js";
import {
  adjacency, BUCKETS, DEFAULT_EDGES, edgeBucket, fitTransform, maxAbsWeight, nearestNode, nodeGrid, percent, strongestEdges,
  strongestFirst, visibleText, zoomTransform
} from "./model.js";

const POS = [37, 99, 235]; // positive edges: blue
const NEG = [220, 38, 38]; // negative edges: red
const MARGIN = 0.5; // the cached bitmap reaches this share of the screen beyond each edge
const QUICK_FROM = 2; // while panning, a redrawn bitmap skips the weakest edge classes (below this one)
const NODE_STYLE = {
  feature: { fill: "#f4b860", stroke: "#9a6417", r: 5 },
  error: { fill: "#c8c8c8", stroke: "#808080", r: 4 },
  embedding: { fill: "#9ad29a", stroke: "#3f7f3f", r: 6 },
  logit: { fill: "#c5a3e6", stroke: "#6b3f99", r: 6 },
};

export class GraphView {
  constructor(canvas, handlers) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.handlers = handlers; // {hover(node, event), click(node, event)}
    this.scale = 1;
    this.tx = 0;
    this.ty = 0;
    this.nodes = [];
    this.cache = null;
    this.frameTimes = []; // ms per drawn frame, for the benchmark
    this.highlight = { hovered: null, selected: new Set(), pinned: new Set(), matches: new Set(), supernodes: [] };
    this.onlyPinned = false;
    this.edgeLimit = DEFAULT_EDGES;
    this.drawnEdges = 0; // edges in the cached bitmap (for the page's counts and the tests)
    this._bindEvents();
    new ResizeObserver(() => this.resize()).observe(canvas.parentElement);
    this.resize();
  }

  // -- data --------------------------------------------------------------------------------------

  /** Shows a graph as /api/graph gives it, drawing its `edgeLimit` strongest edges (default: as before). */
  setGraph(view, keepView = false, edgeLimit = this.edgeLimit) {
    const md = view.metadata;
    this.nodes = view.nodes;
    this.byId = new Map(this.nodes.map((n, i) => [n.id, i]));
    this.edges = view.edges;
    this.edgeLimit = edgeLimit;
    this._order = strongestFirst(this.edges.weight);
    this._adjacency = null;
    this.nPos = md.n_pos;
    this.tokens = md.tokens;
    this.bounds = layout(this.nodes, md.n_layers, md.n_pos);
    this.maxAbs = maxAbsWeight(this.edges.weight);
    this._buildPaths();
    this._buildGrid();
    if (!keepView) this.fit();
    this.invalidate();
  }

  /** Draw the `limit` strongest edges (Infinity: all). */
  setEdgeLimit(limit) {
    this.edgeLimit = limit;
    this._buildPaths();
    this.invalidate();
  }

  /** One Path2D per (sign, strength class), in world units: drawing them needs no JS loop. The
   * strongest `edgeLimit` edges; in the pinned subgraph, every edge between pinned nodes (few). */
  _buildPaths() {
    const { source, target, weight } = this.edges;
    const visible = this.onlyPinned ? this.highlight.pinned : null;
    const limit = visible ? weight.length : Math.min(this.edgeLimit, weight.length);
    this.paths = [];
    for (let s = 0; s < 2; s++) for (let b = 0; b < BUCKETS; b++) this.paths.push(new Path2D());
    this.drawnEdges = 0;
    for (let k = 0; k < limit; k++) {
      const e = this._order[k];
      const a = this.nodes[source[e]];
      const t = this.nodes[target[e]];
      if (visible && !(visible.has(a.id) && visible.has(t.id))) continue;
      const path = this.paths[edgeBucket(weight[e], this.maxAbs)];
      path.moveTo(a.x, a.y);
      path.lineTo(t.x, t.y);
      this.drawnEdges++;
    }
  }

  _buildGrid() {
    this.cell = 24;
    this.grid = nodeGrid(this.nodes, this.cell);
  }

  isShown(n) {
    return !this.onlyPinned || this.highlight.pinned.has(n.id);
  }

  setOnlyPinned(on) {
    this.onlyPinned = on;
    this._buildPaths();
    this.invalidate();
  }

  // -- view --------------------------------------------------------------------------------------

  resize() {
    const box = this.canvas.parentElement.getBoundingClientRect();
    this.dpr = window.devicePixelRatio || 1;
    this.width = Math.max(1, box.width);
    this.height = Math.max(1, box.height);
    this.canvas.width = Math.round(this.width * this.dpr);
    this.canvas.height = Math.round(this.height * this.dpr);
    this.canvas.style.width = `${this.width}px`;
    this.canvas.style.height = `${this.height}px`;
    if (this._fitPending) this.fit();
    this.invalidate();
  }

  fit() {
    if (!this.bounds) return;
    // hidden (the circuit view is shown): fit once the canvas has a size again
    this._fitPending = this.width <= 1 || this.height <= 1;
    if (this._fitPending) return;
    Object.assign(this, fitTransform(this.bounds, this.width, this.height));
    this.invalidate();
  }

  panBy(dx, dy) {
    this.tx += dx;
    this.ty += dy;
    this.lastPan = performance.now();
    this.requestDraw();
  }

  zoomAt(factor, sx, sy) {
    Object.assign(this, zoomTransform(this, factor, sx, sy));
    clearTimeout(this._zoomTimer); // while zooming the old bitmap is stretched; redrawn once it stops
    this._zoomTimer = setTimeout(() => this.invalidate(), 150);
    this.requestDraw();
  }

  screenOf(node) {
    return { x: node.x * this.scale + this.tx, y: node.y * this.scale + this.ty };
  }

  nodeAt(sx, sy) {
    const wx = (sx - this.tx) / this.scale;
    const wy = (sy - this.ty) / this.scale;
    const reach = Math.max(8 / this.scale, 6);
    return nearestNode(this.grid, this.cell, this.nodes, wx, wy, reach, (n) => this.isShown(n));
  }

  // -- drawing -----------------------------------------------------------------------------------

  invalidate() {
    this.cache = null;
    this.requestDraw();
  }

  requestDraw() {
    if (this._pending) return;
    this._pending = true;
    requestAnimationFrame(() => {
      this._pending = false;
      this.draw();
    });
  }

  /** Redraws the bitmap; `quick` (while panning) leaves out the weakest edges, and a full redraw
   * follows once the panning stops: with 100,000 edges a full one takes long enough to stutter. */
  _renderCache(quick = false) {
    const mx = Math.round(this.width * MARGIN);
    const my = Math.round(this.height * MARGIN);
    const canvas = this.cache?.canvas || document.createElement("canvas");
    canvas.width = Math.round((this.width + 2 * mx) * this.dpr);
    canvas.height = Math.round((this.height + 2 * my) * this.dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, this.width + 2 * mx, this.height + 2 * my);
    ctx.setTransform(this.dpr * this.scale, 0, 0, this.dpr * this.scale, this.dpr * (this.tx + mx), this.dpr * (this.ty + my));
    this._drawRows(ctx);
    this._drawEdges(ctx, quick ? QUICK_FROM : 0);
    this._drawNodes(ctx);
    this.cache = { canvas, scale: this.scale, tx: this.tx, ty: this.ty, mx, my, quick };
    if (quick) this._scheduleFullRedraw();
  }

  _scheduleFullRedraw() {
    clearTimeout(this._fullTimer);
    this._fullTimer = setTimeout(() => {
      if (performance.now() - this.lastPan < 250) this._scheduleFullRedraw();
      else if (this.cache?.quick) this.invalidate();
    }, 300);
  }

  _drawRows(ctx) {
    const { rows } = this.bounds;
    ctx.lineWidth = 1 / this.scale;
    ctx.strokeStyle = "#eef0f3";
    for (const row of rows) {
      ctx.beginPath();
      ctx.moveTo(0, row.y + row.height / 2);
      ctx.lineTo(this.bounds.width, row.y + row.height / 2);
      ctx.stroke();
    }
  }

  _drawEdges(ctx, fromBucket = 0) {
    for (let s = 0; s < 2; s++)
      for (let b = fromBucket; b < BUCKETS; b++) {
        const [r, g, bl] = s ? NEG : POS;
        const t = (b + 1) / BUCKETS;
        ctx.strokeStyle = `rgba(${r},${g},${bl},${0.12 + 0.6 * t})`;
        ctx.lineWidth = (0.4 + 3 * t * t) / Math.max(this.scale, 0.35);
        ctx.stroke(this.paths[s * BUCKETS + b]);
      }
  }

  _drawNodes(ctx) {
    const s = this.scale;
    ctx.lineWidth = 1 / s;
    for (const kind of ["error", "feature", "embedding", "logit"]) {
      const style = NODE_STYLE[kind];
      const r = style.r / Math.max(s, 0.6);
      ctx.fillStyle = style.fill;
      ctx.strokeStyle = style.stroke;
      const path = new Path2D();
      for (const n of this.nodes) {
        if (n.kind !== kind || !this.isShown(n)) continue;
        if (kind === "feature") {
          path.moveTo(n.x + r, n.y);
          path.arc(n.x, n.y, r, 0, 2 * Math.PI);
        } else path.rect(n.x - r, n.y - r, 2 * r, 2 * r);
      }
      ctx.fill(path);
      ctx.stroke(path);
    }
    // token texts under the embeddings, the logits' tokens and probabilities above them
    ctx.fillStyle = "#222";
    ctx.font = `${12 / Math.max(s, 0.6)}px system-ui, sans-serif`;
    ctx.textAlign = "center";
    for (const n of this.nodes) {
      if (n.kind === "embedding") {
        ctx.textBaseline = "top";
        ctx.fillText(visibleText(n.text), n.x, n.y + 10 / Math.max(s, 0.6));
      } else if (n.kind === "logit") {
        ctx.save();
        ctx.translate(n.x, n.y - 10 / Math.max(s, 0.6));
        ctx.rotate(-Math.PI / 4);
        ctx.textAlign = "left";
        ctx.textBaseline = "middle";
        ctx.fillText(`${visibleText(n.text)} ${percent(n.probability)}`, 0, 0);
        ctx.restore();
      }
    }
  }

  draw() {
    const t0 = performance.now();
    const ctx = this.ctx;
    if (!this.bounds) return;
    const c = this.cache;
    const sameZoom = c && c.scale === this.scale;
    const inside = c && Math.abs(this.tx - c.tx) <= c.mx && Math.abs(this.ty - c.ty) <= c.my;
    if (!c || (sameZoom && !inside)) this._renderCache(c !== null && performance.now() - (this.lastPan || 0) < 100);
    const cache = this.cache;
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, this.canvas.width, this.canvas.height);
    // place the bitmap: shifted by the pan since it was drawn, stretched by the zoom since then
    const k = this.scale / cache.scale;
    const ox = this.tx - (cache.tx + cache.mx) * k;
    const oy = this.ty - (cache.ty + cache.my) * k;
    ctx.drawImage(cache.canvas, ox * this.dpr, oy * this.dpr, cache.canvas.width * k, cache.canvas.height * k);
    ctx.setTransform(this.dpr * this.scale, 0, 0, this.dpr * this.scale, this.dpr * this.tx, this.dpr * this.ty);
    this._drawOverlay(ctx);
    this.frameTimes.push(performance.now() - t0);
    if (this.frameTimes.length > 1000) this.frameTimes.shift();
    if (!this.firstPaint) {
      this.firstPaint = performance.now();
      performance.mark("graph-first-paint");
    }
  }

  _drawOverlay(ctx) {
    const s = this.scale;
    const h = this.highlight;
    const ring = (n, color, width, extra = 0) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = width / s;
      ctx.beginPath();
      ctx.arc(n.x, n.y, (9 + extra) / Math.max(s, 0.6), 0, 2 * Math.PI);
      ctx.stroke();
    };
    for (const sn of h.supernodes) {
      const members = sn.members.map((id) => this.nodes[this.byId.get(id)]).filter(Boolean);
      if (!members.length) continue;
      const pad = 12 / Math.max(s, 0.6);
      const x0 = Math.min(...members.map((n) => n.x)) - pad;
      const x1 = Math.max(...members.map((n) => n.x)) + pad;
      const y0 = Math.min(...members.map((n) => n.y)) - pad;
      const y1 = Math.max(...members.map((n) => n.y)) + pad;
      ctx.strokeStyle = "#0d9488";
      ctx.lineWidth = 2 / s;
      ctx.setLineDash([6 / s, 4 / s]);
      ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
      ctx.setLineDash([]);
      ctx.fillStyle = "#0d9488";
      ctx.font = `bold ${12 / Math.max(s, 0.6)}px system-ui, sans-serif`;
      ctx.textAlign = "left";
      ctx.textBaseline = "bottom";
      ctx.fillText(sn.name, x0, y0 - 2 / s);
    }
    for (const id of h.matches) this._node(id, (n) => ring(n, "#f59e0b", 3, 2));
    for (const id of h.pinned) this._node(id, (n) => ring(n, "#0d9488", 2.5));
    const focus = [h.hovered, ...h.selected].filter(Boolean);
    this.overlayEdges = 0; // a hovered or selected node's own edges drawn this frame (for the tests)
    for (const id of focus) this._node(id, () => this._drawNeighbourEdges(ctx, this.byId.get(id)));
    for (const id of h.selected) this._node(id, (n) => ring(n, "#111", 2.5, 1));
    if (h.hovered) this._node(h.hovered, (n) => ring(n, "#111", 1.5));
  }

  _node(id, fn) {
    const i = this.byId?.get(id);
    if (i !== undefined && this.isShown(this.nodes[i])) fn(this.nodes[i]);
  }

  _drawNeighbourEdges(ctx, i) {
    const { source, target, weight } = this.edges;
    if (!this._adjacency) this._buildAdjacency();
    for (const e of this._adjacency[i]) {
      const a = this.nodes[source[e]];
      const b = this.nodes[target[e]];
      if (!this.isShown(a) || !this.isShown(b)) continue;
      const t = Math.sqrt(Math.abs(weight[e]) / this.maxAbs);
      const [r, g, bl] = weight[e] < 0 ? NEG : POS;
      ctx.strokeStyle = `rgba(${r},${g},${bl},0.9)`;
      ctx.lineWidth = (1.2 + 4 * t) / this.scale;
      ctx.beginPath();
      ctx.moveTo(a.x, a.y);
      ctx.lineTo(b.x, b.y);
      ctx.stroke();
      this.overlayEdges++;
    }
  }

  _buildAdjacency() {
    this._adjacency = adjacency(this.nodes.length, this.edges.source, this.edges.target);
  }

  /** The node's strongest incoming and outgoing edges: [{node, weight}] by |weight|. */
  neighbours(id, k = 8) {
    const i = this.byId.get(id);
    if (!this._adjacency) this._buildAdjacency();
    return strongestEdges(i, this._adjacency[i], this.nodes, this.edges, k);
  }

  // -- input -------------------------------------------------------------------------------------

  _bindEvents() {
    const c = this.canvas;
    let drag = null;
    c.addEventListener("mousedown", (e) => {
      drag = { x: e.offsetX, y: e.offsetY, moved: false };
    });
    window.addEventListener("mouseup", (e) => {
      if (drag && !drag.moved && e.target === c) {
        const n = this.nodeAt(e.offsetX, e.offsetY);
        this.handlers.click(n, e);
      }
      drag = null;
      c.style.cursor = "";
    });
    c.addEventListener("mousemove", (e) => {
      if (drag && (drag.moved || Math.abs(e.offsetX - drag.x) + Math.abs(e.offsetY - drag.y) > 3)) {
        drag.moved = true;
        c.style.cursor = "grabbing";
        this.panBy(e.offsetX - drag.x, e.offsetY - drag.y);
        drag.x = e.offsetX;
        drag.y = e.offsetY;
        return;
      }
      const n = this.nodeAt(e.offsetX, e.offsetY);
      const id = n ? n.id : null;
      if (id !== this.highlight.hovered) {
        this.highlight.hovered = id;
        this.requestDraw();
      }
      this.handlers.hover(n, e);
    });
    c.addEventListener("mouseleave", () => {
      this.highlight.hovered = null;
      this.handlers.hover(null);
      this.requestDraw();
    });
    c.addEventListener(
      "wheel",
      (e) => {
        e.preventDefault();
        this.zoomAt(Math.exp(-e.deltaY * 0.0015), e.offsetX, e.offsetY);
      },
      { passive: false },
    );
  }
}
