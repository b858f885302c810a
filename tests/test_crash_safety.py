"""Crash safety: runs killed at random points rerun to the uninterrupted output, and damaged files are refused.

The kill points are benchmarks/crash_safety.py's (3 per operation here, 20 in the benchmark): training,
harvest into an activation store, feature-store building and graph saving, each SIGKILLed at
stratified random times, checked as a reader would see what it left, rerun and compared with an
uninterrupted run. Below them, the debris a kill can leave must never block the next run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.train import Planted, planted_config

from cltrace.errors import CltraceError
from cltrace.train.run_dir import prepare_run_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import crash_safety  # noqa: E402

POINTS = 3


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("crash")
    return crash_safety.run(list(crash_safety.OPS), POINTS, work, seed=0, log=lambda _: None)


@pytest.mark.slow
@pytest.mark.parametrize("op", crash_safety.OPS)
def test_killed_operation_reruns_to_the_uninterrupted_output(figures: dict[str, Any], op: str) -> None:
    r = figures["ops"][op]
    assert r["failures"] == [], r["failures"]
    assert r["killed"] >= POINTS - 1, r["kill_points"]  # a run faster than the reference may finish first, once
    assert r["resumed_identical"] == POINTS, r["kill_points"]
    for point in r["kill_points"]:
        assert point["identical"] and "after_kill" in point, point
    if op == "train":  # bit for bit, not only within 1e-6
        assert r["resumed_bit_identical"] == POINTS
    if op == "graph":  # the old graph or the new one, never anything else
        assert {p["after_kill"] for p in r["kill_points"]} <= {"old graph intact", "new graph complete"}
    else:  # a rerun leaves no temporary file of the killed run (a graph save's temp files are reported)
        assert r["debris_after_rerun"] == []


@pytest.mark.slow  # the reference run of every operation first
def test_damaged_outputs_are_refused_in_one_line(figures: dict[str, Any]) -> None:
    damage = dict(figures["damage"])
    assert set(damage) == {"training checkpoint (state.pt)", "transcoder weights", "transcoder config.json", "store shard",
                           "store manifest.json", "feature store", "feature store build state (extended)", "graph"}
    # a byte flipped or cut inside a build-state blob, which SQLite cannot see: the extension refuses it
    assert set(damage.pop("feature store build state (extended)").values()) == {"refused"}
    for kind, outcomes in damage.items():
        assert outcomes["truncated to half"] == "refused", (kind, outcomes)
        assert outcomes["middle byte flipped"] == "refused", (kind, outcomes)
        for name, outcome in outcomes.items():
            # "read, unchanged": the byte changed nothing the loader returns (e.g. a JSON file's last newline)
            assert outcome in ("refused", "read, unchanged"), (kind, name, outcome)
        assert sum(o == "refused" for o in outcomes.values()) >= len(outcomes) - 3, (kind, outcomes)


# -- what a kill leaves never blocks the next run ------------------------------------------------------


def test_a_harvest_killed_before_its_first_manifest_starts_afresh(tmp_path: Path) -> None:
    from helpers import store as helper_store

    out = tmp_path / "store"
    out.mkdir()
    (out / ".manifest.json.k1ll3d.tmp").write_text('{"format": "cltrace-activ')  # the temp file a kill left
    store = helper_store.harvest(tmp_path, out, helper_store.POS * 3)
    assert store.complete and store.contexts == 3
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.safetensors"]
    # killed while writing a shard: cltrace's temp file, and the one safetensors writes through
    (out / ".shard-00001.safetensors.k1ll3d.tmp").write_bytes(b"half")
    (out / ".tmpAbC123").write_bytes(b"half")
    store = helper_store.harvest(tmp_path, out, helper_store.POS * 6)
    assert store.complete and store.contexts == 6
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    (mine / ".manifest.json.k1ll3d.tmp").write_text("{")
    with pytest.raises(CltraceError, match="holds no activation store"):
        helper_store.harvest(tmp_path, mine, helper_store.POS * 3)
    assert sorted(p.name for p in mine.iterdir()) == [".manifest.json.k1ll3d.tmp", "notes.txt"]


def test_a_resumed_run_removes_the_debris_of_killed_writes(tmp_path: Path) -> None:
    cfg = planted_config(total_tokens=256 * 4, checkpoint_every=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.json.k1ll3d.tmp").write_text("{")  # killed while writing its first config.json
    assert prepare_run_dir(run, cfg, resume=False) is False
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
    from cltrace.train import Trainer

    Trainer(cfg, Planted(n=512), run, progress=False, stop_after=2).run()
    debris = [run / "checkpoint" / ".state.pt.k1ll3d.tmp", run / ".metrics.jsonl.k1ll3d.tmp", run / ".eval.json.x.tmp",
              run / ".transcoder.tmp-0123456789ab" / "transcoder.safetensors", run / ".transcoder.old-0123456789ab" / "config.json"]
    kept = [run / ".notes.tmp", run / "checkpoint" / "notes.txt"]  # not files a run writes: never touched
    for path in debris + kept:
        path.parent.mkdir(exist_ok=True)
        path.write_text("half")
    with pytest.raises(CltraceError, match="already holds this run"):
        prepare_run_dir(run, cfg, resume=False)  # refused: nothing touched
    assert all(p.exists() for p in debris + kept)
    assert prepare_run_dir(run, cfg, resume=True) is True
    assert not any(p.exists() for p in debris) and not (run / ".transcoder.tmp-0123456789ab").exists()
    assert all(p.exists() for p in kept)


def test_a_graph_save_removes_the_temp_files_of_killed_saves_of_that_graph(tmp_path: Path) -> None:
    """Saves killed mid-write leave `.NAME.*.tmp` beside the graph: the next save of the same graph
    removes those of dead writers, and nothing else (a live writer's, a fresh one, another file's)."""
    import os
    import subprocess
    import time

    from helpers.graphs import small_graph

    from cltrace.atomic import STALE_TEMP_AGE

    done = subprocess.Popen([sys.executable, "-c", ""])
    done.wait()  # a writer that is gone: its pid runs no more
    stale = [f".g.safetensors.{done.pid}-k1ll3d_1.tmp", ".g.safetensors.k1ll3d_2.tmp"]  # the second: no pid in it
    kept = [
        f".g.safetensors.{os.getpid()}-wr1t1ng_.tmp",  # a writer still running
        ".other.safetensors.k1ll3d_3.tmp",  # another graph's
        ".g.safetensors.x.k1ll3d_4.tmp",  # the graph g.safetensors.x's
        "g.safetensors.k1ll3d_5.tmp",  # not hidden: not a name cltrace writes
        ".g.safetensors.abc.tmp",  # not mkstemp's 8 characters
    ]
    old = time.time() - 10 * STALE_TEMP_AGE
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"half")
        os.utime(tmp_path / name, (old, old))
    (tmp_path / ".g.safetensors.fr3sh___.tmp").write_bytes(b"half")  # young: maybe a write under way
    (tmp_path / ".g.safetensors.f0ld3r__.tmp").mkdir()  # not a file
    os.utime(tmp_path / ".g.safetensors.f0ld3r__.tmp", (old, old))
    kept += [".g.safetensors.fr3sh___.tmp", ".g.safetensors.f0ld3r__.tmp"]

    small_graph().save(tmp_path / "g.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["g.safetensors", *kept])
