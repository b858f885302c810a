"""Crash safety: SIGKILL at random points of training, harvest, feature-store building and graph saving.

For each operation, on a tiny random model (the tests' `tiny_model`) and tiny settings:

1. a reference run, uninterrupted, in a fresh child process; its duration is measured from the
   moment the child starts the operation (imports and model building left out);
2. `--points` kill points at stratified random times (point i at (i + u) / N of the duration, u
   uniform, seeded; the duration taken a quarter longer than the reference's, and a run that
   finishes before its kill tried again at the same fraction of its own): a child starts the
   operation and is sent SIGKILL;
3. what the kill left is checked as a reader would see it (every file that reads as good must be
   good: a listed store shard equals the reference's, a checkpoint loads, a feature store passes
   SQLite's integrity check and, once it says "complete", equals the reference; a graph file is
   the old graph or the new one, never anything else);
4. the operation is run again (`--resume` for training) and its output compared with the
   reference: training weights to 1e-6 (and bit for bit), metrics and evaluation exactly; store
   shards byte for byte and the manifest (less its random store id); every table of the feature
   store; the graph's tensors and metadata. Files the reference does not have (temporary files
   a kill left behind) are reported as debris.

Then every kind of output file (checkpoint, transcoder weights and config, store shard and
manifest, feature store, graph) is damaged (truncated, one byte flipped at several places) and
read back with its loader: it must be refused with a one-line `CltraceError` (or, where the
damaged byte is one the loader never uses, read unchanged). The feature store's build state is
also damaged inside its blobs (where SQLite's own checks cannot see) and the store extended.

Children are forked from a multiprocessing fork server that has imported torch, transformers and
cltrace once (each starts in about 0.1 s instead of 4 s); every child runs torch on one thread,
so that reruns compute the same floats. Timing noise from the shared machine only moves where the
kills land.

    nice -n 10 .venv/bin/python benchmarks/crash_safety.py [--points 20] [--ops train,harvest,features,graph]
                                                            [--seed 0] [--workdir DIR] [--no-write]

Prints a table and writes benchmarks/results/crash_safety.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"
for _p in (str(HERE), str(TESTS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported here or in the fork server

import torch  # noqa: E402

from cltrace.errors import CltraceError  # noqa: E402

OPS = ("train", "harvest", "features", "graph")
#: Modules the fork server imports once, so that each child starts in a fraction of a second.
PRELOAD = ["torch", "transformers", "safetensors.torch", "cltrace.train", "cltrace.data.store", "cltrace.features.build",
           "cltrace.graph.graph", "cltrace.eval", "matplotlib.pyplot", "helpers.models", "helpers.train",
           "helpers.store", "helpers.features"]
GRAPH_FILE = "g.safetensors"
FEATURES_FILE = "features.db"
STORE_CONTEXTS = 90  # 30 shards of 3 contexts
FEATURE_TOKENS = 12 * 4 * 15  # 12 batches of 4 contexts of 15 analysed positions
FEATURE_TOKENS_EXTENDED = 16 * 4 * 15  # the whole corpus of helpers.features: the damage checks extend to it
WINDOW = 1.25  # kills are spread over this multiple of the reference run's duration (see run_op)
GRAPH_EDGES = 1_500_000  # about 30 MB: a save long enough to be killed in every part of it


class Inconsistent(Exception):
    """What a kill left reads as good but is not (a half-written file accepted, a wrong value)."""


# -- the operations, as run in a child ---------------------------------------------------------------


def train_config() -> Any:
    """The training run: the tiny llama, 150 steps, a checkpoint every 4, a final evaluation."""
    from helpers.train import resume_config

    return resume_config().with_overrides({"total_tokens": 16 * 150, "checkpoint_every": 4})


def synthetic_graph(seed: int, n_edges: int = GRAPH_EDGES) -> Any:
    """A graph with the usual node layout and `n_edges` random edges (seeded)."""
    from cltrace.graph.graph import Graph, NodeKind, NodeTable

    g = torch.Generator().manual_seed(seed)
    n_feat, n_err, n_emb, n_logit = 3000, 30, 10, 4
    kinds = [NodeKind.FEATURE] * n_feat + [NodeKind.ERROR] * n_err + [NodeKind.EMBEDDING] * n_emb + [NodeKind.LOGIT] * n_logit
    n = len(kinds)
    layer = [i % 3 for i in range(n_feat)] + [i % 3 for i in range(n_err)] + [-1] * n_emb + [3] * n_logit
    pos = [i % n_emb for i in range(n_feat + n_err)] + list(range(n_emb)) + [n_emb - 1] * n_logit
    nodes = NodeTable.from_columns(
        kind=kinds, layer=layer, pos=pos, feature=[i for i in range(n_feat)] + [-1] * (n - n_feat),
        token=[-1] * (n_feat + n_err) + torch.randint(0, 96, (n_emb + n_logit,), generator=g).tolist(),
        activation=torch.rand(n_feat, generator=g).tolist() + [0.0] * (n - n_feat),
        probability=[0.0] * (n - n_logit) + [0.4, 0.3, 0.2, 0.1],
    )
    target = torch.randint(0, n, (n_edges,), generator=g)
    source = torch.randint(0, n, (n_edges,), generator=g)
    weight = torch.randn(n_edges, generator=g)
    return Graph(nodes, target, source, weight, {"n_layers": 3, "prompt": f"synthetic graph {seed}", "seed": seed})


def _prepare(op: str, work: Path, out: Path, resume: bool) -> Callable[[], Any]:
    """Build what `op` needs (model, data) and return the call that performs it."""
    if op == "train":
        from helpers.models import tiny_model
        from helpers.store import tok

        from cltrace.data.sources import FileSource
        from cltrace.train import train_transcoder

        cfg, model = train_config(), tiny_model("llama")
        source = FileSource(work / "docs.txt", txt_split="paragraph")
        return lambda: train_transcoder(cfg, out, resume=resume, model=model, tokenize=tok, source=source,
                                        progress=False, bos_id=0)
    if op == "harvest":
        from helpers import store as helper_store
        from helpers.models import tiny_model

        model = tiny_model("llama")
        return lambda: helper_store.harvest(work, out, helper_store.POS * STORE_CONTEXTS, model=model)
    if op == "features":
        from helpers import features as helper_features
        from helpers.models import tiny_model

        model, tc = tiny_model("llama"), helper_features.transcoder(seed=3)
        return lambda: helper_features.build(model, tc, out / FEATURES_FILE, FEATURE_TOKENS, checkpoint_batches=1)
    if op == "graph":
        new = synthetic_graph(seed=2)
        return lambda: new.save(out / GRAPH_FILE)
    raise ValueError(op)


def _child(op: str, work: str, out: str, resume: bool, conn: Any) -> None:
    """Child process: prepare, say "go" (with the time), perform the operation, say "done"."""
    torch.set_num_threads(1)  # the same floats in every run, whatever the machine's load
    try:
        call = _prepare(op, Path(work), Path(out), resume)
        conn.send(("go", time.monotonic()))
        call()
        conn.send(("done", time.monotonic()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1) from None


@dataclass
class ChildRun:
    """How a child ended: finished, killed (after `kill_after` s of its operation) or failed."""

    ended: str  # "finished", "killed" or "failed"
    seconds: float  # from "go" to the end (or to the kill)
    error: str = ""


_CTX: Any = None


def _context() -> Any:
    """The fork-server multiprocessing context (its server started on first use, modules preloaded)."""
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(PRELOAD)
    return _CTX


def run_child(op: str, work: Path, out: Path, resume: bool = False, kill_after: float | None = None,
              timeout: float = 300.0) -> ChildRun:
    """Run `op` into `out` in a child; with `kill_after`, SIGKILL it that many seconds after it started."""
    ctx = _context()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(op, str(work), str(out), resume, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            raise RuntimeError(f"{op}: the child did not start within {timeout} s")
        msg = recv.recv()
        if msg[0] != "go":
            return ChildRun("failed", 0.0, msg[1] + "\n" + msg[2])
        go = msg[1]
        wait = timeout if kill_after is None else max(0.0, go + kill_after - time.monotonic())
        if recv.poll(wait):
            msg = recv.recv()
            proc.join(timeout)
            if msg[0] == "done":
                return ChildRun("finished", msg[1] - go)
            return ChildRun("failed", time.monotonic() - go, msg[1] + "\n" + msg[2])
        if kill_after is None:
            raise RuntimeError(f"{op}: the child did not finish within {timeout} s")
        proc.kill()  # SIGKILL
        at = time.monotonic() - go
        proc.join(timeout)
        return ChildRun("killed", at)
    except EOFError:  # the child died without a word
        proc.join(timeout)
        return ChildRun("failed", 0.0, f"the child exited with code {proc.exitcode} without a report")
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        recv.close()


# -- what a finished run wrote, in a comparable form -------------------------------------------------


def listing(out: Path) -> list[str]:
    """Every file and folder under `out`, relative, sorted."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.is_dir() else []


