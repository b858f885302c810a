"""Reading back what a crash-safety run wrote: snapshots to compare with the reference, what a kill
left (every file that reads as good must be good), and damaged files read back with their loaders."""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from crash_ops import FEATURE_TOKENS, FEATURE_TOKENS_EXTENDED, FEATURES_FILE, GRAPH_FILE, train_config
from helpers import features as helper_features
from helpers.models import tiny_model

from cltrace.data.store import ActivationStore
from cltrace.errors import CltraceError
from cltrace.features import FeatureStore
from cltrace.graph.graph import Graph
from cltrace.train.config import TrainConfig
from cltrace.train.distributed import has_checkpoint, read_checkpoint
from cltrace.transcoder import load_transcoder


class Inconsistent(Exception):
    """What a kill left reads as good but is not (a half-written file accepted, a wrong value)."""


# -- what a finished run wrote, in a comparable form -------------------------------------------------


def listing(out: Path) -> list[str]:
    """Every file and folder under `out`, relative, sorted."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else []


def graph_snapshot(path: Path) -> dict[str, Any]:
    g = Graph.load(path)
    cols = {f"nodes.{k}": getattr(g.nodes, k) for k in ("kind", "layer", "pos", "feature", "token", "activation", "probability")}
    cols.update({f"extra.{k}": v for k, v in g.nodes.extra.items()})
    if g.nodes.influence is not None:
        cols["influence"] = g.nodes.influence
    cols.update(edge_target=g.edge_target, edge_source=g.edge_source, edge_weight=g.edge_weight)
    return {"tensors": cols, "metadata": g.metadata}


def db_dump(path: Path) -> dict[str, list[tuple]]:
    """Every table of a feature store, rows sorted; meta without its times."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        dump = {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}  # noqa: S608 - names from sqlite_master
    finally:
        conn.close()
    if "meta" in dump:
        dump["meta"] = [r for r in dump["meta"] if r[0] not in ("created", "finalized", "last_build")]
    return dump


def snapshot(op: str, out: Path) -> dict[str, Any]:
    """The content of a finished run's output, in a form that compares with `equal`."""
    if op == "train":
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        evaluation = json.loads((out / "eval.json").read_text())
        evaluation.pop("train_seconds", None)
        return {
            "weights": dict(load_transcoder(out / "transcoder").state_dict()),
            "metrics": [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows],
            "eval": evaluation,
            "config": (out / "config.json").read_text(),
        }
    if op == "harvest":
        manifest = json.loads((out / "manifest.json").read_text())
        manifest.pop("store_id")  # drawn at random for every new store
        manifest.pop("sha256", None)  # the manifest's digest of its other keys, store_id included
        return {"manifest": manifest, "shards": {p.name: p.read_bytes() for p in sorted(out.glob("shard-*"))}}
    if op == "features":
        return db_dump(out / FEATURES_FILE)
    return graph_snapshot(out / GRAPH_FILE)


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two snapshots differ (tensors compared exactly, dtype included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape \
            and torch.equal(a, b)
        return [] if same else [where or "tensor"]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(set(a) ^ set(b))[:4]}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}" if where else str(k))]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where or "value"]


def max_weight_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest absolute difference between two training snapshots' weights."""
    return max(float((a["weights"][k].double() - b["weights"][k].double()).abs().max()) for k in a["weights"])


def compare(op: str, got: dict[str, Any], ref: dict[str, Any]) -> tuple[bool, str]:
    """Whether a resumed run's output equals the reference's (training weights: to 1e-6), and how."""
    diff = differences(got, ref)
    if not diff:
        return True, "bit-identical"
    if op == "train" and all(d.startswith("weights.") for d in diff):
        gap = max_weight_diff(got, ref)
        return gap <= 1e-6, f"weights within {gap:.1e}"
    return False, "differs in " + ", ".join(diff[:5])


# -- what a kill left: every file that reads as good must be good -------------------------------------


