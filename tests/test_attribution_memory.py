"""Attribution within a memory budget: the estimate, refusals before any work, decoders kept or
gathered per pass, rows kept in bf16 and computed again, and the command line's dry run. Every graph
built under a constraint is checked edge for edge against the unconstrained one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers.attribution import assert_close_rel, case, same_graph
from helpers.cli import assert_one_line_error, run_cli
from helpers.graphs import rewrite_header
from helpers.models import prompt_ids

from cltrace.errors import CltraceError
from cltrace.graph import attribution as attribution_module
from cltrace.graph import estimate as estimate_module
from cltrace.graph.attribution import AttributionConfig, attribute, estimate_attribution
from cltrace.graph.graph import GRAPH_SCHEMA_VERSION, NodeKind
from cltrace.model import load_model
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import Transcoder, TranscoderConfig, save_transcoder


def test_estimate_counts_what_attribute_then_does() -> None:
    from cltrace.graph.attribution import estimate_attribution

    rm, graph = case("gemma2", "clt")
    est = estimate_attribution(rm, prompt_ids(), config=AttributionConfig(max_feature_nodes=10_000, batch_size=16))
    run = rm.run(prompt_ids())
    active = run.activations != 0
    active[0] = False  # BOS features are not nodes
    assert est.n_active_features == int(active.sum()) == graph.metadata["n_active_features"]
    assert est.n_logit_rows == len(graph.metadata["targets"])
    assert est.n_feature_rows == int((graph.nodes.kind == NodeKind.FEATURE).sum())
    assert est.n_batches == -(-est.n_logit_rows // 16) + -(-est.n_feature_rows // 16)
    params = sum(p.numel() * 4 for p in (*rm.model.model.parameters(), *rm.transcoder.parameters()))
    assert params < est.peak_bytes < 2**30 and est.seconds > 0
    # A limit below the estimate refuses the work before any backward pass; the message carries the estimate.
    with pytest.raises(CltraceError, match=r"needs about .* GB .*active features.*--max-memory"):
        attribute(rm, prompt_ids(), config=AttributionConfig(max_memory_bytes=est.peak_bytes - 1), progress=False)


def test_memory_refusal_is_the_default_and_comes_before_the_forward_run(monkeypatch) -> None:
    """With no limit given, the limit is the memory available now; a prompt whose forward run alone
    (attention patterns grow with tokens squared) would not fit is refused before the model runs."""
    import cltrace.graph.config as config_module  # AttributionConfig reads available memory through its own name

    rm, _ = case("gemma2", "clt")
    ids = prompt_ids()
    mcfg, tc = rm.model.model.config, rm.transcoder.config
    P = ids.numel()
    params = sum(t.numel() * t.element_size() for t in (*rm.model.model.parameters(), *rm.transcoder.parameters()))
    patterns = 4 * tc.n_layers * mcfg.num_attention_heads * P * P
    # 'available' memory just below what the run needs: refused, and the model is never run.
    monkeypatch.setattr(config_module, "available_memory_bytes", lambda: params + patterns)
    ran = []
    monkeypatch.setattr(rm, "run", lambda *a, **k: ran.append(1))
    with pytest.raises(CltraceError, match=rf"a prompt of {P} tokens needs at least .* GB .*shorten the prompt"):
        attribute(rm, ids, progress=False)
    assert not ran
    # Plenty available: the same call builds the graph, and an explicit limit overrides what is available.
    monkeypatch.undo()
    monkeypatch.setattr(config_module, "available_memory_bytes", lambda: 1 << 40)
    assert attribute(rm, ids, progress=False).n_edges > 0
    with pytest.raises(CltraceError, match="needs"):
        attribute(rm, ids, config=AttributionConfig(max_memory_bytes=params), progress=False)


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_decoders_gathered_on_each_pass_give_the_same_graph(share: float) -> None:
    """Long prompts gather some or all decoders per pass instead of caching them: the edges must not change."""
    rm, cached = case("qwen2", "clt")
    with torch.enable_grad():
        padded = attribution_module._Attribution(rm, prompt_ids(), None, AttributionConfig(progress=False)).decoder_cache_bytes
    budget = int(share * padded)
    config = AttributionConfig(max_feature_nodes=10_000, batch_size=16, decoder_cache_bytes=budget)
    with torch.enable_grad():
        work = attribution_module._Attribution(rm, prompt_ids(), None, config)
    kept = [g.keep for slot in work.slots if slot is not None for g in slot.groups]
    assert work.cached_decoder_bytes <= budget and (any(kept) and not all(kept) if share else not any(kept))
    assert not work.estimate().decoders_cached
    gathered = attribute(rm, prompt_ids(), config=config)
    assert gathered.n_edges == cached.n_edges
    assert torch.equal(gathered.edge_source, cached.edge_source) and torch.equal(gathered.edge_target, cached.edge_target)
    torch.testing.assert_close(gathered.edge_weight, cached.edge_weight, rtol=1e-6, atol=1e-7)


def test_a_tight_memory_limit_keeps_fewer_decoders_instead_of_refusing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kept decoders are the first thing given up when the graph would not fit in the memory allowed:
    before the rows go to bf16 for a second pass, and before the graph is refused."""
    rm, cached = case("qwen2", "clt")
    # Sparse edges, so that the passes (decoders included), not the edges' layout, set the peak.
    monkeypatch.setattr(estimate_module, "_EDGE_DENSITY", 0.01)
    config = AttributionConfig(max_feature_nodes=10_000, batch_size=16, progress=False)
    full = estimate_attribution(rm, prompt_ids(), config=config)
    gathered = estimate_attribution(rm, prompt_ids(), config=dataclasses.replace(config, decoder_cache_bytes=0))
    assert full.decoders_cached and not gathered.decoders_cached and gathered.peak_bytes < full.peak_bytes
    for limit in (gathered.peak_bytes, (gathered.peak_bytes + full.peak_bytes) // 2):
        limited = dataclasses.replace(config, max_memory_bytes=limit)
        chosen = estimate_attribution(rm, prompt_ids(), config=limited)
        assert not chosen.decoders_cached and not chosen.recompute_rows and chosen.peak_bytes <= limit
        squeezed = attribute(rm, prompt_ids(), config=limited)
        same_graph(squeezed, cached, "fewer decoders kept")
        assert not squeezed.metadata["settings"]["rows_recomputed"]


@pytest.mark.parametrize("family, kind", [("llama", "clt"), ("gpt2", "plt")])
def test_rows_recomputed_give_the_same_exact_graph(family: str, kind: str) -> None:
    """Long prompts keep the rows in bf16 for the ordering and compute the edges again: with every
    feature visited the graph is the fp32 one, and a capped one still sums to its targets exactly."""
    rm, full = case(family, kind)
    config = AttributionConfig(max_feature_nodes=10_000, batch_size=16, recompute_rows=True, progress=False)
    recomputed = attribute(rm, prompt_ids(), config=config)
    assert recomputed.metadata["settings"]["rows_recomputed"] and not full.metadata["settings"]["rows_recomputed"]
    same_graph(recomputed, full, "recomputed rows")
    capped = attribute(rm, prompt_ids(), config=AttributionConfig(max_feature_nodes=20, batch_size=4, recompute_rows=True,
                                                                  progress=False))
    incoming = torch.zeros(capped.n_nodes, dtype=torch.float64).index_add_(0, capped.edge_target, capped.edge_weight.double())
    value = torch.tensor(capped.metadata["target_value"], dtype=torch.float64)
    constant = torch.tensor(capped.metadata["target_constant"], dtype=torch.float64)
    rows = (capped.nodes.kind == NodeKind.FEATURE) | (capped.nodes.kind == NodeKind.LOGIT)
    assert_close_rel((incoming + constant)[rows], value[rows], 1.0, "capped, recomputed completeness")


def test_memory_limit_chooses_recomputed_rows_and_rows_outgrowing_their_budget(monkeypatch) -> None:
    """A limit that fp32 rows would pass but bf16 rows fit picks the second pass up front; rows that
    outgrow their budget on the way go to bf16, and past that the work stops with one clear line."""
    rm, full = case("qwen2", "clt")
    # Rows in bf16 lower the peak where the rows outweigh the graph's edges (fp32 rows are held while
    # the edges are laid out); on these tiny graphs the edges weigh more, unless they are sparse.
    monkeypatch.setattr(estimate_module, "_EDGE_DENSITY", 0.01)
    config = AttributionConfig(max_feature_nodes=10_000, batch_size=16, progress=False)
    fp32 = estimate_attribution(rm, prompt_ids(), config=dataclasses.replace(config, recompute_rows=False))
    bf16 = estimate_attribution(rm, prompt_ids(), config=dataclasses.replace(config, recompute_rows=True))
    assert bf16.row_bytes * 2 == fp32.row_bytes > 0 and bf16.peak_bytes < fp32.peak_bytes
    # Below what fp32 rows take even with every decoder gathered on each pass (see the test above).
    gathered = estimate_attribution(rm, prompt_ids(), config=dataclasses.replace(
        config, recompute_rows=False, decoder_cache_bytes=0))
    limited = dataclasses.replace(config, max_memory_bytes=gathered.peak_bytes - 1)
    chosen = estimate_attribution(rm, prompt_ids(), config=limited)
    assert chosen.recompute_rows and "second pass" in chosen.summary()
    graph = attribute(rm, prompt_ids(), config=limited)
    assert graph.metadata["settings"]["rows_recomputed"]
    same_graph(graph, full, "recomputed under a memory limit")

    # With every feature visited the rows take exactly the estimate; understate it so that the
    # budget (the limit less everything else) is 60% of the fp32 rows: they go to bf16 half-way.
    real = attribution_module._Attribution.estimate

    def understated(share: float):
        def estimate(self, recompute=None):
            est = real(self, recompute)
            return dataclasses.replace(est, row_bytes=int(est.row_bytes * share))
        return estimate

    exact = dataclasses.replace(config, recompute_rows=False, max_memory_bytes=fp32.peak_bytes)
    monkeypatch.setattr(attribution_module._Attribution, "estimate", understated(0.6))
    graph = attribute(rm, prompt_ids(), config=exact)
    assert graph.metadata["settings"]["rows_recomputed"]
    same_graph(graph, full, "rows moved to bf16 on the way")
    monkeypatch.setattr(attribution_module._Attribution, "estimate", understated(0.4))
    with pytest.raises(CltraceError, match=r"outgrew their .* GB budget after \d+ rows: lower --max-feature-nodes"):
        attribute(rm, prompt_ids(), config=exact)


@pytest.mark.slow
def test_cli_dry_run_and_bad_input(tmp_path, capsys) -> None:
    prompt, out = "The cat sat", tmp_path / "g.cltg"
    cfg = TranscoderConfig(kind="clt", n_layers=30, d_model=576, n_features=8, activation="jumprelu")
    tc = Transcoder.random(cfg, seed=3)
    save_transcoder(tc, tmp_path / "clt")
    # --dry-run: the estimate, with the true number of active features, and no graph.
    code, text, err = run_cli("attribute", prompt, "-t", str(tmp_path / "clt"), "-o", str(out), "--dry-run", capsys=capsys)
    assert code == 0, err
    run = ReplacementModel(load_model("default"), tc).run(prompt)
    n_active = int((run.activations[1:] != 0).sum())
    assert f"{len(run.input_ids)} tokens, {n_active} active features" in text
    assert "GB peak memory" in text and "nothing computed" in text and not out.exists()
    # A memory limit below the estimate but above the forward run's needs: refused up front with the
    # estimate, one line, no graph.
    code, _, err = run_cli("attribute", prompt, "-t", str(tmp_path / "clt"), "-o", str(out), "--max-memory", "0.55",
                           capsys=capsys)
    assert_one_line_error(code, err, "GB", "--max-memory", f"{n_active} active features")
    assert not out.exists()
    # Below what the model and the forward run alone take: refused before the model runs.
    code, _, err = run_cli("attribute", prompt, "-t", str(tmp_path / "clt"), "-o", str(out), "--max-memory", "0.1",
                           capsys=capsys)
    assert_one_line_error(code, err, "forward run alone", "--max-memory")
    assert not out.exists()
    # A target that is two tokens.
    code, _, err = run_cli("attribute", prompt, "-t", str(tmp_path / "clt"), "-o", str(out), "--target", " on the",
                           capsys=capsys)
    assert_one_line_error(code, err, "' on the' is 2 tokens")
    # A prompt that tokenizes to nothing.
    code, _, err = run_cli("attribute", "", "-t", str(tmp_path / "clt"), "-o", str(out), capsys=capsys)
    assert_one_line_error(code, err, "empty")
    # A transcoder for another model (4 layers, not 30).
    other = TranscoderConfig(kind="clt", n_layers=4, d_model=576, n_features=8, activation="jumprelu")
    save_transcoder(Transcoder.random(other), tmp_path / "other")
    code, _, err = run_cli("attribute", prompt, "-t", str(tmp_path / "other"), "-o", str(out), capsys=capsys)
    assert_one_line_error(code, err, "does not fit", "4 layers")
    assert not out.exists()
    # A graph file from a newer schema, and a truncated one, refused by export.
    _, graph = case("llama", "clt")
    graph.save(tmp_path / "new.cltg")
    rewrite_header(tmp_path / "new.cltg", schema_version=str(GRAPH_SCHEMA_VERSION + 1))
    code, _, err = run_cli("export", str(tmp_path / "new.cltg"), "-o", str(tmp_path / "new.json"), capsys=capsys)
    assert_one_line_error(code, err, "newer")
    raw = (tmp_path / "new.cltg").read_bytes()
    (tmp_path / "cut.cltg").write_bytes(raw[: len(raw) - 100])
    code, _, err = run_cli("export", str(tmp_path / "cut.cltg"), "-o", str(tmp_path / "cut.json"), capsys=capsys)
    assert_one_line_error(code, err, "cut.cltg")
    assert not (tmp_path / "new.json").exists() and not (tmp_path / "cut.json").exists()
