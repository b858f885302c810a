"""`--device` through every command that runs a model or a transcoder: each works with `--device cpu` on
a tiny model, and each refuses a GPU this machine lacks (or a device name that means nothing) in one
line, before it loads anything. Together with tests/test_cli_flags.py, which checks that every such
command has the option, the device plumbing cannot rot unseen on a machine without a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_one_line_error, run_cli
from helpers.train import tiny_model_dir, word_docs

from cltrace.data.harvest import FIRST_POSITION
from cltrace.transcoder import Transcoder, TranscoderConfig, save_transcoder


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A tiny llama (word-level tokenizer) as a model folder, a random CLT for it, and documents of its words."""
    root = tmp_path_factory.mktemp("device")
    model = tiny_model_dir(root / "model")
    tc = Transcoder.random(TranscoderConfig("clt", 3, 32, 8, activation="relu"), seed=0)
    save_transcoder(tc, root / "tc")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": d}) + "\n" for d in word_docs(400)))
    return {"model": str(model), "tc": str(root / "tc"), "docs": str(docs), "root": str(root)}


PROMPT = "t5 t17 t9 t33 t5 t17"


def command_lines(f: dict[str, str], out: Path) -> dict[str, list[str]]:
    """Every command that loads a model or a transcoder to compute with it, on the tiny model (no --device)."""
    m, t, s = ("-m", f["model"]), ("-t", f["tc"]), ("-s", f["docs"])
    n_ctx = ("--n-ctx", str(16 + FIRST_POSITION))
    return {
        "info": ["info", f["model"]],
        "predict": ["predict", PROMPT, *m, *t],
        "eval": ["eval", *t, *m, *s, "-n", "32", *n_ctx],
        "harvest": ["harvest", *m, *s, "-o", str(out / "store"), "-n", "64", *n_ctx, "-q", "--mix-contexts", "1"],
        "train": ["train", "-p", "tiny", *m, *s, "-o", str(out / "run"), "-q", "--set", "n_features=16",
                  "--set", "total_tokens=512", "--set", "eval_tokens=32", "--set", f"n_ctx={16 + FIRST_POSITION}",
                  "--set", "heldout_fraction=0.1", "--set", "mix_contexts=1"],
        "attribute": ["attribute", PROMPT, *t, *m, "-o", str(out / "g.cltg")],
        "trace": ["trace", PROMPT, *t, *m, "--features", "none", "-o", str(out / "trace"), "-q"],
        "intervene": ["intervene", PROMPT, *t, *m, "--set", "1:3=0"],
        "qk": ["qk", PROMPT, "-l", "1", "--head", "0", *t, *m, "-o", str(out / "qk.json")],
        "features build": ["features", "build", *t, *m, *s, "-n", "64", "-o", str(out / "f.db"), *n_ctx, "-b", "2",
                           "--top-k", "3", "-q"],
        "features global-weights": ["features", "global-weights", *t, "--db", str(out / "f.db"), *m, *s, "-n", "32",
                                    *n_ctx, "-b", "2"],
        "serve": ["serve", str(out), *m, *t],
    }


#: What each command's output shows when it worked.
WORKED = {
    "info": "device      cpu", "predict": "replacement model:", "eval": "NMSE mean", "harvest": "tokens of 3 layers",
    "train": "in float32 on cpu", "attribute": "replacement score", "trace": "replacement score",
    "intervene": "logit change:", "qk": "layer 1 head 0", "features build": "features (", "features global-weights":
    "global weights to", "serve": "serving",
}


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without CUDA, also where the tests run on one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """`cltrace serve` records what it would serve instead of serving it (and finds the front end built)."""
    pytest.importorskip("fastapi")
    import cltrace.serve.app as serve_app

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(serve_app, "serve", lambda root, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(serve_app, "assets_built", lambda: True)
    return calls


@pytest.mark.parametrize("name", list(WORKED))
@pytest.mark.parametrize(("device", "needles"), [
    ("cuda", ("device 'cuda' is not available: this torch sees no CUDA GPU", "use --device cpu or auto")),
    ("cuda:1", ("device 'cuda:1' is not available",)),
    ("bogus", ("unknown device 'bogus': choose one of auto, cpu, cuda, cuda:N, mps",)),
])
def test_a_missing_or_unknown_device_is_one_line_before_any_work(
    name: str, device: str, needles: tuple[str, ...], files: dict[str, str], tmp_path: Path, no_cuda: None,
    served: list[dict[str, object]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import cltrace.model
    import cltrace.transcoder

    def started(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the command loaded a model or transcoder before checking --device")

    monkeypatch.setattr(cltrace.model, "load_model", started)
    monkeypatch.setattr(cltrace.transcoder, "load_transcoder", started)
    code, out, err = run_cli(*command_lines(files, tmp_path)[name], "--device", device, capsys=capsys)
    assert_one_line_error(code, err, *needles)
    assert not served and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.mark.slow
def test_every_model_command_runs_with_device_cpu(files: dict[str, str], tmp_path: Path, no_cuda: None,
                                                  served: list[dict[str, object]],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    for name, args in command_lines(files, tmp_path).items():  # in order: global-weights reads the feature store
        for device in ("cpu", "auto"):
            if device == "auto" and name not in ("predict", "serve"):
                continue  # auto is the default every other test of these commands runs with
            code, out, err = run_cli(*args, "--device", device, capsys=capsys)
            assert code == 0, (name, device, err[-2000:])
            assert WORKED[name] in out, (name, out)
    assert [call["device"] for call in served] == [torch.device("cpu")] * 2
    store = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert store["settings"]["harvest_dtype"] == "float32"  # --compute-dtype auto on the CPU
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == "float32"  # the tiny preset's


@pytest.mark.slow
def test_dtype_reaches_training_and_feature_pages(files: dict[str, str], tmp_path: Path, no_cuda: None,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`train --dtype` sets the config's dtype and harvest_dtype; `features build --dtype` the model's autocast
    (and the old `--bf16` still works, with a deprecation line)."""
    import cltrace.features

    lines = command_lines(files, tmp_path)
    code, out, err = run_cli(*lines["train"], "--dtype", "bfloat16", "--device", "cpu", capsys=capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (cfg["dtype"], cfg["harvest_dtype"]) == ("bfloat16", "bfloat16") and "in bfloat16 on cpu" in out
    asked: list[object] = []
    real = cltrace.features.build_feature_store

    def build(*args: object, **kwargs: object) -> object:
        asked.append(kwargs["autocast_bf16"])
        return real(*args, **kwargs)

    monkeypatch.setattr(cltrace.features, "build_feature_store", build)
    for flags, bf16 in ((("--dtype", "auto"), False), (("--dtype", "bfloat16"), True), (("--bf16",), True)):
        code, _, err = run_cli(*lines["features build"], *flags, "--overwrite", capsys=capsys)
        assert code == 0, err
        assert asked[-1] is bf16 and (("--bf16 is deprecated" in err) == (flags == ("--bf16",)))
    code, _, err = run_cli(*lines["features build"], "--bf16", "--dtype", "float32", capsys=capsys)
    assert_one_line_error(code, err, "both --dtype bfloat16 and --bf16 given")


def test_the_server_loads_its_model_and_transcoder_on_its_device(files: dict[str, str]) -> None:
    pytest.importorskip("fastapi")
    from cltrace.serve.jobs import Models

    replacement = Models(files["model"], files["tc"], device="cpu").replacement({})
    assert replacement.model.device == torch.device("cpu") and replacement.transcoder.W_enc.device.type == "cpu"
