"""Property-based tests of every file loader.

For each format: (1) a generated valid object saved and loaded again is equal to itself; (2) a
damaged file (truncated anywhere, bytes flipped or overwritten at any offset, random bytes, an
altered JSON header or field, a field of the wrong type, a missing file) either loads an object
equal to the original (the damage was harmless) or is refused with a `CltraceError` whose message
is one line naming the file. Never another exception, never a silently different object.

Formats that a person writes or edits (text sources, a training config.json) and circuit-tracer's
foreign layout carry no checksums, so for them the damage property is weaker: a CltraceError or
a load that reflects what the file now says, never another exception.
"""

from __future__ import annotations

import json
import math
import pickle
import shutil
import sqlite3
import struct
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers.graphs import assert_graphs_equal, small_graph
from helpers.transcoders import assert_identical
from hypothesis import event, given, settings
from hypothesis import strategies as st

from cltrace.data.sources import FileSource
from cltrace.data.store import ActivationStore, read_manifest, write_manifest_file
from cltrace.errors import CltraceError
from cltrace.features import FeatureStore
from cltrace.features import store as feature_store
from cltrace.graph.graph import Graph, NodeKind, NodeTable
from cltrace.train.config import TrainConfig, parse_override
from cltrace.train.distributed import read_checkpoint
from cltrace.transcoder import Transcoder, TranscoderConfig, load_transcoder, save_transcoder

# Few examples each (the whole file runs in well under a minute on 2 busy cores); no deadline,
# since the shared machine's timing varies.
FAST = settings(max_examples=25, deadline=None)
MEDIUM = settings(max_examples=60, deadline=None)


