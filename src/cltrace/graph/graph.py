"""The attribution graph as data: a node table, COO edges and metadata.

Node order is fixed: the selected features, then the error nodes, then the token embeddings,
then the target logits (circuit-tracer's order). An edge s → t carries the source's activation
times the virtual weight from s to t: the direct effect, through the frozen residual stream and
attention OV circuits only, of s's output on t's pre-activation (a feature) or on t's logit minus
the vocabulary-mean logit (a logit node).

On disk a graph is one safetensors file (`Graph.save` / `Graph.load`): the node columns and the
COO edges as tensors, and the JSON metadata in the safetensors header together with
``format: "cltrace-graph"``, a ``schema_version`` and (from schema version 2) a ``sha256`` of
everything else in the file: the other header entries and every tensor's name, dtype, shape and
bytes. Safetensors itself checks only that the header's offsets fit the file, so without it a
flipped bit in the edge weights would load as a different graph. Never a dense N×N matrix.

Node ids follow the circuit-tracer / Neuronpedia conventions: features
``"{layer}_{feature}_{pos}"``, error nodes ``"{layer}_-1_{pos}"``, embeddings ``"E_{token}_{pos}"``,
logits ``"{n_layers+1}_{token}_{pos}"``.
"""

from __future__ import annotations

import copy
import heapq
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cltrace.atomic import atomic_write
from cltrace.errors import CltraceError, first_line
from cltrace.fingerprint import sha256_hex, tensor_bytes
from cltrace.graph.nodes import _NODE_COLUMNS, Edge, GraphPath, NodeKind, NodeTable, _kind_name

#: Version of the on-disk layout written by `Graph.save`; loading a newer one is refused.
#: 1: no checksum (still read); 2: the header holds ``sha256`` (see `_graph_digest`), checked at load.
GRAPH_SCHEMA_VERSION = 2
#: The first schema version whose files must carry a ``sha256``.
GRAPH_CHECKSUM_SINCE = 2
#: The value of the ``format`` key in a graph file's safetensors header.
GRAPH_FORMAT = "cltrace-graph"


#: Top-level metadata lists holding one value per node; `Graph.subgraph` slices them with the nodes.
#: (Per-node data is better kept as a tensor in `NodeTable.extra`.)
PER_NODE_METADATA_KEYS = ("target_value", "target_constant", "target_bias")


