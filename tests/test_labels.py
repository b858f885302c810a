"""Measured labels: the pattern search finds a two-token trigger and scores noise low; on planted
features with known triggers and outputs the input label names the trigger with a held-out score a
brute-force count reproduces, and the steering test passes for the planted output, agrees with a
direct hook on the real model, and fails for random decoders; people's labels win; unclear
labels are marked; the seal covers the new tables and old stores still open."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import assert_one_line_error, run_cli
from helpers.labels import (
    NOISE,
    ON_CAPITAL,
    ON_OPEN,
    OPEN,
    SAID,
    calibrate_noise,
    documents,
    planted_model,
    planted_transcoder,
    tokenize,
)

from cltrace.data.packing import PackConfig, pack_batches
from cltrace.errors import CltraceError
from cltrace.features import FeatureStore, build_feature_store
from cltrace.features.heldout import heldout_stream, selection_pass
from cltrace.features.label_data import in_training_half
from cltrace.features.labeller import describe_features, label_inputs, measure_outputs
from cltrace.features.labels import FeatureLabel, LabelConfig, read_evidence
from cltrace.features.patterns import Sites, Vocab, balanced_accuracy, choose_pattern, context_sites, describe, matches
from cltrace.features.show import format_page
from cltrace.graph.attribution import attribute
from cltrace.graph.config import AttributionConfig, CircuitConfig
from cltrace.model.hooks import mlp_hooks
from cltrace.replacement import ReplacementModel
from cltrace.trace.circuit import find_circuit
from cltrace.trace.labels import Labels

N_CTX = 48
CHARS = ["<bos>", *[chr(c) for c in range(32, 127)]]  # char_tokenizer's vocabulary


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run far faster on one thread than on cores the machine shares."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the pattern search alone ----------------------------------------------------------------------


def _contexts(docs: list[str]) -> np.ndarray:
    pack = PackConfig(n_ctx=N_CTX, batch_size=4, bos_id=0, heldout_fraction=0.0)
    return torch.cat([b.tokens for b in pack_batches(docs, tokenize, pack)]).numpy()


def _split(sites: Sites, active: np.ndarray, width: int = 8) -> tuple[Sites, Sites]:
    """(active sites, inactive sites within `width` positions of an active one), as in example windows."""
    close = np.convolve(active.astype(float), np.ones(2 * width + 1), mode="same") > 0
    return sites.take(np.nonzero(active)[0]), sites.take(np.nonzero(close & ~active)[0])


def _heldout_score(pattern: tuple, sites: Sites, active: np.ndarray, vocab: Vocab) -> float:
    """Balanced accuracy as the labeller defines it: TNR the mean of all inactive tokens' and those near active ones'."""
    match = matches(pattern, sites, vocab)
    near = np.convolve(active.astype(float), np.ones(17), mode="same") > 0
    tpr = float(match[active].mean())
    return balanced_accuracy(tpr, float(match[~active].mean()), float(match[near & ~active].mean()))


def test_the_search_finds_a_capital_after_an_open_bracket_and_scores_noise_low() -> None:
    vocab = Vocab(CHARS)
    train, held = _contexts(documents(120, seed=1)), _contexts(documents(120, seed=2))
    sites_t, sites_h = context_sites(vocab, train), context_sites(vocab, held)

    def rule(tokens: np.ndarray) -> np.ndarray:  # an acronym's first letter: a capital right after '('
        prev = np.concatenate([np.zeros((len(tokens), 1), dtype=tokens.dtype), tokens[:, :-1]], axis=1)
        return (np.isin(tokens, [ord(c) - 31 for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]) & (prev == OPEN)).reshape(-1)

    active_t, active_h = rule(train), rule(held)
    assert 50 < active_t.sum() < 0.05 * active_t.size
    pos, rest = _split(sites_t, active_t)
    choice = choose_pattern(pos, rest, sites_t, active_t.mean(), vocab)
    assert choice is not None
    assert describe(choice.pattern, vocab) == "a single capital letter after '('"
    assert _heldout_score(choice.pattern, sites_h, active_h, vocab) == pytest.approx(1.0)
    # the firing token alone misses half the story: the acronym's other letters are capitals too
    assert _heldout_score((("cur", "class", "capital_letter"),), sites_h, active_h, vocab) < 0.96
    # activations unrelated to the tokens: the best pattern on one half predicts nothing on the other
    g = np.random.default_rng(0)
    noise_t, noise_h = g.random(len(sites_t)) < 0.1, g.random(len(sites_h)) < 0.1
    pos, rest = _split(sites_t, noise_t)
    noisy = choose_pattern(pos, rest, sites_t, noise_t.mean(), vocab)
    assert noisy is not None
    assert abs(_heldout_score(noisy.pattern, sites_h, noise_h, vocab) - 0.5) < 0.06


# -- planted features end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A store of the planted transcoder over acronym text, labelled (inputs, then three outputs)."""
    torch.set_num_threads(1)
    loaded = planted_model()
    tc = planted_transcoder(loaded)
    docs = documents(200)
    calibrate_noise(loaded, tc, torch.from_numpy(_contexts(docs[:40])))
    db = tmp_path_factory.mktemp("labels") / "f.db"
    build_feature_store(loaded, tc, docs, 2500, db, n_ctx=N_CTX, batch_size=8, tokenize=tokenize, bos_id=0,
                        progress=False, top_k=10, first_position=1)
    with FeatureStore(db) as store:
        summary = label_inputs(store, loaded, tc, docs, progress=False, tokenize=tokenize, bos_id=0)
        rm = ReplacementModel(loaded, tc)
        labels = measure_outputs(store, rm, [ON_OPEN, ON_CAPITAL, NOISE], progress=False)
    return {"loaded": loaded, "tc": tc, "db": db, "summary": summary, "labels": labels, "rm": rm}


