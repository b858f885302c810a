"""The on-disk activation store: round trip, training from it, killed harvests, damage, wrong model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli import assert_one_line_error, run_cli
from helpers.models import tiny_model
from helpers.store import N_CTX, POS, harvest, tok
from helpers.train import resume_config, tiny_model_dir, word_docs, write_text
from safetensors.torch import load_file

from cltrace.data.harvest import FIRST_POSITION, Harvester
from cltrace.data.packing import PackConfig, pack_batches
from cltrace.data.sources import FileSource
from cltrace.data.store import ActivationStore, file_sha256
from cltrace.errors import CltraceError
from cltrace.train import Trainer, train_transcoder
from cltrace.train.data import HarvestSource, StoreSource
from cltrace.transcoder import load_transcoder

TESTS = Path(__file__).parent


def stream_contexts(tmp_path: Path, n: int) -> torch.Tensor:
    """The first n training contexts [n, N_CTX] of the test text, packed as training packs them."""
    pack = PackConfig(n_ctx=N_CTX, batch_size=n, bos_id=0, heldout_fraction=0.1)
    return next(pack_batches(FileSource(tmp_path / "docs.txt", txt_split="paragraph"), tok, pack)).tokens


# -- round trip --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_store_round_trip_equals_streaming_harvest(tmp_path: Path, dtype: str) -> None:
    store = harvest(tmp_path, tmp_path / "store", tokens=POS * 10 - 5, dtype=dtype)  # 10 contexts: shards of 3, 3, 3, 1
    assert store.complete and store.contexts == 10 and store.tokens == POS * 10
    assert [s["contexts"] for s in store.shards] == [3, 3, 3, 1]
    x_ref, y_ref = Harvester(tiny_model("llama"), max_batch=1).harvest(stream_contexts(tmp_path, 10))  # fp32
    want = getattr(torch, dtype)
    x, y = store.read_contexts(0, 10)
    assert x.dtype == y.dtype == want
    assert torch.equal(x, x_ref.to(want)) and torch.equal(y, y_ref.to(want))
    for entry in store.shards:  # the manifest's sizes and hashes are the files'
        path = tmp_path / "store" / entry["file"]
        assert entry["bytes"] == path.stat().st_size and entry["sha256"] == file_sha256(path)
    stats = store.manifest["stats"]
    norms_x = x.float().norm(dim=-1).double().mean(0)  # [layer]
    norms_y = y.float().norm(dim=-1).double().mean(0)
    torch.testing.assert_close(torch.tensor(stats["x_mean_norm"], dtype=torch.float64), norms_x, rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(stats["y_mean_norm"], dtype=torch.float64), norms_y, rtol=1e-5, atol=0)
    sx, _ = store.scales()
    torch.testing.assert_close(sx, (32**0.5 / norms_x).float())
    # bytes per token: two [layers, d_model] half-precision vectors, plus small headers
    per_token = store.disk_bytes() / store.tokens
    assert 2 * 3 * 32 * 2 <= per_token < 2 * 3 * 32 * 2 * 1.1


def test_store_source_loops_over_the_store_cyclically(tmp_path: Path) -> None:
    store = harvest(tmp_path, tmp_path / "store", tokens=POS * 8)  # 8 contexts
    all_x, all_y = store.read_contexts(0, 8)
    src = StoreSource(store, buffer_contexts=3)
    got = []
    for i, (x, y, pos) in enumerate(src.buffers(None)):
        got.append((x, y, pos))
        if i == 4:
            break
    for i, (x, y, pos) in enumerate(got):  # buffer i holds contexts 3i .. 3i+2, modulo 8
        idx = torch.cat([torch.arange(POS) + POS * (c % 8) for c in range(3 * i, 3 * i + 3)])
        assert torch.equal(x, all_x[idx]) and torch.equal(y, all_y[idx]), i
        assert pos["context"] == 3 * (i + 1)
    # resuming from buffer 2's position gives buffers 3 and 4 again
    resumed = src.buffers(got[2][2])
    for i in (3, 4):
        x, _, pos = next(resumed)
        assert torch.equal(x, got[i][0]) and pos == got[i][2]
    # a position saved on another store is refused
    other = harvest(tmp_path, tmp_path / "other", tokens=POS * 8)
    with pytest.raises(CltraceError, match="changed since this run's checkpoint"):
        next(StoreSource(other, 3).buffers(got[2][2]))
    with pytest.raises(CltraceError, match="fewer than one shuffle buffer"):
        StoreSource(store, 9)


# -- training ----------------------------------------------------------------------------------------


class RoundedStream(HarvestSource):
    """The streaming source with its activations rounded to bf16, as the store keeps them."""

    def buffers(self, start: dict[str, Any] | None) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        for x, y, pos in super().buffers(start):
            yield x.to(torch.bfloat16), y.to(torch.bfloat16), pos


@pytest.mark.slow
@pytest.mark.parametrize("mix", [1, 8])
def test_training_from_store_equals_training_from_stream(tmp_path: Path, mix: int) -> None:
    """A store harvested with the run's mixing (none, or pools of two buffers) trains exactly as the stream."""
    cfg = resume_config().with_overrides({"harvest_batch": 1, "eval_tokens": 0, "total_tokens": 16 * 16,
                                          "mix_contexts": mix})
    steps_per_buffer = cfg.shuffle_contexts * POS // cfg.batch_tokens
    need = -(-cfg.total_steps // steps_per_buffer) * cfg.shuffle_contexts  # contexts of the run: one epoch
    harvest(tmp_path, tmp_path / "store", tokens=need * POS, mix_contexts=mix)
    model = tiny_model("llama")
    stream = RoundedStream(model, FileSource(tmp_path / "docs.txt", txt_split="paragraph"), tok, cfg.n_ctx,
                           cfg.shuffle_contexts, cfg.harvest_batch, cfg.heldout_fraction, bos_id=0, mix_contexts=mix)
    Trainer(cfg, stream, tmp_path / "from-stream", progress=False).run()
    store_cfg = cfg.with_overrides({"store": str(tmp_path / "store"), "source": "text"})
    train_transcoder(store_cfg, tmp_path / "from-store", model=model, tokenize=tok, progress=False, bos_id=0,
                     source=FileSource(tmp_path / "docs.txt", txt_split="paragraph"))
    a = load_transcoder(tmp_path / "from-stream" / "transcoder")
    b = load_transcoder(tmp_path / "from-store" / "transcoder")
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert (ta - tb).abs().max() <= 1e-6, name
    assert a.W_enc.abs().sum() > 0
    # stopped midway and resumed from its checkpoint (position in the store included): the same weights
    stopped = store_cfg.with_overrides({"checkpoint_every": 5})
    Trainer(stopped, StoreSource(str(tmp_path / "store"), cfg.shuffle_contexts), tmp_path / "resumed", progress=False,
            stop_after=7).run()  # the checkpoint of step 5 is mid-buffer (3 steps a buffer)
    Trainer(stopped, StoreSource(str(tmp_path / "store"), cfg.shuffle_contexts), tmp_path / "resumed", progress=False,
            resume=True).run()
    c = load_transcoder(tmp_path / "resumed" / "transcoder")
    for (name, ta), tc in zip(a.state_dict().items(), c.state_dict().values()):
        assert (ta - tc).abs().max() <= 1e-6, name
    # more steps than the store holds: it is read again from its start and the run finishes
    long_cfg = store_cfg.with_overrides({"total_tokens": 16 * 40})
    train_transcoder(long_cfg, tmp_path / "two-epochs", model=model, tokenize=tok, progress=False, bos_id=0,
                     source=FileSource(tmp_path / "docs.txt", txt_split="paragraph"))
    rows = (tmp_path / "two-epochs" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(rows[-1])["tokens"] == 16 * 40


# -- killed harvest ----------------------------------------------------------------------------------

HARVEST_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from cltrace.data.harvest import Harvester
    import torch
    from helpers import store

    torch.set_num_threads(int(sys.argv[4]))  # the parent's: float results can depend on the thread count
    orig = Harvester.harvest
    def slow(self, tokens):
        time.sleep(0.5)  # slow enough for the parent to kill us between shards, or while one is written
        return orig(self, tokens)
    Harvester.harvest = slow
    store.harvest(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
    """
)


@pytest.mark.slow
def test_killed_harvest_resumes_to_the_same_store(tmp_path: Path) -> None:
    tokens = POS * 20  # 20 contexts: 7 shards
    write_text(tmp_path / "docs.txt")
    script = tmp_path / "harvest.py"
    script.write_text(HARVEST_SCRIPT.format(tests=str(TESTS)))
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(tmp_path / "killed"), str(tokens),
                             str(torch.get_num_threads())], stderr=subprocess.PIPE)
    manifest = tmp_path / "killed" / "manifest.json"
    deadline = time.time() + 90
    while time.time() < deadline:
        if manifest.is_file() and len(json.loads(manifest.read_text())["shards"]) >= 2:
            break
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = ActivationStore(tmp_path / "killed")
    assert not partial.complete and 2 <= len(partial.shards) < 7
    for i in range(len(partial.shards)):  # everything the manifest lists reads as good
        partial.read_shard(i)
    with pytest.raises(CltraceError, match="incomplete"):
        StoreSource(partial, 1)
    # debris a kill can leave: a temporary file, and a shard renamed into place but never listed
    (tmp_path / "killed" / ".shard-00009.safetensors.abc.tmp").write_bytes(b"half")
    (tmp_path / "killed" / "shard-00042.safetensors").write_bytes(b"renamed, never listed")
    resumed = harvest(tmp_path, tmp_path / "killed", tokens)
    full = harvest(tmp_path, tmp_path / "full", tokens)
    assert resumed.complete and resumed.contexts == full.contexts == 20
    assert sorted(p.name for p in (tmp_path / "killed").iterdir()) == sorted(p.name for p in (tmp_path / "full").iterdir())
    for a, b in zip(resumed.shards, full.shards):
        ta, tb = load_file(tmp_path / "killed" / a["file"]), load_file(tmp_path / "full" / b["file"])
        assert torch.equal(ta["x"], tb["x"]) and torch.equal(ta["y"], tb["y"])
        assert a == b  # same contexts, bytes, sha256 and norm sums
    assert resumed.manifest["position"] == full.manifest["position"]
    # a larger --tokens extends the store from where it stopped, with the same contexts as a store
    # harvested to that size at once
    extended = harvest(tmp_path, tmp_path / "full", POS * 25)
    at_once = harvest(tmp_path, tmp_path / "at-once", POS * 25, shard_contexts=3)
    assert torch.equal(extended.read_contexts(0, 25)[0], at_once.read_contexts(0, 25)[0])


# -- damage and refusals -----------------------------------------------------------------------------


def test_damaged_shard_is_detected(tmp_path: Path) -> None:
    harvest(tmp_path, tmp_path / "store", tokens=POS * 6)
    shard = tmp_path / "store" / "shard-00001.safetensors"
    good = shard.read_bytes()
    flipped = bytearray(good)
    flipped[-100] ^= 0x01  # one bit of one activation: still a valid safetensors file
    shard.write_bytes(bytes(flipped))
    src = StoreSource(ActivationStore(tmp_path / "store"), 3)
    buffers = src.buffers(None)
    next(buffers)  # shard 0 is fine
    with pytest.raises(CltraceError, match=r"shard-00001.safetensors is damaged: its sha256"):
        next(buffers)
    shard.write_bytes(good[:-64])
    with pytest.raises(CltraceError, match=r"shard-00001.safetensors is damaged: .* bytes, the manifest says"):
        ActivationStore(tmp_path / "store").read_contexts(3, 3)


def test_wrong_model_or_settings_are_refused(tmp_path: Path) -> None:
    harvest(tmp_path, tmp_path / "store", tokens=POS * 8)
    before = {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()}
    cfg = resume_config().with_overrides({"store": str(tmp_path / "store"), "source": "text", "eval_tokens": 0,
                                          "total_tokens": 16 * 4})
    text = FileSource(tmp_path / "docs.txt", txt_split="paragraph")
    for model in (tiny_model("llama", seed=1), tiny_model("qwen2")):
        with pytest.raises(CltraceError, match="was harvested from another model .*tiny-llama, 3 layers"):
            train_transcoder(cfg, tmp_path / "run", model=model, tokenize=tok, source=text, progress=False, bos_id=0)
        with pytest.raises(CltraceError, match="holds activations of another model"):
            harvest(tmp_path, tmp_path / "store", tokens=16 * 12, model=model)
    with pytest.raises(CltraceError, match=r"other settings than this run's: n_ctx=9 \(store: 17\)"):
        train_transcoder(cfg.with_overrides({"n_ctx": 9}), tmp_path / "run", model=tiny_model("llama"), tokenize=tok,
                         source=text, progress=False, bos_id=0)
    with pytest.raises(CltraceError, match=r"other settings \(n_ctx=17->9"):
        harvest(tmp_path, tmp_path / "store", tokens=16 * 12, n_ctx=9)
    with pytest.raises(CltraceError, match=r"other settings \(mix_contexts=1->8"):  # extending must keep the order
        harvest(tmp_path, tmp_path / "store", tokens=16 * 12, mix_contexts=8)
    assert {p.name: p.read_bytes() for p in (tmp_path / "store").iterdir()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(CltraceError, match="holds no activation store"):
        harvest(tmp_path, tmp_path / "mine", tokens=16)
    with pytest.raises(CltraceError, match="no activation store at"):
        StoreSource(str(tmp_path / "nowhere"), 1)


def test_n_ctx_the_model_cannot_take_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """An absurd n_ctx is named as such (not blamed on disk space), and too small a one is no
    division by zero; the store folder is not created."""
    out = tmp_path / "store"
    with pytest.raises(CltraceError, match=r"n_ctx 1000000000000 is larger than the model's context of 64 tokens: "
                                           r"lower --n-ctx to 64 or less"):
        harvest(tmp_path, out, tokens=16, n_ctx=10**12)
    with pytest.raises(CltraceError, match=rf"raise --n-ctx to at least {FIRST_POSITION + 1}"):
        harvest(tmp_path, out, tokens=16, n_ctx=FIRST_POSITION)
    assert not out.exists()


# -- command line ------------------------------------------------------------------------------------


def test_cli_harvest_then_train_from_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in word_docs(80)))
    model = tiny_model_dir(tmp_path / "model")
    other = tiny_model_dir(tmp_path / "other", seed=1)
    store = tmp_path / "store"
    args = ["harvest", "-m", str(model), "-s", str(tmp_path / "docs.jsonl"), "--text-column", "body", "-o", str(store),
            "--n-ctx", str(32 + FIRST_POSITION), "--shard-contexts", "8", "--heldout-fraction", "0.2", "-q"]
    code, out, err = run_cli(*args, "--tokens", "1000", capsys=capsys)
    assert code == 0, err
    assert "1,024 tokens" in out and "4 shards" in out  # 1000 rounded up to 32 whole contexts of 32 training positions
    code, out, err = run_cli("train", "--store", str(store), "-p", "tiny", "-o", str(tmp_path / "run"), "-q",
                             "--set", "total_tokens=512", "--set", "eval_tokens=64", capsys=capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["store"], cfg["model"], cfg["n_ctx"], cfg["text_column"]) == (str(store), str(model), 32 + FIRST_POSITION, "body")
    assert "activations from the store" in out and (tmp_path / "run" / "transcoder").is_dir()
    # one line each: a store of another model, a damaged shard, a folder that is no store
    code, _, err = run_cli("train", "--store", str(store), "-m", str(other), "-p", "tiny", "-o", str(tmp_path / "r2"),
                           "-q", capsys=capsys)
    assert_one_line_error(code, err, "harvested from another model")
    code, _, err = run_cli(*args, "--tokens", "1000", "-m", str(other), capsys=capsys)
    assert_one_line_error(code, err, "holds activations of another model")
    shard = store / "shard-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, _, err = run_cli("train", "--store", str(store), "-p", "tiny", "-o", str(tmp_path / "r3"), "-q",
                           "--set", "total_tokens=2048", "--set", "eval_tokens=0", capsys=capsys)
    assert_one_line_error(code, err, "shard-00002.safetensors is damaged")
    code, _, err = run_cli("train", "--store", str(tmp_path / "model"), "-p", "tiny", "-o", str(tmp_path / "r4"),
                           capsys=capsys)
    assert_one_line_error(code, err, "holds no activation store")
