"""Training: losses, config, planted-dictionary recovery, folding, checkpoints, exact resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers.models import tiny_model
from helpers.train import Planted, planted_config, resume_config, tiny_model_dir, word_docs, write_text

from cltrace.data.sources import FileSource
from cltrace.errors import CltraceError
from cltrace.train import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    fold_normalisation,
    preset,
    train_transcoder,
    transcoder_loss,
)
from cltrace.train.config import parse_override
from cltrace.train.trainer import lr_at, sparsity_lambda_at
from cltrace.transcoder import Transcoder, TranscoderConfig, load_transcoder

TESTS = Path(__file__).parent


# -- planted dictionary ------------------------------------------------------------------------------


@pytest.mark.slow
def test_training_recovers_planted_features(tmp_path: Path) -> None:
    src = Planted()
    trainer = Trainer(planted_config(), src, tmp_path / "run", progress=False)
    trainer.run()
    for l in range(src.n_layers):
        W = trainer.tc.W_dec[l][:, 0]  # decoders of layer l's features towards layer l
        W = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        best = (src.D[l] @ W.T).max(dim=1).values  # [planted]: best cosine with a learned feature
        assert (best >= 0.9).float().mean() >= 0.9, best
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nmse"] < 0.05 and rows[-1]["l0"] < 4
    for name in ("config.json", "checkpoint/state.pt", "metrics.jsonl", "curves.png", "transcoder/config.json"):
        assert (tmp_path / "run" / name).is_file(), name


# -- losses ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,activation,skip", [("clt", "jumprelu", False), ("plt", "jumprelu", True), ("clt", "relu", False), ("clt", "topk", False)]
)
def test_sparse_and_dense_paths_agree(kind: str, activation: str, skip: bool) -> None:
    L, d, Fn, N = 3, 16, 24, 40
    cfg = TranscoderConfig(kind, L, d, Fn, activation=activation, topk_k=5 if activation == "topk" else None,
                           skip=skip, dtype="float64")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, L, d, generator=g, dtype=torch.float64) * 2
    y = torch.randn(N, L, d, generator=g, dtype=torch.float64)
    results = {}
    for decode in ("sparse", "dense"):
        tc = Transcoder.random(cfg, seed=3)
        if skip:
            with torch.no_grad():
                tc.W_skip.normal_(0, 0.1, generator=torch.Generator().manual_seed(5))
        if activation == "jumprelu":
            with torch.no_grad():  # thresholds spread so that some entries sit in the estimator window
                tc.activation.threshold.uniform_(0.0, 0.6, generator=torch.Generator().manual_seed(4))
            tc.activation.bandwidth = 0.5
        terms = transcoder_loss(tc, x, y, sparsity_lambda=0.3, sparsity_c=2.0, preact_lambda=0.01, decode=decode)
        terms["total"].backward()
        results[decode] = (terms, {n: p.grad.clone() for n, p in tc.named_parameters() if p.grad is not None})
    (ts, gs), (td, gd) = results["sparse"], results["dense"]
    for key in ("mse", "sparsity", "preact", "total"):
        torch.testing.assert_close(ts[key], td[key], atol=1e-10, rtol=1e-10)
    assert gs.keys() == gd.keys()
    if activation == "jumprelu":
        assert gd["activation.threshold"].abs().sum() > 0
    for name in gs:
        torch.testing.assert_close(gs[name], gd[name], atol=1e-9, rtol=1e-7, msg=name)


def test_schedules() -> None:
    cfg = planted_config(total_tokens=256 * 100, lr=1e-3, lr_decay_frac=0.2, sparsity_lambda=0.5, sparsity_warmup_frac=0.5)
    assert lr_at(cfg, 0) == lr_at(cfg, 79) == 1e-3
    assert lr_at(cfg, 90) == pytest.approx(5e-4)
    assert lr_at(cfg, 99) == pytest.approx(5e-5)
    assert sparsity_lambda_at(cfg, 0) == pytest.approx(0.01)
    assert sparsity_lambda_at(cfg, 24) == pytest.approx(0.25)
    assert sparsity_lambda_at(cfg, 60) == 0.5


# -- folding -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,skip", [("clt", False), ("plt", True)])
def test_folded_transcoder_works_on_raw_activations(kind: str, skip: bool) -> None:
    L, d = 3, 8
    tc = Transcoder.random(TranscoderConfig(kind, L, d, 12, activation="jumprelu", skip=skip), seed=2)
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.3)
        tc.b_dec.normal_(0, 0.3)
        if skip:
            tc.W_skip.normal_(0, 0.2)
    sx = torch.tensor([0.5, 2.0, 3.0])
    sy = torch.tensor([4.0, 0.25, 1.5])
    x = torch.randn(10, L, d) * 3
    folded = fold_normalisation(tc, sx, sy)
    acts_raw, recon_raw = folded(x)
    acts_n, recon_n = tc(x * sx[:, None])
    torch.testing.assert_close(acts_raw, acts_n, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recon_raw, recon_n / sy[:, None], atol=1e-5, rtol=1e-5)


# -- config ------------------------------------------------------------------------------------------


def test_config_round_trip_and_rejections(tmp_path: Path) -> None:
    cfg = preset("default").with_overrides({"n_features": 128, "lr": 1e-4})
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    (tmp_path / "c.json").write_text(cfg.to_json())
    assert TrainConfig.load(tmp_path / "c.json") == cfg
    with pytest.raises(CltraceError, match="unknown key.*n_feature\\b"):
        TrainConfig.from_dict({**cfg.to_dict(), "n_feature": 3})
    for bad, match in [({"lr": -1.0}, "lr must be"), ({"n_features": 0}, "n_features"), ({"kind": "sae"}, "kind"),
                       ({"decode": "fast"}, "decode"), ({"lr": float("nan")}, "lr must"),
                       ({"batch_tokens": 10**7}, "shuffle buffer"), ({"topk_k": 3}, "topk_k"),
                       ({"heldout_fraction": 0.0}, "heldout_fraction")]:
        with pytest.raises(CltraceError, match=match):
            cfg.with_overrides(bad)
    with pytest.raises(CltraceError, match="not valid JSON"):
        TrainConfig.from_json("{")
    with pytest.raises(CltraceError, match="unknown preset"):
        preset("huge")
    assert parse_override("lr=1e-4") == ("lr", 1e-4)
    assert parse_override("n-features=64") == ("n_features", 64)
    assert parse_override("source=my.txt") == ("source", "my.txt")
    assert parse_override("topk_k=null") == ("topk_k", None)


# -- NaN -----------------------------------------------------------------------------------------


def test_nan_stops_with_clear_message_and_keeps_last_checkpoint(tmp_path: Path) -> None:
    # 2 steps per buffer; the NaN comes in buffer 2 (steps 5-6); checkpoints every 2 steps.
    src = Planted(n=512, nan_at_buffer=2)
    cfg = planted_config(total_tokens=256 * 20, checkpoint_every=2, shuffle_contexts=512, log_every=1)
    trainer = Trainer(cfg, src, tmp_path / "run", progress=False)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 5: the loss is nan; the last good checkpoint is .*state.pt"):
        trainer.run()
    state = torch.load(tmp_path / "run" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["transcoder"].values())
    assert not (tmp_path / "run" / "transcoder").exists()


# -- exact resume after SIGKILL ----------------------------------------------------------------------

RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, time, json
    sys.path.insert(0, {tests!r})
    from helpers.models import tiny_model
    from cltrace.data.sources import FileSource
    from cltrace.train import TrainConfig, train_transcoder
    from cltrace.train.data import HarvestSource

    slow = sys.argv[3] == "slow"
    if slow:  # make harvesting slow so that the parent can kill us midway
        orig = HarvestSource.buffers
        def buffers(self, start):
            for item in orig(self, start):
                time.sleep(0.4)
                yield item
        HarvestSource.buffers = buffers
    cfg = TrainConfig.from_dict(json.loads(sys.argv[2]))
    model = tiny_model("llama")
    tok = lambda text: [1 + (ord(c) % 90) for c in text]
    train_transcoder(cfg, sys.argv[1], resume=len(sys.argv) > 4, model=model, tokenize=tok,
                     source=FileSource({text!r}, txt_split="paragraph"), progress=False, bos_id=0)
    """
)