# -- helpers -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """A fresh folder per call. Folders are kept until the module ends, so no two examples share a
    path or an inode (the feature store caches verified files by both)."""
    base = tmp_path_factory.mktemp("loaders")
    return lambda: Path(tempfile.mkdtemp(dir=base))


@st.composite
def damages(draw: st.DrawFn, n: int) -> tuple:
    """A way to damage a file of `n` bytes (a recipe, so that a failing example prints short):
    truncated, 1-3 bytes XOR-ed, a run overwritten, or replaced whole."""
    how = draw(st.sampled_from(("truncate", "flip", "overwrite", "replace")))
    if how == "truncate":
        return how, draw(st.integers(0, n - 1))
    if how == "flip":
        return how, draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=3))
    if how == "overwrite":
        return how, draw(st.integers(0, n - 1)), draw(st.binary(min_size=1, max_size=48))
    return how, draw(st.binary(max_size=300))


def damage(raw: bytes, recipe: tuple) -> bytes:
    """`raw` damaged as `recipe` (from `damages`) says."""
    how = recipe[0]
    if how == "truncate":
        return raw[: recipe[1]]
    if how == "flip":
        out = bytearray(raw)
        for offset, mask in recipe[1]:
            out[offset] ^= mask
        return bytes(out)
    if how == "overwrite":
        at, junk = recipe[1], recipe[2]
        return raw[:at] + junk + raw[at + len(junk) :]
    return recipe[1]


def damaged(data: st.DataObject, raw: bytes) -> bytes:
    """`raw` damaged some way `data` draws."""
    return damage(raw, data.draw(damages(len(raw))))


def damaged_or_missing(data: st.DataObject, raw: bytes) -> bytes | None:
    """`raw` damaged, or (one time in five) None: the file is missing."""
    return None if data.draw(st.integers(0, 4)) == 0 else damaged(data, raw)


def json_values(max_leaves: int = 6) -> st.SearchStrategy[Any]:
    """Any JSON value (no NaN: it never equals itself)."""
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
    return st.recursive(
        scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=max_leaves,
    )


def loaded_or_refused(load: Callable[[], Any], *names: str) -> Any:
    """What `load()` returns, or None after checking its refusal is one line naming `names`; the
    hypothesis events ("loaded"/"refused", see --hypothesis-show-statistics) show how damage fell."""
    try:
        got = load()
    except CltraceError as exc:
        assert_refused(exc, *names)
        event("refused")
        return None
    event("loaded")
    return got


def assert_refused(exc: CltraceError, *names: str) -> None:
    """A one-line message that names the file (any of `names`)."""
    msg = str(exc)
    assert msg and len(msg.splitlines()) == 1, msg
    assert any(name in msg for name in names), msg


def mutate_json(draw: st.DrawFn, doc: Any) -> Any:
    """`doc` with one value somewhere in it replaced by any JSON value, or one key deleted or added."""
    if not isinstance(doc, (dict, list)) or not doc or draw(st.integers(0, 3)) == 0:
        return draw(json_values())
    if isinstance(doc, dict):
        key = draw(st.sampled_from(sorted(doc)))
        how = draw(st.sampled_from(("descend", "delete", "add")))
        out = dict(doc)
        if how == "delete":
            del out[key]
        elif how == "add":
            out[draw(st.text(max_size=8))] = draw(json_values())
        else:
            out[key] = mutate_json(draw, doc[key])
        return out
    i = draw(st.integers(0, len(doc) - 1))
    return [mutate_json(draw, v) if j == i else v for j, v in enumerate(doc)]


def deep_equal(a: Any, b: Any) -> bool:
    """Equality of nested containers of tensors (same dtype and values) and plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(deep_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(deep_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


# -- graph files ---------------------------------------------------------------------------------------


@st.composite
def graphs(draw: st.DrawFn) -> Graph:
    """A valid graph: nodes in kind order with any column values, any edges, JSON metadata,
    optional influence and extra columns of several dtypes."""
    counts = [draw(st.integers(0, 3)) for _ in NodeKind]
    kinds = [k for k, c in zip(NodeKind, counts) for _ in range(c)]
    n = len(kinds)
    i32, i64 = st.integers(-(2**31), 2**31 - 1), st.integers(-(2**63), 2**63 - 1)
    f32 = st.floats(allow_nan=False, width=32)
    nodes = NodeTable.from_columns(
        kind=kinds, layer=draw(st.lists(i32, min_size=n, max_size=n)), pos=draw(st.lists(i32, min_size=n, max_size=n)),
        feature=draw(st.lists(i64, min_size=n, max_size=n)), token=draw(st.lists(i64, min_size=n, max_size=n)),
        activation=draw(st.lists(f32, min_size=n, max_size=n)), probability=draw(st.lists(f32, min_size=n, max_size=n)),
    )
    if draw(st.booleans()):
        nodes.influence = torch.tensor(draw(st.lists(f32, min_size=n, max_size=n)), dtype=torch.float32)
    for name in draw(st.lists(st.text("abcxyz_.", min_size=1, max_size=5), max_size=2, unique=True)):
        dtype = draw(st.sampled_from((torch.float64, torch.bool, torch.int16, torch.bfloat16, torch.uint8)))
        nodes.extra[name] = torch.tensor(draw(st.lists(st.floats(-300, 300), min_size=n, max_size=n)), dtype=torch.float64).to(dtype)
    n_edges = draw(st.integers(0, 12)) if n else 0
    index = st.integers(0, max(n - 1, 0))
    edges = [(draw(index), draw(index), draw(f32)) for _ in range(n_edges)]
    metadata = draw(st.dictionaries(st.text(max_size=8), json_values(), max_size=4))
    return Graph.from_edges(nodes, edges, metadata)


@FAST
@given(graph=graphs())
def test_graph_round_trip(scratch, graph: Graph) -> None:
    path = graph.save(scratch() / "g.cltg")
    assert_graphs_equal(graph, Graph.load(path))


@pytest.fixture(scope="module")
def graph_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Graph, bytes]:
    g = small_graph()
    g.nodes.influence = torch.linspace(0, 1, g.n_nodes)
    g.nodes.extra = {"target_value": torch.randn(g.n_nodes, dtype=torch.float64)}
    path = g.save(tmp_path_factory.mktemp("graph") / "g.cltg")
    return g, path.read_bytes()


def _load_graph_or_refuse(path: Path, original: Graph) -> None:
    got = loaded_or_refused(lambda: Graph.load(path), str(path))
    if got is None:
        return
    assert_graphs_equal(original, got)


@MEDIUM
@given(data=st.data())
def test_damaged_graph_is_refused_or_identical(scratch, graph_file, data: st.DataObject) -> None:
    original, raw = graph_file
    path = scratch() / "g.cltg"
    path.write_bytes(damaged(data, raw))
    _load_graph_or_refuse(path, original)


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join_safetensors(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


@MEDIUM
@given(data=st.data())
def test_graph_with_altered_header_is_refused_or_identical(scratch, graph_file, data: st.DataObject) -> None:
    """Any value of the safetensors header changed (metadata, checksum, version, a tensor's dtype,
    shape or offsets; the metadata's JSON itself), a key removed or added."""
    original, raw = graph_file
    header, body = _split_safetensors(raw)
    if data.draw(st.booleans()):  # inside the graph's own JSON metadata
        meta = json.loads(header["__metadata__"]["metadata"])
        header["__metadata__"]["metadata"] = json.dumps(mutate_json(data.draw, meta))
    else:
        header = mutate_json(data.draw, header)
    path = scratch() / "g.cltg"
    path.write_bytes(_join_safetensors(header, body) if isinstance(header, dict) else json.dumps(header).encode())
    _load_graph_or_refuse(path, original)


def test_graph_schema_versions(tmp_path: Path, graph_file) -> None:
    """Version 1 files (no checksum) still load; a version 2 file without its checksum does not."""
    original, raw = graph_file
    header, body = _split_safetensors(raw)
    meta = dict(header["__metadata__"])
    del meta["sha256"]
    (tmp_path / "v1.cltg").write_bytes(_join_safetensors({**header, "__metadata__": {**meta, "schema_version": "1"}}, body))
    assert_graphs_equal(original, Graph.load(tmp_path / "v1.cltg"))
    (tmp_path / "v2.cltg").write_bytes(_join_safetensors({**header, "__metadata__": meta}, body))
    with pytest.raises(CltraceError, match="no sha256") as exc:
        Graph.load(tmp_path / "v2.cltg")
    assert_refused(exc.value, "v2.cltg")
    flipped = bytearray(raw)
    flipped[-3] ^= 0x10  # a bit of the last edge weight: the old loader read it as another graph
    (tmp_path / "bit.cltg").write_bytes(bytes(flipped))
    with pytest.raises(CltraceError, match="is damaged"):
        Graph.load(tmp_path / "bit.cltg")
    with pytest.raises(CltraceError, match="does not exist"):
        Graph.load(tmp_path / "missing.cltg")


# -- transcoder directories ----------------------------------------------------------------------------


@st.composite
def transcoders(draw: st.DrawFn) -> Transcoder:
    """A random transcoder of any kind, activation, skip, size, dtype and model id."""
    kind = draw(st.sampled_from(("clt", "plt")))
    activation = draw(st.sampled_from(("jumprelu", "relu", "topk")))
    n_features = draw(st.integers(1, 5))
    config = TranscoderConfig(
        kind=kind, n_layers=draw(st.integers(1, 3)), d_model=draw(st.integers(1, 5)), n_features=n_features,
        activation=activation, topk_k=draw(st.integers(1, n_features)) if activation == "topk" else None,
        skip=kind == "plt" and draw(st.booleans()), model_id=draw(st.none() | st.text(max_size=16)),
        dtype=draw(st.sampled_from(("float32", "bfloat16", "float16", "float64"))),
    )
    return Transcoder.random(config, seed=draw(st.integers(0, 2**16)))


@FAST
@given(tc=transcoders())
def test_transcoder_round_trip(scratch, tc: Transcoder) -> None:
    folder = scratch()
    save_transcoder(tc, folder / "native")
    assert_identical(tc, load_transcoder(folder / "native"))
    if tc.config.kind == "clt" and tc.config.activation == "topk":
        return  # circuit-tracer has no TopK CLT (save refuses it; tested in test_transcoder_formats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # circuit-tracer 0.5.0 runs a TopK PLT as ReLU: a warning, not our case
        save_transcoder(tc, folder / "ct", format="circuit-tracer")
    assert_identical(tc, load_transcoder(folder / "ct"))


@pytest.fixture(scope="module")
def transcoder_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Transcoder, Path]]:
    """A JumpReLU CLT and a PLT with skip, each saved natively and in circuit-tracer's layout."""
    base = tmp_path_factory.mktemp("transcoders")
    out = {}
    for kind, skip in (("clt", False), ("plt", True)):
        tc = Transcoder.random(TranscoderConfig(kind, 3, 4, 5, skip=skip, model_id="tiny"), seed=3)
        for fmt in ("native", "circuit-tracer"):
            out[f"{kind}-{fmt}"] = (tc, save_transcoder(tc, base / f"{kind}-{fmt}", format=fmt))
    return out


