"""Text sources, the spec parser, token packing, the held-out split and exact resume."""

from __future__ import annotations

import gzip
import json
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from cltrace.data import default_corpus as dc
from cltrace.data.default_corpus import COMPONENTS, DefaultCorpusSource
from cltrace.data.packing import (
    PackConfig,
    PackPosition,
    is_heldout,
    pack_batches,
    split_documents,
)
from cltrace.data.sources import (
    FileSource,
    HFDatasetSource,
    open_text_source,
    parse_hf_spec,
)
from cltrace.errors import CltraceError


def char_tok(text: str) -> list[int]:
    """A tiny fake tokenizer: one id per character (ids 10+)."""
    return [10 + (ord(c) % 200) for c in text]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- sources


def test_txt_one_document_per_file_and_per_paragraph(tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text("First para\nline two.\n\n\nSecond para.\n   \nThird.\n", encoding="utf-8")
    assert list(FileSource(f)) == [f.read_text(encoding="utf-8")]
    assert list(FileSource(f, txt_split="paragraph")) == [
        "First para\nline two.",
        "Second para.",
        "Third.",
    ]


def test_jsonl_default_and_custom_column(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "alpha", "body": "x"}, {"text": "beta"}])
    assert list(FileSource(f)) == ["alpha", "beta"]
    g = tmp_path / "e.jsonl"
    g.write_text('{"body": "one"}\n\n{"body": "two"}\n', encoding="utf-8")
    assert list(open_text_source(str(g), text_column="body")) == ["one", "two"]


def test_parquet_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    f = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["p one", None, "p two"], "n": [1, 2, 3]}), f)
    assert list(FileSource(f)) == ["p one", "p two"]
    with pytest.raises(CltraceError, match=r"no column 'content'.*text, n"):
        list(FileSource(f, text_column="content"))


def test_folder_reads_supported_files_recursively_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two", encoding="utf-8")
    (tmp_path / "1.txt").write_text("one", encoding="utf-8")
    write_jsonl(tmp_path / "b" / "3.jsonl", [{"text": "three"}])
    (tmp_path / "notes.csv").write_text("ignored,in,a,folder", encoding="utf-8")
    src = open_text_source(str(tmp_path))
    assert list(src) == ["one", "two", "three"]
    assert list(src) == ["one", "two", "three"]  # re-iterable, same order every pass


def test_spec_parser() -> None:
    assert parse_hf_spec("hf:org/name") == ("org/name", None, "train")
    assert parse_hf_spec("hf:wikitext:wikitext-103-raw-v1") == (
        "wikitext",
        "wikitext-103-raw-v1",
        "train",
    )
    assert parse_hf_spec("hf:a/b:cfg:validation") == ("a/b", "cfg", "validation")
    assert parse_hf_spec("hf:a/b::test") == ("a/b", None, "test")
    src = open_text_source("hf:a/b::test", text_column="body")
    assert isinstance(src, HFDatasetSource)
    assert (src.name, src.config, src.split, src.text_column) == ("a/b", None, "test", "body")
    assert isinstance(open_text_source("default"), DefaultCorpusSource)
    for bad in ("hf:", "hf::cfg", "hf:a:b:c:d"):
        with pytest.raises(CltraceError, match="hf:NAME"):
            open_text_source(bad)
    with pytest.raises(CltraceError, match="text source is empty"):
        open_text_source("  ")


