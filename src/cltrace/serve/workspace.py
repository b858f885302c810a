"""The folder of graphs that `cltrace serve` shows: listing, path confinement, pruned views for the
browser, per-graph saved work (pinned nodes, supernodes, labels) and feature pages.

Nothing here depends on the web stack, so it is tested directly as well as through the API.

The user's work on a graph lives in a sidecar JSON file beside it, ``{stem}.explorer.json``::

    {"format": "cltrace-explorer", "version": 1,
     "qParams": {"pinnedIds": ["3_117_5", ...], "supernodes": [["say-DA", "12_345_9", ...], ...]},
     "labels": {"3:117": "acronym letter", ...}}

``qParams`` follows circuit-tracer / Neuronpedia, so the file also loads with
`cltrace.replacement.supernodes.load_supernodes` (e.g. ``cltrace intervene --supernodes FILE``).
``labels`` holds the labels written while no feature store was at hand; with a store, labels go
into it (`FeatureStore.set_label`). The file is written atomically on every change.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cltrace.atomic import atomic_write_text
from cltrace.errors import CltraceError
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.prune import DEFAULT_EDGE_THRESHOLD, DEFAULT_NODE_THRESHOLD, cumulative_scores, node_influence, prune
from cltrace.notation import format_feature, parse_feature

GRAPH_SUFFIX = ".safetensors"
SIDECAR_SUFFIX = ".explorer.json"
#: A traced prompt's circuit, beside its graph in the trace folder (its "graph" field names the graph).
CIRCUIT_FILE = "circuit.json"
EXPLORER_FORMAT = "cltrace-explorer"
EXPLORER_VERSION = 1
#: Folders this deep below the served one are still searched for graphs.
MAX_DEPTH = 3
KIND_NAMES = {int(k): k.name.lower() for k in NodeKind}


class PathRefused(CltraceError):
    """A path that names something outside the served folder (HTTP 403)."""


class NotFound(CltraceError):
    """A graph, node or feature that does not exist (HTTP 404)."""


def _round_sig(values: torch.Tensor, digits: int = 4) -> list[float]:
    """Values rounded to `digits` significant digits: the browser needs no more, and the JSON of
    100,000 edges shrinks by half."""
    v = values.detach().double().cpu().numpy()
    mag = np.floor(np.log10(np.abs(v), where=v != 0, out=np.zeros_like(v)))
    scale = 10.0 ** (digits - 1 - mag)
    return (np.round(v * scale) / scale).tolist()


def _is_graph_file(path: Path) -> bool:
    """Whether `path` is a cltrace graph file (only the safetensors header is read)."""
    from safetensors import SafetensorError, safe_open

    from cltrace.graph.graph import GRAPH_FORMAT

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == GRAPH_FORMAT
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return False


def _shape(cfg: dict[str, Any]) -> tuple[Any, ...]:
    """What a graph and a feature store must share at least: the transcoder's kind and sizes."""
    return tuple(cfg.get(k) for k in ("kind", "n_layers", "d_model", "n_features"))