def _graph_snapshot(path: Path) -> dict[str, Any]:
    from cltrace.graph.graph import Graph

    g = Graph.load(path)
    cols = {f"nodes.{k}": getattr(g.nodes, k) for k in ("kind", "layer", "pos", "feature", "token", "activation", "probability")}
    cols.update({f"extra.{k}": v for k, v in g.nodes.extra.items()})
    if g.nodes.influence is not None:
        cols["influence"] = g.nodes.influence
    cols.update(edge_target=g.edge_target, edge_source=g.edge_source, edge_weight=g.edge_weight)
    return {"tensors": cols, "metadata": g.metadata}


def _db_dump(path: Path) -> dict[str, list[tuple]]:
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
        from cltrace.transcoder import load_transcoder

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
        return _db_dump(out / FEATURES_FILE)
    return _graph_snapshot(out / GRAPH_FILE)


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
        from cltrace.train.config import TrainConfig
        from cltrace.train.distributed import has_checkpoint, read_checkpoint
        from cltrace.transcoder import load_transcoder

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
        from cltrace.data.store import ActivationStore

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
            diff = differences(_db_dump(db), ref)
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
    got = _graph_snapshot(out / GRAPH_FILE)
    temps = sum(p.name.endswith(".tmp") for p in out.iterdir())
    detail = f"{temps} temporary file(s) beside it"
    if not differences(got, old):
        return "old graph intact", detail
    if not differences(got, ref):
        return "new graph complete", detail
    raise Inconsistent("the graph file is neither the old graph nor the new one")