def test_hf_source_streams_with_fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name, config, split, streaming):  # the datasets API this source uses
        calls.append((name, config, split, streaming))
        return iter([{"text": "hello", "id": 1}, {"text": "world", "id": 2}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(open_text_source("hf:org/ds:cfg:validation")) == ["hello", "world"]
    assert calls == [("org/ds", "cfg", "validation", True)]
    with pytest.raises(CltraceError, match=r"no column 'body'.*text, id"):
        list(open_text_source("hf:org/ds", text_column="body"))


def test_hf_source_without_datasets_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    src = open_text_source("hf:org/ds")  # creating it needs nothing
    with pytest.raises(CltraceError, match="pip install"):
        next(iter(src))


def test_hf_source_on_a_local_dataset_folder(tmp_path: Path) -> None:
    pytest.importorskip("datasets")
    write_jsonl(tmp_path / "train.jsonl", [{"text": "local one"}, {"text": "local two"}])
    assert list(HFDatasetSource(str(tmp_path))) == ["local one", "local two"]


# ---------------------------------------------------------------- source errors


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CltraceError, match=r"no such file or folder: .*nope.*'default'"):
        open_text_source(str(tmp_path / "nope"))


def test_unsupported_file_type(tmp_path: Path) -> None:
    f = tmp_path / "data.csv"
    f.write_text("a,b", encoding="utf-8")
    with pytest.raises(
        CltraceError, match=r"unsupported file type '.csv'.*\.txt, \.jsonl, \.parquet"
    ):
        open_text_source(str(f))


def test_folder_without_text_files(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a", encoding="utf-8")
    with pytest.raises(CltraceError, match="has no .txt, .jsonl or .parquet files"):
        list(open_text_source(str(tmp_path)))


def test_empty_source(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("", encoding="utf-8")
    (tmp_path / "b.txt").write_text("  \n\n ", encoding="utf-8")
    write_jsonl(tmp_path / "c.jsonl", [{"text": ""}])
    with pytest.raises(CltraceError, match="holds no text"):
        list(open_text_source(str(tmp_path)))


def test_unknown_jsonl_column_names_existing_columns(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "d.jsonl", [{"content": "x", "meta": 1}])
    with pytest.raises(
        CltraceError, match=r"d.jsonl:1 has no column 'text'; columns there: content, meta"
    ):
        list(open_text_source(str(f)))


def test_bad_jsonl_lines(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(CltraceError, match=r"bad.jsonl:2 is not valid JSON"):
        list(open_text_source(str(f)))
    f.write_text('["a list"]\n', encoding="utf-8")
    with pytest.raises(CltraceError, match="not an object"):
        list(open_text_source(str(f)))
    f.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(CltraceError, match="not a string"):
        list(open_text_source(str(f)))


# ---------------------------------------------------------------- packing


def naive_pack(docs: list[str], cfg: PackConfig) -> list[list[int]]:
    """Concatenate-and-split, written as plainly as possible, for checking the packer."""
    stream: list[int] = []
    for d in docs:
        toks = char_tok(d)
        if toks:
            stream += toks + ([cfg.sep_id] if cfg.sep_id is not None else [])
    body = cfg.n_ctx - 1
    return [[cfg.bos_id] + stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]


DOCS = [f"document {i}: " + "word " * (i % 7) + "end." for i in range(40)]


@pytest.mark.parametrize("sep_id", [2, None])
@pytest.mark.parametrize("n_ctx", [2, 7, 33])
def test_packing_matches_naive_concatenate_and_split(sep_id: int | None, n_ctx: int) -> None:
    cfg = PackConfig(n_ctx=n_ctx, batch_size=3, bos_id=1, sep_id=sep_id, heldout_fraction=0.0)
    batches = [b.tokens for b in pack_batches(DOCS, char_tok, cfg)]
    assert all(b.dtype == torch.long and b.shape == (3, n_ctx) for b in batches)
    expected = naive_pack(DOCS, cfg)
    expected = expected[: len(expected) // 3 * 3]  # drop_last
    assert torch.cat(batches).tolist() == expected
    assert all(row[0] == 1 for row in expected)


def test_packing_heldout_split_and_last_partial_batch() -> None:
    for split in ("train", "heldout"):
        cfg = PackConfig(
            n_ctx=9,
            batch_size=4,
            bos_id=0,
            sep_id=5,
            split=split,
            heldout_fraction=0.3,
            drop_last=False,
        )
        batches = [b.tokens for b in pack_batches(DOCS, char_tok, cfg)]
        docs = list(split_documents(DOCS, split, 0.3))
        assert torch.cat(batches).tolist() == naive_pack(docs, cfg)
        assert all(b.shape[0] == 4 for b in batches[:-1]) and 1 <= batches[-1].shape[0] <= 4


def test_heldout_and_train_never_share_a_document() -> None:
    docs = [f"doc {i} " + "x" * (i % 13) for i in range(3000)]
    train = set(split_documents(docs, "train", 0.1, seed=7))
    held = set(split_documents(docs, "heldout", 0.1, seed=7))
    assert not train & held and train | held == set(docs)
    assert 0.07 < len(held) / len(docs) < 0.13
    # stable: depends on the text only, not on position or order
    assert set(split_documents(list(reversed(docs)), "heldout", 0.1, seed=7)) == held
    assert set(split_documents(docs, "heldout", 0.1, seed=8)) != held

    # through the packer: token ids name the document they came from
    ids = {d: i for i, d in enumerate(docs[:400])}

    def doc_tok(text: str) -> list[int]:
        return [100 + ids[text]] * 5

    seen = {}
    for split in ("train", "heldout"):
        cfg = PackConfig(n_ctx=8, batch_size=2, bos_id=0, split=split, heldout_fraction=0.2)
        toks = torch.cat([b.tokens[:, 1:] for b in pack_batches(docs[:400], doc_tok, cfg)])
        seen[split] = set(toks.flatten().tolist())
    assert seen["train"] and seen["heldout"] and not seen["train"] & seen["heldout"]
    assert seen["heldout"] <= {100 + ids[d] for d in docs[:400] if is_heldout(d, 0.2)}
    assert seen["train"] <= {100 + ids[d] for d in docs[:400] if not is_heldout(d, 0.2)}


def assert_resumes_from_every_batch(full: list, cfg: PackConfig) -> None:
    """Resuming from the position after any batch of `full` gives exactly the batches after it."""
    for k in range(len(full)):
        saved = json.loads(json.dumps(full[k].position.to_dict()))  # as a checkpoint stores it
        rest = list(pack_batches(DOCS, char_tok, cfg, start=PackPosition.from_dict(saved)))
        assert len(rest) == len(full) - k - 1
        for a, b in zip(rest, full[k + 1 :]):
            assert torch.equal(a.tokens, b.tokens) and a.position == b.position


@pytest.mark.parametrize("sep_id", [3, None])
def test_resume_yields_exactly_the_remaining_batches(sep_id: int | None) -> None:
    cfg = PackConfig(n_ctx=6, batch_size=2, bos_id=1, sep_id=sep_id, heldout_fraction=0.25)
    full = list(pack_batches(DOCS, char_tok, cfg))
    assert len(full) > 10
    # positions land both inside documents and exactly on document ends
    assert any(b.position.token_offset > 0 for b in full)
    assert any(b.position.token_offset == 0 for b in full)
    assert_resumes_from_every_batch(full, cfg)
    assert full[-1].position.contexts == 2 * len(full)


def test_resume_with_another_batch_size_continues_the_same_contexts() -> None:
    cfg = PackConfig(n_ctx=5, batch_size=3, bos_id=1, sep_id=2, heldout_fraction=0.0)
    flat = torch.cat([b.tokens for b in pack_batches(DOCS, char_tok, cfg)])
    pos = next(iter(pack_batches(DOCS, char_tok, cfg))).position
    cfg2 = PackConfig(n_ctx=5, batch_size=2, bos_id=1, sep_id=2, heldout_fraction=0.0)
    rest = torch.cat([b.tokens for b in pack_batches(DOCS, char_tok, cfg2, start=pos)])
    assert torch.equal(rest, flat[3 : 3 + len(rest)])


def test_resume_with_another_stream_is_refused() -> None:
    cfg = PackConfig(n_ctx=5, batch_size=2, bos_id=1, heldout_fraction=0.0)
    pos = next(iter(pack_batches(DOCS, char_tok, cfg))).position
    other = PackConfig(n_ctx=6, batch_size=2, bos_id=1, heldout_fraction=0.0)
    with pytest.raises(CltraceError, match="another stream"):
        next(iter(pack_batches(DOCS, char_tok, other, start=pos)))
    with pytest.raises(CltraceError, match="bad saved data position"):
        PackPosition.from_dict({"doc_index": "x"})


@pytest.mark.parametrize("drop_last", [True, False])
def test_mixing_yields_each_pool_of_contexts_once_in_a_new_order(drop_last: bool) -> None:
    plain = PackConfig(n_ctx=6, batch_size=1, bos_id=1, sep_id=2, heldout_fraction=0.0, drop_last=False)
    contexts = torch.cat([b.tokens for b in pack_batches(DOCS, char_tok, plain)])  # [n, n_ctx], stream order
    mixed = PackConfig(n_ctx=6, batch_size=3, bos_id=1, sep_id=2, heldout_fraction=0.0, mix_contexts=12,
                       drop_last=drop_last)
    batches = [b.tokens for b in pack_batches(DOCS, char_tok, mixed)]
    assert len(contexts) % 12 and len(contexts) % 3  # a short last pool and a short last batch
    got = torch.cat(batches)
    assert len(got) == (len(contexts) // 3 * 3 if drop_last else len(contexts))
    for p in range(0, len(got), 12):  # every pool holds the contexts of that stretch of the stream
        pool, stretch = sorted(got[p : p + 12].tolist()), contexts[p : p + 12].tolist()
        if len(stretch) == 12 or not drop_last:
            assert pool == sorted(stretch)
        else:  # the short last pool without its short last batch
            assert len(pool) == len(stretch) // 3 * 3 and all(pool.count(r) <= stretch.count(r) for r in pool)
    assert not torch.equal(got[:12], contexts[:12])  # and not in stream order
    assert all(b.shape[0] == 3 for b in batches[:-1])


def test_mixed_stream_resumes_exactly_from_every_batch() -> None:
    cfg = PackConfig(n_ctx=5, batch_size=2, bos_id=1, sep_id=3, heldout_fraction=0.25, mix_contexts=8)
    full = list(pack_batches(DOCS, char_tok, cfg))
    assert len(full) > 12 and any(b.position.pool_offset > 0 for b in full)
    assert_resumes_from_every_batch(full, cfg)
    # a position of the unmixed stream is refused by the mixed one, and the other way round
    plain = PackConfig(n_ctx=5, batch_size=2, bos_id=1, sep_id=3, heldout_fraction=0.25)
    with pytest.raises(CltraceError, match="another stream"):
        next(iter(pack_batches(DOCS, char_tok, plain, start=full[0].position)))
    with pytest.raises(CltraceError, match="another stream"):
        next(iter(pack_batches(DOCS, char_tok, cfg, start=next(iter(pack_batches(DOCS, char_tok, plain))).position)))


def test_bad_pack_configs() -> None:
    with pytest.raises(CltraceError, match="n_ctx must be at least 2"):
        PackConfig(n_ctx=1, batch_size=1, bos_id=0)
    with pytest.raises(CltraceError, match="batch_size"):
        PackConfig(n_ctx=4, batch_size=0, bos_id=0)
    with pytest.raises(CltraceError, match="mix_contexts must be 1 or a multiple of batch_size=4"):
        PackConfig(n_ctx=4, batch_size=4, bos_id=0, mix_contexts=6)
    with pytest.raises(CltraceError, match=r"heldout_fraction must be in \[0, 1\)"):
        PackConfig(n_ctx=4, batch_size=1, bos_id=0, heldout_fraction=1.0)
    with pytest.raises(CltraceError, match="holds no documents"):
        PackConfig(n_ctx=4, batch_size=1, bos_id=0, split="heldout", heldout_fraction=0.0)


def test_too_little_text_for_one_batch() -> None:
    cfg = PackConfig(n_ctx=1000, batch_size=1, bos_id=0, heldout_fraction=0.0)
    with pytest.raises(CltraceError, match="fewer than 999 tokens"):
        list(pack_batches(["short"], char_tok, cfg))
    cfg = PackConfig(n_ctx=3, batch_size=100, bos_id=0, heldout_fraction=0.0)
    with pytest.raises(CltraceError, match="fewer than batch_size=100"):
        list(pack_batches(["short text"], char_tok, cfg))
    mixed = PackConfig(n_ctx=3, batch_size=100, bos_id=0, heldout_fraction=0.0, mix_contexts=200)
    with pytest.raises(CltraceError, match="fewer than batch_size=100"):
        list(pack_batches(["short text"], char_tok, mixed))


# ---------------------------------------------------------------- default corpus


def make_fake_root(root: Path) -> None:
    """A miniature install tree with three of the components."""
    afaq = root / "usr/share/doc/anarchism/markdown"
    afaq.mkdir(parents=True)
    for i in range(3):
        with gzip.open(afaq / f"sec{i}.md.gz", "wt", encoding="utf-8") as fh:
            fh.write(f"# Section {i}\n\n" + "The question of freedom is old. " * 20)
    git = root / "usr/share/doc/git-doc"
    git.mkdir(parents=True)
    (git / "git-add.txt").write_text("git-add(1)\n=========\n\n" + "Add file contents. " * 20)
    (git / "tiny.txt").write_text("too short to be prose")
    pg = root / "usr/share/doc/postgresql-doc-15/html"
    pg.mkdir(parents=True)
    (pg / "intro.html").write_text(
        "<html><head><title>T</title><script>var x=1;</script></head><body>"
        '<div class="navheader">Prev Up Next</div><div class="sect1"><h2>Intro</h2>'
        "<p>PostgreSQL is a database &amp; more. " + "It stores rows. " * 20 + "</p></div>"
        '<div class="navfooter">Home</div></body></html>'
    )


def test_default_corpus_reads_a_fake_install_tree(tmp_path: Path) -> None:
    make_fake_root(tmp_path)
    names = ["afaq", "git-doc", "postgresql-doc"]
    src = DefaultCorpusSource(roots=[tmp_path], components=names)
    docs = list(src)
    assert len(docs) == 5  # 3 sections + git-add + intro; tiny.txt is below MIN_DOC_CHARS
    assert docs == list(src)  # fixed order
    html = next(d for d in docs if "PostgreSQL" in d)
    assert "database & more" in html and "var x" not in html and "Prev Up" not in html
    git = next(d for d in docs if "git-add" in d)
    assert "=====" not in git
    # the interleaving does not depend on which other components are installed
    only_afaq = [d for d in docs if d.startswith("# Section")]
    assert list(DefaultCorpusSource(roots=[tmp_path], components=["afaq"])) == only_afaq


def test_default_corpus_missing_components(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dc, "_python_package_dir", lambda module: None)
    with pytest.raises(
        CltraceError, match=r"default corpus not installed.*python -m cltrace.data.install_corpus"
    ):
        next(iter(DefaultCorpusSource(roots=[tmp_path])))
    make_fake_root(tmp_path)
    with pytest.warns(UserWarning, match="left out: .*linux-doc.*python -m cltrace"):
        assert len(list(DefaultCorpusSource(roots=[tmp_path]))) == 5
    with pytest.raises(CltraceError, match="missing: .*python-doc"):
        next(iter(DefaultCorpusSource(roots=[tmp_path], require_all=True)))
    with pytest.raises(CltraceError, match="unknown default-corpus component"):
        DefaultCorpusSource(components=["nope"])


def test_default_corpus_roots_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_fake_root(tmp_path)
    monkeypatch.setenv(dc.ROOT_ENV, str(tmp_path))
    src = open_text_source("default")
    assert isinstance(src, DefaultCorpusSource)
    assert src.installed()["afaq"] == tmp_path / "usr/share/doc/anarchism/markdown"


def test_installed_default_corpus_yields_english() -> None:
    src = DefaultCorpusSource()
    if not any(src.installed().values()):
        pytest.skip("default corpus not installed: " + dc.install_instructions(list(COMPONENTS)))
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # components not installed only warn
        for doc in src:
            docs.append(doc)
            if len(docs) == 20:
                break
    assert len(docs) == 20
    text = " ".join(docs).lower()
    words = text.split()
    common = sum(w in {"the", "of", "and", "to", "a", "in", "is"} for w in words)
    assert common / len(words) > 0.05, "default corpus does not look like English prose"


def test_installer_needs_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dc.shutil, "which", lambda tool: None)
    with pytest.raises(CltraceError, match="needs 'apt-get'.*CLTRACE_CORPUS_ROOT"):
        dc.install_default_corpus(tmp_path)