class Workspace:
    """The served folder. Every path the browser sends is relative to `root` and confined to it."""

    def __init__(self, root: str | Path, features: str | Path | None = None, cache_size: int = 8) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise CltraceError(f"'{root}' is not a folder: pass the folder holding your graph files")
        self.features = None if features is None else Path(features).resolve()
        if self.features is not None and not self.features.is_file():
            raise CltraceError(f"feature store '{features}' does not exist: build it with `cltrace features build`")
        self._lock = threading.RLock()  # guards the caches and the sidecar and circuit writes
        self._graphs: OrderedDict[tuple, Graph] = OrderedDict()
        self._views: OrderedDict[tuple, dict[str, Any]] = OrderedDict()
        self._stores: dict[tuple, tuple[Path | None, str]] = {}
        self._cache_size = cache_size

    @property
    def lock(self) -> threading.RLock:
        """Held while a file of the folder is read, changed and written back."""
        return self._lock

    # -- paths ---------------------------------------------------------------------------------------

    def resolve(self, rel: str, must_exist: bool = True) -> Path:
        """The absolute path of `rel` inside the served folder; PathRefused if it leads outside
        (absolute paths, '..', symlinks pointing out), NotFound if it does not exist."""
        if not isinstance(rel, str) or not rel.strip():
            raise CltraceError("no graph path given: pass a path relative to the served folder")
        if "\x00" in rel:
            raise CltraceError("the graph path holds a NUL character")
        candidate = Path(rel)
        if candidate.is_absolute():
            raise PathRefused(f"'{rel}' is an absolute path: give a path relative to the served folder")
        shown = rel if len(rel) <= 100 else rel[:100] + "..."
        try:
            full = (self.root / candidate).resolve()
            if not full.is_relative_to(self.root):
                raise PathRefused(f"'{shown}' is outside the served folder: only files under {self.root} are served")
            exists = full.is_file()
        except (OSError, ValueError):
            # a name too long for the file system, a symlink loop, text the file system cannot encode
            raise NotFound(f"no graph '{shown}' in the served folder: pick one from the list") from None
        if must_exist and not exists:
            raise NotFound(f"no graph '{shown}' in the served folder: pick one from the list")
        return full

    def rel(self, path: Path) -> str:
        return path.resolve().relative_to(self.root).as_posix()

    def circuit_file(self, graph_path: Path) -> Path | None:
        """The circuit.json beside a graph that names it (as `cltrace trace` writes it), else None."""
        path = graph_path.parent / CIRCUIT_FILE
        if not path.is_file() or not path.resolve().is_relative_to(self.root):
            return None
        try:
            named = json.loads(path.read_text(encoding="utf-8")).get("graph", "graph.safetensors")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            return path  # a damaged one is still this graph's: opening it says what is wrong
        return path if named == graph_path.name else None

    def sidecar(self, graph_path: Path) -> Path:
        return graph_path.with_name(graph_path.name[: -len(GRAPH_SUFFIX)] + SIDECAR_SUFFIX
                                    if graph_path.name.endswith(GRAPH_SUFFIX) else graph_path.name + SIDECAR_SUFFIX)

    # -- graphs --------------------------------------------------------------------------------------

    def graph_files(self) -> list[Path]:
        """Every graph file under the folder (hidden folders skipped, at most MAX_DEPTH deep)."""
        found = []
        for path in sorted(self.root.rglob(f"*{GRAPH_SUFFIX}")):
            rel = path.relative_to(self.root)
            if len(rel.parts) > MAX_DEPTH + 1 or any(p.startswith(".") for p in rel.parts):
                continue
            if path.resolve().is_relative_to(self.root) and _is_graph_file(path):
                found.append(path)
        return found

    def list_graphs(self) -> list[dict[str, Any]]:
        """One summary per graph file: path, prompt, model, counts, modification time."""
        out = []
        for path in self.graph_files():
            try:
                graph = self.load(path)
            except CltraceError:
                continue  # a damaged file is not listed; opening it directly says what is wrong
            md = graph.metadata
            out.append({
                "path": self.rel(path), "prompt": md.get("prompt"), "model": md.get("model"),
                "n_nodes": graph.n_nodes, "n_edges": graph.n_edges, "mtime": path.stat().st_mtime,
            })
        return out

    def load(self, path: Path) -> Graph:
        """The graph at `path` (absolute, already confined), cached while the file is unchanged."""
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._graphs:
                self._graphs.move_to_end(key)
                return self._graphs[key]
        graph = Graph.load(path)
        with self._lock:
            self._graphs[key] = graph
            while len(self._graphs) > self._cache_size:
                self._graphs.popitem(last=False)
        return graph

    def graph(self, rel: str) -> Graph:
        return self.load(self.resolve(rel))

    def view(self, rel: str, node_threshold: float = DEFAULT_NODE_THRESHOLD,
             edge_threshold: float = DEFAULT_EDGE_THRESHOLD, full: bool = False) -> dict[str, Any]:
        """What the browser draws: the graph pruned at the thresholds (or, `full`, every node and
        edge), as node records and columnar edges, with labels and the saved work."""
        path = self.resolve(rel)
        graph = self.load(path)
        st = path.stat()
        key = (str(path), st.st_mtime_ns, None if full else (round(node_threshold, 6), round(edge_threshold, 6)))
        with self._lock:
            cached = self._views.get(key)
        if cached is None:
            cached = self._build_view(graph, node_threshold, edge_threshold, full)
            with self._lock:
                self._views[key] = cached
                while len(self._views) > self._cache_size:
                    self._views.popitem(last=False)
        # Labels and saved work change without the graph changing: always fresh.
        labels = self.labels(path, graph)
        nodes = [dict(n, label=labels.get((n["layer"], n["feature"]), "")) if n["kind"] == "feature" else n
                 for n in cached["nodes"]]
        return {**cached, "path": self.rel(path), "nodes": nodes, "state": self.state(path),
                "features_db": self.store_path(path, graph) is not None, "has_circuit": self.circuit_file(path) is not None}

    def _build_view(self, graph: Graph, node_threshold: float, edge_threshold: float, full: bool) -> dict[str, Any]:
        md = graph.metadata
        if full:
            shown, infl = graph, cumulative_scores(node_influence(graph))
            pruning = None
        else:
            shown, result = prune(graph, node_threshold, edge_threshold)
            infl, pruning = result.cumulative_scores[result.node_mask], result.as_dict()  # = shown's influence column
        tokens = md.get("tokens") or []
        targets = md.get("targets") or []
        nodes = []
        n = shown.nodes
        logit_rank = 0
        for _i, (nid, kind, layer, pos, feat, tok, act, prob, inf) in enumerate(zip(
            shown.node_ids(), n.kind.tolist(), n.layer.tolist(), n.pos.tolist(), n.feature.tolist(), n.token.tolist(),
            _round_sig(n.activation), n.probability.tolist(), infl.tolist(),
        )):
            text = ""
            if kind == NodeKind.EMBEDDING:
                text = tokens[pos] if pos < len(tokens) and tokens[pos] is not None else f"<{tok}>"
            elif kind == NodeKind.LOGIT:
                target = targets[logit_rank] if logit_rank < len(targets) and isinstance(targets[logit_rank], dict) else {}
                text = str(target.get("label", f"<{tok}>"))
                logit_rank += 1
            nodes.append({
                "id": nid, "kind": KIND_NAMES[kind], "layer": layer, "pos": pos, "feature": feat, "token": tok,
                "text": text, "activation": act, "probability": round(prob, 6),
                "influence": None if not math.isfinite(inf) else round(inf, 6),
            })
        return {
            "metadata": {
                "prompt": md.get("prompt"), "tokens": tokens, "model": md.get("model"), "n_layers": graph.n_layers,
                "n_pos": len(tokens) if tokens else (int(graph.nodes.pos.max()) + 1 if graph.n_nodes else 0),
                "targets": targets, "scores": md.get("scores"), "pruning": pruning,
                "n_nodes_full": graph.n_nodes, "n_edges_full": graph.n_edges,
            },
            "nodes": nodes,
            "edges": {
                "source": shown.edge_source.tolist(), "target": shown.edge_target.tolist(),
                "weight": _round_sig(shown.edge_weight),
            },
        }

    # -- saved work ----------------------------------------------------------------------------------

    def _read_sidecar(self, graph_path: Path) -> dict[str, Any]:
        path = self.sidecar(graph_path)
        empty = {"format": EXPLORER_FORMAT, "version": EXPLORER_VERSION, "qParams": {"pinnedIds": [], "supernodes": []},
                 "labels": {}}
        if not path.is_file():
            return empty
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CltraceError(f"cannot read '{path.name}' ({str(exc).splitlines()[0]}): fix or delete it") from None
        if not isinstance(data, dict) or data.get("format") != EXPLORER_FORMAT:
            raise CltraceError(f"'{path.name}' is not a graph explorer file: move it away")
        q = data.get("qParams")
        q = q if isinstance(q, dict) else {}
        return {**empty, "qParams": {"pinnedIds": list(q.get("pinnedIds") or []),
                                     "supernodes": list(q.get("supernodes") or [])},
                "labels": dict(data.get("labels") or {})}

    def _write_sidecar(self, graph_path: Path, data: dict[str, Any]) -> None:
        atomic_write_text(self.sidecar(graph_path), json.dumps(data, indent=1), what="graph explorer state")

    def state(self, graph_path: Path) -> dict[str, Any]:
        """The saved work on a graph: {"pinned": [node ids], "supernodes": [{"name", "members"}]}."""
        q = self._read_sidecar(graph_path)["qParams"]
        return {"pinned": q["pinnedIds"], "supernodes": [{"name": s[0], "members": s[1:]} for s in q["supernodes"]]}

    def save_state(self, rel: str, pinned: list[str], supernodes: list[dict[str, Any]]) -> dict[str, Any]:
        """Replace a graph's pinned nodes and supernodes (checked against the graph), atomically."""
        from cltrace.replacement.supernodes import supernodes_from_json

        path = self.resolve(rel)
        graph = self.load(path)
        ids = graph.node_ids()
        known = set(ids)
        features = {nid for nid, k in zip(ids, graph.nodes.kind.tolist()) if k == NodeKind.FEATURE}
        for nid in pinned:
            if nid not in known:
                raise CltraceError(f"cannot pin '{nid}': no such node in this graph")
        if len(set(pinned)) != len(pinned):
            raise CltraceError("a node is pinned twice: list each node once")
        groups = [[s["name"], *s["members"]] for s in supernodes]
        supernodes_from_json(groups)  # names valid and unique, members feature node ids
        for name, *members in groups:
            for nid in members:
                if nid not in features:
                    raise CltraceError(f"supernode {name!r}: '{nid}' is not a feature node of this graph; group features only")
        with self._lock:
            data = self._read_sidecar(path)
            data["qParams"] = {"pinnedIds": list(pinned), "supernodes": groups}
            self._write_sidecar(path, data)
        return self.state(path)

    # -- features ------------------------------------------------------------------------------------

    def store_path(self, graph_path: Path, graph: Graph) -> Path | None:
        """The feature store for a graph: the one given to the server, else a ``*.db`` store in the
        served folder; None when there is none (`_match_store` says why)."""
        return self._match_store(graph)[0]

    def _match_store(self, graph: Graph) -> tuple[Path | None, str]:
        """(the feature store for `graph`, why there is none). A graph that records its transcoder's
        fingerprint gets only a store of that very transcoder (a retrained one of the same shape has
        other features); an older graph, one built for a transcoder of its shape (or the given one)."""
        cfg = graph.metadata.get("transcoder")
        cfg = cfg if isinstance(cfg, dict) else {}
        shape = _shape(cfg)
        fingerprint = graph.metadata.get("transcoder_fingerprint")
        key = (shape, fingerprint, self.features)
        with self._lock:
            if key in self._stores:
                return self._stores[key]
        found, others = None, []
        for candidate in [self.features] if self.features is not None else sorted(self.root.glob("*.db")):
            try:
                from cltrace.features import FeatureStore

                with FeatureStore(candidate) as store:
                    meta = dict(store.meta)
            except CltraceError:
                continue
            same_shape = self.features is not None or _shape(meta.get("transcoder") or {}) == shape
            if fingerprint is None and same_shape or fingerprint is not None and meta.get("fingerprint") == fingerprint:
                found = candidate
                break
            if same_shape:
                others.append(candidate.name)
        why = (
            f"the feature store {', '.join(others)} was built for another transcoder than this graph's (fingerprint "
            f"{str(fingerprint)[:12]}…), so its pages would describe other features: build one for the graph's "
            "transcoder with `cltrace features build -t T` and serve it beside the graph (or pass --features)"
            if others else
            "no feature store for this graph's transcoder: build one with `cltrace features build` and "
            "put it in the served folder (or pass --features)"
        )
        with self._lock:
            self._stores[key] = (found, why)
        return found, why

    def labels(self, graph_path: Path, graph: Graph) -> dict[tuple[int, int], str]:
        """(layer, feature) -> the label shown: the store's (a person's, else automatic), and the
        sidecar's labels where no store is at hand."""
        out: dict[tuple[int, int], str] = {}
        db = self.store_path(graph_path, graph)
        if db is not None:
            from cltrace.features import FeatureStore

            with FeatureStore(db) as store:
                # search("") matches every feature: its label, or else its automatic label
                out = {(l, f): s for l, f, s in store.search("", limit=store.n_layers * store.n_features)}
        else:
            for key, text in self._read_sidecar(graph_path)["labels"].items():
                out[parse_feature(key)] = text
        return out

    def _feature_in_graph(self, graph: Graph, layer: int, feature: int) -> None:
        is_feat = graph.nodes.kind == int(NodeKind.FEATURE)
        if not bool((is_feat & (graph.nodes.layer == layer) & (graph.nodes.feature == feature)).any()):
            raise NotFound(f"feature {layer}:{feature} is not in this graph")

    def feature_page(self, rel: str, layer: int, feature: int) -> dict[str, Any]:
        """The feature page of `layer:feature` from the graph's feature store; NotFound without one."""
        from cltrace.features import FeatureStore

        path = self.resolve(rel)
        graph = self.load(path)
        self._feature_in_graph(graph, layer, feature)
        db, why = self._match_store(graph)
        if db is None:
            raise NotFound(why)
        with FeatureStore(db) as store:
            return store.page(layer, feature).to_dict()

    def set_label(self, rel: str, layer: int, feature: int, label: str) -> str:
        """Set (or, with "", remove) a feature's label: in the feature store if there is one, else
        in the graph's sidecar file. Returns where it went ("store" or "sidecar")."""
        from cltrace.features import FeatureStore

        if len(label) > 500:
            raise CltraceError("a label is at most 500 characters")
        path = self.resolve(rel)
        graph = self.load(path)
        self._feature_in_graph(graph, layer, feature)
        db = self.store_path(path, graph)
        if db is not None:
            with FeatureStore(db) as store:
                store.set_label(layer, feature, label.strip() or None)
            return "store"
        with self._lock:
            data = self._read_sidecar(path)
            if label.strip():
                data["labels"][format_feature(layer, feature)] = label.strip()
            else:
                data["labels"].pop(format_feature(layer, feature), None)
            self._write_sidecar(path, data)
        return "sidecar"

    def new_graph_path(self, name: str, taken: Collection[Path] = ()) -> Path:
        """A fresh graph file path in the served folder for a graph called `name`, neither on disk
        nor in `taken` (the paths of graphs still being computed)."""
        import re

        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:60] or "graph"
        path = self.root / f"{stem}{GRAPH_SUFFIX}"
        k = 2
        while path.exists() or path.is_symlink() or path in taken:  # a dangling link is taken too
            path = self.root / f"{stem}-{k}{GRAPH_SUFFIX}"
            k += 1
        return path
