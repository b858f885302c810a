"""Distributed training and attribution on torch.distributed: gloo on the CPU, 2 and 4 processes.

Ground truth is always one process: the same config trained (or the same graph built) without
torch.distributed. Ranks are real processes: started by `torchrun` (attribution), or forked with
the environment torchrun gives its workers (training), so that each rank's output and exit status
can be checked and one of them can be killed; those run functions of this module.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))

from helpers.train import Planted  # noqa: E402

from cltrace.train import TrainConfig, Trainer  # noqa: E402
from cltrace.train.distributed import ShardedTranscoder, feature_slice, read_checkpoint, sharded_loss  # noqa: E402
from cltrace.train.losses import transcoder_loss  # noqa: E402
from cltrace.transcoder import Transcoder, TranscoderConfig, load_transcoder  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def planted_run_config() -> TrainConfig:
    """12 steps of 64 tokens, 2 steps per buffer of 128, a checkpoint every 3; float64 so that runs compare to 1e-5."""
    return TrainConfig(
        kind="clt", n_features=18, model="planted", n_ctx=4, batch_tokens=64, shuffle_contexts=64,
        total_tokens=64 * 12, norm_tokens=128, lr=3e-3, sparsity_lambda=0.05, checkpoint_every=3, log_every=1,
        eval_tokens=0, threshold_init=0.1, sparsity_warmup_frac=0.3, dtype="float64", lr_decay_frac=0.3,
    )


class DyingPlanted(Planted):
    """Planted data; rank `die_rank` is killed (SIGKILL: no clean-up) when it asks for buffer `die_at`."""

    def __init__(self, die_rank: int, die_at: int) -> None:
        super().__init__(n_layers=2, d=16, n_planted=12, n=128)
        self.die_rank, self.die_at = die_rank, die_at

    def buffers(self, start: dict[str, Any] | None):
        for x, y, after in super().buffers(start):
            if after["i"] - 1 == self.die_at and int(os.environ["RANK"]) == self.die_rank:
                os.kill(os.getpid(), signal.SIGKILL)
            yield x, y, after


def planted_source() -> Planted:
    return Planted(n_layers=2, d=16, n_planted=12, n=128)


# -- ranks ------------------------------------------------------------------------------------------------
#
# Rank processes are forked from a fork server that has imported torch, transformers and cltrace
# once (about 3.5 CPU-seconds a process on this 2-core machine), each with the environment torchrun
# gives its workers and its stdout/stderr in a file of its own.

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["test_distributed"])


def _start_fork_server() -> None:
    """Start the fork server with this folder importable (Python 3.11 does not pass sys.path to it)."""
    from multiprocessing import forkserver

    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), *([before] if before else [])])
    try:
        forkserver.ensure_running()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, log: str, fn: str, args: tuple) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(ENV)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    code = 0
    try:
        globals()[fn](*args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start_ranks(n: int, logs: Path, fn: str, *args: Any) -> list[tuple[Any, Path]]:
    """n rank processes running `fn(*args)`; returns (process, log file) pairs."""
    _start_fork_server()
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    started = []
    for rank in range(n):
        log = logs / f"rank{rank}.log"
        proc = _CTX.Process(target=_rank_main, args=(rank, n, port, str(log), fn, args))
        proc.start()
        started.append((proc, log))
    return started


def wait_all(started: list[tuple[Any, Path]], timeout: float = 120) -> list[tuple[int, str]]:
    """(exit code, output) of every rank; a rank still running at the deadline is killed and fails the test."""
    deadline = time.time() + timeout
    results = []
    for proc, log in started:
        proc.join(max(0.1, deadline - time.time()))
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            pytest.fail(f"a rank did not finish within {timeout} s:\n{log.read_text()[-3000:]}")
        results.append((proc.exitcode, log.read_text()))
    return results


def assert_ok(results: list[tuple[int, str]]) -> None:
    for rank, (code, err) in enumerate(results):
        assert code == 0, f"rank {rank}:\n{err[-3000:]}"


def train_planted(out: str, feature_parallel: int, stop_after: int = 0, die_rank: int = -1, die_at: int = -1) -> None:
    """One rank: train planted_run_config() into `out`; a CltraceError prints one line and exits 2, as the CLI does."""
    from cltrace.errors import CltraceError
    from cltrace.train.distributed import init_layout, shutdown

    try:
        # A short collective timeout bounds how long the survivors of a killed rank wait; a healthy run
        # gets a long one, so that a loaded machine (ranks starved for seconds) cannot fail it.
        init_layout(feature_parallel, timeout_s=20 if die_rank >= 0 else 180)
        src = DyingPlanted(die_rank, die_at) if die_rank >= 0 else planted_source()
        Trainer(planted_run_config(), src, out, resume=True, progress=False, stop_after=stop_after or None).run()
        shutdown()
    except CltraceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def cli(*args: str) -> None:
    """One rank running the command line."""
    from cltrace.cli import main

    main(list(args))


def metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(got: list[dict[str, Any]], want: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["step"], key)


def assert_same_weights(a: Transcoder, b: Transcoder, tol: float = 1e-5) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].shape == sb[name].shape, name
        assert (sa[name].double() - sb[name].double()).abs().max() <= tol, name


# -- in one process: slices and the sharded loss --------------------------------------------------------


def test_feature_slices_cover_every_feature_once() -> None:
    for n, parts in [(18, 4), (16, 4), (5, 5), (7, 2)]:
        slices = [feature_slice(n, parts, i) for i in range(parts)]
        assert slices[0][0] == 0 and slices[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
        sizes = [e - s for s, e in slices]
        assert max(sizes) - min(sizes) <= 1
    from cltrace.errors import CltraceError

    with pytest.raises(CltraceError, match="fewer than the 4 feature-parallel ranks"):
        feature_slice(3, 4, 0)


@pytest.mark.parametrize("kind,decode", [("clt", "sparse"), ("clt", "dense"), ("plt", "sparse"), ("plt", "dense")])
def test_slices_sum_to_the_whole_loss_and_gradient(kind: str, decode: str) -> None:
    """Without a process group: the partial reconstructions of 3 slices summed by hand give transcoder_loss's
    reconstruction, loss and gradients (the all_reduce is the only thing the ranks add)."""
    cfg = TranscoderConfig(kind=kind, n_layers=3, d_model=8, n_features=10, skip=kind == "plt", dtype="float64")
    full = Transcoder.random(cfg, seed=3).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        full.b_dec.normal_(0, 0.1, generator=g)
        full.b_enc.normal_(0, 0.3, generator=g)
        if kind == "plt":
            full.W_skip.normal_(0, 0.1, generator=g)
    x = torch.randn(32, 3, 8, generator=g, dtype=torch.float64) * 3
    y = torch.randn(32, 3, 8, generator=g, dtype=torch.float64)
    want = transcoder_loss(full, x, y, 0.01, 1.0, 1e-3, decode=decode)
    want["total"].backward()

    # one rank holding every feature is transcoder_loss exactly
    alone = sharded_loss(ShardedTranscoder(full, 0, 10), x, y, 0.01, 1.0, 1e-3, decode, None, 1)
    assert torch.equal(alone["total"].detach(), want["total"].detach())

    # three slices; the sum of their partial reconstructions (here by hand) stands in for the all_reduce
    import cltrace.train.distributed as d

    shards = [ShardedTranscoder(full, *feature_slice(10, 3, i)) for i in range(3)]
    with torch.no_grad():
        summed = sum(s.local.decode(s.local.encode(x)) for s in shards)  # [N, L, d]; each local b_dec is 0

    class HandSum(torch.autograd.Function):  # what _SumOverRanks does across ranks
        @staticmethod
        def forward(ctx, partial, group):
            return summed.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad, None

    original, d._SumOverRanks = d._SumOverRanks, HandSum
    try:
        terms = [d.sharded_loss(s, x, y, 0.01, 1.0, 1e-3, decode, None, 3) for s in shards]
    finally:
        d._SumOverRanks = original
    for t in terms:
        assert t["mse"].item() == pytest.approx(want["mse"].item(), rel=1e-12)
    assert sum(t["sparsity"] for t in terms).item() == pytest.approx(want["sparsity"].item(), rel=1e-12)
    assert sum(t["preact"] for t in terms).item() == pytest.approx(want["preact"].item(), rel=1e-12)
    assert torch.allclose(sum(t["l0_per_layer"] for t in terms), want["l0_per_layer"])
    assert torch.equal(torch.cat([t["fired"] for t in terms], dim=1), want["fired"])
    # each rank's own loss gives its parameters the one-process gradient
    full_grads = {name: p.grad for name, p in full.named_parameters()}
    for s, t in zip(shards, terms):
        t["total"].backward()
        for name, p in s.named_tensors():
            axis = d.feature_axis(name, kind)
            ref = full_grads[name] if axis is None else full_grads[name].narrow(axis, s.start, s.end - s.start)
            tol = 1e-5 if p.dtype == torch.float32 else 1e-9  # JumpReLU thresholds stay fp32
            assert torch.allclose(p.grad, ref, rtol=tol, atol=tol * 1e-3), name


# -- several processes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Transcoder]:
    """The one-process run of planted_run_config(): its metrics and final transcoder are the ground truth."""
    out = tmp_path_factory.mktemp("one") / "run"
    tc = Trainer(planted_run_config(), planted_source(), out, progress=False).run()
    return out, tc


@pytest.mark.slow
def test_four_rank_checkpoint_resumes_on_two_and_one_and_a_killed_rank_stops_the_rest(
    tmp_path: Path, reference: tuple[Path, Transcoder]
) -> None:
    ref_dir, ref_tc = reference
    ref_metrics = metrics(ref_dir)
    keys = ("total", "mse", "sparsity", "preact", "nmse", "l0", "grad_norm", "lr", "lambda")

    # 4 ranks: 2 data-parallel groups x 2 feature slices, stopped after step 6 (checkpoints at 3 and 6)
    four = tmp_path / "four"
    assert_ok(wait_all(start_ranks(4, tmp_path / "logs4", "train_planted", str(four), 2, 6)))
    manifest = json.loads((four / "checkpoint" / "manifest.json").read_text())
    assert (manifest["step"], manifest["feature_parallel"], manifest["data_parallel"]) == (6, 2, 2)
    assert [(s["start"], s["end"]) for s in manifest["shards"]] == [(0, 9), (9, 18)]
    assert not (four / "checkpoint" / "step-000000003").exists()  # older step folders are cleaned up
    # metrics of a data-parallel run agree with one process, except the batch-centred NMSE (averaged over the groups)
    assert_same_curve(metrics(four), ref_metrics[:6], tuple(k for k in keys if k != "nmse"))
    # the shards hold the one-process weights of step 6 (read back whole, through the re-slicing reader)
    one_at_6 = tmp_path / "one6"
    Trainer(planted_run_config(), planted_source(), one_at_6, progress=False, stop_after=6).run()
    whole = read_checkpoint(four / "checkpoint", 0, 18)
    single = torch.load(one_at_6 / "checkpoint" / "state.pt", weights_only=False)
    for name, t in single["transcoder"].items():
        assert (whole["tensors"][name] - t).abs().max() <= 1e-5, name
    names = list(single["transcoder"])
    for i, st in single["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert (whole["adam"][names[i]][k] - st[k]).abs().max() <= 1e-5 * (1 + st[k].abs().max()), (names[i], k)
    assert torch.equal(whole["last_fired"], single["last_fired"])

    on_one, on_two = tmp_path / "on_one", tmp_path / "on_two"
    shutil.copytree(four, on_one)
    shutil.copytree(four, on_two)

    # resumed in one plain process (no torch.distributed): finishes on the one-process weights and curve
    tc = Trainer(planted_run_config(), planted_source(), on_one, resume=True, progress=False).run()
    assert_same_weights(tc, ref_tc)
    assert_same_curve(metrics(on_one)[6:], ref_metrics[6:], keys)
    assert (on_one / "checkpoint" / "state.pt").is_file() and not (on_one / "checkpoint" / "manifest.json").exists()

    # resumed on 2 ranks (feature parallel), rank 1 killed when it asks for buffer 5 (after step 10;
    # the last checkpoint is step 9): rank 0 stops with one clear line, in bounded time
    ranks = start_ranks(2, tmp_path / "logs2", "train_planted", str(on_two), 2, 0, 1, 5)
    t_dead = None
    deadline = time.time() + 90
    while ranks[0][0].exitcode is None and time.time() < deadline:
        if t_dead is None and ranks[1][0].exitcode is not None:
            t_dead = time.time()
        time.sleep(0.05)
    t_dead = t_dead or time.time()
    (code0, err0), (code1, _) = wait_all(ranks, timeout=10)
    assert code1 == -signal.SIGKILL
    assert code0 == 2, err0[-3000:]
    assert time.time() - t_dead < 25, "rank 0 took too long to notice"
    lines = [line for line in err0.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err0, err0[-3000:]
    assert "rank 0/2" in lines[0] and "step 9" in lines[0] and "--resume" in lines[0], lines[0]
    assert json.loads((on_two / "checkpoint" / "manifest.json").read_text())["step"] == 9
    assert not (on_two / "transcoder").exists()

    # the same 2 ranks resume from step 9 and finish on the one-process weights and curve
    assert_ok(wait_all(start_ranks(2, tmp_path / "logs2b", "train_planted", str(on_two), 2)))
    assert_same_weights(load_transcoder(on_two / "transcoder"), ref_tc)
    got = metrics(on_two)
    assert_same_curve(got[:6], ref_metrics[:6], tuple(k for k in keys if k != "nmse"))  # from the 4-rank run
    assert_same_curve(got[6:], ref_metrics[6:], keys)


# -- the command line: `-m cltrace train` on 2 ranks, `torchrun -m cltrace attribute` ---------------------


CLI_TRAIN = ["--preset", "tiny", "--quiet", *[f"--set={kv}" for kv in (
    "n_features=12", "dtype=float64", "n_ctx=9", "batch_tokens=32", "shuffle_contexts=8", "total_tokens=256",
    "harvest_batch=4", "norm_tokens=64", "checkpoint_every=3", "log_every=1", "eval_tokens=32", "heldout_fraction=0.1",
)]]


def run_main(*args: str) -> int:
    """`cltrace ARGS` in this process; its exit status."""
    from cltrace.cli import main

    try:
        main(list(args))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama with a word-level tokenizer saved as a model folder, a folder of text, and a
    one-process `cltrace train` of CLI_TRAIN on them (the ground truth)."""
    from helpers.models import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    tiny_model("llama").model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    text = root / "text"
    text.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(40):
        words = torch.randint(2, 40, (int(torch.randint(20, 60, (1,), generator=g)),), generator=g)
        (text / f"doc{i:02d}.txt").write_text(" ".join(f"t{w}" for w in words.tolist()))
    one = root / "one"
    assert run_main("train", "--model", str(model_dir), "--source", str(text), "--out", str(one), *CLI_TRAIN) == 0
    return {"model": model_dir, "text": text, "one": one, "root": root}


