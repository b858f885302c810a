"""Property tests of the activation store and feature store loaders: round trips, and damage refused in one line or harmless."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.damage import (
    FAST,
    MEDIUM,
    assert_refused,
    copy_with,
    damaged,
    damaged_or_missing,
    deep_equal,
    json_values,
    loaded_or_refused,
    mutate_json,
    scratch_folders,
)
from helpers.features import BATCH, BOS, T1, build, corpus, tokenize, transcoder
from helpers.models import tiny_model
from helpers.store import POS, harvest
from hypothesis import given, settings
from hypothesis import strategies as st

from cltrace.data.store import SETTING_KEYS, STORE_FORMAT, ActivationStore, read_manifest, write_manifest_file
from cltrace.errors import CltraceError
from cltrace.features import FeatureStore
from cltrace.features import store as feature_store
from cltrace.features.labeller import label_inputs, measure_outputs
from cltrace.features.labels import LabelConfig
from cltrace.replacement import ReplacementModel


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """A fresh folder per call, kept until the module ends (see `scratch_folders`)."""
    return scratch_folders(tmp_path_factory.mktemp("loaders"))


# -- activation stores ---------------------------------------------------------------------------------


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed store manifest with any values its fields may hold (infinite norms included)."""
    L, per_context = draw(st.integers(1, 3)), draw(st.integers(1, 64))
    norms = st.lists(st.floats(allow_nan=False), min_size=L, max_size=L)
    shards = [
        {"file": f"shard-{i:05d}.safetensors", "contexts": c, "tokens": c * per_context,
         "bytes": draw(st.integers(0, 2**40)), "sha256": draw(st.text("0123456789abcdef", min_size=64, max_size=64)),
         "x_norm_sum": draw(norms), "y_norm_sum": draw(norms)}
        for i, c in enumerate(draw(st.lists(st.integers(1, 1000), max_size=3)))
    ]
    contexts = sum(s["contexts"] for s in shards)
    stats: dict[str, Any] = {"tokens": contexts * per_context}
    if contexts:
        stats |= {"x_mean_norm": draw(norms), "y_mean_norm": draw(norms), "scale_x": draw(norms), "scale_y": draw(norms)}
    settings = {k: draw(json_values(3)) for k in SETTING_KEYS}
    settings |= {"dtype": draw(st.sampled_from(("bfloat16", "float16"))), "n_ctx": draw(st.integers(1, 4096))}
    return {
        "format": STORE_FORMAT, "version": 2, "store_id": draw(st.text(max_size=32)), "settings": settings,
        "fingerprint": draw(st.dictionaries(st.text(max_size=8), json_values(3), max_size=4)),
        "n_layers": L, "d_model": draw(st.integers(1, 4096)), "positions_per_context": per_context,
        "target_tokens": draw(st.integers(0, 2**40)), "contexts": contexts, "tokens": contexts * per_context,
        "position": draw(st.none() | st.dictionaries(st.text(max_size=8), st.integers(), max_size=3)),
        "complete": draw(st.booleans()), "source_exhausted": draw(st.booleans()), "shards": shards, "stats": stats,
    }


@FAST
@given(manifest=manifests())
def test_store_manifest_round_trip(scratch, manifest: dict[str, Any]) -> None:
    folder = scratch()
    write_manifest_file(folder, manifest)
    assert read_manifest(folder) == manifest


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], torch.Tensor, torch.Tensor]:
    """A harvested store of 6 contexts in two shards, its manifest and all its (x, y)."""
    base = tmp_path_factory.mktemp("store")
    store = harvest(base, base / "store", tokens=POS * 6)
    return store.path, store.manifest, *store.read_contexts(0, store.contexts)


def _read_store_or_refuse(folder: Path, store_dir) -> None:
    _, manifest, x, y = store_dir
    def read() -> tuple[ActivationStore, torch.Tensor, torch.Tensor]:
        store = ActivationStore(folder)
        return store, *store.read_contexts(0, store.contexts)

    got = loaded_or_refused(read, str(folder))
    if got is None:
        return
    store, got_x, got_y = got
    assert store.manifest == manifest
    assert deep_equal(got_x, x) and deep_equal(got_y, y)