def _copy_with(scratch: Callable[[], Path], source: Path, name: str, content: bytes | None) -> Path:
    """A copy of directory `source` with file `name` replaced by `content` (None: deleted)."""
    folder = scratch() / source.name
    shutil.copytree(source, folder)
    if content is None:
        (folder / name).unlink()
    else:
        (folder / name).write_bytes(content)
    return folder


@MEDIUM
@given(data=st.data())
def test_damaged_native_transcoder_is_refused_or_identical(scratch, transcoder_dirs, data: st.DataObject) -> None:
    tc, source = transcoder_dirs[data.draw(st.sampled_from(("clt-native", "plt-native")))]
    name = data.draw(st.sampled_from(("config.json", "transcoder.safetensors")))
    raw = (source / name).read_bytes()
    folder = _copy_with(scratch, source, name, damaged_or_missing(data, raw))
    got = loaded_or_refused(lambda: load_transcoder(folder), str(folder))
    if got is None:
        return
    assert_identical(tc, got)


@MEDIUM
@given(data=st.data())
def test_native_config_with_altered_fields_is_refused_or_identical(scratch, transcoder_dirs, data: st.DataObject) -> None:
    """config.json with any field set to any JSON value (wrong types included), removed or added."""
    tc, source = transcoder_dirs[data.draw(st.sampled_from(("clt-native", "plt-native")))]
    meta = mutate_json(data.draw, json.loads((source / "config.json").read_text()))
    folder = _copy_with(scratch, source, "config.json", json.dumps(meta).encode())
    got = loaded_or_refused(lambda: load_transcoder(folder), str(folder))
    if got is None:
        return
    assert_identical(tc, got)