def after_kill(op: str, out: Path, ref: dict[str, Any], old: dict[str, Any] | None) -> tuple[str, str]:
    """Check the output a kill left, as a reader would open it; returns the phase it shows, and details.

    Raises Inconsistent where something reads as good but differs from what it must be.
    """
    if op == "train":
        cfg = train_config()
        if not (out / "config.json").is_file():
            return "nothing written", ""
        if TrainConfig.load(out / "config.json") != cfg:
            raise Inconsistent("config.json differs from the run's config")
        phase, detail = "before the first checkpoint", ""
        if has_checkpoint(out / "checkpoint"):
            state = read_checkpoint(out / "checkpoint", 0, cfg.n_features)
            phase = "training" if state["step"] < cfg.total_steps else "trained, not saved"
            detail = f"checkpoint of step {state['step']} of {cfg.total_steps}"
        if (out / "transcoder").exists():
            tc = load_transcoder(out / "transcoder")
            if differences(dict(tc.state_dict()), ref["weights"]) and max_weight_diff({"weights": dict(tc.state_dict())}, ref) > 1e-6:
                raise Inconsistent("the saved transcoder differs from the reference's")
            phase = "transcoder saved"
        if (out / "eval.json").is_file():
            evaluation = json.loads((out / "eval.json").read_text())
            evaluation.pop("train_seconds", None)
            if evaluation != ref["eval"]:
                raise Inconsistent("eval.json differs from the reference's")
            phase = "evaluated"
        return phase, detail
    if op == "harvest":
        if not (out / "manifest.json").is_file():
            return "no manifest", ""
        store = ActivationStore(out)
        for i, entry in enumerate(store.shards):
            store.read_shard(i)  # size and sha256 against the manifest
            if (out / entry["file"]).read_bytes() != ref["shards"][entry["file"]]:
                raise Inconsistent(f"listed shard {entry['file']} differs from the reference's")
        detail = f"{len(store.shards)} of {len(ref['shards'])} shards listed"
        if store.complete:
            return "complete", detail
        return ("some shards listed" if store.shards else "manifest, no shard yet"), detail
    if op == "features":
        db = out / FEATURES_FILE
        if not db.exists() or db.stat().st_size == 0:
            return "no database", ""
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # what the kill left, WAL included, for the rerun
        try:
            check = conn.execute("PRAGMA integrity_check").fetchone()[0]
            tables = {t for (t,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        finally:
            conn.close()
        if check != "ok":
            raise Inconsistent(f"SQLite integrity check: {check}")
        if not meta:
            return "schema only", ""
        if json.loads(meta["status"]) == "complete":
            diff = differences(db_dump(db), ref)
            if diff:
                raise Inconsistent("a store marked complete differs from the reference in " + ", ".join(diff[:4]))
            return "complete", ""
        tokens = json.loads(meta["tokens"])
        detail = f"{tokens} of {FEATURE_TOKENS} tokens committed"
        return ("building, nothing committed" if tokens == 0 else "building, batches committed"), detail
    # graph: the file is the old graph or the new one; any other *.safetensors is a stray
    strays = [p.name for p in out.glob("*.safetensors") if p.name != GRAPH_FILE]
    if strays:
        raise Inconsistent(f"stray graph files {strays}")
    got = graph_snapshot(out / GRAPH_FILE)
    temps = sum(p.name.endswith(".tmp") for p in out.iterdir())
    detail = f"{temps} temporary file(s) beside it"
    if not differences(got, old):
        return "old graph intact", detail
    if not differences(got, ref):
        return "new graph complete", detail
    raise Inconsistent("the graph file is neither the old graph nor the new one")


# -- damaged files ----------------------------------------------------------------------------------


Damage = Callable[[Path], None]


def _byte_damages(size: int, seed: int) -> list[tuple[str, Damage]]:
    """Truncations and one-byte flips (at byte 8, the middle, the end and three seeded random places)."""

    def edit(change: Callable[[bytearray], bytearray]) -> Damage:
        return lambda path: path.write_bytes(bytes(change(bytearray(path.read_bytes()))))

    def flip(at: int) -> Damage:
        def change(b: bytearray) -> bytearray:
            b[at] ^= 0xFF
            return b
        return edit(change)

    rng = random.Random(seed)
    out: list[tuple[str, Damage]] = [
        ("truncated to half", edit(lambda b: b[: len(b) // 2])),
        ("last byte cut", edit(lambda b: b[:-1])),
        ("byte 8 flipped", flip(min(8, size - 1))),
        ("middle byte flipped", flip(size // 2)),
        ("last byte flipped", flip(size - 1)),
    ]
    for _ in range(3):
        at = rng.randrange(size)
        out.append((f"byte {at} flipped", flip(at)))
    return out


def _state_damages(seed: int) -> list[tuple[str, Damage]]:
    """Damage inside the feature store's build-state blobs, below what SQLite's structure checks see."""

    def edit_blob(name: str, change: Callable[[bytes], bytes]) -> Damage:
        def apply(path: Path) -> None:
            conn = sqlite3.connect(path)
            try:
                (data,) = conn.execute("SELECT data FROM state WHERE name=?", (name,)).fetchone()
                conn.execute("UPDATE state SET data=? WHERE name=?", (change(data), name))
                conn.commit()
            finally:
                conn.close()
        return apply

    def flip(data: bytes, at: int) -> bytes:
        b = bytearray(data)
        b[at % len(b)] ^= 0x40
        return bytes(b)

    rng = random.Random(seed)
    return [
        ("top_val blob: byte flipped", edit_blob("top_val", lambda d: flip(d, rng.randrange(len(d))))),
        ("count blob: byte flipped", edit_blob("count", lambda d: flip(d, rng.randrange(len(d))))),
        ("top_win blob: cut short", edit_blob("top_win", lambda d: d[: len(d) - 2])),
    ]


_EXTENSION: dict[str, Any] = {}


def _extend_features(out: Path) -> Any:
    """Extend a copy of the reference feature store to the whole corpus (it reads the build state)."""
    if "model" not in _EXTENSION:
        _EXTENSION["model"], _EXTENSION["tc"] = tiny_model("llama"), helper_features.transcoder(seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the children's floats
    try:
        helper_features.build(_EXTENSION["model"], _EXTENSION["tc"], out / FEATURES_FILE, FEATURE_TOKENS_EXTENDED)
    finally:
        torch.set_num_threads(threads)
    return db_dump(out / FEATURES_FILE)


def _loaders() -> dict[str, tuple[str, str, Callable[[Path], Any]]]:
    """Per kind of output file: (operation, file under its output, loader of the whole output)."""
    def checkpoint(out: Path) -> Any:
        state = read_checkpoint(out / "checkpoint", 0, train_config().n_features)
        return {k: state[k] for k in ("tensors", "adam", "last_fired", "step", "scale_x", "scale_y", "data")}

    def store(out: Path) -> Any:
        st = ActivationStore(out)
        return {"xy": st.read_contexts(0, st.contexts), "scales": st.scales(), "complete": st.complete}

    def features(out: Path) -> Any:
        with FeatureStore(out / FEATURES_FILE) as fs:
            stats = {k: v for k, v in fs.stats().items() if k not in ("bytes", "path")}
            return {"stats": stats, "pages": [fs.page(l, f).to_dict() for l in range(fs.n_layers) for f in range(fs.n_features)]}

    def transcoder(out: Path) -> Any:
        return dict(load_transcoder(out / "transcoder").state_dict())

    return {
        "training checkpoint (state.pt)": ("train", "checkpoint/state.pt", checkpoint),
        "transcoder weights": ("train", "transcoder/transcoder.safetensors", transcoder),
        "transcoder config.json": ("train", "transcoder/config.json", transcoder),
        "store shard": ("harvest", "shard-00001.safetensors", store),
        "store manifest.json": ("harvest", "manifest.json", store),
        "feature store": ("features", FEATURES_FILE, features),
        "feature store build state (extended)": ("features", FEATURES_FILE, _extend_features),
        "graph": ("graph", GRAPH_FILE, lambda out: graph_snapshot(out / GRAPH_FILE)),
    }


def damage_checks(work: Path, ops: list[str], seed: int = 0) -> dict[str, dict[str, str]]:
    """Damage a copy of each reference output file in several ways and read it back with its loader.

    Outcomes: "refused" (a one-line CltraceError), "refused, several lines", "crashed (TYPE)" (an
    exception other than CltraceError: a stack trace for the user), "read, unchanged" (the damage
    missed everything the loader returns) or "read as good, WRONG" (a damaged file accepted).
    """
    results: dict[str, dict[str, str]] = {}
    for index, (kind, (op, rel, load)) in enumerate(_loaders().items()):
        if op not in ops:
            continue
        ref_out = work / op / "reference"
        copy = work / "damaged" / op
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(ref_out, copy)
        good = load(copy)  # (a loader may write: the extension does)
        damages = _state_damages(seed + index) if "build state" in kind else _byte_damages((ref_out / rel).stat().st_size, seed + index)
        results[kind] = {}
        for name, apply in damages:
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(ref_out, copy)
            apply(copy / rel)
            try:
                got = load(copy)
            except CltraceError as exc:
                outcome = "refused" if "\n" not in str(exc) else "refused, several lines"
            except Exception as exc:  # noqa: BLE001 - what the user would see as a stack trace
                outcome = f"crashed ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})"
            else:
                outcome = "read, unchanged" if not differences(got, good) else "read as good, WRONG"
            results[kind][name] = outcome
        shutil.rmtree(work / "damaged", ignore_errors=True)
    return results