def _run(script: Path, out: Path, cfg: TrainConfig, mode: str, resume: bool = False) -> subprocess.Popen:
    args = [sys.executable, str(script), str(out), json.dumps(cfg.to_dict()), mode] + (["resume"] if resume else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_sigkill_and_resume_gives_identical_weights(tmp_path: Path) -> None:
    text = write_text(tmp_path / "docs.txt")
    script = tmp_path / "train.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(TESTS), text=str(text)))
    cfg = resume_config()
    full = _run(script, tmp_path / "full", cfg, "fast")
    killed = _run(script, tmp_path / "killed", cfg, "slow")
    state = tmp_path / "killed" / "checkpoint" / "state.pt"
    deadline = time.time() + 60
    while time.time() < deadline:
        if state.is_file() and torch.load(state, weights_only=False)["step"] >= 6:
            break
        assert killed.poll() is None, killed.communicate()[1].decode()[-2000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "transcoder").exists(), "the run finished before it could be killed"
    step_at_kill = torch.load(state, weights_only=False)["step"]
    assert 6 <= step_at_kill < 24
    resumed = _run(script, tmp_path / "killed", cfg, "fast", resume=True)
    for proc in (full, resumed):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-3000:]
    a = load_transcoder(tmp_path / "full" / "transcoder")
    b = load_transcoder(tmp_path / "killed" / "transcoder")
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert (ta - tb).abs().max() <= 1e-6, name
    ma = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["total"] for r in ma] == [json.loads(r)["total"] for r in mb]
    ev = json.loads((tmp_path / "full" / "eval.json").read_text())
    for key in ("nmse_mean", "l0_mean", "spliced_top1", "spliced_kl", "dead_fraction", "nmse_per_layer", "l0_per_layer"):
        assert key in ev