def test_native_format_versions(tmp_path: Path, transcoder_dirs) -> None:
    """Version 1 (no config checksum) still loads; an edited version 2 config.json does not."""
    tc, source = transcoder_dirs["clt-native"]
    meta = json.loads((source / "config.json").read_text())
    shutil.copytree(source, tmp_path / "v1")
    v1 = {k: v for k, v in meta.items() if k != "config_sha256"} | {"format_version": 1}
    (tmp_path / "v1" / "config.json").write_text(json.dumps(v1))
    assert_identical(tc, load_transcoder(tmp_path / "v1"))
    shutil.copytree(source, tmp_path / "edited")
    (tmp_path / "edited" / "config.json").write_text(json.dumps({**meta, "model_id": "another"}))
    with pytest.raises(CltraceError, match="does not match its config_sha256") as exc:
        load_transcoder(tmp_path / "edited")
    assert_refused(exc.value, "edited")


@MEDIUM
@given(data=st.data())
def test_damaged_circuit_tracer_transcoder_never_crashes(scratch, transcoder_dirs, data: st.DataObject) -> None:
    """circuit-tracer's layout has no checksums: damage is refused in one line or loads what the
    files now say (a truncated or deleted weight file is always refused)."""
    tc, source = transcoder_dirs[data.draw(st.sampled_from(("clt-circuit-tracer", "plt-circuit-tracer")))]
    name = data.draw(st.sampled_from(sorted(p.name for p in source.iterdir())))
    raw = (source / name).read_bytes()
    content = damaged_or_missing(data, raw)
    folder = _copy_with(scratch, source, name, content)
    got = loaded_or_refused(lambda: load_transcoder(folder), str(folder))
    if got is None:
        return
    assert isinstance(got, Transcoder)
    if content is not None and raw.startswith(content):  # a truncation
        assert name == "config.yaml" or content == raw, "a truncated weight file loaded"
    if content is None:
        assert name == "config.yaml" or name == f"layer_{tc.config.n_layers - 1}.safetensors", name