@pytest.mark.slow
def test_cli_train_on_two_ranks_matches_one_process(tmp_path: Path, tiny_setup: dict[str, Path]) -> None:
    out = tmp_path / "two"
    args = ("train", "--model", str(tiny_setup["model"]), "--source", str(tiny_setup["text"]), "--out", str(out), *CLI_TRAIN)
    results = wait_all(start_ranks(2, tmp_path / "logs", "cli", *args))
    assert_ok(results)
    assert "sharded over 2 ranks = 1 data-parallel x 2 feature-parallel" in results[0][1]
    assert "transcoder:" in results[0][1] and "transcoder:" not in results[1][1]  # rank 0 speaks for all
    one = tiny_setup["one"]
    assert_same_curve(metrics(out), metrics(one), ("total", "mse", "sparsity", "preact", "nmse", "l0", "grad_norm"))
    assert_same_weights(load_transcoder(out / "transcoder"), load_transcoder(one / "transcoder"))
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["step"] == 8 and [(s["start"], s["end"]) for s in manifest["shards"]] == [(0, 6), (6, 12)]
    a, b = json.loads((out / "eval.json").read_text()), json.loads((one / "eval.json").read_text())
    assert a["nmse_mean"] == pytest.approx(b["nmse_mean"], rel=1e-5)


