"""Feature store: true top contexts, exact resume and extension, crash safety, bad input, "say X" tokens."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import assert_one_line_error, run_cli
from helpers.features import BATCH, BOS, N_CTX, T1, K, build, corpus, tokenize, transcoder
from helpers.models import tiny_model

from cltrace.data.packing import PackConfig, pack_batches
from cltrace.errors import CltraceError
from cltrace.features import FeatureStore, build_feature_store
from cltrace.features.show import format_page
from cltrace.features.views import unembedding_directions
from cltrace.transcoder import Transcoder, TranscoderConfig

TESTS = Path(__file__).resolve().parent


def dump(path: Path) -> tuple[list, list]:
    conn = sqlite3.connect(path)
    try:
        feats = conn.execute("SELECT * FROM features ORDER BY layer, feature").fetchall()
        examples = conn.execute("SELECT * FROM examples ORDER BY layer, feature, kind, rank").fetchall()
    finally:
        conn.close()
    return feats, examples


def brute_activations(
    loaded, tc, n_contexts: int, first_position: int = 1, exclude: tuple[int, ...] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [C, n_ctx], activations [C, n_ctx, L, F]) of the first C contexts, one context at a time,
    with resid_mid captured by this test's own hooks; positions not analysed (BOS, those before
    `first_position`, those holding an `exclude` token) are all zero."""
    pack = PackConfig(n_ctx=N_CTX, batch_size=1, bos_id=BOS, heldout_fraction=0.0)
    ctxs = [b.tokens[0] for _, b in zip(range(n_contexts), pack_batches(corpus(), tokenize, pack))]
    layers = loaded.adapter.decoder_layers(loaded.model)
    acts = []
    for ids in ctxs:
        grabbed: dict[int, torch.Tensor] = {}
        handles = [
            loaded.adapter.mlp_input_module(layer).register_forward_pre_hook(
                lambda _m, args, l=l, g=grabbed: g.__setitem__(l, args[0][0].detach().clone())
            )
            for l, layer in enumerate(layers)
        ]
        try:
            with torch.no_grad():
                loaded.model(input_ids=ids[None])
        finally:
            for h in handles:
                h.remove()
        x = torch.stack([grabbed[l] for l in range(len(layers))], dim=1)  # [n_ctx, L, d]
        with torch.no_grad():
            a = tc.encode(x)
        a[:first_position] = 0.0  # BOS is never analysed, nor what comes before first_position
        a[torch.isin(ids, torch.tensor(exclude, dtype=torch.long))] = 0.0
        acts.append(a)
    return torch.stack(ctxs), torch.stack(acts)


@pytest.fixture(scope="module")
def loaded():
    return tiny_model("llama")


def test_top_contexts_are_the_true_top_ones(loaded, tmp_path: Path) -> None:
    tc = transcoder()
    exclude = (5, 9)  # two common words, standing for special tokens
    build(loaded, tc, tmp_path / "f.db", 360, first_position=3, exclude_tokens=exclude)
    store = FeatureStore(tmp_path / "f.db")
    C = store.stats()["contexts"]
    assert C % BATCH == 0 and store.stats()["status"] == "complete"
    tokens, acts = brute_activations(loaded, tc, C, 3, exclude)  # [C, n_ctx], [C, n_ctx, L, F]
    analysed = int((~torch.isin(tokens[:, 3:], torch.tensor(exclude))).sum())
    assert analysed >= 360 > analysed - BATCH * (N_CTX - 3)  # whole batches until 360 tokens are analysed
    n_tokens = store.stats()["tokens"]
    assert n_tokens == analysed
    for l in range(tc.n_layers):
        for f in range(tc.n_features):
            page = store.page(l, f)
            a = acts[:, :, l, f]  # [C, n_ctx]
            flat = a.reshape(-1)
            active = flat > 0
            assert page.count == int(active.sum())
            assert page.density == pytest.approx(int(active.sum()) / n_tokens)
            assert sum(page.hist_counts) == page.count
            if page.count == 0:
                assert page.top == [] and page.samples == []
                continue
            assert page.mean_act == pytest.approx(float(flat[active].mean()), rel=1e-5)
            vals, idx = flat.topk(min(K, int(active.sum())))
            assert [e.act for e in page.top] == pytest.approx(vals.tolist(), rel=1e-6)
            assert [(e.ctx_id, e.pos) for e in page.top] == [divmod(int(i), N_CTX) for i in idx]
            assert page.max_act == pytest.approx(float(vals[0]), rel=1e-6)
            for e in page.top + page.samples:
                lo = e.pos - e.mark
                assert e.tokens == tokens[e.ctx_id, lo : lo + len(e.tokens)].tolist()
                assert lo >= 1 and e.tokens[e.mark] == int(tokens[e.ctx_id, e.pos])
                want = a[e.ctx_id, lo : lo + len(e.tokens)].clamp_min(0)
                assert e.acts == pytest.approx(want.tolist(), rel=2e-3, abs=2e-3)  # fp16 windows
            # sampled contexts: real activations, bands ordered by activation
            assert len(page.samples) == min(6, page.count)
            for e in page.samples:
                assert e.act == pytest.approx(float(a[e.ctx_id, e.pos]), rel=1e-6) and e.act > 0
            assert [e.act for e in page.samples] == sorted(e.act for e in page.samples)
            assert len({(e.ctx_id, e.pos) for e in page.samples}) == len(page.samples)
    text = format_page(store.page(1, 3))
    assert "feature 1:3" in text and "«" in text and "promotes" in text
    store.close()