def test_input_labels_name_the_planted_triggers(planted: dict) -> None:
    labels = planted["labels"]
    assert labels[ON_OPEN].input_label == "'('" and labels[ON_OPEN].input_score >= 0.99
    assert labels[ON_CAPITAL].input_label == "a single capital letter" and labels[ON_CAPITAL].input_score >= 0.99
    assert not labels[ON_OPEN].input_unclear and not labels[ON_CAPITAL].input_unclear
    assert planted["summary"]["features"] == 3 and planted["summary"]["scored"] == 3  # the dead ones are not labelled


def _naive_match(pattern: list, text: str) -> bool:
    """The planted features' patterns matched by hand, on one token's text."""
    (slot, kind, value), = pattern
    assert slot == "cur"
    if kind == "ids":
        return CHARS.index(text) in value
    if kind == "id":
        return CHARS.index(text) == value
    assert (kind, value) == ("class", "capital_letter")
    return len(text) == 1 and text.isupper()


def test_the_heldout_score_matches_a_brute_force_count(planted: dict) -> None:
    """Recount TPR and FPRs from the store's held-out-half windows and a fresh encoding of the stored
    held-out contexts, with a hand matcher: they give the stored score."""
    loaded, tc = planted["loaded"], planted["tc"]
    with FeatureStore(planted["db"]) as store:
        held = torch.from_numpy(np.stack([np.frombuffer(b, dtype="<i4") for (b,) in store.conn.execute(
            "SELECT tokens FROM label_contexts ORDER BY ctx_id")]).astype(np.int64))  # [C, T]
        grabbed: dict[int, torch.Tensor] = {}
        with mlp_hooks(loaded, lambda l, x: grabbed.__setitem__(l, x), lambda l, y: None), torch.no_grad():
            loaded.model(input_ids=held)
        acts = tc.encode(torch.stack([grabbed[l] for l in range(3)], dim=2)).detach()[:, 1:]  # [C, T-1, L, F]
        for key in (ON_OPEN, ON_CAPITAL, NOISE):
            page = store.page(*key)
            pattern = page.measured["input_evidence"]["pattern"]
            floor = LabelConfig().active_fraction * page.max_act
            a = acts[..., key[0], key[1]].numpy().reshape(-1)
            on, off = (a > 0) & (a >= floor), a <= 0
            hit = np.array([_naive_match(pattern, CHARS[t]) for t in held[:, 1:].reshape(-1).tolist()])
            tp, p, fp, n = (hit & on).sum(), on.sum(), (hit & off).sum(), off.sum()
            seen: dict[tuple[int, int], tuple[float, bool]] = {}
            for ex in page.top + page.samples:
                if not in_training_half(ex.ctx_id, 0):
                    for i, (t, act) in enumerate(zip(ex.texts, ex.acts)):
                        seen[(ex.ctx_id, ex.pos - ex.mark + i)] = (act, _naive_match(pattern, t))
            tp += sum(m for act, m in seen.values() if act > 0 and act >= floor)
            p += sum(act > 0 and act >= floor for act, _ in seen.values())
            near = [m for act, m in seen.values() if act <= 0]
            want = balanced_accuracy(tp / p, fp / n, float(np.mean(near)) if near else None)
            assert page.measured["input_score"] == pytest.approx(want, abs=1e-4), key


