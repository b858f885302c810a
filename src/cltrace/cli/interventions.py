"""Commands that run the model on a prompt: `predict`, `intervene`."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cltrace.cli.common import DeviceOption, ModelOption, app, decoded_prompt, device_given
from cltrace.errors import CltraceError


@app.command()
def predict(
    prompt: Annotated[str, typer.Argument(help="The text to continue.", callback=decoded_prompt)],
    model: ModelOption = None,
    top: Annotated[int, typer.Option("--top", "-k", min=1, max=100, help="How many tokens to show.")] = 10,
    transcoder: Annotated[
        Path | None,
        typer.Option("--transcoder", "-t", help="Also run the local replacement model with this transcoder ('default': the default CLT)."),
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Show the model's most probable next tokens for a prompt."""
    import torch

    from cltrace.model import load_model

    dev = device_given(device)
    loaded = load_model(model, device=dev)
    replacement = None
    if transcoder is not None:
        from cltrace.replacement import ReplacementModel
        from cltrace.train.default import resolve_transcoder
        from cltrace.transcoder import load_transcoder

        tc_path = resolve_transcoder(transcoder, model, model=loaded)
        replacement = ReplacementModel(loaded, load_transcoder(tc_path, device=dev))
    ids = loaded.encode(prompt)
    with torch.no_grad():
        logits = loaded.model(input_ids=ids[None].to(loaded.device), use_cache=False).logits[0]  # [pos, vocab]
    probs, tokens = logits[-1].float().softmax(-1).topk(min(top, logits.shape[-1]))  # a vocabulary may be smaller
    shown = "|".join(loaded.decode_token(t) for t in ids.tolist())
    typer.echo(f"{loaded.name} · {ids.numel()} tokens: {shown}")
    for rank, (p, t) in enumerate(zip(probs.tolist(), tokens.tolist()), start=1):
        typer.echo(f"{rank:>3}. {loaded.decode_token(t)!r:<20} {100 * p:6.2f}%")
    if replacement is not None:
        run = replacement.run(ids)
        l0 = (run.activations[1:] > 0).sum(-1).float().mean(0)  # [layer], BOS position left out
        mse = (run.error[1:] ** 2).sum((0, 2))  # [layer]
        var = ((run.mlp_out[1:] - run.mlp_out[1:].mean(0)) ** 2).sum((0, 2)).clamp_min(1e-12)
        typer.echo(
            f"replacement model: max |logit difference| {float((run.logits - logits).abs().max()):.2e}, "
            f"mean L0 per layer {float(l0.mean()):.1f}, mean NMSE on this prompt {float((mse / var).mean()):.3f}"
        )


class InterventionMode(str, Enum):
    iterative = "iterative"
    constrained = "constrained"


@app.command()
def intervene(
    prompt: Annotated[str, typer.Argument(help="The text to run the model on.", callback=decoded_prompt)],
    transcoder: Annotated[Path, typer.Option("--transcoder", "-t", help="The transcoder directory, or 'default' (the default CLT, trained on first use).")],
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="LAYER:FEATURE[@POS]=VALUE to set, or =xFACTOR to scale; POS: 4, 2-5 or 2- (open-ended: also "
            "the generated tokens); no @POS: every position. A supernode name may stand for LAYER:FEATURE. Repeatable.",
        ),
    ] = None,
    model: ModelOption = None,
    mode: Annotated[
        InterventionMode, typer.Option("--mode", help="iterative: downstream features recomputed; constrained: held.")
    ] = InterventionMode.iterative,
    layers: Annotated[
        str | None, typer.Option("--layers", help="LO-HI: the layers whose features constrained mode holds (default all).")
    ] = None,
    freeze_attention: Annotated[
        bool, typer.Option("--freeze-attention/--free-attention", help="Replay the prompt's attention patterns and norms.")
    ] = False,
    generate: Annotated[int, typer.Option("--generate", "-g", min=0, max=512, help="Greedy tokens to generate.")] = 0,
    top: Annotated[int, typer.Option("--top", "-k", min=1, max=100, help="How many tokens to show.")] = 5,
    supernodes: Annotated[
        Path | None, typer.Option("--supernodes", help="A supernodes JSON file whose names --set may use.")
    ] = None,
    graph: Annotated[
        Path | None,
        typer.Option("--graph", help="A graph of this prompt: also show its predicted change beside the measured one."),
    ] = None,
    device: DeviceOption = "auto",
) -> None:
    """Set or scale transcoder features and show how the output changes (and, with --graph, what the graph predicted)."""
    from cltrace.model import load_model
    from cltrace.replacement import ReplacementModel
    from cltrace.replacement.interventions import check_interventions, parse_intervention
    from cltrace.replacement.interventions import intervene as run_interventions
    from cltrace.train.default import resolve_transcoder
    from cltrace.transcoder import load_transcoder

    dev = device_given(device)
    named = None
    if supernodes is not None:
        from cltrace.replacement.supernodes import load_supernodes

        named = load_supernodes(supernodes)
    if not set_:
        raise CltraceError("give at least one intervention: --set LAYER:FEATURE[@POS]=VALUE (or =xFACTOR)")
    specs = [iv for text in set_ for iv in parse_intervention(text, named)]
    layer_range = _layer_range(layers, mode)
    loaded_graph = None
    if graph is not None:
        from cltrace.graph.graph import Graph

        loaded_graph = Graph.load(graph)
    loaded_transcoder = load_transcoder(resolve_transcoder(transcoder, model, device=dev), device=dev)
    # layers and features can be checked before the (slow) model load; positions need the prompt's length
    check_interventions(specs, loaded_transcoder.n_layers, loaded_transcoder.n_features, None)
    loaded = load_model(model, device=dev)
    replacement = ReplacementModel(loaded, loaded_transcoder)
    ids = loaded.encode(prompt)
    if loaded_graph is not None and loaded_graph.metadata.get("input_ids") not in (None, ids.tolist()):
        raise CltraceError(f"the graph '{graph}' was built for another prompt: build one for this prompt")
    result = run_interventions(
        replacement, ids, specs, mode=mode.value, layers=layer_range, freeze_attention=freeze_attention,
        generate=generate, top=top,
    )
    shown = "|".join(loaded.decode_token(t) for t in ids.tolist())
    typer.echo(f"{loaded.name} · {ids.numel()} tokens: {shown}")
    lo, hi = result.layers
    where = f", layers {lo}-{hi} held" if mode.value == "constrained" else ""
    attention = "frozen" if freeze_attention else "free"
    typer.echo(f"interventions ({mode.value}{where}, attention {attention}): {', '.join(str(iv) for iv in specs)}")
    _echo_changes(loaded, result, generate)
    if loaded_graph is not None:
        _echo_graph_prediction(replacement, loaded_graph, specs, ids)


