"""Global weights: planted virtual weights come out exactly, top-k matches a brute force over every
pair, co-activation statistics match a per-token count, and the feature store keeps them."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

from cltrace.errors import CltraceError
from cltrace.features.database import SCHEMA, connect
from cltrace.features.global_weights import (
    CoActivation,
    format_global_weights,
    global_weights,
    read_global_weights,
    write_global_weights,
)
from cltrace.transcoder import Transcoder, TranscoderConfig


def planted_clt() -> Transcoder:
    """3 layers, 4 features, d 8. Feature f of layer 0 writes 1·e_f into layer 0 and 2·e_f into
    layer 1; feature f of layer 1 writes 3·e_{f+4} into layer 1. Encoders: layer 1 feature g reads
    e_g; layer 2 feature g reads e_g + e_{g+4}. So V(0:f → 1:g) = [f = g], V(0:f → 2:g) = 3·[f = g],
    V(1:f → 2:g) = 3·[f = g], and nothing else."""
    cfg = TranscoderConfig(kind="clt", n_layers=3, d_model=8, n_features=4, activation="relu")
    tc = Transcoder.random(cfg)
    eye = torch.eye(8)
    with torch.no_grad():
        for w in tc.W_dec:
            w.zero_()
        tc.W_enc.zero_()
        for f in range(4):
            tc.W_dec[0][f, 0] = eye[f]
            tc.W_dec[0][f, 1] = 2 * eye[f]
            tc.W_dec[1][f, 0] = 3 * eye[f + 4]
            tc.W_enc[1, f] = eye[f]
            tc.W_enc[2, f] = eye[f] + eye[f + 4]
    return tc


def test_planted_virtual_weights() -> None:
    gw = global_weights(planted_clt(), top_k=2)
    down, up = gw.top["virtual", "down"], gw.top["virtual", "up"]
    for f in range(4):
        # layer 0 feature f: to 2:f with 3, then 1:f with 1
        assert down.layer[0, f].tolist() == [2, 1] and down.feature[0, f].tolist() == [f, f]
        assert down.weight[0, f].tolist() == pytest.approx([3.0, 1.0])
        assert down.layer[1, f, 0] == 2 and down.feature[1, f, 0] == f and down.weight[1, f, 0] == pytest.approx(3.0)
        # layer 2 feature f: from 0:f and 1:f, both 3
        assert sorted(zip(up.layer[2, f].tolist(), up.feature[2, f].tolist())) == [(0, f), (1, f)]
        assert up.weight[2, f].tolist() == pytest.approx([3.0, 3.0])
    assert (down.layer[2] == -1).all()  # the top layer has nothing downstream
    assert (up.layer[0] == -1).all()


def brute_force(tc: Transcoder, scale: torch.Tensor | None = None) -> dict[tuple[int, int, int, int], float]:
    """V for every pair, one dot product at a time (times scale[s, t] over flat feature indices)."""
    L, F = tc.n_layers, tc.n_features
    out = {}
    for s in range(L):
        dec = tc.decoder_vectors(s, torch.arange(F))  # [F, n_out, d]
        for t in range(s + 1, L):
            for f in range(F):
                into = sum(dec[f, j - s] for j in tc.output_layers(s) if j < t)
                for g in range(F):
                    v = float(into @ tc.W_enc[t, g])
                    out[s, f, t, g] = v * (1.0 if scale is None else float(scale[s * F + f, t * F + g]))
    return out


@pytest.mark.parametrize("kind", ["clt", "plt"])
def test_top_k_matches_brute_force(kind: str) -> None:
    cfg = TranscoderConfig(kind=kind, n_layers=4, d_model=6, n_features=5, activation="relu")
    tc = Transcoder.random(cfg, seed=3)
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(200, 4, 5, generator=g) - 0.5)  # [tokens, L, F], sparse-ish
    stats = CoActivation.zeros(4, 5)
    stats.add(acts[:120])
    stats.add(acts[120:])
    flat = acts.reshape(200, -1)
    fired = (flat != 0).float()
    mean = (flat.T @ fired) / fired.sum(0).clamp_min(1)  # [source, target]
    torch.testing.assert_close(stats.sums / stats.count.clamp_min(1).float(), mean)
    gw = global_weights(tc, top_k=3, coactivation=stats)
    for name, scale in (("virtual", None), ("target_weighted", mean)):
        truth = brute_force(tc, scale)
        down = gw.top[name, "down"]
        for s in range(3):
            for f in range(5):
                want = sorted(((abs(v), v) for (s2, f2, t, g2), v in truth.items() if (s2, f2) == (s, f)), reverse=True)[:3]
                assert down.weight[s, f].tolist() == pytest.approx([v for _, v in want], abs=1e-5)
        up = gw.top[name, "up"]
        for t in range(1, 4):
            for g2 in range(5):
                want = sorted(((abs(v), v) for (s2, f2, t2, g3), v in truth.items() if (t2, g3) == (t, g2)), reverse=True)[:3]
                assert up.weight[t, g2].tolist() == pytest.approx([v for _, v in want], abs=1e-5)


def test_store_round_trip(tmp_path: Path) -> None:
    tc = planted_clt()
    db = tmp_path / "features.db"
    conn = connect(db)
    conn.executescript(SCHEMA)
    conn.close()
    n = write_global_weights(db, tc, global_weights(tc, top_k=2))
    assert n == 4 * 2 + 4 * 1 + 4 * 1 + 4 * 2  # down: layer 0 two partners, layer 1 one; up: layer 1 one, layer 2 two
    page = read_global_weights(db, 0, 1)
    assert page["virtual_down"] == [
        {"layer": 2, "feature": 1, "weight": 3.0, "label": ""}, {"layer": 1, "feature": 1, "weight": 1.0, "label": ""}
    ]
    text = format_global_weights(page)
    assert "outputs (virtual weight): 2:1 +3.000; 1:1 +1.000" in text and "inputs" not in text
    assert read_global_weights(db, 2, 3)["virtual_up"][0]["weight"] == 3.0
    with sqlite3.connect(db) as raw:
        tables = {row[0] for row in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"features", "examples", "global_weights"} <= tables
    with pytest.raises(CltraceError, match="no feature store"):
        write_global_weights(tmp_path / "missing.db", tc, global_weights(tc))


@pytest.mark.slow
def test_cli_global_weights_on_a_feature_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`cltrace features build`, then `features global-weights` (with co-activation statistics), then
    `features show`: the page lists the feature's inputs and outputs by both global weights."""
    from helpers.cli import assert_one_line_error, run_cli

    from cltrace.transcoder import save_transcoder

    tc = Transcoder.random(TranscoderConfig("clt", 30, 576, 4, activation="relu"), seed=0)  # the default model's shape
    save_transcoder(tc, tmp_path / "tc")
    db = tmp_path / "f.db"
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. Harry Potter went to school, and Harry Potter came back.\n" * 20)
    code, _, err = run_cli("features", "build", str(tmp_path / "tc"), "-s", str(text), "-n", "100", "-o", str(db),
                           "--n-ctx", "32", "-b", "2", "--top-k", "3", "-q", capsys=capsys)
    assert code == 0, err
    code, out, err = run_cli("features", "global-weights", "-t", str(tmp_path / "tc"), "--db", str(db), "-s", str(text),
                             "-n", "200", "--n-ctx", "32", "-b", "2", "--top-k", "3", capsys=capsys)
    assert code == 0, err
    assert "co-activation statistics over 200 tokens" in out and "global weights to" in out
    code, out, err = run_cli("features", "show", "15:2", "--db", str(db), capsys=capsys)
    assert code == 0, err
    for title in ("inputs (virtual weight)", "outputs (virtual weight)", "inputs (target-weighted)"):
        assert title in out
    stored = read_global_weights(db, 15, 2)
    assert len(stored["virtual_up"]) == 3 and len(stored["virtual_down"]) == 3
    other = Transcoder.random(TranscoderConfig("clt", 30, 576, 4, activation="relu"), seed=1)
    save_transcoder(other, tmp_path / "other")
    code, _, err = run_cli("features", "global-weights", "-t", str(tmp_path / "other"), "--db", str(db), capsys=capsys)
    assert_one_line_error(code, err, "another transcoder")