def test_patterns_are_chosen_on_the_even_heldout_contexts_and_scored_on_the_odd_ones(planted: dict) -> None:
    """The held-out stream splits by context parity: the two parts interleave the whole stream and share
    no context; the selection pass's active tokens are those of a plain encoding of the even contexts;
    the contexts kept as the label test's are the odd ones."""
    loaded, tc = planted["loaded"], planted["tc"]
    docs = documents(200)
    run = {"tokenize": tokenize, "bos_id": 0}
    with FeatureStore(planted["db"]) as store:
        stored = torch.from_numpy(np.stack([np.frombuffer(b, dtype="<i4") for (b,) in store.conn.execute(
            "SELECT tokens FROM label_contexts ORDER BY ctx_id")]).astype(np.int64))  # [C, T]
        whole = torch.cat(list(heldout_stream(store, loaded, docs, 2 * len(stored) + 2, 8, **run)[0]))  # [C', T]
        assert torch.equal(stored, whole[1::2][: len(stored)])
        even, odd = (torch.cat(list(heldout_stream(store, loaded, docs, 32, 8, part=p, **run)[0])) for p in (0, 1))
        assert torch.equal(even, whole[0::2][:32]) and torch.equal(odd, whole[1::2][:32]) and len(odd) > 0
        vocab = Vocab(CHARS)
        floor = np.zeros((3, tc.n_features))
        for layer, feature, max_act in store.conn.execute("SELECT layer, feature, max_act FROM features"):
            floor[layer, feature] = LabelConfig().active_fraction * max_act
        chosen_on = selection_pass(store, loaded, tc, docs, vocab, floor, 32, 8, progress=False, **run)
    grabbed: dict[int, torch.Tensor] = {}
    with mlp_hooks(loaded, lambda l, x: grabbed.__setitem__(l, x), lambda l, y: None), torch.no_grad():
        loaded.model(input_ids=even)
    acts = tc.encode(torch.stack([grabbed[l] for l in range(3)], dim=2)).detach()[:, 1:].reshape(-1, 3, tc.n_features)
    kept = np.ones(acts.shape[0], dtype=bool)  # the store analyses every position after BOS here (first_position 1)
    assert len(chosen_on.sites) == int(kept.sum())
    assert np.array_equal(chosen_on.sites.cur, even[:, 1:].reshape(-1).numpy())
    for key in (ON_OPEN, ON_CAPITAL, NOISE):
        a = acts[:, key[0], key[1]].numpy()
        want = np.nonzero((a > 0) & (a >= floor[key]))[0]
        assert np.array_equal(chosen_on.active.get(key, np.zeros(0, dtype=np.int64)), want), key
        assert len(want) > 0 or key == NOISE


