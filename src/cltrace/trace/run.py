"""Trace a prompt end to end: attribution graph, pruning, scores, a readable report and a picture.

This is what `cltrace trace` (and `make demo`) runs. Everything it makes goes into one folder:

    graph.safetensors  the full attribution graph (`Graph.load`; `cltrace serve FOLDER` explores it)
    graph.png       the pruned graph, with the strongest paths to the top prediction drawn in black
    circuit.json    the circuit: a few labelled supernodes with signed effects and edges, validated
                    by intervening (docs/circuit.md)
    circuit.png     the circuit drawn as a diagram
    supernodes.json the automatic supernodes of the pruned graph (`cltrace supernodes` edits them)
    report.txt      the report printed on stdout, the circuit first
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cltrace.atomic import atomic_write_text, check_writable
from cltrace.cache import cache_dir
from cltrace.device import place
from cltrace.features import FeatureStore, build_feature_store
from cltrace.features.labeller import label_inputs
from cltrace.fingerprint import transcoder_fingerprint
from cltrace.graph.attribution import attribute
from cltrace.graph.config import CircuitConfig
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.prune import prune
from cltrace.graph.targets import TargetSpec
from cltrace.replacement import ReplacementModel
from cltrace.trace.circuit import (
    CIRCUIT_FILE,
    CIRCUIT_PICTURE,
    SUPERNODES_FILE,
    CircuitResult,
    circuit_metadata,
    find_circuit,
    format_circuit,
    write_circuit,
)
from cltrace.trace.labels import Labels
from cltrace.trace.plot import plot_graph
from cltrace.trace.report import TraceReport, trace_report

log = logging.getLogger(__name__)

GRAPH_FILE = "graph.safetensors"
PICTURE_FILE = "graph.png"
REPORT_FILE = "report.txt"


@dataclass
class TraceResult:
    """What `trace_prompt` made."""

    graph: Graph
    pruned: Graph
    report: TraceReport
    folder: Path
    circuit: CircuitResult | None = None

    @property
    def graph_path(self) -> Path:
        return self.folder / GRAPH_FILE

    @property
    def picture_path(self) -> Path:
        return self.folder / PICTURE_FILE


def feature_db_path(transcoder: Any) -> Path:
    """Where the automatic feature database of `transcoder` lives: the user's cache, one file per
    transcoder (named by a hash of its weights, so a retrained one gets a new database)."""
    return cache_dir() / "features" / f"{transcoder_fingerprint(transcoder)[:16]}.db"


def ensure_feature_db(loaded: Any, transcoder: Any, n_tokens: int, progress: bool = True) -> Path:
    """The automatic feature database of `transcoder`, built (or resumed, or extended to `n_tokens`)
    over the default corpus first when needed, with the measured input label of every feature."""
    path = feature_db_path(transcoder)
    path.parent.mkdir(parents=True, exist_ok=True)
    build_feature_store(loaded, transcoder, "default", n_tokens, path, resume=True, progress=progress,
                        autocast_bf16=True)
    with FeatureStore(path) as store:
        if "auto_labels" not in store.meta:  # measured input labels: once per store
            log.info("labelling every feature from measured evidence (once)")
            label_inputs(store, loaded, transcoder, "default", progress=progress, autocast_bf16=True)
    return path


def check_trace_folder(folder: str | Path) -> Path:
    """Refuse up front, in one line, a `folder` that `trace_prompt` could not write its files into
    (a file, an unwritable place, or one of its files' names taken by a folder)."""
    folder = check_writable(folder, "trace", folder=True)
    if folder.is_dir():
        for name, what in ((GRAPH_FILE, "graph"), (PICTURE_FILE, "picture"), (REPORT_FILE, "report"),
                           (CIRCUIT_FILE, "circuit"), (CIRCUIT_PICTURE, "circuit picture"), (SUPERNODES_FILE, "supernodes")):
            check_writable(folder / name, what)
    return folder


def trace_prompt(
    replacement: ReplacementModel,
    prompt: str,
    folder: str | Path,
    *,
    feature_db: Any = None,
    transcoder_path: str | None = None,
    targets: list[TargetSpec] | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    n_paths: int = 5,
    circuit: CircuitConfig | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> TraceResult:
    """Attribute `prompt`, prune the graph, find and validate its circuit, and write the graph, the
    circuit, their pictures and the report to `folder`.

    `feature_db`: an open `FeatureStore` for the transcoder (labels and where features fire), or None.
    `transcoder_path` is recorded in the graph so that `cltrace serve` can intervene on it.
    `targets`: token ids, one-token strings or `LogitDifference`s (None: the top logits; the circuit
    explains the first). `max_feature_nodes`, `batch_size`: None takes `AttributionConfig`'s. `device`:
    where the graph is computed (None: where the replacement model is; else its model and transcoder
    are moved there).
    """
    folder = check_trace_folder(folder)
    replacement.transcoder.to(place(replacement.model.model, device))
    folder.mkdir(parents=True, exist_ok=True)
    graph = attribute(replacement, prompt, targets=targets, max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                      progress=progress)
    pruned, result = prune(graph, node_threshold=node_threshold, edge_threshold=edge_threshold)
    graph.metadata["scores"] = result.as_dict()
    if transcoder_path is not None:
        graph.metadata["transcoder_path"] = transcoder_path
    found = find_circuit(replacement, graph, Labels(feature_db), config=circuit, influence=result.node_influence)
    write_circuit(folder, found, graph.n_layers)
    graph.metadata["circuit"] = circuit_metadata(found.circuit)
    graph.save(folder / GRAPH_FILE)

    report = trace_report(graph, pruned, replacement.model, replacement.transcoder, feature_db, n_paths=n_paths)
    report.circuit_text = format_circuit(found.circuit)
    _plot_full_graph(pruned, report, prompt, folder / PICTURE_FILE)
    atomic_write_text(folder / REPORT_FILE, report.format() + "\n")
    return TraceResult(graph, pruned, report, folder, found)


def _plot_full_graph(pruned: Graph, report: TraceReport, prompt: str, path: Path) -> None:
    """The pruned graph's picture, the report's paths drawn in black and their features labelled."""
    notes = {(f.layer, f.feature, f.pos): f for f in report.features}
    labels = {}
    for p in report.path_nodes:
        for v in p[1:-1]:
            if int(pruned.nodes.kind[v]) == NodeKind.FEATURE:
                note = notes[(int(pruned.nodes.layer[v]), int(pruned.nodes.feature[v]), int(pruned.nodes.pos[v]))]
                what = note.label or (f"says {note.says[0]!r}" if note.says else "")
                labels[v] = f"{note.name} {what}".strip()
    logits = (pruned.nodes.kind == int(NodeKind.LOGIT)).nonzero().flatten().tolist()
    if logits:
        labels[logits[0]] = repr(report.targets[0][0]) if report.targets else "top"
    top = report.targets[0] if report.targets else ("?", None)
    title = f"{prompt!r} -> {top[0]!r}" + (f" {100 * top[1]:.0f}%" if top[1] is not None else "")
    plot_graph(pruned, path, highlight=report.path_nodes, labels=labels, title=title)


__all__ = ["GRAPH_FILE", "PICTURE_FILE", "REPORT_FILE", "TraceResult", "check_trace_folder", "ensure_feature_db",
           "feature_db_path", "trace_prompt"]
