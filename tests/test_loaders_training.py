"""Property tests of the training inputs' loaders (config.json and --set overrides, text sources, checkpoints): damage refused or read as written."""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers.damage import FAST, MEDIUM, assert_refused, damaged, damaged_or_missing, deep_equal, json_values, loaded_or_refused, mutate_json, scratch_folders
from hypothesis import given
from hypothesis import strategies as st

from cltrace.data.harvest import FIRST_POSITION
from cltrace.data.sources import FileSource
from cltrace.errors import CltraceError
from cltrace.train.config import TINY_PRESET, TrainConfig, parse_override
from cltrace.train.distributed import read_checkpoint
from cltrace.transcoder import Transcoder, TranscoderConfig


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Path]:
    """A fresh folder per call, kept until the module ends (see `scratch_folders`)."""
    return scratch_folders(tmp_path_factory.mktemp("loaders"))


# -- training configs ----------------------------------------------------------------------------------


@st.composite
def train_configs(draw: st.DrawFn) -> TrainConfig:
    """A valid TrainConfig with any values its fields allow."""
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