@dataclass
class Graph:
    """An attribution graph: nodes, edges (target, source, weight) and metadata."""

    nodes: NodeTable
    edge_target: torch.Tensor  # [edge] int64, index into nodes
    edge_source: torch.Tensor  # [edge] int64, index into nodes
    edge_weight: torch.Tensor  # [edge] float32
    metadata: dict[str, Any] = field(default_factory=dict)
    _id_index: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)
    _id_index_key: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def from_edges(cls, nodes: NodeTable, edges: Any, metadata: dict[str, Any] | None = None) -> Graph:
        """A graph from a node table and edges given as (source, target, weight) triples."""
        edges = list(edges)
        src = torch.tensor([int(e[0]) for e in edges], dtype=torch.int64)
        tgt = torch.tensor([int(e[1]) for e in edges], dtype=torch.int64)
        w = torch.tensor([float(e[2]) for e in edges], dtype=torch.float32)
        graph = cls(nodes, tgt, src, w, dict(metadata or {}))
        graph.validate()
        return graph

    @property
    def n_nodes(self) -> int:
        return len(self.nodes)

    @property
    def n_edges(self) -> int:
        return int(self.edge_weight.shape[0])

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Check shapes, dtypes, index bounds and the node order; raise CltraceError if wrong."""
        n = self.n_nodes
        for name, dtype in _NODE_COLUMNS.items():
            col = getattr(self.nodes, name)
            if not isinstance(col, torch.Tensor) or col.dim() != 1 or col.shape[0] != n:
                raise CltraceError(f"graph node column '{name}' must be a 1-D tensor of length {n}; rebuild the graph")
            if col.dtype != dtype:
                raise CltraceError(f"graph node column '{name}' has dtype {col.dtype}, expected {dtype}; convert it")
        if self.nodes.influence is not None:
            infl = self.nodes.influence
            if infl.dim() != 1 or infl.shape[0] != n or infl.dtype != torch.float32:
                raise CltraceError(f"graph node column 'influence' must be float32 of length {n} or None")
        for name, col in self.nodes.extra.items():
            if not isinstance(col, torch.Tensor) or col.dim() != 1 or col.shape[0] != n:
                raise CltraceError(f"graph extra node column '{name}' must be a 1-D tensor of length {n}")
        e = self.n_edges
        for name, dtype in (("edge_target", torch.int64), ("edge_source", torch.int64), ("edge_weight", torch.float32)):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != e:
                raise CltraceError(f"graph '{name}' must be a 1-D tensor of length {e}; rebuild the graph")
            if t.dtype != dtype:
                raise CltraceError(f"graph '{name}' has dtype {t.dtype}, expected {dtype}; convert it")
        if e and (int(self.edge_target.min()) < 0 or int(self.edge_source.min()) < 0
                  or int(self.edge_target.max()) >= n or int(self.edge_source.max()) >= n):
            raise CltraceError(f"graph edges index nodes outside 0..{n - 1}; the node table and edges do not match")
        kinds = self.nodes.kind
        if n and (int(kinds.min()) < 0 or int(kinds.max()) > int(NodeKind.LOGIT)):
            raise CltraceError("graph node kinds must be NodeKind values 0..3")
        if n > 1 and bool((kinds[1:] < kinds[:-1]).any()):
            raise CltraceError("graph nodes must be ordered features, errors, embeddings, logits; reorder the node table")

    # ------------------------------------------------------------------ save / load

    def save(self, path: str | os.PathLike) -> Path:
        """Write the graph to one safetensors file, atomically (temp file, fsync, rename)."""
        from safetensors.torch import save_file

        self.validate()
        path = Path(path)
        try:
            meta_json = json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise CltraceError(f"graph metadata is not JSON-serialisable ({exc}); keep only str/int/float/bool/list/dict values") from None
        tensors = {f"nodes.{name}": getattr(self.nodes, name).detach().cpu().contiguous() for name in _NODE_COLUMNS}
        if self.nodes.influence is not None:
            tensors["nodes.influence"] = self.nodes.influence.detach().cpu().contiguous()
        for name, col in self.nodes.extra.items():
            tensors[f"nodes.extra.{name}"] = col.detach().cpu().contiguous()
        tensors["edges.target"] = self.edge_target.detach().cpu().contiguous()
        tensors["edges.source"] = self.edge_source.detach().cpu().contiguous()
        tensors["edges.weight"] = self.edge_weight.detach().cpu().contiguous()
        header = {"format": GRAPH_FORMAT, "schema_version": str(GRAPH_SCHEMA_VERSION), "metadata": meta_json}
        header["sha256"] = _graph_digest(header, tensors)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header), what="graph")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Graph:
        """Read a graph written by `save`.

        CltraceError (one line naming the file) for a missing, truncated, damaged, foreign or newer
        file; a file of schema version 2 or later is checked against the sha256 in its header, so
        damage anywhere in it is refused rather than read as a different graph.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        redo = "re-create it (re-run the command that wrote it, e.g. `cltrace attribute`)"
        if not path.is_file():
            raise CltraceError(f"graph file '{path}' does not exist or is not a file; check the path")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                if header.get("format") != GRAPH_FORMAT:
                    raise CltraceError(
                        f"'{path}' is not a cltrace graph file (format {header.get('format')!r}); "
                        "pass a file written by Graph.save"
                    )
                try:
                    version = int(header.get("schema_version", ""))
                except ValueError:
                    raise CltraceError(f"'{path}' has an unreadable schema_version; the file is damaged: {redo}") from None
                if version > GRAPH_SCHEMA_VERSION:
                    raise CltraceError(
                        f"'{path}' uses graph schema_version {version}, newer than this cltrace reads "
                        f"({GRAPH_SCHEMA_VERSION}); upgrade cltrace, or if no newer cltrace wrote it the file is damaged: {redo}"
                    )
                if version < 1:
                    raise CltraceError(f"'{path}' has schema_version {version}, which no cltrace writes; the file is damaged: {redo}")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except CltraceError:
            raise
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:  # truncated / not safetensors
            raise CltraceError(
                f"cannot read graph file '{path}' ({type(exc).__name__}: {first_line(exc)}); "
                f"it is truncated or damaged, or not a safetensors file: {redo}"
            ) from None
        # Checked before anything is interpreted: any damage reads as this one message.
        recorded = header.get("sha256")
        if recorded is None and version >= GRAPH_CHECKSUM_SINCE:
            raise CltraceError(f"graph file '{path}' has no sha256 in its header, which schema_version {version} requires; "
                               f"the file is damaged: {redo}")
        if recorded is not None and recorded != _graph_digest(header, tensors):
            raise CltraceError(f"graph file '{path}' is damaged: its contents do not match the sha256 recorded in it; {redo}")
        needed = [f"nodes.{n}" for n in _NODE_COLUMNS] + ["edges.target", "edges.source", "edges.weight"]
        missing = [k for k in needed if k not in tensors]
        if missing:
            raise CltraceError(f"graph file '{path}' lacks tensors {missing}; the file is damaged: {redo}")
        try:
            metadata = json.loads(header.get("metadata", "{}"))
        except (ValueError, RecursionError):
            raise CltraceError(f"graph file '{path}' has unreadable JSON metadata; the file is damaged: {redo}") from None
        if not isinstance(metadata, dict):
            raise CltraceError(f"graph file '{path}' has metadata that is a JSON {type(metadata).__name__}, not an object; "
                               f"the file is damaged: {redo}")
        nodes = NodeTable(
            **{n: tensors[f"nodes.{n}"] for n in _NODE_COLUMNS}, influence=tensors.get("nodes.influence"),
            extra={k[len("nodes.extra."):]: v for k, v in sorted(tensors.items()) if k.startswith("nodes.extra.")},
        )
        graph = cls(nodes, tensors["edges.target"], tensors["edges.source"], tensors["edges.weight"], metadata)
        try:
            graph.validate()
        except CltraceError as exc:
            raise CltraceError(f"graph file '{path}' is inconsistent: {exc}") from None
        return graph

    # ------------------------------------------------------------------ ids

    @property
    def n_layers(self) -> int:
        """The model's layer count: metadata ``n_layers``, else the logit nodes' layer, else max layer + 1."""
        if "n_layers" in self.metadata:
            return int(self.metadata["n_layers"])
        logit = self.nodes.kind == int(NodeKind.LOGIT)
        if bool(logit.any()):
            return int(self.nodes.layer[logit][0])
        return int(self.nodes.layer.max()) + 1 if self.n_nodes else 0

    def node_id(self, i: int) -> str:
        """The circuit-tracer style id of node `i`."""
        n = self.n_nodes
        if not -n <= int(i) < n:
            raise CltraceError(f"node index {i} is outside 0..{n - 1}")
        i = int(i) % n
        kind = int(self.nodes.kind[i])
        layer, pos = int(self.nodes.layer[i]), int(self.nodes.pos[i])
        if kind == NodeKind.FEATURE:
            return f"{layer}_{int(self.nodes.feature[i])}_{pos}"
        if kind == NodeKind.ERROR:
            return f"{layer}_-1_{pos}"
        if kind == NodeKind.EMBEDDING:
            return f"E_{int(self.nodes.token[i])}_{pos}"
        return f"{self.n_layers + 1}_{int(self.nodes.token[i])}_{pos}"

    def node_ids(self) -> list[str]:
        """The ids of all nodes, in node order."""
        kinds = self.nodes.kind.tolist()
        layers, poss = self.nodes.layer.tolist(), self.nodes.pos.tolist()
        feats, toks = self.nodes.feature.tolist(), self.nodes.token.tolist()
        top = self.n_layers + 1
        out = []
        for k, l, p, f, t in zip(kinds, layers, poss, feats, toks):
            if k == NodeKind.FEATURE:
                out.append(f"{l}_{f}_{p}")
            elif k == NodeKind.ERROR:
                out.append(f"{l}_-1_{p}")
            elif k == NodeKind.EMBEDDING:
                out.append(f"E_{t}_{p}")
            else:
                out.append(f"{top}_{t}_{p}")
        return out

    def find(self, node_id: str) -> int:
        """The index of the node with this id; CltraceError if there is none."""
        key = (id(self.nodes), self.n_nodes, id(self.nodes.kind), id(self.nodes.feature), id(self.nodes.token))
        if self._id_index is None or self._id_index_key != key:
            self._id_index = {nid: i for i, nid in enumerate(self.node_ids())}
            self._id_index_key = key
        try:
            return self._id_index[node_id]
        except KeyError:
            raise CltraceError(
                f"no node '{node_id}' in this graph; ids look like '{{layer}}_{{feature}}_{{pos}}', "
                "'{layer}_-1_{pos}' (error), 'E_{token}_{pos}' or '{n_layers+1}_{token}_{pos}' (logit)"
            ) from None

    def _index(self, node: int | str) -> int:
        if isinstance(node, str):
            return self.find(node)
        n = self.n_nodes
        if not -n <= int(node) < n:
            raise CltraceError(f"node index {node} is outside 0..{n - 1}")
        return int(node) % n

    # ------------------------------------------------------------------ neighbourhoods

    def _top_edges(self, mask: torch.Tensor, k: int | None) -> list[Edge]:
        idx = mask.nonzero().flatten()
        w = self.edge_weight[idx]
        order = torch.sort(w.abs(), descending=True, stable=True).indices
        if k is not None:
            order = order[: max(int(k), 0)]
        idx = idx[order]
        return [Edge(s, t, w) for s, t, w in zip(self.edge_source[idx].tolist(), self.edge_target[idx].tolist(),
                                                 self.edge_weight[idx].tolist())]

    def inputs(self, node: int | str, k: int | None = 10) -> list[Edge]:
        """The `k` strongest edges into `node` (index or id), by |weight|, strongest first."""
        return self._top_edges(self.edge_target == self._index(node), k)

    def outputs(self, node: int | str, k: int | None = 10) -> list[Edge]:
        """The `k` strongest edges out of `node` (index or id), by |weight|, strongest first."""
        return self._top_edges(self.edge_source == self._index(node), k)

    # ------------------------------------------------------------------ paths

    def normalized_weights(self) -> torch.Tensor:
        """[edge] |weight| divided by the sum of |weight| over its target's incoming edges
        (the row-normalised |A| that pruning and path scores use)."""
        a = self.edge_weight.abs().to(torch.float32)
        rowsum = torch.zeros(self.n_nodes, dtype=a.dtype).index_add_(0, self.edge_target, a)
        return a / rowsum.clamp(min=1e-10)[self.edge_target]

    def top_paths(self, source: int | str, target: int | str, k: int = 5) -> list[GraphPath]:
        """The `k` paths from `source` to `target` with the largest product of row-normalised
        |edge weights|, best first (fewer if fewer exist). Exact: best-first search over the DAG,
        guided by the best completion score of every node (computed by dynamic programming)."""
        s, t = self._index(source), self._index(target)
        if k <= 0:
            return []
        n = self.n_nodes
        # Coalesce duplicate (target, source) pairs and drop zero-weight edges; work in log space.
        a = self.normalized_weights().to(torch.float64)
        key = self.edge_target * n + self.edge_source
        ukey, inv = torch.unique(key, return_inverse=True)
        ua = torch.zeros(ukey.shape[0], dtype=torch.float64).index_add_(0, inv, a)
        keep = ua > 0
        ukey, ua = ukey[keep], ua[keep]
        et, es, logw = ukey // n, ukey % n, ua.log()
        # best[v] = max log-score of a path v -> t (the exact heuristic); iterate to a fixed point.
        best = torch.full((n,), -math.inf, dtype=torch.float64)
        best[t] = 0.0
        for _ in range(n + 1):
            cand = torch.full((n,), -math.inf, dtype=torch.float64)
            cand.scatter_reduce_(0, es, logw + best[et], reduce="amax", include_self=True)
            cand[t] = 0.0
            new = torch.maximum(best, cand)
            if torch.equal(new, best):
                break
            best = new
        else:
            raise CltraceError("graph has a cycle; attribution graphs must be acyclic")
        if best[s] == -math.inf:
            return []
        # Out-adjacency (CSR by source) restricted to edges that can still reach t.
        useful = best[et] > -math.inf
        es_u, et_u, lw_u = es[useful], et[useful], logw[useful]
        order = torch.argsort(es_u, stable=True)
        es_u, et_u, lw_u = es_u[order], et_u[order], lw_u[order]
        ptr = torch.zeros(n + 1, dtype=torch.int64)
        ptr[1:] = torch.cumsum(torch.bincount(es_u, minlength=n), 0)
        ptr_l, et_l, lw_l, best_l = ptr.tolist(), et_u.tolist(), lw_u.tolist(), best.tolist()
        heap: list[tuple[float, int, float, tuple[int, ...]]] = [(-best_l[s], 0, 0.0, (s,))]
        counter = 1
        out: list[GraphPath] = []
        while heap and len(out) < k:
            _, _, g, path = heapq.heappop(heap)
            v = path[-1]
            if v == t:
                out.append(GraphPath(list(path), math.exp(g)))
                continue
            for j in range(ptr_l[v], ptr_l[v + 1]):
                w = et_l[j]
                g2 = g + lw_l[j]
                heapq.heappush(heap, (-(g2 + best_l[w]), counter, g2, path + (w,)))
                counter += 1
        return out

    # ------------------------------------------------------------------ whole-graph views

    def to_dense(self, max_nodes: int = 16384) -> torch.Tensor:
        """The adjacency matrix A[target, source] (float32, duplicates summed); small graphs only."""
        n = self.n_nodes
        if n > max_nodes:
            raise CltraceError(
                f"graph has {n} nodes, more than max_nodes={max_nodes} for a dense matrix; "
                "use the COO edges, or pass a larger max_nodes"
            )
        dense = torch.zeros(n * n, dtype=torch.float32)
        dense.index_add_(0, self.edge_target * n + self.edge_source, self.edge_weight.to(torch.float32))
        return dense.view(n, n)

    def summary(self) -> dict[str, int]:
        """Counts: nodes by kind, and edges."""
        counts = torch.bincount(self.nodes.kind.to(torch.int64), minlength=len(NodeKind)).tolist()
        out = {_kind_name(k): int(counts[k]) for k in range(len(NodeKind))}
        out["nodes"] = self.n_nodes
        out["edges"] = self.n_edges
        return out

    def subgraph(self, node_mask: torch.Tensor, edge_mask: torch.Tensor | None = None) -> Graph:
        """The graph restricted to the nodes in `node_mask` (bool [node]) and the edges in
        `edge_mask` (bool [edge], default all) whose two ends are kept; node indices remapped."""
        node_mask = node_mask.to(torch.bool)
        if node_mask.shape != (self.n_nodes,):
            raise CltraceError(f"node_mask must have shape ({self.n_nodes},), got {tuple(node_mask.shape)}")
        keep_e = node_mask[self.edge_target] & node_mask[self.edge_source]
        if edge_mask is not None:
            if edge_mask.shape != (self.n_edges,):
                raise CltraceError(f"edge_mask must have shape ({self.n_edges},), got {tuple(edge_mask.shape)}")
            keep_e &= edge_mask.to(torch.bool)
        remap = torch.cumsum(node_mask.to(torch.int64), 0) - 1
        metadata = copy.deepcopy(self.metadata)
        keep_list = node_mask.tolist()
        for key in PER_NODE_METADATA_KEYS:
            values = metadata.get(key)
            if isinstance(values, list) and len(values) == self.n_nodes:
                metadata[key] = [v for v, m in zip(values, keep_list) if m]
        return Graph(
            nodes=self.nodes.select(node_mask),
            edge_target=remap[self.edge_target[keep_e]],
            edge_source=remap[self.edge_source[keep_e]],
            edge_weight=self.edge_weight[keep_e].clone(),
            metadata=metadata,
        )

def _graph_digest(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of a graph file's content: its header entries other than ``sha256`` itself, then every
    tensor (sorted by name) as name, dtype, shape and raw bytes.

    Computed from what `Graph.save` hands to safetensors and from what `Graph.load` reads back, so
    it does not depend on how safetensors lays the file out.
    """
    entries = sorted((k, v) for k, v in header.items() if k != "sha256")
    names = sorted(tensors)
    # The JSON prefix fixes every length, so the concatenated tensor bytes that follow are unambiguous.
    layout = [entries, [[n, str(tensors[n].dtype), list(tensors[n].shape)] for n in names]]
    return sha256_hex([json.dumps(layout, separators=(",", ":")), *(tensor_bytes(tensors[n]) for n in names)])


__all__ = ["GRAPH_FORMAT", "GRAPH_SCHEMA_VERSION", "PER_NODE_METADATA_KEYS", "Edge", "Graph", "GraphPath", "NodeKind", "NodeTable"]