def _layer_range(layers: str | None, mode: InterventionMode) -> tuple[int, int] | None:
    """`--layers LO-HI` as (LO, HI); None when not given."""
    if layers is None:
        return None
    if mode.value != "constrained":
        raise CltraceError("--layers applies to --mode constrained only: add --mode constrained or drop --layers")
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", layers)
    if not m:
        raise CltraceError(f"--layers {layers!r} is not LO-HI, e.g. 0-29")
    return int(m.group(1)), int(m.group(2))


def _echo_changes(loaded: Any, result: Any, generate: int) -> None:
    """The top tokens before and after, the logit changes, the features changed and the continuations."""
    typer.echo(f"     {'before':<28} after")
    for rank, (b, a) in enumerate(zip(result.top_before, result.top_after), start=1):
        typer.echo(f"{rank:>3}. {b.text!r:<18} {100 * b.probability:6.2f}%  {a.text!r:<18} {100 * a.probability:6.2f}%")
    change = result.logit_change
    shown_tokens = list(dict.fromkeys([t.token for t in result.top_before] + [t.token for t in result.top_after]))
    typer.echo(
        "logit change: " + ", ".join(f"{loaded.decode_token(t)!r} {float(change[t]):+.3f}" for t in shown_tokens)
    )
    changed = result.changed_features(k=5)
    typer.echo(
        f"features changed: {result.n_changed_features()}"
        + (" (largest: " + ", ".join(f"{l}:{f}@{p} {b + 0.0:.3f}→{a + 0.0:.3f}" for l, p, f, b, a in changed) + ")" if changed else "")
    )
    if generate:
        typer.echo(f"continuation before: {result.text_before!r}")
        typer.echo(f"continuation after:  {result.text_after!r}")


def _echo_graph_prediction(replacement: Any, graph: Any, specs: list[Any], ids: Any) -> None:
    """What the graph predicted the interventions would change, beside what they did."""
    from cltrace.graph.predict import compare_with_graph

    rows, _, prediction = compare_with_graph(replacement, graph, specs, ids)
    typer.echo(
        "graph prediction beside the measured change (constrained, attention frozen; logits: logit − mean "
        "logit, features: pre-activation):"
    )
    typer.echo(f"  {'':<28} {'predicted':>9} {'measured':>9}")
    for row in [r for r in rows if r.kind == "logit"] + [r for r in rows if r.kind == "feature"][:10]:
        label = f"logit {row.label!r}" if row.kind == "logit" else f"feature {row.node_id}"
        typer.echo(f"  {label:<28} {row.predicted:+9.4f} {row.actual:+9.4f}")
    if prediction.missing:
        typer.echo(f"not in the graph (effect not predicted): {', '.join(prediction.missing[:10])}")
