"""The operations crash_safety.py kills (training, harvest, feature-store building, graph saving), each
run in a child forked from a fork server that has imported the heavy modules once.

Imported through crash_safety.py, which puts tests/ on the path (for `helpers`) and sets
OMP_NUM_THREADS before torch is imported.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from helpers import features as helper_features
from helpers import store as helper_store
from helpers.models import tiny_model
from helpers.store import tok
from helpers.train import resume_config

from cltrace.data.sources import FileSource
from cltrace.graph.graph import Graph, NodeKind, NodeTable
from cltrace.train import train_transcoder

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
GRAPH_EDGES = 1_500_000  # about 30 MB: a save long enough to be killed in every part of it


# -- the operations, as run in a child ---------------------------------------------------------------


def train_config() -> Any:
    """The training run: the tiny llama, 150 steps, a checkpoint every 4, a final evaluation."""
    return resume_config().with_overrides({"total_tokens": 16 * 150, "checkpoint_every": 4})


def synthetic_graph(seed: int, n_edges: int = GRAPH_EDGES) -> Any:
    """A graph with the usual node layout and `n_edges` random edges (seeded)."""
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
        cfg, model = train_config(), tiny_model("llama")
        source = FileSource(work / "docs.txt", txt_split="paragraph")
        return lambda: train_transcoder(cfg, out, resume=resume, model=model, tokenize=tok, source=source,
                                        progress=False, bos_id=0)
    if op == "harvest":
        model = tiny_model("llama")
        return lambda: helper_store.harvest(work, out, helper_store.POS * STORE_CONTEXTS, model=model)
    if op == "features":
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