def test_steering_passes_for_the_planted_output_and_fails_for_random_decoders(planted: dict) -> None:
    labels, config = planted["labels"], LabelConfig()
    said = labels[ON_OPEN]
    assert said.output_tokens == ["Q"] and said.output_score >= config.min_steer_z and not said.output_unclear
    assert said.text() == "'(' → says 'Q'" and not said.unclear
    for key in (ON_CAPITAL, NOISE):
        assert labels[key].output_score < config.min_steer_z and labels[key].output_unclear, key
    assert labels[ON_CAPITAL].text().endswith("?") and "unclear" not in labels[ON_CAPITAL].text()


def test_a_steering_site_agrees_with_a_hook_on_the_real_model(planted: dict) -> None:
    """Setting the planted feature in iterative mode adds exactly its decoder (it writes to the last
    layer only): the z of 'Q' at a steered site equals the one from a hook adding that vector."""
    loaded, tc, config = planted["loaded"], planted["tc"], LabelConfig()
    with FeatureStore(planted["db"]) as store:
        page = store.page(*ON_OPEN)
        site = page.measured["output_evidence"]["steer"][0]
        tokens = (np.frombuffer(store.conn.execute("SELECT tokens FROM label_contexts WHERE ctx_id=?",
                                                   (site["ctx"],)).fetchone()[0], dtype="<i4")
                  if site["where"] == "heldout" else None)
    assert tokens is not None and tokens[site["pos"]] == OPEN
    lo = max(1, site["pos"] - config.steer_window)
    ids = torch.tensor([0, *tokens[lo : site["pos"] + 1].tolist()])[None]
    run = planted["rm"].run(ids[0])
    own = float(run.activations[-1, 0, ON_OPEN[1]])
    add = (config.steer_factor * page.max_act - own) * tc.W_dec[0][ON_OPEN[1], 2]

    def plus(layer: int, out: torch.Tensor) -> torch.Tensor | None:
        if layer != 2:
            return None
        out = out.clone()
        out[:, -1] += add
        return out

    with torch.no_grad():
        before = loaded.model(input_ids=ids).logits[0, -1]
        with mlp_hooks(loaded, lambda l, x: None, plus):
            after = loaded.model(input_ids=ids).logits[0, -1]
    delta = (after - before).double()
    z = (delta - delta.mean()) / delta.std()
    assert float(z[SAID]) == pytest.approx(site["z"], abs=0.01)
    assert site["raised"][0]["text"] == "Q"


def test_people_win_pages_show_the_evidence_and_unclear_is_marked(planted: dict, tmp_path: Path) -> None:
    with FeatureStore(planted["db"]) as store:
        store.set_label(*ON_CAPITAL, "first letter of an acronym")
        try:
            got = store.labels_for([ON_CAPITAL, ON_OPEN, NOISE, (1, 3)])
            assert got[ON_CAPITAL].source == "user" and got[ON_CAPITAL].text() == "first letter of an acronym"
            assert got[ON_OPEN].source == "auto" and not got[ON_OPEN].unclear
            never = got[(1, 3)]  # never measured (dead): the token-list label, as it always read, flagged unclear
            assert never.unclear and not never.measured and never.text() == "dead"
            page = store.page(*ON_CAPITAL)
            assert page.display_label == "first letter of an acronym"
            assert page.measured["input_label"] == "a single capital letter"
        finally:
            store.set_label(*ON_CAPITAL, None)
        page = store.page(*ON_OPEN)
        assert page.display_label == "'(' → says 'Q'"
        data = json.loads(json.dumps(page.to_dict()))
        assert data["measured"]["input_score"] >= 0.99 and data["measured"]["output_evidence"]["steer"]
        text = format_page(page)
        assert "input label:  '('  [confident; held-out balanced accuracy 1.000" in text
        assert "output label: 'Q'  [confident; steering z" in text and "token-list label: on '('" in text
        assert [hit[:2] for hit in store.search("capital")] == [ON_CAPITAL]
        seen = []

        def describer(page: dict) -> str:
            seen.append(page["measured"]["input_label"])
            return "opens an aside or an acronym"

        assert describe_features(store, describer, [ON_OPEN]) == {ON_OPEN: "opens an aside or an acronym"}
        assert seen == ["'('"]
        assert "description:  opens an aside or an acronym  [from the describer" in format_page(store.page(*ON_OPEN))
    both = FeatureLabel(0, 0, "' ('", 0.5, "'DA'", 1.0, ["DA"], True, "auto", True, True)
    assert both.text() == "unclear: ' ('? → says 'DA'?"
    only_in = FeatureLabel(0, 0, "' ('", 0.9, "'DA'", 1.0, ["DA"], False, "auto", False, True)
    assert only_in.text() == "' (' → says 'DA'?"