# -- activation stores ---------------------------------------------------------------------------------


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed store manifest with any values its fields may hold (infinite norms included)."""
    from cltrace.data.store import SETTING_KEYS, STORE_FORMAT

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
    from helpers.store import POS, harvest

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
    folder = _copy_with(scratch, source, name, damaged_or_missing(data, (source / name).read_bytes()))
    _read_store_or_refuse(folder, store_dir)


@MEDIUM
@given(data=st.data())
def test_store_manifest_with_altered_fields_is_refused_or_identical(scratch, store_dir, data: st.DataObject) -> None:
    source = store_dir[0]
    manifest = mutate_json(data.draw, json.loads((source / "manifest.json").read_text()))
    folder = _copy_with(scratch, source, "manifest.json", json.dumps(manifest).encode())
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
    from helpers.features import BATCH, BOS, T1, build, corpus, tokenize, transcoder
    from helpers.models import tiny_model

    from cltrace.features.labeller import label_inputs, measure_outputs
    from cltrace.features.labels import LabelConfig
    from cltrace.replacement import ReplacementModel

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


# -- training configs ----------------------------------------------------------------------------------


@st.composite
def train_configs(draw: st.DrawFn) -> TrainConfig:
    """A valid TrainConfig with any values its fields allow."""
    from cltrace.data.harvest import FIRST_POSITION

    kind = draw(st.sampled_from(("clt", "plt")))
    activation = draw(st.sampled_from(("jumprelu", "relu", "topk")))
    n_features = draw(st.integers(1, 4096))
    n_ctx, shuffle = draw(st.integers(FIRST_POSITION + 1, 512)), draw(st.integers(1, 64))
    batch = draw(st.integers(1, shuffle * (n_ctx - FIRST_POSITION)))
    name = st.text(min_size=1, max_size=12).filter(lambda s: s.strip() != "")
    unit, positive = st.floats(0, 1), st.floats(min_value=1e-9, max_value=1e3)
    count = st.integers(1, 10**6)
    return TrainConfig(
        kind=kind, n_features=n_features, activation=activation,
        topk_k=draw(st.integers(1, n_features)) if activation == "topk" else None, skip=kind == "plt" and draw(st.booleans()),
        model=draw(name), source=draw(name), text_column=draw(name), store=draw(st.none() | name), n_ctx=n_ctx,
        batch_tokens=batch, total_tokens=draw(st.integers(batch, 10**12)), shuffle_contexts=shuffle,
        harvest_batch=draw(count), norm_tokens=draw(count),
        heldout_fraction=draw(st.floats(0, 1, exclude_min=True, exclude_max=True)), split_seed=draw(st.integers()),
        lr=draw(positive), lr_decay_frac=draw(unit), adam_beta1=draw(st.floats(0, 1, exclude_max=True)),
        adam_beta2=draw(st.floats(0, 1, exclude_max=True)), grad_clip=draw(unit), sparsity_lambda=draw(unit),
        sparsity_c=draw(positive), sparsity_warmup_frac=draw(unit), preact_lambda=draw(unit),
        threshold_init=draw(unit), bandwidth=draw(positive), seed=draw(st.integers()),
        dtype=draw(st.sampled_from(("float32", "bfloat16", "float64"))),
        harvest_dtype=draw(st.sampled_from(("float32", "bfloat16"))), decode=draw(st.sampled_from(("sparse", "dense"))),
        checkpoint_every=draw(count), log_every=draw(count), dead_window=draw(count), eval_tokens=draw(st.integers(0, 10**6)),
    )


@FAST
@given(config=train_configs())
def test_train_config_round_trip(scratch, config: TrainConfig) -> None:
    path = scratch() / "config.json"
    path.write_text(config.to_json(), encoding="utf-8")
    assert TrainConfig.load(path) == config


def _config_or_refuse(path: Path) -> None:
    """A config file is meant to be edited, so it has no checksum: whatever loads must be exactly
    what the file says (over the defaults), anything else one line naming the file."""
    got = loaded_or_refused(lambda: TrainConfig.load(path), str(path))
    if got is None:
        return
    written = json.loads(path.read_bytes().decode("utf-8"))
    assert got.to_dict() == {**TrainConfig().to_dict(), **written}


@MEDIUM
@given(data=st.data())
def test_damaged_train_config_is_refused_or_read_as_written(scratch, data: st.DataObject) -> None:
    from cltrace.train.config import TINY_PRESET

    path = scratch() / "config.json"
    raw = TINY_PRESET.to_json().encode()
    if data.draw(st.booleans()):
        path.write_bytes(damaged(data, raw))
    else:  # any field set to any JSON value (wrong types), removed or added
        path.write_text(json.dumps(mutate_json(data.draw, json.loads(raw))), encoding="utf-8")
    _config_or_refuse(path)


override_texts = st.text(max_size=30) | st.builds(
    lambda key, value: f"{key}={value}",
    st.sampled_from([f.name for f in TrainConfig.__dataclass_fields__.values()]) | st.text(max_size=8),
    st.text(max_size=12) | json_values(3).map(json.dumps),
)


@MEDIUM
@given(text=override_texts)
def test_parse_override_reads_json_or_text_and_never_crashes(text: str) -> None:
    from cltrace.train.config import TINY_PRESET

    try:
        key, value = parse_override(text)
    except CltraceError as exc:
        assert "=" not in text or not text.split("=", 1)[0].strip()
        assert_refused(exc, repr(text))
        return
    raw = text.split("=", 1)[1]
    assert key == text.split("=", 1)[0].strip().replace("-", "_")
    try:
        parsed = json.loads(raw)
        assert value == parsed or (isinstance(parsed, float) and value == int(parsed)) or (
            isinstance(parsed, float) and math.isnan(parsed) and math.isnan(value))
    except ValueError:
        assert value == raw
    try:
        config = TINY_PRESET.with_overrides({key: value})
    except CltraceError as exc:
        assert len(str(exc).splitlines()) == 1, str(exc)
        return
    assert getattr(config, key) == value


# -- text sources ----------------------------------------------------------------------------------------

documents = st.lists(st.text(max_size=40), min_size=1, max_size=6)


def _expected_documents(docs: list[str]) -> list[str]:
    return [d for d in docs if d and not d.isspace()]


def _read_or_refuse(source: FileSource, *names: str) -> list[str] | None:
    docs = loaded_or_refused(lambda: list(source), *names)
    if docs is None:
        return None
    assert all(isinstance(d, str) and d and not d.isspace() for d in docs)
    return docs


@FAST
@given(docs=documents, suffix=st.sampled_from((".jsonl", ".parquet", ".txt")))
def test_text_source_round_trip(scratch, docs: list[str], suffix: str) -> None:
    folder = scratch()
    if suffix == ".jsonl":
        (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)),
                                           encoding="utf-8")
    elif suffix == ".parquet":
        pq.write_table(pa.table({"text": docs}), folder / "docs.parquet", write_page_checksum=True)
    else:
        docs = [d.replace("\r", "") for d in docs]  # text files are read with universal newlines
        for i, d in enumerate(docs):
            (folder / f"doc-{i:03d}.txt").write_text(d, encoding="utf-8")
    source = FileSource(folder)
    if not _expected_documents(docs):
        with pytest.raises(CltraceError, match="holds no text"):
            list(source)
        return
    assert list(source) == _expected_documents(docs)
    assert list(source) == _expected_documents(docs)  # re-iterable: the same pass again


@pytest.fixture(scope="module")
def text_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    base = tmp_path_factory.mktemp("texts")
    docs = [f"document {i}: the cat sat on the mat, " * (i % 4 + 1) for i in range(30)]
    (base / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    pq.write_table(pa.table({"text": docs, "n": list(range(30))}), base / "d.parquet", write_page_checksum=True)
    (base / "d.txt").write_text("\n\n".join(docs), encoding="utf-8")
    return {p.suffix: p.read_bytes() for p in base.iterdir()}


@MEDIUM
@given(data=st.data())
def test_damaged_text_source_is_refused_or_read(scratch, text_files, data: st.DataObject) -> None:
    """User files have no checksums: damage is read as what the file now says, or refused in one
    line naming the file, never another exception."""
    suffix = data.draw(st.sampled_from(sorted(text_files)))
    path = scratch() / f"d{suffix}"
    bad = damaged(data, text_files[suffix])
    path.write_bytes(bad)
    split = data.draw(st.sampled_from(("file", "paragraph")))
    docs = _read_or_refuse(FileSource(path, txt_split=split), str(path))
    if docs is not None and suffix == ".txt":  # any bytes are text (bad UTF-8 read as U+FFFD): nothing is lost
        text = path.read_text(encoding="utf-8", errors="replace")
        assert "".join("".join(d.split()) for d in docs) == "".join(text.split())
        assert split == "paragraph" or docs == [text]


def test_missing_and_unsupported_text_sources(tmp_path: Path) -> None:
    with pytest.raises(CltraceError, match="no such file or folder") as exc:
        FileSource(tmp_path / "nowhere.jsonl")
    assert_refused(exc.value, "nowhere.jsonl")
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(CltraceError, match="unsupported file type") as exc:
        FileSource(tmp_path / "d.csv")
    assert_refused(exc.value, "d.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CltraceError, match="has no .txt") as exc:
        list(FileSource(tmp_path / "empty"))
    assert_refused(exc.value, "empty")
    (tmp_path / "keys.jsonl").write_text(json.dumps({"a\nb": "x"}) + "\n")
    with pytest.raises(CltraceError, match="no column 'text'") as exc:
        list(FileSource(tmp_path / "keys.jsonl"))
    assert_refused(exc.value, "keys.jsonl")


# -- training checkpoints --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A one-process checkpoint as the trainer writes it (state.pt) and what read_checkpoint returns."""
    ckpt = tmp_path_factory.mktemp("run") / "checkpoint"
    ckpt.mkdir()
    tc = Transcoder.random(TranscoderConfig("clt", 2, 4, 3), seed=5)
    opt = torch.optim.Adam(tc.parameters(), lr=1e-3)
    for p in tc.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = {
        "version": 1, "config": {"kind": "clt", "n_features": 3}, "fingerprint": {"model": "tiny", "n_layers": 2},
        "step": 7, "tokens": 700, "data": {"buffer_start": {"doc_index": 3}, "buffer_index": 1, "step_in_buffer": 2},
        "scale_x": torch.ones(2), "scale_y": torch.full((2,), 2.0), "rng": {"torch": torch.get_rng_state()},
        "elapsed": 12.5, "transcoder": tc.state_dict(), "optimizer": opt.state_dict(),
        "last_fired": torch.arange(6).view(2, 3),
    }
    torch.save(state, ckpt / "state.pt")
    return ckpt, read_checkpoint(ckpt, 0, 3)