@pytest.mark.slow
def test_torchrun_attribute_on_two_ranks_gives_the_one_process_graph(tmp_path: Path, tiny_setup: dict[str, Path]) -> None:
    from cltrace.graph.graph import Graph

    tc, model = str(tiny_setup["one"] / "transcoder"), str(tiny_setup["model"])
    prompt = "t5 t9 t17 t3 t30 t8 t12 t21"
    common = ("--transcoder", tc, "--model", model, "--batch-size", "4", "--max-feature-nodes", "40")
    assert run_main("attribute", prompt, *common, "--output", str(tmp_path / "one.pt")) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cltrace", "attribute", prompt, *common,
         "--output", str(tmp_path / "two.pt")],
        env=ENV, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 writes and reports
    one, two = Graph.load(tmp_path / "one.pt"), Graph.load(tmp_path / "two.pt")
    assert one.n_nodes == two.n_nodes and one.n_edges == two.n_edges > 0
    # the same nodes, visited in the same order, and the same edges (to float rounding: the ranks run
    # on one thread each, this process on more, so matrix products may round differently)
    for column in ("kind", "layer", "pos", "feature", "token"):
        assert torch.equal(getattr(one.nodes, column), getattr(two.nodes, column)), column
    for column in ("activation", "probability"):
        assert torch.allclose(getattr(one.nodes, column), getattr(two.nodes, column), rtol=1e-5, atol=1e-7), column
    assert torch.equal(one.edge_target, two.edge_target) and torch.equal(one.edge_source, two.edge_source)
    assert torch.allclose(one.edge_weight, two.edge_weight, rtol=1e-4, atol=1e-6)
    assert one.metadata["n_active_features"] == two.metadata["n_active_features"]
    assert [t["tokens"] for t in one.metadata["targets"]] == [t["tokens"] for t in two.metadata["targets"]]
    for key in ("target_value", "target_constant"):
        assert np.allclose(one.metadata[key], two.metadata[key], rtol=1e-4, atol=1e-6), key