def _copy(db: Path, to: Path) -> Path:
    source, dest = sqlite3.connect(db), sqlite3.connect(to)
    source.backup(dest)
    source.close()
    dest.close()
    return to


def test_the_seal_covers_measured_labels_and_old_stores_open(planted: dict, tmp_path: Path) -> None:
    db = _copy(planted["db"], tmp_path / "tampered.db")
    conn = sqlite3.connect(db)
    conn.execute("UPDATE auto_labels SET input_score = 0.2 WHERE layer = 0 AND feature = 0")
    conn.commit()
    conn.close()
    with pytest.raises(CltraceError, match="its auto_labels table does not match its seal"):
        FeatureStore(db)
    old = _copy(planted["db"], tmp_path / "old.db")  # a store from before measured labels: no such tables
    conn = sqlite3.connect(old)
    conn.execute("DROP TABLE auto_labels")
    conn.execute("DROP TABLE label_contexts")
    seal = json.loads(conn.execute("SELECT value FROM meta WHERE key='seal'").fetchone()[0])
    for key in ("auto_labels", "label_contexts"):
        seal.pop(key)
    conn.execute("UPDATE meta SET value=? WHERE key='seal'", (json.dumps(seal),))
    conn.commit()
    conn.close()
    with FeatureStore(old) as store:
        assert store.page(*ON_OPEN).measured is None
        assert store.page(*ON_OPEN).display_label.startswith("on '('")
        label = store.labels_for([ON_OPEN])[ON_OPEN]
        assert label.unclear and not label.measured and label.text() == store.page(*ON_OPEN).auto_label
        assert store.search("on '('")[0][:2] == ON_OPEN


def test_extending_a_store_drops_its_measured_labels(planted: dict, tmp_path: Path) -> None:
    db = _copy(planted["db"], tmp_path / "grown.db")
    build_feature_store(planted["loaded"], planted["tc"], documents(200), 3500, db, n_ctx=N_CTX, batch_size=8,
                        tokenize=tokenize, bos_id=0, progress=False, top_k=10, first_position=1)
    with FeatureStore(db) as store:
        assert store.page(*ON_OPEN).measured is None  # its held-out text may now be in the store


@pytest.mark.slow
def test_cli_autolabel_labels_inputs_then_steers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.models import char_tokenizer

    from cltrace.transcoder import save_transcoder

    loaded = planted_model()
    tc = planted_transcoder(loaded)
    loaded.model.save_pretrained(tmp_path / "model")
    char_tokenizer().save_pretrained(tmp_path / "model")
    save_transcoder(tc, tmp_path / "clt")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents(200)))
    db = tmp_path / "f.db"
    m, t, d = ("-m", str(tmp_path / "model")), ("-t", str(tmp_path / "clt")), ("-d", str(db))
    code, out, err = run_cli("features", "build", *t, *m, "-s", str(tmp_path / "docs.jsonl"), "-n", "2500", "-o", str(db),
                             "--n-ctx", str(N_CTX), "--autolabel", "-q", capsys=capsys)
    assert code == 0, err
    assert "features labelled" in out
    code, out, err = run_cli("features", "autolabel", *d, *t, *m, "-s", str(tmp_path / "docs.jsonl"), "--contexts", "32",
                             "-q", capsys=capsys)
    assert code == 0, err
    assert "features labelled" in out and "unclear" in out
    code, out, err = run_cli("features", "autolabel", *d, *t, *m, "--steer", "0:0", "-q", capsys=capsys)
    assert code == 0, err
    assert out.split("[")[0].split() == ["0:0", "'('", "→", "says", "'Q'"]
    code, out, err = run_cli("features", "show", "0:0", *d, capsys=capsys)
    assert code == 0 and "steering z" in out
    code, _, err = run_cli("features", "autolabel", *d, *t, *m, "--steer", "9:0", "-q", capsys=capsys)
    assert_one_line_error(code, err, "unknown feature 9:0")