def test_two_part_build_equals_one_at_once(loaded, tmp_path: Path) -> None:
    tc = transcoder(seed=2)
    a, b = 3 * BATCH * T1, 4 * BATCH * T1
    build(loaded, tc, tmp_path / "parts.db", a)
    with FeatureStore(tmp_path / "parts.db") as store:
        assert store.stats()["tokens"] == a
        store.set_label(0, 2, "a person's label")
    build(loaded, tc, tmp_path / "parts.db", a + b)
    build(loaded, tc, tmp_path / "once.db", a + b)
    assert dump(tmp_path / "parts.db") == dump(tmp_path / "once.db")
    with FeatureStore(tmp_path / "parts.db") as store:
        assert store.stats()["tokens"] == a + b
        assert store.page(0, 2).label == "a person's label"  # labels survive an extension
        assert store.search("PERSON'S") == [(0, 2, "a person's label")]
        assert store.page(0, 3).label is None
    # running it again with the same n_tokens is a no-op
    before = dump(tmp_path / "once.db")
    build(loaded, tc, tmp_path / "once.db", a + b)
    assert dump(tmp_path / "once.db") == before


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from helpers.models import tiny_model
import helpers.features as t

slow = t.tokenize
def tokenize(text):
    time.sleep(0.05)
    return slow(text)