# -- bad input ---------------------------------------------------------------------------------------


def tiny_train(tmp_path: Path, out: Path, cfg: TrainConfig | None = None, resume: bool = False, model: str = "llama",
               text: Path | None = None, seed: int = 0) -> dict:
    text = text or write_text(tmp_path / "docs.txt")
    return train_transcoder(cfg or resume_config(), out, resume=resume, model=tiny_model(model, seed=seed),
                            tokenize=lambda t: [1 + (ord(c) % 90) for c in t],
                            source=FileSource(text, txt_split="paragraph"), progress=False, bos_id=0)


def test_output_folder_holding_another_run_is_refused(tmp_path: Path) -> None:
    cfg = resume_config().with_overrides({"total_tokens": 16 * 4})
    tiny_train(tmp_path, tmp_path / "run", cfg)
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    other = cfg.with_overrides({"lr": 5e-4})
    for resume in (False, True):
        with pytest.raises(CltraceError, match="holds another run .*lr=0.001->0.0005"):
            tiny_train(tmp_path, tmp_path / "run", other, resume=resume)
    with pytest.raises(CltraceError, match="already holds this run; pass --resume"):
        tiny_train(tmp_path, tmp_path / "run", cfg)
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("mine")
    with pytest.raises(CltraceError, match="holds no training run"):
        tiny_train(tmp_path, tmp_path / "stuff", cfg)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert before == after


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path: Path) -> None:
    """Two runs on one folder would interleave their checkpoints: the second is refused, one line,
    before it writes anything; once the first is gone (its lock with it) the folder trains."""
    from cltrace.locks import acquire, release

    cfg = resume_config().with_overrides({"total_tokens": 16 * 4})
    out = tmp_path / "run"
    out.mkdir()
    other = acquire(out, "the other run")  # a lock of its own, as another process would hold
    try:
        with pytest.raises(CltraceError, match=r"run folder '.*run' is in use by another process.*choose another folder"):
            tiny_train(tmp_path, out, cfg)
        assert list(out.iterdir()) == []
    finally:
        release(other)
    tiny_train(tmp_path, out, cfg)
    assert (out / "transcoder").is_dir()
    again = acquire(out, "a later run")  # the finished run gave its lock back
    assert again is not None
    release(again)


def test_checkpoint_from_another_model_is_refused(tmp_path: Path) -> None:
    cfg = resume_config().with_overrides({"total_tokens": 16 * 8})
    trainer_out = tmp_path / "run"
    # stop midway: a checkpoint, no finished transcoder
    text = write_text(tmp_path / "docs.txt")
    from cltrace.train.data import HarvestSource

    data = HarvestSource(tiny_model("llama"), FileSource(text, txt_split="paragraph"), lambda t: [1 + ord(c) % 90 for c in t],
                         cfg.n_ctx, cfg.shuffle_contexts, cfg.harvest_batch, cfg.heldout_fraction, bos_id=0)
    Trainer(cfg, data, trainer_out, progress=False, stop_after=3).run()
    with pytest.raises(CltraceError, match="from another model"):
        tiny_train(tmp_path, trainer_out, cfg, resume=True, seed=1)
    with pytest.raises(CltraceError, match="from another model"):
        tiny_train(tmp_path, trainer_out, cfg, resume=True, model="qwen2")


def test_empty_text_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(CltraceError, match="holds no text"):
        tiny_train(tmp_path, tmp_path / "run", text=tmp_path / "empty.txt")
    assert not (tmp_path / "run" / "checkpoint" / "state.pt").exists()
    # the failed run never reached a checkpoint: the folder is reused once the text is fixed
    tiny_train(tmp_path, tmp_path / "run", resume_config().with_overrides({"total_tokens": 32, "eval_tokens": 0}))
    assert (tmp_path / "run" / "transcoder").is_dir()
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(CltraceError, match="fewer than"):
        tiny_train(tmp_path, tmp_path / "run2", text=tmp_path / "short.txt")