def test_the_share_above_a_threshold_follows_the_histogram() -> None:
    """The active share the pattern search corrects random tokens' matches by, read from the store's
    histogram, is within the threshold's own bin of the true share."""
    from cltrace.features.label_data import FeatureExamples
    from cltrace.features.state import HIST_EDGES, hist_bins

    acts = torch.from_numpy(np.random.default_rng(0).lognormal(0.0, 1.0, 5000)).float()
    bins = hist_bins(acts, len(HIST_EDGES) + 1)
    hist = torch.bincount(bins, minlength=len(HIST_EDGES) + 1).tolist()
    ex = FeatureExamples(0, 0, len(acts), 0.1, float(acts.max()), [], hist)
    for threshold in (0.05, 0.3, 1.0, 4.0):
        true = float((acts >= threshold).float().mean())
        own_bin = hist[int(hist_bins(torch.tensor([threshold]), len(hist))[0])] / len(acts)
        assert abs(ex.share_above(threshold, HIST_EDGES) - true) <= own_bin / 2 + 1e-9
    assert ex.share_above(0.0, HIST_EDGES) == 1.0 and ex.share_above(1e9, HIST_EDGES) == 0.0


def test_a_store_that_used_up_its_text_asks_for_more(planted: dict, tmp_path: Path) -> None:
    docs = documents(20, seed=5)
    db = tmp_path / "all.db"
    build_feature_store(planted["loaded"], planted["tc"], docs, 10**6, db, n_ctx=N_CTX, batch_size=8,
                        tokenize=tokenize, bos_id=0, progress=False, top_k=5, first_position=1)
    with FeatureStore(db) as store, pytest.raises(CltraceError, match="pass a larger text source"):
        label_inputs(store, planted["loaded"], planted["tc"], docs, progress=False, tokenize=tokenize, bos_id=0)


def test_a_circuit_measures_the_output_labels_of_its_strongest_members(planted: dict, tmp_path: Path) -> None:
    """Tracing steers the strongest members of the circuit's supernodes where the store has no output
    label yet: the planted '(' feature comes out saying 'Q', and its supernode is steered on 'Q'."""
    db = tmp_path / "inputs-only.db"
    docs = documents(200)
    build_feature_store(planted["loaded"], planted["tc"], docs, 2500, db, n_ctx=N_CTX, batch_size=8, tokenize=tokenize,
                        bos_id=0, progress=False, top_k=10, first_position=1)
    rm = planted["rm"]
    graph = attribute(rm, "the Data Unit (", targets=["Q"], config=AttributionConfig(progress=False))
    with FeatureStore(db) as store:
        label_inputs(store, planted["loaded"], planted["tc"], docs, progress=False, tokenize=tokenize, bos_id=0)
        unmeasured = find_circuit(rm, graph, Labels(store), config=CircuitConfig(label_members=0)).circuit
        assert "steer" not in read_evidence(store, *ON_OPEN)[1]
        circuit = find_circuit(rm, graph, Labels(store)).circuit
        assert "steer" in read_evidence(store, *ON_OPEN)[1]
    pos = len("the Data Unit (")  # the BOS token comes first
    opened = [sn for sn in circuit.supernodes if sn.members[0][:2] == ON_OPEN and sn.members[0][2] == pos]
    assert len(opened) == 1 and opened[0].effect > 0
    node = opened[0]
    assert node.output_tokens == ["Q"] and "says 'Q'" in node.name and node.label_scores["output"] >= LabelConfig().min_steer_z
    assert node.validation is not None and node.validation["steer"]["tokens"] == ["Q"] and node.validation["steer"]["passed"]
    before = next(sn for sn in unmeasured.supernodes if sn.id == node.id)
    assert before.output_tokens == [] and before.validation is not None and before.validation["steer"] is None
