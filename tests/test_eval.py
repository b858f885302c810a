"""Evaluation metrics against brute-force computations on tiny models."""

from __future__ import annotations

import pytest
import torch
from helpers.models import VOCAB, tiny_model

from cltrace.data.harvest import FIRST_POSITION as P0
from cltrace.errors import CltraceError
from cltrace.eval import evaluate, format_table
from cltrace.replacement import ReplacementModel
from cltrace.transcoder import Transcoder, TranscoderConfig


def contexts(n: int = 6, n_ctx: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(1, VOCAB, (n, n_ctx), generator=g)
    toks[:, 0] = 0
    return toks


def spliced_brute_force(loaded, tc: Transcoder, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] with every MLP output (sink positions kept) replaced by the transcoder's reconstruction,
    by fixed-point iteration: L full passes, each replacing the outputs with the reconstruction of the
    previous pass's inputs (layer l is exact after l + 1 passes)."""
    adapter = loaded.adapter
    layers = adapter.decoder_layers(loaded.model)
    L = len(layers)
    replace: list[torch.Tensor | None] = [None] * L
    logits = None
    for _ in range(L + 1):
        seen: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
        handles = []
        for l, layer in enumerate(layers):
            # this pass's lists bound now: the hooks are removed before the next pass rebinds them
            def pre(module, args, l=l, seen=seen):
                seen[l] = args[0].detach().clone()

            def post(module, args, output, l=l, replace=replace):
                if replace[l] is None:
                    return None
                out = output.clone()
                out[:, P0:] = replace[l]
                return out

            handles.append(adapter.mlp_input_module(layer).register_forward_pre_hook(pre))
            handles.append(adapter.mlp_output_module(layer).register_forward_hook(post))
        with torch.no_grad():
            logits = loaded.model(input_ids=tokens, use_cache=False).logits
        for h in handles:
            h.remove()
        x = torch.stack(seen, dim=2)[:, P0:]  # [B, T - P0, L, d]
        with torch.no_grad():
            recon = tc.decode(tc.encode(x), x)
        replace = [recon[:, :, l] for l in range(L)]
    return logits


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_evaluate_matches_brute_force(family: str, kind: str) -> None:
    loaded = tiny_model(family)
    cfg = TranscoderConfig(kind, loaded.n_layers, loaded.d_model, 16, activation="jumprelu", skip=kind == "plt")
    tc = Transcoder.random(cfg, seed=1)
    with torch.no_grad():
        tc.b_dec.normal_(0, 0.1)
        tc.activation.threshold.fill_(0.2)
        if getattr(tc, "W_skip", None) is not None:
            tc.W_skip.normal_(0, 0.05)
    tokens = contexts()
    result = evaluate(loaded, tc, tokens, n_tokens=6 * (10 - P0), batch_size=4)
    assert result["n_tokens"] == 6 * (10 - P0)

    rm = ReplacementModel(loaded, tc)
    runs = [rm.run(tokens[b]) for b in range(tokens.shape[0])]
    y = torch.cat([r.mlp_out[P0:] for r in runs]).double()  # [N, L, d]
    recon = torch.cat([r.reconstruction[P0:] for r in runs]).double()
    acts = torch.cat([r.activations[P0:] for r in runs])
    nmse = ((recon - y) ** 2).sum((0, 2)) / ((y - y.mean(0)) ** 2).sum((0, 2))
    l0 = (acts != 0).sum(-1).double().mean(0)
    dead = float((acts != 0).sum(0).eq(0).double().mean())
    torch.testing.assert_close(torch.tensor(result["nmse_per_layer"], dtype=torch.float64), nmse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(result["l0_per_layer"], dtype=torch.float64), l0, atol=1e-6, rtol=0)
    assert result["nmse_mean"] == pytest.approx(float(nmse.mean()), rel=1e-4)
    assert result["l0_mean"] == pytest.approx(float(l0.mean()))
    assert result["dead_fraction"] == pytest.approx(dead)

    original = torch.stack([r.logits[P0:] for r in runs]).double()
    spliced = spliced_brute_force(loaded, tc, tokens)[:, P0:].double()
    lp_o, lp_s = original.log_softmax(-1), spliced.log_softmax(-1)
    kl = float((lp_o.exp() * (lp_o - lp_s)).sum(-1).mean())
    top1 = float((original.argmax(-1) == spliced.argmax(-1)).double().mean())
    assert result["spliced_kl"] == pytest.approx(kl, rel=1e-3, abs=1e-5)
    assert result["spliced_top1"] == pytest.approx(top1)
    assert kl > 1e-3  # the transcoder is random: splicing changes the output
    assert "NMSE mean" in format_table(result)


def test_spliced_equals_model_when_reconstruction_is_exact() -> None:
    """A transcoder whose reconstruction equals the MLP output on these tokens splices in with no change.

    A PLT with no active features and a skip path W_skip = 0 reproduces a model whose MLPs output zero.
    """
    loaded = tiny_model("llama")
    with torch.no_grad():
        for layer in loaded.adapter.decoder_layers(loaded.model):
            layer.mlp.down_proj.weight.zero_()
    tc = Transcoder.random(TranscoderConfig("plt", loaded.n_layers, loaded.d_model, 8), seed=0)
    with torch.no_grad():
        tc.W_dec.zero_()
    result = evaluate(loaded, tc, contexts(), n_tokens=54)
    assert result["spliced_kl"] == pytest.approx(0.0, abs=1e-9)
    assert result["spliced_top1"] == 1.0


def test_evaluate_rejects_transcoder_of_another_model() -> None:
    loaded = tiny_model("llama")
    tc = Transcoder.random(TranscoderConfig("clt", 4, loaded.d_model, 8))
    with pytest.raises(CltraceError, match="does not fit model"):
        evaluate(loaded, tc, contexts(), n_tokens=10)


def test_evaluate_on_text_uses_heldout_split(tmp_path) -> None:
    from cltrace.data.sources import FileSource

    loaded = tiny_model("gpt2")
    tc = Transcoder.random(TranscoderConfig("clt", loaded.n_layers, loaded.d_model, 8))
    docs = [f"document number {i} about cats and dogs and birds" for i in range(200)]
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    src = FileSource(tmp_path / "d.txt", txt_split="paragraph")
    result = evaluate(loaded, tc, src, n_tokens=30, n_ctx=16, tokenize=lambda t: [1 + ord(c) % 90 for c in t],
                      heldout_fraction=0.2, bos_id=0)
    assert result["n_tokens"] >= 30
    (tmp_path / "e.txt").write_text("  ")
    with pytest.raises(CltraceError, match="holds no text"):
        evaluate(loaded, tc, FileSource(tmp_path / "e.txt"), n_tokens=30, tokenize=lambda t: [1], bos_id=0)


def test_heldout_contexts_are_drawn_across_the_split() -> None:
    """The evaluated contexts are a fixed random draw from the whole held-out split, not its first ones."""
    from cltrace.data.packing import PackConfig, pack_batches
    from cltrace.eval.evaluate import token_batches

    loaded = tiny_model("gpt2")
    docs = [str(i) for i in range(400)]
    tokenize = lambda t: [1 + 20 * int(t) + j for j in range(20)]  # noqa: E731  (every context unique)
    in_order = torch.cat([b.tokens for b in pack_batches(docs, tokenize, PackConfig(
        n_ctx=16, batch_size=8, bos_id=0, split="heldout", heldout_fraction=0.5, drop_last=False))])  # [n, 16]
    assert len(in_order) > 150

    def draw() -> torch.Tensor:
        return torch.cat(list(token_batches(loaded, docs, n_tokens=16 * 14, n_ctx=16, tokenize=tokenize,
                                            heldout_fraction=0.5, bos_id=0)))  # [16, 16]

    drawn = draw()
    assert drawn.shape == (16, 16)
    index = {tuple(row.tolist()): i for i, row in enumerate(in_order)}
    where = [index[tuple(row.tolist())] for row in drawn]  # each one a held-out context
    assert len(set(where)) == 16
    assert where != list(range(16)) and max(where) >= len(in_order) // 2
    assert torch.equal(draw(), drawn)  # the same draw every time

    # A small evaluation draws from a pool sized to it (64 x 2 contexts), not from the whole split.
    few = torch.cat(list(token_batches(loaded, docs, n_tokens=2 * 14, n_ctx=16, batch_size=2, tokenize=tokenize,
                                       heldout_fraction=0.5, bos_id=0)))  # [2, 16]
    where = [index[tuple(row.tolist())] for row in few]
    assert max(where) < 128 and where != [0, 1]


def test_cli_eval_rejects_missing_transcoder(tmp_path) -> None:
    from typer.testing import CliRunner

    from cltrace.cli import app

    result = CliRunner().invoke(app, ["eval", str(tmp_path / "nope")])
    assert isinstance(result.exception, CltraceError) and "does not exist" in str(result.exception)