@MEDIUM
@given(data=st.data())
def test_damaged_store_is_refused_or_identical(scratch, store_dir, data: st.DataObject) -> None:
    source = store_dir[0]
    name = data.draw(st.sampled_from(sorted(p.name for p in source.iterdir())))
    folder = copy_with(scratch, source, name, damaged_or_missing(data, (source / name).read_bytes()))
    _read_store_or_refuse(folder, store_dir)


@MEDIUM
@given(data=st.data())
def test_store_manifest_with_altered_fields_is_refused_or_identical(scratch, store_dir, data: st.DataObject) -> None:
    source = store_dir[0]
    manifest = mutate_json(data.draw, json.loads((source / "manifest.json").read_text()))
    folder = copy_with(scratch, source, "manifest.json", json.dumps(manifest).encode())
    _read_store_or_refuse(folder, store_dir)


def test_store_manifest_versions(tmp_path: Path, store_dir) -> None:
    """A version 1 manifest (no checksum) still reads; an edited version 2 one does not."""
    source, manifest, x, _ = store_dir
    shutil.copytree(source, tmp_path / "v1")
    v1 = {k: v for k, v in manifest.items() if k != "sha256"} | {"version": 1}
    (tmp_path / "v1" / "manifest.json").write_text(json.dumps(v1))
    assert deep_equal(ActivationStore(tmp_path / "v1").read_contexts(0, 6)[0], x)
    shutil.copytree(source, tmp_path / "edited")
    scaled = {**manifest, "stats": {**manifest["stats"], "scale_x": [2.0] * manifest["n_layers"]}}
    (tmp_path / "edited" / "manifest.json").write_text(json.dumps(scaled))
    with pytest.raises(CltraceError, match="does not match its sha256") as exc:
        ActivationStore(tmp_path / "edited")
    assert_refused(exc.value, "edited")


# -- feature stores ------------------------------------------------------------------------------------

# Primary keys of the feature store's tables, to address one row of each.
FEATURE_TABLES = {
    "meta": ("key",), "vocab": ("token_id",), "contexts": ("ctx_id",), "state": ("name",),
    "features": ("layer", "feature"), "examples": ("layer", "feature", "kind", "rank"),
    "labels": ("layer", "feature"), "example_seals": ("layer", "feature"),
    "auto_labels": ("layer", "feature"), "label_contexts": ("ctx_id",),
}


def feature_snapshot(path: Path) -> dict[str, Any]:
    """Everything a reader gets from the store: every page, the summary, labels, a search."""
    with FeatureStore(path) as store:
        pages = [store.page(l, f).to_dict() for l in range(store.n_layers) for f in range(store.n_features)]
        stats = {k: v for k, v in store.stats().items() if k not in ("path", "bytes")}
        return {"pages": pages, "stats": stats, "labels": store.labels(), "search": store.search("a")}


