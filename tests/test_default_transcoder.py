"""The transcoder named `default`: trained on first use into the cache, then loaded; resumes if stopped."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli import assert_one_line_error, run_cli
from helpers.models import tiny_model
from helpers.train import write_text

from cltrace.data.sources import FileSource
from cltrace.errors import CltraceError
from cltrace.train import TrainConfig, Trainer, preset
from cltrace.train import run as run_module
from cltrace.train.default import config_hash, default_paths, open_transcoder, resolve_transcoder
from cltrace.transcoder import load_transcoder


@pytest.fixture
def tiny_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """An empty cache, the tiny preset for `default`, and a tiny model and text standing in for the defaults."""
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLTRACE_DEFAULT_PRESET", "tiny")
    monkeypatch.chdir(tmp_path)
    text = write_text(tmp_path / "docs.txt", n_docs=1500)  # enough documents for a held-out split at 1%
    return dict(model=tiny_model("llama"), source=FileSource(text, txt_split="paragraph"),
                tokenize=lambda t: [1 + (ord(c) % 90) for c in t], bos_id=0, progress=False)


TRAIN_STEP = Trainer._train_step  # unpatched, whatever a test patched in before


class Killed(BaseException):
    """Stands in for the process dying (not an Exception: nothing may catch it on the way)."""


def count_steps(monkeypatch: pytest.MonkeyPatch, fail_at: int | None = None) -> list[int]:
    """Record every training step taken (and raise Killed before step `fail_at`)."""
    steps: list[int] = []
    original = TRAIN_STEP

    def step(self: Trainer, xb: torch.Tensor, yb: torch.Tensor) -> dict[str, torch.Tensor]:
        if fail_at is not None and self.step == fail_at:
            raise Killed
        steps.append(self.step)
        return original(self, xb, yb)

    monkeypatch.setattr(Trainer, "_train_step", step)
    return steps


@pytest.mark.slow
def test_first_use_trains_and_caches_then_loads(tiny_default: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    cfg = preset("tiny")
    target, run = default_paths()
    assert target.name == run.name == f"default-{config_hash(cfg)}"
    assert target.parent == Path(tiny_default["source"].path).parent / "cache" / "transcoders"
    steps = count_steps(monkeypatch)
    path = resolve_transcoder("default", **tiny_default)
    assert path == target and steps == list(range(cfg.total_steps))
    err = capsys.readouterr().err
    assert "not in the cache yet: training it with the 'tiny' preset" in err and "estimated time: about" in err
    tc = load_transcoder(path)
    assert (tc.n_layers, tc.d_model, tc.n_features) == (3, 32, cfg.n_features)
    assert json.loads((run / "eval.json").read_text())["n_tokens"] > 0
    assert not (run / "checkpoint").exists() and not (run / "transcoder").exists()
    # second use: no training at all, the same weights
    monkeypatch.setattr(run_module, "train_transcoder", lambda *a, **k: pytest.fail("trained again"))
    again = open_transcoder("default", **tiny_default)
    for a, b in zip(tc.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert resolve_transcoder("some/dir") == Path("some/dir")
    # the command line takes the name too (convert loads no model: it shows the wiring fast)
    code, out, err = run_cli("convert", "default", str(Path("ct")), "--to", "circuit-tracer", capsys=capsys)
    assert code == 0, err
    assert "not in the cache" not in err
    converted = load_transcoder("ct")
    assert torch.equal(converted.W_enc, tc.W_enc)


@pytest.mark.slow
def test_interrupted_first_run_resumes(tiny_default: dict[str, Any], tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = preset("tiny")
    count_steps(monkeypatch, fail_at=10)  # checkpoints every 4 steps: the last one before is step 8
    with pytest.raises(Killed):
        resolve_transcoder("default", **tiny_default)
    target, run = default_paths()
    assert not target.exists()
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=False)["step"] == 8
    capsys.readouterr()
    steps = count_steps(monkeypatch)
    path = resolve_transcoder("default", **tiny_default)
    assert "resuming it" in capsys.readouterr().err
    assert steps == list(range(8, cfg.total_steps))  # resumed from its checkpoint, not restarted
    resumed = load_transcoder(path)
    # the same weights as a first use that was never interrupted
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path / "cache2"))
    uninterrupted = load_transcoder(resolve_transcoder("default", **tiny_default))
    for (name, a), b in zip(resumed.state_dict().items(), uninterrupted.state_dict().values()):
        assert (a - b).abs().max() <= 1e-6, name


def test_config_hash_names_the_settings_not_the_field_list() -> None:
    """A field added with a default that keeps the old behaviour must not retrain the cached default;
    changing any setting must."""
    cfg = preset("default")
    grown = dataclasses.make_dataclass("Grown", [("new_setting", int, dataclasses.field(default=3))], bases=(TrainConfig,))
    assert config_hash(grown(**cfg.to_dict())) == config_hash(cfg)
    assert config_hash(grown(**cfg.to_dict(), new_setting=4)) != config_hash(cfg)
    for name, value in (("n_features", cfg.n_features * 2), ("lr", cfg.lr / 2), ("seed", cfg.seed + 1)):
        assert config_hash(dataclasses.replace(cfg, **{name: value})) != config_hash(cfg), name
    assert config_hash(preset("tiny")) != config_hash(cfg)


def test_bad_default_preset_is_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CLTRACE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CLTRACE_DEFAULT_PRESET", "huge")
    with pytest.raises(CltraceError, match="CLTRACE_DEFAULT_PRESET='huge' is not a preset"):
        resolve_transcoder("default")
    code, _, err = run_cli("convert", "default", str(tmp_path / "out"), capsys=capsys)
    assert_one_line_error(code, err, "CLTRACE_DEFAULT_PRESET")
    assert not (tmp_path / "cache").exists()


def test_a_second_process_waits_for_the_default_transcoder_being_trained(
    tiny_default: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one process trains the default transcoder, another asking for it waits, says so, and
    then uses the finished one instead of training it a second time."""
    import threading
    import time

    from cltrace.locks import acquire, release
    from cltrace.train.default import default_transcoder_path

    target, run = default_paths()
    run.parent.mkdir(parents=True)
    first = acquire(run.parent / f"{run.name}.lock", "the first process")
    steps = count_steps(monkeypatch)

    def finish_first() -> None:
        time.sleep(1.0)
        target.mkdir(parents=True)  # the first process's transcoder arrives
        release(first)

    threading.Thread(target=finish_first).start()
    said: list[str] = []
    t0 = time.perf_counter()
    assert default_transcoder_path(echo=said.append, **tiny_default) == target
    assert time.perf_counter() - t0 >= 0.9 and steps == []
    assert len(said) == 1 and "another process is training the default transcoder" in said[0] and "waiting" in said[0]
