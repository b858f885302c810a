"""A traced prompt's circuit in the explorer: read, edit and re-validate the trace folder's circuit.json.

`cltrace trace` writes ``circuit.json`` beside ``graph.safetensors`` (its ``graph`` field names the
graph; the format is the circuit's, `cltrace.graph.circuit`). Routes, each under the app's guards:

- ``GET /api/circuit?path=GRAPH``: the circuit of that graph (404 where it has none);
- ``PUT /api/circuit?path=GRAPH``: an edit, the circuit's supernodes as ``{id, name, members}``
  (renamed, merged, split), checked against the graph and saved atomically;
- ``POST /api/circuit/validate?path=GRAPH``: a background job (the new-graph jobs' machinery) that
  rebuilds the circuit's edges and effects from its supernodes and ablates and steers them again.

An edit keeps what still holds: a supernode whose members are unchanged keeps its effect, edges and
validation under its new name. One whose members changed (merged, split off) takes the labels of the
supernode it has most members from, and has no effect, edges or validation until the circuit is
re-validated (tokens left without an edge leave the circuit); the circuit is marked ``"edited"``
until then. The folder's supernodes.json follows each edit, so that `cltrace circuit FOLDER` builds
from the same groups; the names a person gave stay in circuit.json, where that command reads them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, FastAPI, Query
from pydantic import BaseModel, Field

from cltrace.atomic import atomic_write_text
from cltrace.errors import CltraceError
from cltrace.graph.circuit import Circuit, build_circuit
from cltrace.graph.circuit_plot import CIRCUIT_PICTURE, circuit_title, plot_circuit
from cltrace.graph.graph import Graph, NodeKind
from cltrace.graph.validate import validate_circuit
from cltrace.replacement.supernodes import Supernode, load_supernodes, save_supernodes
from cltrace.serve.jobs import Job, Jobs, Models
from cltrace.serve.workspace import NotFound, Workspace

GraphPath = Annotated[str, Query(min_length=1, max_length=1000, description="The graph file, relative to the served folder.")]
#: The trace folder's supernodes (`cltrace trace` writes it; `cltrace circuit` rebuilds the circuit from it).
SUPERNODES_FILE = "supernodes.json"
#: Label fields a changed supernode takes from the supernode it has most members from.
LABEL_FIELDS = ("input_label", "output_label", "label_scores", "unclear", "output_tokens")
#: Ids kept for a circuit's tokens and outputs.
RESERVED = re.compile(r"e\d+|out\d*")
#: Stages of a re-validation, in order (a job's done / total counts them).
STAGES = ("loading model", "building the circuit", "validating", "saving")


class CircuitSupernodeEdit(BaseModel):
    """One supernode of an edited circuit."""

    id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z_][A-Za-z0-9_.\-]*$",
                    description="Stable id (letters, digits, '_', '.', '-'): keep it to keep the supernode's numbers.")
    name: str = Field(min_length=1, max_length=200, description="What a person reads: any text.")
    members: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        min_length=1, max_length=5000, description="Feature node ids 'layer_feature_pos'.")


class CircuitEdit(BaseModel):
    supernodes: list[CircuitSupernodeEdit] = Field(min_length=1, max_length=200)


def circuit_of(workspace: Workspace, rel: str) -> tuple[Path, Path, dict[str, Any]]:
    """(the graph's path, its circuit.json's path, the circuit) of graph `rel`; NotFound without one."""
    graph_path = workspace.resolve(rel)
    path = workspace.circuit_file(graph_path)
    if path is None:
        raise NotFound(f"no circuit for '{workspace.rel(graph_path)}': `cltrace trace` writes circuit.json beside the graph")
    return graph_path, path, read_circuit(path)


def read_circuit(path: Path) -> dict[str, Any]:
    """circuit.json as a dict; a one-line error where it cannot be read."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CltraceError(f"cannot read '{path.name}' ({str(exc).splitlines()[0]}): trace the prompt again") from None
    if not isinstance(data, dict) or not isinstance(data.get("supernodes"), list):
        raise CltraceError(f"'{path.name}' is not a circuit (no supernodes list): trace the prompt again")
    return data


