"""Head loadings: each head's share of a cross-position edge, checked against independent passes.

The sum over heads is checked against the edge itself, measured by moving the source in the frozen
model (and against the attribution graph's stored weight); a single head's share against the edge
with every other head's pattern zeroed, where only one attention layer lies between the two nodes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.models import prompt_ids, tiny_model
from helpers.transcoders import CASE_IDS, CASES, random_transcoder

from cltrace.errors import CltraceError
from cltrace.graph.attribution import attribute
from cltrace.graph.heads import NodeRef, graph_node, head_loadings
from cltrace.graph.qk_sites import AttentionSites
from cltrace.model.freeze import FreezeState
from cltrace.replacement import ReplacementModel


def setup(family: str, kind: str):  # noqa: ANN201
    model = tiny_model(family)
    rm = ReplacementModel(model, random_transcoder(model, kind))
    return rm, rm.run(prompt_ids(9))


@torch.no_grad()
def measured_edge(rm: ReplacementModel, run, source: NodeRef, target: NodeRef, state: FreezeState | None = None) -> float:
    """The target's value moved by adding the source's output in the frozen model (patterns from `state`)."""
    run = run if state is None else dataclasses.replace(run, freeze_state=state)
    live = getattr(rm.transcoder, "W_skip", None) is not None
    base = run.reconstruction + run.error
    moved = base.clone()
    if source.kind == "feature":
        act = run.activations[source.pos, source.layer, source.feature]
        dec = rm.transcoder.decoder_vectors(source.layer, torch.tensor([source.feature]))[0]
        out = rm.transcoder.output_layers(source.layer)
        moved[source.pos, out.start : out.stop] += act * dec
    else:
        moved[source.pos, source.layer] += run.error[source.pos, source.layer]
    enc = rm.transcoder.W_enc[target.layer, target.feature]
    values = [rm.frozen(run, m, live_skip=live).resid_mid_layers[target.layer][0, target.pos] @ enc for m in (base, moved)]
    return float(values[1] - values[0])


def active(run, layer: int, pos: int) -> int:
    return int(run.activations[pos, layer].abs().argmax())


@pytest.mark.parametrize(("family", "kind"), CASES, ids=CASE_IDS)
def test_loadings_sum_to_the_edge(family: str, kind: str) -> None:
    rm, run = setup(family, kind)
    sites = AttentionSites(rm, run)
    for source, target in [
        (NodeRef("feature", 0, 3, active(run, 0, 3)), NodeRef("feature", 2, 7, active(run, 2, 7))),
        (NodeRef("error", 1, 5, -1), NodeRef("feature", 2, 8, active(run, 2, 8))),
    ]:
        result = head_loadings(rm, run, source, target, sites)
        edge = measured_edge(rm, run, source, target)
        assert abs(edge) > 1e-4
        assert result.total == pytest.approx(edge, rel=1e-4, abs=1e-6)
        assert (result.loadings != 0).sum() > 1


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gpt2"])
def test_one_head_alone_carries_its_loading(family: str) -> None:
    rm, run = setup(family, "plt")
    sites = AttentionSites(rm, run)
    source, target = NodeRef("feature", 1, 2, active(run, 1, 2)), NodeRef("feature", 2, 3, active(run, 2, 3))
    result = head_loadings(rm, run, source, target, sites)
    module = sites.attention(2)
    for head in range(sites.n_heads):
        patterns = dict(run.freeze_state.patterns)
        alone = torch.zeros_like(patterns[module])
        alone[:, head] = patterns[module][:, head]
        alone[:, head, source.pos, source.pos] = 0.0  # the diagonal entry at p carries nothing to q anyway
        patterns[module] = alone
        edge = measured_edge(rm, run, source, target, FreezeState("record", patterns, run.freeze_state.norm_scales))
        # The measured edge is a difference of two forward passes: fp32 cancellation bounds its precision.
        assert float(result.loadings[2, head]) == pytest.approx(edge, rel=1e-4, abs=2e-5)
    assert result.loadings[2].abs().max() > 1e-3
    assert result.loadings[:2].abs().max() == 0  # lower layers' heads act before the source exists


def test_loadings_match_the_graphs_edges() -> None:
    rm, run = setup("qwen2", "clt")
    graph = attribute(rm, run.input_ids)
    sites = AttentionSites(rm, run)
    checked: dict[tuple[str, str], int] = {}
    edges = zip(graph.edge_source.tolist(), graph.edge_target.tolist(), graph.edge_weight.tolist())
    for src, dst, weight in edges:
        s, t = graph_node(graph, src), graph_node(graph, dst)
        t_pos = run.n_pos - 1 if t.kind == "logit" else t.pos
        if s.pos >= t_pos or checked.get((s.kind, t.kind), 0) >= 2:
            continue
        assert head_loadings(rm, run, s, t, sites).total == pytest.approx(weight, rel=1e-3, abs=1e-5), (s, t)
        checked[s.kind, t.kind] = checked.get((s.kind, t.kind), 0) + 1
    assert set(checked) >= {("feature", "feature"), ("embedding", "feature"), ("feature", "logit"), ("error", "feature")}


def test_same_position_edges_are_refused() -> None:
    rm, run = setup("llama", "clt")
    with pytest.raises(CltraceError, match="across positions"):
        head_loadings(rm, run, NodeRef("error", 0, 4), NodeRef("feature", 2, 4, 0))