def test_cli_train_rejects_bad_config(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cltrace.cli import app

    runner = CliRunner()
    for args, match in [(["--set", "n_featurez=3"], "unknown key"), (["--set", "lr=-2"], "lr must be"),
                        (["--preset", "huge"], "unknown preset"), (["--set", "lr"], "key=value")]:
        result = runner.invoke(app, ["train", "-o", str(tmp_path / "r"), *args])
        assert isinstance(result.exception, CltraceError) and match in str(result.exception), result.output
        assert not (tmp_path / "r").exists()


def test_bf16_dense_training_runs_and_learns(tmp_path: Path) -> None:
    cfg = planted_config(total_tokens=256 * 200, dtype="bfloat16", decode="dense", log_every=10)
    trainer = Trainer(cfg, Planted(), tmp_path / "run", progress=False)
    folded = trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["nmse"] < 0.5 * rows[0]["nmse"]
    assert folded.W_enc.dtype == torch.float32 and folded.activation.threshold.dtype == torch.float32


# -- bad input on the command line: one line each, and an earlier run left as it was ---------------


@pytest.mark.slow
def test_cli_bad_training_input_is_one_line_and_keeps_the_earlier_run(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from helpers.cli import assert_one_line_error, run_cli

    model = tiny_model_dir(tmp_path / "model")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in word_docs()))
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    base = ["train", "-p", "tiny", "-m", str(model), "-s", str(tmp_path / "docs.jsonl"), "-q",
            "--set", "total_tokens=512", "--set", "eval_tokens=0"]
    run = tmp_path / "run"
    code, _, err = run_cli(*base, "-o", str(run), capsys=capsys)
    assert code == 0, err
    earlier = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert any(p.name == "state.pt" for p in earlier) and (run / "transcoder").is_dir()
    (tmp_path / "unknown.json").write_text(json.dumps({**preset("tiny").to_dict(), "n_featurez": 3}))
    (tmp_path / "impossible.json").write_text(json.dumps({**preset("tiny").to_dict(), "lr": -1}))
    cases = [
        (["-s", str(tmp_path / "missing.txt")], "no such file or folder"),
        (["-s", str(tmp_path / "empty.jsonl")], "holds no text"),
        (["--set", "text_column=body"], "has no column 'body'"),
        (["--config", str(tmp_path / "unknown.json")], "unknown key(s) n_featurez"),
        (["--config", str(tmp_path / "impossible.json")], "lr must be a positive number"),
        (["--set", "n_features=0"], "n_features must be an integer >= 1"),
    ]
    for i, (args, needle) in enumerate(cases):
        # aimed at a new folder: the message names the problem, and no checkpoint is written
        code, _, err = run_cli(*base, *args, "-o", str(tmp_path / f"new{i}"), capsys=capsys)
        assert_one_line_error(code, err, needle)
        assert not list((tmp_path / f"new{i}").rglob("state*.pt")), args
        # aimed at the earlier run's folder (resuming it, or not): refused, nothing of it touched
        for resume in ([], ["--resume"]):
            code, _, err = run_cli(*base, *args, "-o", str(run), *resume, capsys=capsys)
            assert_one_line_error(code, err)
            assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == earlier, (args, resume)
    # the folder of another run (another config), then a checkpoint of another model: same model
    # folder, other weights
    code, _, err = run_cli(*base, "--set", "lr=0.001", "-o", str(run), capsys=capsys)
    assert_one_line_error(code, err, "holds another run", "lr=0.0003->0.001")
    tiny_model_dir(tmp_path / "model", seed=1)
    code, _, err = run_cli(*base, "-o", str(run), "--resume", capsys=capsys)
    assert_one_line_error(code, err, "is from another model")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == earlier


def test_config_too_big_for_memory_is_refused_before_anything_is_written(tmp_path: Path, monkeypatch) -> None:
    """The estimate counts the weights four times (weights, gradients, two Adam moments): a machine
    with less available is refused in one line, and no run folder is started."""
    import cltrace.train.run_dir as run_dir_module
    from cltrace.train.run_dir import training_memory_bytes

    cfg = resume_config().with_overrides({"total_tokens": 16 * 4})
    model = tiny_model("llama")
    L, d = model.n_layers, model.d_model
    need = training_memory_bytes(cfg, L, d)
    weights = sum(p.numel() for p in Transcoder.random(TranscoderConfig(
        cfg.kind, L, d, cfg.n_features, cfg.activation, cfg.topk_k, cfg.skip)).parameters()) * 4
    assert 4 * weights <= need  # the bound holds what training certainly keeps
    monkeypatch.setattr(run_dir_module, "available_memory_bytes", lambda: need - 1)
    with pytest.raises(CltraceError, match=rf"training {cfg.n_features} features per layer .* needs at least .* GB.*lower n_features"):
        tiny_train(tmp_path, tmp_path / "run", cfg)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(run_dir_module, "available_memory_bytes", lambda: need)
    tiny_train(tmp_path, tmp_path / "run", cfg)
    assert (tmp_path / "run" / "transcoder").is_dir()