def _feature_nodes(graph: Graph) -> dict[str, tuple[int, int, float]]:
    """Feature node id -> (layer, pos, activation)."""
    n = graph.nodes
    return {nid: (layer, pos, act) for nid, kind, layer, pos, act in zip(
        graph.node_ids(), n.kind.tolist(), n.layer.tolist(), n.pos.tolist(), n.activation.tolist()) if kind == NodeKind.FEATURE}


def _check_edit(edit: list[dict[str, Any]], features: dict[str, tuple[int, int, float]], fixed: set[str]) -> None:
    """Ids unique and free, members features of the graph, each in one supernode."""
    seen_ids: set[str] = set()
    owner: dict[str, str] = {}
    for sn in edit:
        if sn["id"] in seen_ids:
            raise CltraceError(f"two supernodes share the id {sn['id']!r}: give each its own")
        if sn["id"] in fixed or RESERVED.fullmatch(sn["id"]):
            raise CltraceError(f"the id {sn['id']!r} is kept for the circuit's tokens (e{{pos}}) and output (out): give the supernode another")
        seen_ids.add(sn["id"])
        for m in sn["members"]:
            if m not in features:
                raise CltraceError(f"supernode {sn['id']!r}: '{m}' is not a feature node of this graph; group features only")
            if m in owner and owner[m] != sn["id"]:
                raise CltraceError(f"'{m}' is in both {owner[m]!r} and {sn['id']!r}: a feature belongs to one supernode")
            owner[m] = sn["id"]


def apply_edit(circuit: dict[str, Any], edit: list[dict[str, Any]], graph: Graph) -> dict[str, Any]:
    """`circuit` with its supernodes replaced by `edit` ([{id, name, members}], checked against
    `graph`): unchanged supernodes keep their numbers, changed ones are rebuilt (module docstring)."""
    features = _feature_nodes(graph)
    fixed = {str(x.get("id")) for x in [*circuit.get("inputs", []), *circuit.get("outputs", [])] if isinstance(x, dict)}
    _check_edit(edit, features, fixed)
    old = {str(sn.get("id")): sn for sn in circuit["supernodes"] if isinstance(sn, dict)}
    kept: set[str] = set()
    supernodes = []
    for sn in edit:
        members = list(dict.fromkeys(sn["members"]))
        before = old.get(sn["id"])
        if before is not None and set(before.get("members") or []) == set(members):
            supernodes.append({**before, "name": sn["name"]})
            kept.add(sn["id"])
            continue
        shared = {oid: len(set(o.get("members") or []) & set(members)) for oid, o in old.items()}
        best = max(shared, key=lambda oid: (shared[oid], oid == sn["id"]), default=None)
        parent = old[best] if best is not None and shared[best] else {}
        layers = sorted({features[m][0] for m in members})
        supernodes.append({
            "id": sn["id"], "name": sn["name"], "members": members, "layers": layers,
            "pos": max(features[m][1] for m in members), "activation": sum(features[m][2] for m in members),
            **{k: parent[k] for k in LABEL_FIELDS if k in parent}, "effect": None, "validation": None, "edited": True,
        })
    ends = kept | fixed
    edges = [e for e in circuit.get("edges", []) if isinstance(e, dict) and e.get("source") in ends and e.get("target") in ends]
    linked = {e["source"] for e in edges}
    inputs = [x for x in circuit.get("inputs", []) if isinstance(x, dict) and x.get("id") in linked]
    changed = len(kept) != len(old) or len(kept) != len(supernodes)
    return {**circuit, "supernodes": supernodes, "inputs": inputs, "edges": edges,
            "edited": bool(circuit.get("edited")) or changed}


def _write(path: Path, circuit: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(circuit, indent=1, allow_nan=False) + "\n", what="circuit")


def sync_supernodes(path: Path, old_ids: list[str], edit: list[dict[str, Any]]) -> None:
    """The trace folder's supernodes file (`path`, what `cltrace circuit` rebuilds from) made to
    hold the edited circuit's supernodes, first: the groups the circuit had are replaced, the
    others keep their features but those the edit took; a group left empty goes."""
    groups = load_supernodes(path) if path.is_file() else {}
    circuit = [Supernode(sn["id"], [_member(m) for m in sn["members"]]) for sn in edit]
    taken = {m for sn in circuit for m in sn.members}
    rest = []
    for name, group in groups.items():
        if name in old_ids or name in {sn.name for sn in circuit}:
            continue
        members = [m for m in group.members if m not in taken]
        if members:
            rest.append(Supernode(name, members))
    save_supernodes(path, circuit + rest)