t.tokenize = tokenize
t.build(tiny_model("llama"), t.transcoder(seed=3), __import__("pathlib").Path({out!r}), {n_tokens}, checkpoint_batches=1)
print("finished")
"""


def _meta_tokens(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key='tokens'").fetchone()
        finally:
            conn.close()
        return int(row[0]) if row else 0
    except sqlite3.Error:
        return 0


@pytest.mark.slow
def test_killed_build_resumes_and_is_never_corrupt(loaded, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed process, so that the two compute the same floats
    try:
        _killed_build_resumes(loaded, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _killed_build_resumes(loaded, tmp_path: Path) -> None:
    n_tokens = 8 * BATCH * T1
    out = tmp_path / "killed.db"
    script = KILL_SCRIPT.format(tests=str(TESTS), out=str(out), n_tokens=n_tokens)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while _meta_tokens(out) < 2 * BATCH * T1 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    done = _meta_tokens(out)
    assert 2 * BATCH * T1 <= done < n_tokens, done
    conn = sqlite3.connect(out)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT value FROM meta WHERE key='status'").fetchone()[0] == '"building"'
    conn.close()
    with pytest.raises(CltraceError, match="not finished|not in"):
        FeatureStore(out).page(0, 0)
    build(loaded, transcoder(seed=3), out, n_tokens)
    build(loaded, transcoder(seed=3), tmp_path / "whole.db", n_tokens)
    feats, examples = dump(out)
    feats2, examples2 = dump(tmp_path / "whole.db")
    assert [r[:3] for r in feats] == [r[:3] for r in feats2]  # counts exact
    assert [r[6:] for r in feats] == [r[6:] for r in feats2]  # histograms, tokens, labels
    assert np.allclose([r[3:6] for r in feats], [r[3:6] for r in feats2], rtol=1e-6)
    assert [r[:6] for r in examples] == [r[:6] for r in examples2]  # the same contexts, in the same order
    assert np.allclose([r[6] for r in examples], [r[6] for r in examples2], rtol=1e-6)
    conn = sqlite3.connect(out)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_bad_input_gives_clear_errors(loaded, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tc = transcoder(seed=4)
    db = tmp_path / "f.db"
    build(loaded, tc, db, 2 * BATCH * T1)
    with FeatureStore(db) as store:
        for layer, feature in ((3, 0), (0, 16), (-1, 0)):
            with pytest.raises(CltraceError, match=f"unknown feature {layer}:{feature}"):
                store.page(layer, feature)
    with pytest.raises(CltraceError, match="another transcoder"):
        build(loaded, transcoder(seed=5), db, 4 * BATCH * T1)
    with pytest.raises(CltraceError, match="already exists"):
        build(loaded, tc, db, 4 * BATCH * T1, resume=False)
    with pytest.raises(CltraceError, match="n_ctx"):
        build_feature_store(loaded, tc, corpus(), 100, db, n_ctx=32, batch_size=BATCH, tokenize=tokenize, bos_id=BOS, progress=False)
    with pytest.raises(CltraceError, match="does not exist"):
        FeatureStore(tmp_path / "missing.db")
    (tmp_path / "junk.db").write_text("not a database at all, just text" * 100)
    with pytest.raises(CltraceError, match="not a feature store"):
        FeatureStore(tmp_path / "junk.db")
    # the command line: one line, exit 2
    for args, needle in (
        (["features", "show", "0:99", "--db", str(db)], "unknown feature 0:99"),
        (["features", "show", "zero", "--db", str(db)], "not a feature"),
        (["features", "show", "0:1", "--db", str(tmp_path / "missing.db")], "does not exist"),
    ):
        code, _, err = run_cli(*args, capsys=capsys)
        assert_one_line_error(code, err, needle)
    code, out, _ = run_cli("features", "show", "0:1", "--db", str(db), capsys=capsys)
    assert code == 0 and "feature 0:1" in out


@pytest.mark.parametrize("family,kind", [("llama", "clt"), ("gpt2", "plt"), ("gemma2", "clt")])
def test_promoted_tokens_equal_decoder_times_unembedding(family: str, kind: str, tmp_path: Path) -> None:
    loaded = tiny_model(family)
    tc = transcoder(kind, seed=6)
    build(loaded, tc, tmp_path / "f.db", BATCH * T1)
    W_U = loaded.model.get_output_embeddings().weight.detach()  # [V, d]
    norm = loaded.model.model.norm if family != "gpt2" else loaded.model.transformer.ln_f
    g = norm.weight.detach() + (1.0 if family.startswith("gemma") else 0.0)
    E = loaded.model.get_input_embeddings().weight.detach()
    assert torch.allclose(unembedding_directions(loaded), g[:, None] * W_U.T)
    with FeatureStore(tmp_path / "f.db") as store:
        for l in range(tc.n_layers):
            for f in range(tc.n_features):
                if kind == "clt":
                    dec = sum(tc.W_dec[l][f, j] for j in range(tc.n_layers - l))
                else:
                    dec = tc.W_dec[l, f]
                logits = (dec.detach() * g) @ W_U.T  # [V]
                page = store.page(l, f)
                top, bot = logits.topk(10), logits.topk(10, largest=False)
                assert [s.token for s in page.promoted] == top.indices.tolist()
                assert [s.score for s in page.promoted] == pytest.approx(top.values.tolist(), abs=1e-4)
                assert [s.token for s in page.suppressed] == bot.indices.tolist()
                assert [s.score for s in page.suppressed] == pytest.approx(bot.values.tolist(), abs=1e-4)
                inputs = (tc.W_enc[l, f].detach() @ E.T).topk(10)
                assert [s.token for s in page.inputs] == inputs.indices.tolist()
                assert page.promoted[0].text == f"<{page.promoted[0].token}>"


def test_export_writes_circuit_tracer_feature_files(loaded, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from cltrace.features.export import export_feature_files
    from cltrace.graph.export import cantor_pairing

    tc = transcoder(seed=7)
    db = tmp_path / "f.db"
    build(loaded, tc, db, 2 * BATCH * T1)
    with FeatureStore(db) as store:
        store.set_label(2, 5, "my label")
        page = store.page(2, 5)
    folder = export_feature_files(db, tmp_path / "out", scan="tiny")
    assert folder == tmp_path / "out" / "features" / "tiny"
    files = sorted(folder.glob("*.json"))
    assert len(files) == tc.n_layers * tc.n_features
    data = json.loads((folder / f"{cantor_pairing(2, 5)}.json").read_text())
    keys = {"transcoder_id", "index", "examples_quantiles", "top_logits", "bottom_logits", "act_min", "act_max",
            "quantile_values", "histogram", "activation_frequency"}
    assert keys <= set(data) and data["label"] == "my label" and data["index"] == cantor_pairing(2, 5)
    top = data["examples_quantiles"][0]["examples"]
    assert [e["tokens_acts_list"][e["train_token_ind"]] for e in top] == pytest.approx([e.act for e in page.top], rel=2e-3)
    assert top[0]["tokens"] == page.top[0].texts
    assert data["top_logits"] == [s.text for s in page.promoted]
    assert data["activation_frequency"] == pytest.approx(page.density)
    as_dict = json.loads(json.dumps(page.to_dict()))  # JSON-ready, for the web UI
    assert as_dict["name"] == "2:5" and as_dict["display_label"] == "my label"
    assert as_dict["top"][0]["acts"][as_dict["top"][0]["mark"]] == pytest.approx(page.max_act, rel=2e-3)
    code, out, _ = run_cli("features", "export", str(tmp_path / "cli"), "--db", str(db), "--scan", "tiny", capsys=capsys)
    assert code == 0
    assert f"wrote {tc.n_layers * tc.n_features} feature files" in out


def test_compact_store_reads_but_does_not_extend(loaded, tmp_path: Path) -> None:
    tc = transcoder(seed=8)
    build(loaded, tc, tmp_path / "full.db", 2 * BATCH * T1)
    build(loaded, tc, tmp_path / "small.db", 2 * BATCH * T1, keep_state=False)
    assert dump(tmp_path / "full.db") == dump(tmp_path / "small.db")
    assert (tmp_path / "small.db").stat().st_size < (tmp_path / "full.db").stat().st_size
    build(loaded, tc, tmp_path / "small.db", 2 * BATCH * T1)  # nothing to do: fine
    with pytest.raises(CltraceError, match="cannot be extended"):
        build(loaded, tc, tmp_path / "small.db", 3 * BATCH * T1)
    with FeatureStore(tmp_path / "small.db") as store:
        assert store.page(1, 1).layer == 1


def test_refuses_to_overwrite_other_files(loaded, tmp_path: Path) -> None:
    other = tmp_path / "notes.txt"
    other.write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(CltraceError, match="not a feature store"):
            build(loaded, transcoder(), other, BATCH * T1, overwrite=overwrite)
    assert other.read_text() == "precious"
    empty = tmp_path / "empty.db"
    empty.touch()  # what a build killed before its first commit leaves
    build(loaded, transcoder(), empty, BATCH * T1)
    with FeatureStore(empty) as store:
        assert store.stats()["status"] == "complete"


@pytest.mark.slow
def test_cli_build_and_show_on_the_default_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cltrace features build` then `show`, on the default model with a tiny random CLT."""
    from cltrace.transcoder import save_transcoder

    tc = Transcoder.random(TranscoderConfig("clt", 30, 576, 4), seed=0)  # the default model's 30 layers x 576
    save_transcoder(tc, tmp_path / "tc")
    db = tmp_path / "f.db"

    def run(*args: str) -> tuple[int, str, str]:
        return run_cli(*args, capsys=capsys)

    code, out, err = run("features", "build", str(tmp_path / "tc"), "-n", "100", "-o", str(db), "--n-ctx", "32",
                         "-b", "2", "--top-k", "3", "-q")
    assert code == 0, err
    assert "features (" in out and str(db) in out
    code, out, err = run("features", "show", "29:3", "--db", str(db))
    assert code == 0, err
    assert out.startswith("feature 29:3") and "promotes" in out
    code, out, err = run("features", "label", "29:3", "say the acronym", "--db", str(db))
    assert code == 0 and "labelled" in out
    code, out, _ = run("features", "search", "ACRONYM", "--db", str(db))
    assert "29:3  say the acronym" in out


def test_a_custom_labeller_names_every_feature(loaded, tmp_path: Path) -> None:
    seen = []

    def labeller(page):
        seen.append(page.name)
        return f"L{page.layer} fires {page.count}x, says {page.promoted[0].text}"

    tc = transcoder(seed=9)
    build(loaded, tc, tmp_path / "f.db", BATCH * T1, labeller=labeller)
    assert len(seen) == tc.n_layers * tc.n_features
    with FeatureStore(tmp_path / "f.db") as store:
        page = store.page(2, 7)
        assert page.auto_label == f"L2 fires {page.count}x, says {page.promoted[0].text}"
        assert page.display_label == page.auto_label and page.label is None
        assert [hit[:2] for hit in store.search("L1 fires")] == [(1, f) for f in range(tc.n_features)]