@pytest.fixture(scope="module")
def feature_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A small sealed feature store (3 layers x 16 features, one label, measured labels) and its snapshot."""
    path = tmp_path_factory.mktemp("features") / "f.db"
    loaded, tc = tiny_model("llama"), transcoder(seed=4)
    build(loaded, tc, path, 2 * BATCH * T1)
    config = LabelConfig(heldout_contexts=8, random_tokens=100, min_positives=1)
    with FeatureStore(path) as store:
        store.set_label(1, 2, "a label, set by hand")
        label_inputs(store, loaded, tc, corpus(), config, progress=False, tokenize=tokenize, bos_id=BOS)
        measure_outputs(store, ReplacementModel(loaded, tc), [(0, 1), (2, 3)], config, progress=False)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == feature_store.APPLICATION_ID
    conn.close()
    return path, feature_snapshot(path)


def _snapshot_or_refuse(path: Path, expected: dict[str, Any]) -> None:
    got = loaded_or_refused(lambda: feature_snapshot(path), str(path))
    if got is None:
        return
    assert got == expected


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_damaged_feature_store_is_refused_or_identical(scratch, feature_db, data: st.DataObject) -> None:
    source, expected = feature_db
    path = scratch() / "f.db"
    if data.draw(st.integers(0, 9)) == 0:
        assert not path.exists()  # a missing store
    else:
        path.write_bytes(damaged(data, source.read_bytes()))
    _snapshot_or_refuse(path, expected)


sql_values = st.none() | st.integers(-(2**63), 2**63 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=20)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_feature_store_with_altered_rows_is_refused_or_identical(scratch, feature_db, data: st.DataObject) -> None:
    """One value of one row of any table set to any SQLite value, or one row deleted: a valid
    database whose content changed, which only the seal can tell."""
    source, expected = feature_db
    path = scratch() / "f.db"
    shutil.copyfile(source, path)
    table = data.draw(st.sampled_from(sorted(FEATURE_TABLES)))
    conn = sqlite3.connect(path)
    try:
        keys = FEATURE_TABLES[table]
        rows = conn.execute(f"SELECT {', '.join(keys)} FROM {table}").fetchall()
        if not rows:
            return
        row = data.draw(st.sampled_from(rows))
        where = " AND ".join(f"{k}=?" for k in keys)
        if data.draw(st.integers(0, 5)) == 0:
            conn.execute(f"DELETE FROM {table} WHERE {where}", row)
        else:
            columns = [c[1] for c in conn.execute(f"PRAGMA table_info({table})")]
            column = data.draw(st.sampled_from(columns))
            conn.execute(f"UPDATE {table} SET {column}=? WHERE {where}", (data.draw(sql_values), *row))
        conn.commit()
    except sqlite3.IntegrityError:
        return  # a NULL in a NOT NULL column, or a duplicate key: SQLite refused the change itself
    finally:
        conn.close()
    _snapshot_or_refuse(path, expected)


@FAST
@given(labels=st.dictionaries(st.tuples(st.integers(0, 2), st.integers(0, 15)), st.text(min_size=1, max_size=30), max_size=5))
def test_feature_store_labels_round_trip(scratch, feature_db, labels: dict[tuple[int, int], str]) -> None:
    source, expected = feature_db
    path = scratch() / "f.db"
    shutil.copyfile(source, path)
    with FeatureStore(path) as store:
        for (layer, feature), text in labels.items():
            store.set_label(layer, feature, text)
    want = {**expected["labels"], **labels}
    with FeatureStore(path) as store:  # reopened: the labels' digest was kept current
        assert store.labels() == want
        for (layer, feature), text in want.items():
            assert store.page(layer, feature).label == text


def test_unsealed_feature_store_still_reads(tmp_path: Path, feature_db) -> None:
    """A store built before seals existed reads as before; a store with one seal mark is refused."""
    source, expected = feature_db
    shutil.copyfile(source, tmp_path / "old.db")
    conn = sqlite3.connect(tmp_path / "old.db")
    conn.execute("DELETE FROM meta WHERE key='seal'")
    conn.execute("DROP TABLE example_seals")
    conn.execute("PRAGMA application_id=0")
    conn.commit()
    conn.close()
    assert feature_snapshot(tmp_path / "old.db") == expected
    shutil.copyfile(source, tmp_path / "half.db")
    conn = sqlite3.connect(tmp_path / "half.db")
    conn.execute("PRAGMA application_id=0")
    conn.commit()
    conn.close()
    with pytest.raises(CltraceError, match="only one of its two seal marks") as exc:
        FeatureStore(tmp_path / "half.db")
    assert_refused(exc.value, "half.db")
    shutil.copyfile(source, tmp_path / "act.db")
    conn = sqlite3.connect(tmp_path / "act.db")
    conn.execute("UPDATE examples SET act = act * 2 WHERE layer=2 AND kind='top' AND rank=0")
    conn.commit()
    conn.close()
    with FeatureStore(tmp_path / "act.db") as store:  # the structure is sound; one page's content is not
        with pytest.raises(CltraceError, match="do not match their seal"):
            for f in range(store.n_features):
                store.page(2, f)