def _member(node_id: str) -> tuple[int, int, int]:
    layer, feature, pos = (int(x) for x in node_id.split("_"))
    return layer, feature, pos


def revalidate(workspace: Workspace, models: Models, graph_path: Path, path: Path) -> Callable[[Job, Callable[[str], None]], None]:
    """The work of a re-validation job: the circuit rebuilt from its supernodes (their names and
    labels kept) on the full graph, validated on the graph's model, saved unless edited meanwhile;
    the picture beside it (a trace folder's circuit.png) drawn again with the new numbers."""

    def work(job: Job, step: Callable[[str], None]) -> None:
        def stage(name: str) -> None:
            step(name)
            job.done, job.total = STAGES.index(name), len(STAGES)

        text = path.read_text(encoding="utf-8")
        edited = Circuit.from_dict(json.loads(text))
        if not edited.supernodes:
            raise CltraceError("the circuit has no supernodes to validate: trace the prompt again")
        graph = workspace.load(graph_path)
        stage("loading model")
        rm = models.replacement(graph.metadata)
        stage("building the circuit")
        circuit = build_circuit(graph, edited.as_supernodes(), max_supernodes=len(edited.supernodes), min_coverage=1.0,
                                core_share=1.0, names=edited.names(), graph_file=graph_path.name, target=_target_index(graph, edited.target))
        # how the circuit was first chosen among all supernodes: the person's edits kept its features
        circuit.coverage, circuit.n_candidates, circuit.n_needed = edited.coverage, edited.n_candidates, edited.n_needed
        labels = {sn.id: sn for sn in edited.supernodes}
        for sn in circuit.supernodes:
            if sn.id in labels:
                for key in LABEL_FIELDS:
                    setattr(sn, key, getattr(labels[sn.id], key))
        stage("validating")
        validate_circuit(rm, graph, circuit)
        stage("saving")
        with workspace.lock:
            if path.read_text(encoding="utf-8") != text:
                raise CltraceError("the circuit was edited while it was being validated: re-validate to include the edit")
            circuit.save(path)
            picture = path.parent / CIRCUIT_PICTURE
            if picture.is_file():
                plot_circuit(circuit, picture, graph.n_layers, title=circuit_title(circuit))
        job.done = len(STAGES)

    return work


def _target_index(graph: Graph, target: dict[str, Any]) -> int:
    """Which of the graph's targets the circuit explains (by label; the first where none matches)."""
    targets = graph.metadata.get("targets") or []
    labels = [t.get("label") if isinstance(t, dict) else None for t in targets]
    return labels.index(target.get("label")) if target.get("label") in labels else 0


def add_circuit_routes(app: FastAPI, workspace: Workspace, models: Models, jobs: Jobs) -> None:
    """The circuit view's routes (module docstring)."""

    @app.get("/api/circuit", summary="The circuit of a traced prompt: supernodes, labels, signed edges, validation")
    def get_circuit(path: GraphPath) -> dict[str, Any]:
        return circuit_of(workspace, path)[2]

    @app.put("/api/circuit", summary="Save an edited circuit: its supernodes renamed, merged or split (atomic)")
    def put_circuit(path: GraphPath, body: CircuitEdit = Body()) -> dict[str, Any]:
        edit = [s.model_dump() for s in body.supernodes]
        with workspace.lock:
            graph_path, file, circuit = circuit_of(workspace, path)
            edited = apply_edit(circuit, edit, workspace.load(graph_path))
            _write(file, edited)
            sync_supernodes(file.parent / SUPERNODES_FILE, [str(s.get("id")) for s in circuit["supernodes"]], edit)
        return edited

    @app.post("/api/circuit/validate", status_code=202,
              summary="Rebuild the circuit from its supernodes and validate it again, in the background",
              responses={429: {"description": "This circuit, or the most jobs allowed, are being computed: try again later"}})
    def post_validate(path: GraphPath) -> dict[str, Any]:
        graph_path, file, circuit = circuit_of(workspace, path)
        work = revalidate(workspace, models, graph_path, file)
        return jobs.submit_work("circuit", str(circuit.get("prompt") or ""), workspace.rel(graph_path), work).to_dict()