@MEDIUM
@given(data=st.data())
def test_damaged_checkpoint_is_refused_or_identical(scratch, checkpoint_dir, data: st.DataObject) -> None:
    source, expected = checkpoint_dir
    ckpt = scratch() / "checkpoint"
    ckpt.mkdir()
    content = damaged_or_missing(data, (source / "state.pt").read_bytes())
    if content is not None:
        (ckpt / "state.pt").write_bytes(content)
    got = loaded_or_refused(lambda: read_checkpoint(ckpt, 0, 3), str(ckpt))
    if got is None:
        return
    assert deep_equal(got, expected)


class _Payload:
    """Unpickling this would run code: it touches a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.touch, (self.marker,))


def test_checkpoint_never_runs_pickled_code(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    marker = tmp_path / "ran"
    torch.save({"version": 1, "config": {"kind": "clt"}, "evil": _Payload(marker)}, ckpt / "state.pt")
    with pytest.raises(CltraceError, match="state.pt") as exc:
        read_checkpoint(ckpt, 0, 3)
    assert_refused(exc.value, "state.pt")
    assert not marker.exists()
    with open(ckpt / "state.pt", "wb") as fh:  # a bare pickle, not torch's zip
        pickle.dump(_Payload(marker), fh)
    with pytest.raises(CltraceError, match="state.pt"):
        read_checkpoint(ckpt, 0, 3)
    assert not marker.exists()


@MEDIUM
@given(state=st.recursive(st.none() | st.integers() | st.text(max_size=5),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                          max_leaves=12))
def test_checkpoint_with_another_structure_is_refused(scratch, state: Any) -> None:
    """A file that loads as a torch archive but is not shaped like a checkpoint: one line, never a KeyError."""
    ckpt = scratch() / "checkpoint"
    ckpt.mkdir()
    torch.save(state, ckpt / "state.pt")
    with pytest.raises(CltraceError) as exc:
        read_checkpoint(ckpt, 0, 3)
    assert_refused(exc.value, str(ckpt))
