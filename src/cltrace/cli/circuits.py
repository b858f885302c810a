"""Commands on circuits and supernodes: `circuit` (rebuild and re-validate a traced prompt's circuit)
and the `supernodes` group (group a graph's features automatically; list, rename, merge, split)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cltrace.cli.common import ModelOption, app, config_option
from cltrace.errors import CltraceError
from cltrace.fields import field_default
from cltrace.graph.config import CircuitConfig, GroupingConfig

supernodes_app = typer.Typer(
    name="supernodes", help="Supernodes: group a graph's features by role automatically, and edit the groups.",
    no_args_is_help=True,
)
app.add_typer(supernodes_app, name="supernodes")

SupernodesFile = Annotated[Path, typer.Argument(help="A supernodes JSON file (`cltrace supernodes auto`, `cltrace trace`).")]
DbOption = Annotated[Path | None, typer.Option("--db", "-d", help="A feature store whose labels name the supernodes.")]


def _trace_graph(path: Path) -> tuple[Path, Path]:
    """(graph file, its folder) from a trace folder or a graph file."""
    from cltrace.trace.run import GRAPH_FILE

    graph = path / GRAPH_FILE if path.is_dir() else path
    if not graph.is_file():
        raise CltraceError(f"'{path}' is neither a graph file nor a folder holding {GRAPH_FILE}; run `cltrace trace` first")
    return graph, graph.parent


def _open_labels(db: Path | None):  # noqa: ANN202 - a Labels and the store to close
    from cltrace.features import FeatureStore
    from cltrace.trace.labels import Labels

    store = FeatureStore(db) if db is not None else None
    return Labels(store), store


@supernodes_app.command("auto")
def supernodes_auto(
    graph: Annotated[Path, typer.Argument(help="A graph file, or a trace folder holding graph.safetensors.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write the supernodes file (default: supernodes.json beside the graph).")] = None,
    db: DbOption = None,
    threshold: Annotated[float, config_option(GroupingConfig, "threshold", "--threshold")] = field_default(GroupingConfig, "threshold"),
    max_layer_gap: Annotated[int, config_option(GroupingConfig, "max_layer_gap", "--max-layer-gap")] = field_default(
        GroupingConfig, "max_layer_gap"),
    node_threshold: Annotated[float, config_option(GroupingConfig, "node_threshold", "--node-threshold")] = field_default(
        GroupingConfig, "node_threshold"),
) -> None:
    """Group the pruned graph's features into supernodes by role (same position, nearby layers, similar effects and inputs)."""
    from cltrace.graph.graph import Graph
    from cltrace.graph.grouping import group_features
    from cltrace.graph.prune import prune
    from cltrace.replacement.supernodes import save_supernodes

    path, folder = _trace_graph(graph)
    output = out or folder / "supernodes.json"
    pruned, _ = prune(Graph.load(path), node_threshold=node_threshold)
    labels, store = _open_labels(db)
    try:
        groups = group_features(pruned, label_of=labels.text, threshold=threshold, max_layer_gap=max_layer_gap)
    finally:
        if store is not None:
            store.close()
    save_supernodes(output, groups)
    several = sum(1 for g in groups if len(g.members) > 1)
    typer.echo(f"wrote {output}: {len(groups)} supernodes ({several} of several features) for {sum(len(g.members) for g in groups)} features")


@supernodes_app.command("list")
def supernodes_list(file: SupernodesFile) -> None:
    """The supernodes of a file: name, size and members."""
    from cltrace.replacement.supernodes import load_supernodes

    for sn in load_supernodes(file).values():
        members = ", ".join(f"{l}:{f}" + (f"@{p}" if p is not None else "") for l, f, p in sn.members)
        typer.echo(f"{sn.name}  ({len(sn.members)})  {members}")


def _edit(file: Path, change) -> None:  # noqa: ANN001 - a function of the supernodes dict
    from cltrace.replacement.supernodes import load_supernodes, save_supernodes

    named = load_supernodes(file)
    change(named)
    save_supernodes(file, list(named.values()))


def _need(named: dict, name: str) -> None:
    if name not in named:
        raise CltraceError(f"no supernode named {name!r} in the file; `cltrace supernodes list FILE` shows them")


@supernodes_app.command("rename")
def supernodes_rename(file: SupernodesFile, old: Annotated[str, typer.Argument(help="Its name now.")],
                      new: Annotated[str, typer.Argument(help="The new name.")]) -> None:
    """Rename a supernode."""
    from cltrace.replacement.supernodes import Supernode

    def change(named: dict) -> None:
        _need(named, old)
        if new in named and new != old:
            raise CltraceError(f"a supernode named {new!r} exists already; choose another name")
        items = [(new if k == old else k, Supernode(new, v.members) if k == old else v) for k, v in named.items()]
        named.clear()
        named.update(items)

    _edit(file, change)
    typer.echo(f"renamed {old} to {new} in {file}")