# -- one operation: reference, kills, resumes ---------------------------------------------------------


def setup(work: Path) -> None:
    """The inputs every operation reads: the text, and the old graph that a save overwrites."""
    from helpers.train import write_text

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "docs.txt").exists():
        write_text(work / "docs.txt")
    if not (work / "old.safetensors").exists():
        synthetic_graph(seed=1, n_edges=GRAPH_EDGES // 2).save(work / "old.safetensors")


def fresh_output(op: str, work: Path, name: str) -> Path:
    """An empty output folder (for a graph: holding the old graph, which the save replaces)."""
    out = work / op / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if op == "graph":
        shutil.copyfile(work / "old.safetensors", out / GRAPH_FILE)
    return out


def kill_times(points: int, duration: float, seed: int) -> list[float]:
    """Stratified random times over [0, duration]: point i falls in the i-th of `points` equal slices."""
    rng = random.Random(seed)
    return [duration * (i + rng.random()) / points for i in range(points)]


def run_op(op: str, work: Path, points: int, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The reference run, then `points` kill points, each checked and resumed; the figures of `op`."""
    t0 = time.monotonic()
    ref_out = fresh_output(op, work, "reference")
    ref_run = run_child(op, work, ref_out)
    if ref_run.ended != "finished":
        raise RuntimeError(f"{op}: the reference run failed: {ref_run.error}")
    ref = snapshot(op, ref_out)
    ref_files = listing(ref_out)
    old = _graph_snapshot(work / "old.safetensors") if op == "graph" else None
    results = []
    for i, at in enumerate(kill_times(points, 1.0, seed * 1000 + OPS.index(op))):
        # `at` is a fraction of the operation's duration. On a shared machine a run's speed varies,
        # so the kill is timed on a window a quarter longer than the reference (a slower run is
        # still killed late in its course), and a run that finishes before its kill is tried again
        # at the same fraction of its own duration (twice at most; a run that still finishes first
        # is checked like any other).
        duration = WINDOW * ref_run.seconds
        for _ in range(3):
            out = fresh_output(op, work, f"kill-{i:02d}")
            run = run_child(op, work, out, kill_after=at * duration)
            if run.ended != "finished":
                break
            duration = run.seconds
        point: dict[str, Any] = {"point": i, "kill_at_s": round(run.seconds, 3), "fraction": round(at, 3),
                                 "ended": run.ended}
        failure = None
        if run.ended == "failed":
            failure = f"the killed run failed before the kill: {run.error.splitlines()[0]}"
        else:
            try:
                point["after_kill"], point["state"] = after_kill(op, out, ref, old)
            except (Inconsistent, CltraceError) as exc:  # a file a kill left reads badly or wrongly
                failure = f"after the kill: {type(exc).__name__}: {exc}"
            point["debris_after_kill"] = sorted(set(listing(out)) - set(ref_files))
            again = run_child(op, work, out, resume=True)
            if again.ended != "finished":
                failure = failure or f"the rerun failed: {again.error.splitlines()[0]}"
                point["rerun_error"] = again.error[-2000:]
            else:
                same, how = compare(op, snapshot(op, out), ref)
                point["rerun"] = how
                point["identical"] = same
                if not same:
                    failure = failure or f"the rerun's output differs from the reference: {how}"
            point["debris_after_rerun"] = sorted(set(listing(out)) - set(ref_files))
        if failure:
            point["failure"] = failure
        results.append(point)
        log(f"  {op} point {i:2d}: kill at {run.seconds:6.2f} s ({at:.2f}) {run.ended:8s} "
            f"{point.get('after_kill', '-'):27s} {point.get('state', ''):32s} {point.get('rerun', '-'):16s} {failure or ''}")
        shutil.rmtree(out, ignore_errors=True)
    return {
        "reference_seconds": round(ref_run.seconds, 3),
        "points": points,
        "killed": sum(p["ended"] == "killed" for p in results),
        "finished_before_kill": sum(p["ended"] == "finished" for p in results),
        "after_kill_phases": dict(Counter(p.get("after_kill", "-") for p in results)),
        "previous_output_intact": sum(p.get("after_kill") == "old graph intact" for p in results) if op == "graph" else None,
        "resumed_identical": sum(bool(p.get("identical")) for p in results),
        "resumed_bit_identical": sum(p.get("rerun") == "bit-identical" for p in results),
        "failures": [f"point {p['point']}: {p['failure']}" for p in results if "failure" in p],
        "debris_after_kill": sum(bool(p.get("debris_after_kill")) for p in results),
        "debris_after_rerun": sorted({f for p in results for f in p.get("debris_after_rerun", [])}),
        "seconds": round(time.monotonic() - t0, 1),
        "kill_points": results,
    }


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
    from helpers import features as helper_features
    from helpers.models import tiny_model

    if "model" not in _EXTENSION:
        _EXTENSION["model"], _EXTENSION["tc"] = tiny_model("llama"), helper_features.transcoder(seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the children's floats
    try:
        helper_features.build(_EXTENSION["model"], _EXTENSION["tc"], out / FEATURES_FILE, FEATURE_TOKENS_EXTENDED)
    finally:
        torch.set_num_threads(threads)
    return _db_dump(out / FEATURES_FILE)


def _loaders() -> dict[str, tuple[str, str, Callable[[Path], Any]]]:
    """Per kind of output file: (operation, file under its output, loader of the whole output)."""
    from cltrace.data.store import ActivationStore
    from cltrace.features import FeatureStore
    from cltrace.train.distributed import read_checkpoint
    from cltrace.transcoder import load_transcoder

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
        "graph": ("graph", GRAPH_FILE, lambda out: _graph_snapshot(out / GRAPH_FILE)),
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


# -- main -----------------------------------------------------------------------------------------------


def run(ops: list[str], points: int, work: Path, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every selected operation's kill points, then the damage checks; the figures as one dict."""
    setup(work)
    figures: dict[str, Any] = {"points_per_op": points, "seed": seed, "ops": {}}
    t0 = time.monotonic()
    for op in ops:
        log(f"{op}: reference run and {points} kill points")
        figures["ops"][op] = run_op(op, work, points, seed, log)
    figures["damage"] = damage_checks(work, ops, seed)
    figures["seconds"] = round(time.monotonic() - t0, 1)
    return figures


def print_table(figures: dict[str, Any]) -> None:
    print(f"\n{'operation':10s} {'ref s':>6s} {'points':>6s} {'killed':>6s} {'identical':>9s} {'bit-id':>6s} "
          f"{'old kept':>8s} {'failures':>8s}  phases after the kill")
    for op, r in figures["ops"].items():
        kept = "-" if r["previous_output_intact"] is None else str(r["previous_output_intact"])
        phases = ", ".join(f"{k} {v}" for k, v in sorted(r["after_kill_phases"].items()))
        print(f"{op:10s} {r['reference_seconds']:6.2f} {r['points']:6d} {r['killed']:6d} {r['resumed_identical']:9d} "
              f"{r['resumed_bit_identical']:6d} {kept:>8s} {len(r['failures']):8d}  {phases}")
        for f in r["failures"]:
            print(f"    FAILURE {f}")
        if r["debris_after_rerun"]:
            print(f"    debris left after the rerun: {r['debris_after_rerun'][:6]}")
    print("\ndamaged files:")
    for kind, outcomes in figures["damage"].items():
        counts = Counter(outcomes.values())
        print(f"  {kind:32s} " + ", ".join(f"{k}: {v}" for k, v in counts.most_common()))
        for name, outcome in outcomes.items():
            if outcome != "refused":
                print(f"      {name}: {outcome}")
    print(f"\ntotal {figures['seconds']:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20, help="kill points per operation")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {','.join(OPS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/crash_safety.json")
    args = parser.parse_args()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in ops if o not in OPS]
    if unknown or args.points < 1:
        parser.error(f"unknown operation(s) {unknown}; choose from {', '.join(OPS)}" if unknown else "--points must be >= 1")
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="cltrace-crash-")
    work = args.workdir or Path(tmp.name)
    try:
        figures = run(ops, args.points, work, args.seed)
    finally:
        if tmp is not None:
            tmp.cleanup()
    print_table(figures)
    if not args.no_write:
        from common import write_result

        print(f"wrote {write_result('crash_safety', figures)}")


if __name__ == "__main__":
    main()