@supernodes_app.command("merge")
def supernodes_merge(
    file: SupernodesFile, names: Annotated[list[str], typer.Argument(help="Two or more supernodes to merge.")],
    name: Annotated[str | None, typer.Option("--name", help="The merged supernode's name (default: the first's).")] = None,
) -> None:
    """Merge supernodes into one (in place of the first)."""
    from cltrace.replacement.supernodes import Supernode

    if len(names) < 2:
        raise CltraceError("merge needs at least two supernode names")
    merged_name = name or names[0]

    def change(named: dict) -> None:
        for n in names:
            _need(named, n)
        if merged_name in named and merged_name not in names:
            raise CltraceError(f"a supernode named {merged_name!r} exists already; choose another --name")
        members = [m for n in names for m in named[n].members]
        items = []
        for k, v in named.items():
            if k == names[0]:
                items.append((merged_name, Supernode(merged_name, list(dict.fromkeys(members)))))
            elif k not in names:
                items.append((k, v))
        named.clear()
        named.update(items)

    _edit(file, change)
    typer.echo(f"merged {', '.join(names)} into {merged_name} in {file}")


@supernodes_app.command("split")
def supernodes_split(file: SupernodesFile, name: Annotated[str, typer.Argument(help="The supernode to split.")]) -> None:
    """Split a supernode into one supernode per member (NAME.1, NAME.2, ...)."""
    from cltrace.graph.grouping import unique_name
    from cltrace.replacement.supernodes import Supernode

    def change(named: dict) -> None:
        _need(named, name)
        taken = set(named) - {name}
        items = []
        for k, v in named.items():
            if k == name:
                items += [(s.name, s) for s in (Supernode(unique_name(f"{name}.{i}", taken), [m])
                                                for i, m in enumerate(v.members, 1))]
            else:
                items.append((k, v))
        named.clear()
        named.update(items)

    _edit(file, change)
    typer.echo(f"split {name} into its members in {file}")


@app.command()
def circuit(
    graph: Annotated[Path, typer.Argument(help="A trace folder (or a graph file): its circuit is rebuilt there.")],
    supernodes: Annotated[Path | None, typer.Option("--supernodes", help="Supernodes to build it from (default: the "
                          "folder's supernodes.json; none there: grouped afresh).")] = None,
    transcoder: Annotated[str | None, typer.Option("--transcoder", "-t", help="The graph's transcoder, to validate "
                          "(default: the one recorded in the graph); 'none' skips validation.")] = None,
    model: ModelOption = None,
    db: DbOption = None,
    max_supernodes: Annotated[int, config_option(CircuitConfig, "max_supernodes", "--max-supernodes")] = field_default(
        CircuitConfig, "max_supernodes"),
) -> None:
    """Rebuild a traced prompt's circuit (after editing its supernodes), validate it, and write circuit.json and circuit.png."""
    import dataclasses

    from cltrace.graph.circuit import Circuit
    from cltrace.graph.graph import Graph
    from cltrace.replacement.supernodes import load_supernodes
    from cltrace.trace.circuit import (
        CIRCUIT_FILE,
        SUPERNODES_FILE,
        circuit_metadata,
        find_circuit,
        format_circuit,
        write_circuit,
    )

    path, folder = _trace_graph(graph)
    full = Graph.load(path)
    given = supernodes or (folder / SUPERNODES_FILE if (folder / SUPERNODES_FILE).is_file() else None)
    groups = list(load_supernodes(given).values()) if given is not None else None
    names = Circuit.load(folder / CIRCUIT_FILE).names() if (folder / CIRCUIT_FILE).is_file() else None  # kept
    replacement = _replacement(full, transcoder, model)
    labels, store = _open_labels(db)
    try:
        found = find_circuit(replacement, full, labels, supernodes=groups, names=names,
                             config=dataclasses.replace(CircuitConfig(), max_supernodes=max_supernodes))
    finally:
        if store is not None:
            store.close()
    written = write_circuit(folder, found, full.n_layers)
    full.metadata["circuit"] = circuit_metadata(found.circuit)
    full.save(path)
    typer.echo(format_circuit(found.circuit))
    typer.echo(f"wrote {', '.join(str(p) for p in written)}")


def _replacement(graph, transcoder: str | None, model: str | None):  # noqa: ANN001, ANN202
    """The replacement model to validate `graph` on, or None (--transcoder none)."""
    if transcoder == "none":
        return None
    spec = transcoder or graph.metadata.get("transcoder_path")
    if not spec:
        raise CltraceError("the graph does not record its transcoder: pass -t/--transcoder, or -t none to skip validation")
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    loaded = load_model(model)
    return ReplacementModel(loaded, load_transcoder(resolve_transcoder(Path(spec), model, model=loaded)))
